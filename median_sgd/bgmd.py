"""Block geometric median descent (BGmD): ``u = scatter_I(Gm((G + 1 m^T)[:, I]))``, ``m <- rule((G + 1 m^T)[:, J])``.

Acharya et al. (AISTATS 2022), Algorithms 1 and 2; derived in the chapters "Block geometric
median descent" and "What BGmD's memory remembers". Each step takes the ``(n, d)`` matrix ``G`` of
(step-size-scaled) gradients, one row per sample or client, and

1. adds the memory ``m`` to every row: ``A = G + 1 m^T`` (memory augmentation);
2. selects a block ``I`` of ``k`` columns of ``A`` (:func:`select_block`; ``J`` is the rest);
3. returns the update ``u`` with ``u_I = Gm(A[:, I])`` (the geometric median in ``R^k``) and
   ``u_J = 0``;
4. stores the residual ``A[:, J]`` in the memory: ``m_I = 0`` and ``m_J = rule(A[:, J])``, where
   the rule is the paper's mean over *all* rows (``"mean"``), a coordinate-wise median
   (``"median"``) or a geometric median (``"gm"``) of the residual rows, or no memory at all
   (``None``).

Because the geometric median is translation equivariant, ``Gm(A[:, I]) = m_I + Gm(G[:, I])``:
whatever the memory holds passes straight into the update. With ``"mean"`` the memory is a plain
average of every row, corrupted rows included, so over many steps BGmD moves like the *mean* on
the coordinates outside each block; see the chapter on memory.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ._checks import (check_choice, check_generator, check_real, check_sample_matrix, value_checks,
                      value_checks_enabled)
from ._numerics import opmath_dtype, to_device
from ._numerics import pow2_scale as _pow2_scale
from .medians import GeometricMedianResult, coordinate_median, geometric_median
from .weiszfeld import max_abs as _max_abs
from .weiszfeld import max_abs_matrix as _max_abs_matrix

__all__ = ["select_block", "resolve_block_size", "BGmD", "MODES", "MEMORY_RULES", "check_block_generator"]

MODES = ("norm", "topk")
MEMORY_RULES = ("mean", "median", "gm", None)
_GM_OPTIONS = ("eps", "tol", "max_iter", "fixed_iter", "init")


def resolve_block_size(k: Union[int, float], d: int) -> int:
    """The number of kept columns: an ``int`` ``1 <= k <= d`` as is, a ``float`` ``0 < k <= 1``
    as the fraction ``beta`` of ``d``: ``max(1, floor(beta d))`` (as the authors' code does)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be an int (a number of columns) or a float fraction, got {k!r}")
    if isinstance(k, numbers.Integral):
        k = int(k)
        if not 1 <= k <= d:
            raise ValueError(f"k must satisfy 1 <= k <= d = {d}, got {k}")
        return k
    k = check_real(k, "a fractional k", 0.0, 1.0, lo_open=True)
    return max(1, int(math.floor(k * d + 1e-9)))


def check_block_generator(generator):
    """``generator``: ``None``, a ``torch.Generator``, or a tuple of them, one per leading problem.

    A tuple draws each problem's block keys from its own generator, in the order of the
    problems: a batch of independent runs (one per seed) stacked on a leading dimension then
    draws exactly the blocks that each run draws alone (the batched trainer of chapter "Robust
    training experiments")."""
    if isinstance(generator, tuple):
        if not generator:
            raise ValueError("a tuple of generators must not be empty")
        for g in generator:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"each generator of the tuple must be a torch.Generator, got "
                                f"{type(g).__name__}")
        return generator
    return check_generator(generator)


def _exponential(shape, generator, device: torch.device) -> torch.Tensor:
    """Exp(1) draws in float64 on ``device`` (drawn on the generator's device when it differs).

    float64, so that a draw of exactly 0 (which would make a key infinite) has probability
    ~2**-53 instead of float32's ~2**-24 per column; floored at the smallest normal number.
    A tuple of generators (:func:`~median_sgd.bgmd.check_block_generator`) draws the last dimension of each
    leading problem from its own generator.
    """
    if isinstance(generator, tuple):
        problems = math.prod(shape[:-1])
        if problems != len(generator):
            raise ValueError(f"{len(generator)} generators for {problems} problems of shape "
                             f"{tuple(shape)}: give one generator per leading problem")
        rows = [_exponential(shape[-1:], g, device) for g in generator]
        return torch.stack(rows).reshape(shape)
    where = device if generator is None else generator.device
    # -log1p(-U) is what exponential_ computes on the CPU (the same draws up to rounding), at a
    # third of its cost there.
    u = torch.rand(shape, device=where, dtype=torch.float64, generator=generator)
    u = u.neg_().log1p_().neg_()
    return to_device(u, device).clamp_min_(torch.finfo(torch.float64).tiny)


def _syncs_are_free(device: torch.device) -> bool:
    """Whether reading a value on the host is free (the CPU): the ordered block selection is
    taken only then. Tests patch it to run the device code path on the CPU."""
    return device.type == "cpu"


_CHUNK_ELEMENTS = 1 << 19  # CPU column statistics: ~2 MB chunks of G stay in cache
# CPU column statistics: below max |G| = 2**_SAFE_EXPONENT no square of an entry (nor a sum of n
# of them) overflows, and above 2**-_SAFE_EXPONENT no square of an entry within 2**40 of the
# largest underflows, so the plain sums and squares, scaled afterwards, have the scaled bits.
_SAFE_EXPONENT = 20
# The k largest of d keys: a kthvalue over all d costs O(d) with a large constant; above this d a
# threshold estimated from a strided sample of _SAMPLE keys first keeps a few more than k.
_PREFILTER_MIN = 1 << 16
_SAMPLE = 1 << 13
_SAMPLE_SIGMAS = 6.0  # how far below the estimated threshold (binomial standard deviations)


def column_stats(G: torch.Tensor, m: Optional[torch.Tensor] = None):
    """Scaled column statistics of ``A = G + 1 m^T`` (``G`` (..., n, d), ``m`` (..., d) or None).

    Returns ``(s, sums, squares)``: ``s`` (...,) a power of two bringing ``max(|G|, |m|)`` to 1,
    ``sums = s sum_i A_ij`` and ``squares = s^2 sum_i A_ij^2`` (..., d), in float32 for half
    precision, else in ``G``'s dtype. Scaled, no sum overflows whatever the (finite) values
    (a square of 1e20 overflows float32, of 256 float16); the scaling is exact, so ratios and
    orderings (the block's scores) are those of the unscaled statistics. A's statistics come
    from G's without forming A: ``sum_i A_ij = s_j + n m_j``, ``sum_i A_ij^2 = q_j + m_j (2 s_j + n m_j)``
    (chapter "Block geometric median descent", the cost of a block).

    On the CPU one pass over ``G`` in column chunks after its maximum: each chunk's sums and
    squares are two matrix-vector products, the squares formed while the chunk is in cache; for
    ``max |G|`` within ``2**+-20`` on the plain values, scaled afterwards (exact), else on the
    chunk scaled first. Elsewhere the plain reductions.
    """
    n, d = G.shape[-2], G.shape[-1]
    batch = G.shape[:-2]
    dtype = opmath_dtype(G.dtype)  # column statistics of half-precision data in float32
    amax = _max_abs_matrix(G).to(dtype)
    if m is not None:
        amax = torch.maximum(amax, _max_abs(m, -1).to(dtype))
    s = _pow2_scale(amax)  # (...,)
    s_rows = s[..., None, None]
    chunk = max(1024, _CHUNK_ELEMENTS // max(1, n * math.prod(batch)))
    if G.device.type != "cpu" or chunk >= d:
        scaled = torch.mul(G, s_rows)  # in dtype (float32 for half precision)
        sums = scaled.sum(-2)
        squares = scaled.square_().sum(-2)
    else:
        sums, squares = _chunked_column_stats(G, s, amax, chunk, dtype)
    if m is not None:
        ms_ = m.to(dtype) * s[..., None]
        squares = (squares + ms_ * (2 * sums + n * ms_)).clamp_min_(0.0)
        sums = sums + n * ms_
    return s, sums, squares


def _chunked_column_stats(G, s, amax, chunk, dtype):
    """``(s sum_i G_ij, s^2 sum_i G_ij^2)`` on the CPU, ``chunk`` columns at a time (in cache).

    Within ``2**+-_SAFE_EXPONENT`` the plain values: the matrix-vector product reads the chunk in
    place, and scaling the results by ``s`` and ``s^2`` is exact (no square over- or
    underflows), so the bits are those of the scaled computation. Otherwise each chunk is scaled
    first (a copy in cache).
    """
    n, d = G.shape[-2], G.shape[-1]
    batch = G.shape[:-2]
    ones = torch.ones(n, dtype=dtype, device=G.device)
    bound = 2.0 ** _SAFE_EXPONENT
    plain = bool(((amax <= bound) & (amax >= 1.0 / bound)).all())  # the CPU: a free host read
    convert = G.dtype != dtype
    sum_parts, square_parts = [], []
    buf = torch.empty(*batch, G.shape[-2], chunk, dtype=dtype, device=G.device)
    s_rows = s[..., None, None]
    for start in range(0, d, chunk):
        part = G[..., start:start + chunk]
        work = buf[..., : part.shape[-1]]
        if plain:
            if convert:
                part = work.copy_(part)  # half precision: the chunk in float32
            sum_parts.append(torch.matmul(ones, part))
            square_parts.append(torch.matmul(ones, torch.mul(part, part, out=work)))
        else:
            torch.mul(part, s_rows, out=work)
            sum_parts.append(torch.matmul(ones, work))
            square_parts.append(torch.matmul(ones, work.square_()))
    sums, squares = torch.cat(sum_parts, dim=-1), torch.cat(square_parts, dim=-1)
    if plain:
        sums.mul_(s[..., None])
        squares.mul_(s[..., None]).mul_(s[..., None])  # s^2 may underflow where s^2 q does not
    return sums, squares


def _largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the ``k`` largest entries of ``keys`` along the last dimension.

    On the CPU, where a host synchronisation costs nothing, the threshold (``kthvalue``) and a
    mask give the indices in increasing order, which makes the column gather that follows
    faster; on ties at the threshold it falls back to ``topk`` (unordered), as on other devices.
    For one long vector the threshold is searched among the candidates above a lower bound
    estimated from a strided sample (:func:`_largest_prefiltered`): the same indices, in the same
    order, a few times faster.
    """
    d = keys.shape[-1]
    if _syncs_are_free(keys.device) and k < d:
        if keys.dim() == 1 and d >= _PREFILTER_MIN:
            found = _largest_prefiltered(keys, k)
            if found is not None:
                return found
        threshold = torch.kthvalue(keys, d - k + 1, dim=-1, keepdim=True).values
        mask = keys >= threshold
        if bool((mask.sum(-1) == k).all()):
            return mask.nonzero()[:, -1].reshape(*keys.shape[:-1], k)
    return torch.topk(keys, k, dim=-1, sorted=False).indices


def _largest_prefiltered(keys: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """The ``k`` largest of the (d,) ``keys`` in increasing index order, or None (then the
    caller's full search: ties at the threshold, NaN keys, or an estimate that missed).

    A strided sample of ``m`` keys holds about ``Binomial(m, k/d)`` keys above the ``k``-th
    largest; its ``r``-th largest, ``r`` that mean plus ``_SAMPLE_SIGMAS`` standard deviations,
    is then a lower bound ``low`` for it, checked exactly: if at least ``k`` keys are
    ``>= low``, the ``k`` largest are among them, and their threshold is the ``k``-th largest of
    these candidates alone. The sample uses no random draws, so the generator's state is that of
    the plain search.
    """
    d = keys.shape[-1]
    stride = max(1, d // _SAMPLE)
    sample = keys[::stride]
    m = sample.numel()
    p = k / d
    r = int(m * p + _SAMPLE_SIGMAS * math.sqrt(m * p * (1.0 - p))) + 1
    if r >= m // 2 or bool(torch.isnan(sample).any()):
        return None  # k near d / 2 or beyond: no saving
    low = torch.kthvalue(sample, m - r + 1).values
    candidates = (keys >= low).nonzero().squeeze(-1)  # increasing
    c = candidates.numel()
    if c < k or c > d // 2:
        return None
    values = keys.index_select(0, candidates)
    threshold = torch.kthvalue(values, c - k + 1).values
    keep = values >= threshold
    if bool(torch.isnan(keys).any()):
        return None  # the full search ranks NaN first
    found = candidates[keep]
    return found if found.numel() == k else None


def select_from_squares(
    sq: torch.Tensor, k: int, mode: str,
    generator: Union[None, torch.Generator, Tuple[torch.Generator, ...]], power: float,
) -> torch.Tensor:
    """The block (indices, shape (..., k)) from squared column norms ``sq``."""
    if mode == "topk":
        return _largest(sq, k)
    else:
        # Successive sampling without replacement with probabilities proportional to s_j is the
        # order of arrival of independent exponential clocks of rates s_j (Efraimidis-Spirakis):
        # clock j rings at E_j / s_j, E_j ~ Exp(1), so keep the k largest keys s_j / E_j. One
        # pass, no 2**24 category limit (unlike torch.multinomial), no host synchronisation.
        scores = sq.to(torch.float64)  # s_j = ||G[:, j]||^power, in float64 (no overflow)
        if power != 2.0:
            scores = scores.pow(0.5 * power)
        clocks = _exponential(sq.shape, generator, sq.device)
        keys = torch.div(scores, clocks, out=clocks)  # 0 for a zero column
        return _largest(keys, k)


def select_block(
    G: torch.Tensor,
    k: Union[int, float],
    *,
    mode: str = "norm",
    generator: Union[None, torch.Generator, Tuple[torch.Generator, ...]] = None,
    power: float = 2.0,
) -> torch.Tensor:
    """``I_k``: ``k`` distinct columns of ``G`` (..., n, d), drawn with probability ``∝ ||G[:, j]||^power``.

    Algorithm 2 of Acharya et al. (chapter "Block geometric median descent"). ``mode="norm"``
    samples ``k`` columns without replacement, successively, each draw with probability
    proportional to the score ``s_j = ||G[:, j]||_2^power`` of the columns not drawn yet (active
    norm sampling). ``power=2`` (default) is the squared norm of the paper's Algorithm 2 box and
    of its introduction ("measured by the squared l2 norm"); ``power=1`` the plain norm of its
    Section 4 text. Columns of norm 0 are drawn only once every nonzero column is in.
    ``mode="topk"`` keeps the ``k`` largest column norms, deterministically: what the authors'
    released code does. ``k`` is a number of columns (``int``) or a fraction of ``d``
    (``float`` in ``(0, 1]``, see :func:`~median_sgd.bgmd.resolve_block_size`).

    Returns a ``LongTensor`` of shape (..., k) on ``G``'s device: in increasing order on the CPU
    (unless there are ties in the scores), in no particular order elsewhere. Draws come
    from ``generator`` (a ``torch.Generator``; one on another device than ``G`` works too, its
    draws are moved: from the CPU to a GPU through pinned memory, without waiting), or from a
    tuple of them, one per leading problem, as in :class:`BGmD`
    (:func:`~median_sgd.bgmd.check_block_generator`). No host
    synchronisation. The column norms are computed on ``G`` scaled by a power of two (in float32
    for half precision): no square overflows, and the scores keep their order and ratios.
    """
    check_sample_matrix(G)
    check_choice(mode, "mode", MODES)
    check_block_generator(generator)
    power = check_real(power, "power", 0.0, lo_open=True)
    k = resolve_block_size(k, G.shape[-1])
    sq = column_stats(G)[2]  # squared column norms (scaled: the same order, the same draws)
    return select_from_squares(sq, k, mode, generator, power)


class BGmD:
    """Stateful BGmD aggregator: ``u = scatter_I(Gm(A[:, I]))``, ``m <- rule(A[:, J])``, ``A = G + 1 m^T``.

    Algorithm 1 of Acharya et al. (chapters "Block geometric median descent" and "What BGmD's
    memory remembers"). ``agg(G)`` takes the ``(..., n, d)`` matrix of step-size-scaled gradients
    (one row per sample or client; the leading dimensions are independent problems, each with its
    own memory) and returns the ``(..., d)`` update ``u`` (the step is ``x <- x - u``):

    * the memory ``m`` (zero at first) is added to every row: ``A = G + m``;
    * a block ``I`` of ``k`` columns of ``A`` is chosen by :func:`select_block` with ``mode``
      (``"norm"``: Algorithm 2's norm-proportional sampling; ``"topk"``: the authors' code);
    * ``u_I = geometric_median(A[:, I], **gm_options).median`` and ``u = 0`` outside ``I``;
    * the residual ``A - C_k(A)`` (the unselected columns ``J``) goes to the memory with the rule
      ``memory``: ``"mean"`` (the paper: ``m_J = mean_i A[i, J]``, every row, corrupted rows
      included), ``"median"`` (coordinate-wise median of the residual rows), ``"gm"`` (their
      geometric median in ``R^{d-k}``: robust, but as costly as a full geometric median), or
      ``None`` (no memory: the residual is dropped). ``m_I = 0`` always.

    ``k`` is an int number of columns or a float fraction of ``d`` (``0.1``: the paper's 10%).
    ``gm_options`` go to :func:`median_sgd.geometric_median` (``eps``, ``tol``, ``max_iter``,
    ``fixed_iter``, ``init``; with ``fixed_iter=True`` a step has no host synchronisation at all;
    ``init="median"`` starts each solve at the coordinate-wise median, robust to huge rows) and are
    also used by the ``"gm"`` memory rule. ``power`` is the exponent of the column norms in the
    sampling probabilities (see :func:`select_block`). ``generator`` may be a tuple of
    generators, one per leading problem (:func:`~median_sgd.bgmd.check_block_generator`): each problem then draws
    its blocks as it would alone.

    State: ``agg.memory`` (``None`` until the first call or after ``agg.reset()``), and, for
    diagnostics, ``agg.last_block`` (the indices ``I``), ``agg.last_gm`` (the
    :class:`~median_sgd.GeometricMedianResult` of the block) and ``agg.last_residual`` (the
    relative residual ``||A - C_k(A)||_F^2 / ||A||_F^2`` of the augmented matrix, ``1 - xi`` of
    the paper's Lemma 1; a tensor, read it without forcing a synchronisation in a hot loop). A
    later call must have the same shape (up to ``n``), dtype and device as the memory, else
    ``ValueError``; ``reset()`` first to change them. ``G`` is never modified.
    """

    def __init__(
        self,
        k: Union[int, float],
        *,
        mode: str = "norm",
        memory: Optional[str] = "mean",
        generator: Optional[torch.Generator] = None,
        power: float = 2.0,
        **gm_options,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise TypeError(f"k must be an int (a number of columns) or a float fraction, got {k!r}")
        if isinstance(k, numbers.Integral) and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not isinstance(k, numbers.Integral):
            resolve_block_size(k, 1)  # validates the fraction
        check_choice(mode, "mode", MODES)
        check_choice(memory, "memory", MEMORY_RULES)
        check_block_generator(generator)
        check_real(power, "power", 0.0, lo_open=True)
        unknown = sorted(set(gm_options) - set(_GM_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown geometric_median option(s) {unknown}; expected some of {list(_GM_OPTIONS)}"
            )
        self.k: Union[int, float] = k
        self.mode: str = mode
        self.memory_rule: Optional[str] = memory
        self.generator = generator
        self.power: float = float(power)
        self.gm_options: Dict[str, Any] = dict(gm_options)
        self.memory: Optional[torch.Tensor] = None
        self.last_block: Optional[torch.Tensor] = None
        self.last_gm: Optional[GeometricMedianResult] = None
        self.last_residual: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.gm_options.items())
        return (f"BGmD(k={self.k!r}, mode={self.mode!r}, memory={self.memory_rule!r}"
                f"{'' if self.power == 2.0 else f', power={self.power!r}'}{opts})")

    def reset(self) -> None:
        """Forget the memory (and the diagnostics of the last step)."""
        self.memory = None
        self.last_block = None
        self.last_gm = None
        self.last_residual = None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        with value_checks(False):  # shape and dtype here; finiteness below, from the column sums
            check_sample_matrix(G)
        n, d = G.shape[-2], G.shape[-1]
        k = resolve_block_size(self.k, d)
        m = self._memory_for(G)
        # Column statistics of A = G + 1 m^T without forming A (an n x d allocation costs as much
        # as a Weiszfeld iteration), scaled so that they cannot overflow.
        s, colsum, sq = column_stats(G, m)  # (...,), (..., d) each
        # A NaN or Inf anywhere in a column makes its sum NaN or Inf: an O(d) finiteness check
        # instead of check_finite's O(n d) (scaled, a finite column's sum cannot overflow).
        if value_checks_enabled() and not bool(torch.isfinite(colsum).all()):
            raise ValueError("G contains NaN or Inf values")
        with value_checks(False):  # G is checked; the geometric medians need not re-check blocks
            return self._step(G, m, k, n, d, s, colsum, sq)

    def _memory_for(self, G: torch.Tensor) -> Optional[torch.Tensor]:
        """The memory, checked against ``G`` (..., n, d): None, or a (..., d) tensor like ``G``'s."""
        m = self.memory
        if m is not None and (m.shape != (*G.shape[:-2], G.shape[-1]) or m.dtype != G.dtype
                              or m.device != G.device):
            raise ValueError(
                f"G of shape {tuple(G.shape)}, {G.dtype} on {G.device} does not match the "
                f"memory of shape {tuple(m.shape)}, {m.dtype} on {m.device}; call reset() first"
            )
        return m

    def _record(self, sq, idx, gm, dtype) -> None:
        """``last_block``, ``last_gm`` and ``last_residual = 1 - (block's share of sum_j sq_j)``."""
        total = sq.sum(-1)
        kept = torch.gather(sq, -1, idx).sum(-1)
        tiny = torch.finfo(total.dtype).tiny
        self.last_residual = torch.where(
            total > 0, (total - kept).clamp_min(0.0) / total.clamp_min(tiny), torch.zeros_like(total)
        ).to(dtype)
        self.last_block = idx
        self.last_gm = gm

    def _step(self, G, m, k, n, d, s, colsum, sq):
        # colsum, sq: scaled by s, s^2 (in float32 for half-precision G), the sums of A's columns
        work = colsum.dtype  # half precision: G + m and the medians in float32

        def block_median(idx):
            block = take_columns(G, idx)  # a copy: the in-place updates below leave G alone
            if m is not None:
                # A's block; finite values whose sum overflows saturate (a NaN stays)
                big = torch.finfo(work).max
                block = block.to(work).add_(torch.gather(m, -1, idx).to(work).unsqueeze(-2))
                block = block.clamp_(-big, big)
            gm = geometric_median(block, **self.gm_options)
            median = _saturate(gm.median, G.dtype)
            self.last_gm = GeometricMedianResult(median=median, n_iter=gm.n_iter, converged=gm.converged)
            return median

        def memory_of(idx):
            rule = self.memory_rule
            if rule == "mean":
                new = colsum / (n * s.unsqueeze(-1))  # exact unscaling: n s is n times a power of two
            elif rule == "median":
                # The coordinate-wise median commutes with adding m_j to a whole column.
                new = coordinate_median(G) if m is None else coordinate_median(G).to(work) + m.to(work)
            else:  # "gm": the residual rows A - C_k(A), which are zero on the block
                A = G.to(work, copy=True) if m is None else _saturate(G.to(work) + m.to(work).unsqueeze(-2))
                new = geometric_median(zero_columns(A, idx), **self.gm_options).median
            # stored in G's dtype, finite (a memory beyond the dtype's range saturates)
            return _saturate(new, G.dtype)

        idx, update, self.memory = bgmd_step(sq, k, self.mode, self.generator, self.power,
                                             block_median, memory_of if self.memory_rule else None)
        self._record(sq, idx, self.last_gm, G.dtype)
        return update


def take_columns(G: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``G[..., :, idx]`` for ``G`` (..., n, d) and a block ``idx`` (..., k)."""
    if G.dim() == 2 or idx.dim() == 1:
        return G.index_select(-1, idx)  # faster than gather on the CPU
    return torch.gather(G, -1, idx.unsqueeze(-2).expand(*G.shape[:-1], idx.shape[-1]))


def zero_columns(A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``A`` (..., n, d) with the columns ``idx`` (..., k) set to 0, in place: the residual ``A - C_k(A)``."""
    if idx.dim() == 1:
        return A.index_fill_(-1, idx, 0.0)
    return A.scatter_(-1, idx.unsqueeze(-2).expand(*A.shape[:-1], idx.shape[-1]), 0.0)


def bgmd_step(sq, k, mode, generator, power, block_median, memory_of, *, absent=None, memory=None):
    """``I = select(sq)``, ``u_I = block_median(I)``, ``u_J = 0``, ``m = memory_of(I)`` with ``m_I = 0``.

    One step of Algorithm 1 of Acharya et al. (chapter "Block geometric median descent") given
    the squared column norms ``sq`` (..., d) of the memory-augmented matrix ``A``: the block
    ``I`` of ``k`` columns by :func:`select_block`'s rule (``mode``, ``generator``, ``power``),
    the update ``u`` (the block's geometric median ``block_median(I)`` (..., k) scattered into
    zeros) and the new memory (``memory_of(I)`` (..., d) with the block zeroed; ``None`` when
    ``memory_of`` is). Where the rows live is the callers' business: :class:`BGmD` (rows in this
    process), ``make_aggregator("bgmd")`` (the finite rows) and the DDP hook's ``"bgmd"`` rule
    (one row per rank) pass their own ``block_median`` and ``memory_of``. ``absent`` (a (...,)
    bool tensor, or None): the problems in which no row counted (every one dropped). There the
    step is no step: ``u = 0`` and the memory stays ``memory`` (the one before the step; None:
    zero), as if nothing had been sent, instead of being overwritten by the statistics of no
    rows. Returns ``(I, u, m)``.
    """
    idx = select_from_squares(sq, k, mode, generator, power)  # (..., k)
    median = block_median(idx)
    zeros = median.new_zeros(*median.shape[:-1], sq.shape[-1])
    update = zeros.index_copy_(-1, idx, median) if idx.dim() == 1 else zeros.scatter_(-1, idx, median)
    if absent is not None:
        update = update.masked_fill_(absent.unsqueeze(-1), 0.0)
    if memory_of is None:
        return idx, update, None
    new = memory_of(idx)
    new = new.index_fill_(-1, idx, 0.0) if idx.dim() == 1 else new.scatter_(-1, idx, 0.0)
    if absent is not None:
        kept = torch.zeros_like(new) if memory is None else memory.to(new.dtype)
        new = torch.where(absent.unsqueeze(-1), kept, new)
    return idx, update, new


def _saturate(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` in ``dtype`` (default: its own), values beyond its range (+-Inf included) replaced by
    its largest finite ones; NaN stays NaN."""
    dtype = x.dtype if dtype is None else dtype
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype)
