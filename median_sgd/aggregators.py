"""Gradient aggregators ``agg(G) -> u``: one interface from the ``(..., n, d)`` rows to a ``(..., d)`` update.

The robust-training chapters ("Block geometric median descent", "What BGmD's memory remembers",
"Robust training experiments") compare these rules as the server's step of distributed SGD:
``x <- x - agg(gamma G)`` with one row of ``G`` per client (or per sample). Every aggregator is
positively homogeneous (``agg(c G) = c agg(G)`` for ``c > 0``), so scaling by the step size
before or after aggregating is the same, except for BGmD whose memory mixes steps.

* ``mean`` (SGD): ``mean_i G_i``; breakdown point 0.
* ``cmd``: coordinate-wise median (CmD; Yin et al. 2018).
* ``gmd``: geometric median (GmD), smoothed Weiszfeld.
* ``bgmd``: block geometric median with memory (:class:`median_sgd.BGmD`).
* ``trimmed_mean``: coordinate-wise trimmed mean (Yin et al. 2018).
* ``krum`` / ``multi_krum``: Krum (Blanchard et al. 2017): the row whose ``n - f - 2`` nearest
  other rows are closest in squared distance (multi-Krum averages the ``m`` best such rows).

Use :func:`make_aggregator` (``make_aggregator("cmd")``, ``make_aggregator("bgmd", k=0.1)``).
Every aggregator is a callable object with ``reset()`` (a no-op for the stateless ones) and keeps
``G``'s dtype and device; none modifies ``G``.

**Rows that are not finite are dropped.** The aggregators are where the workers' data arrives, so a
row with a NaN or an infinite entry is a faulty (or hostile) worker's: every aggregator gives it
weight 0 in that call, as if it had not been sent, and ``agg.last_dropped`` ((...,) tensor) counts
the rows dropped. The whole row goes, also for the coordinate-wise rules (a worker that sends NaN
in one coordinate is broken, and its other coordinates are not to be trusted either; it is also
what the DDP hooks of :mod:`median_sgd.distributed` do, where a rank's flag travels with the
collectives). The rules then act on the rows that remain; when none remains the update is 0 (no
step). Huge but finite rows are data, not faults: they are outliers like any other, and the sums
of the mean and the trimmed mean cannot overflow (half precision is summed in float32; a sum that
overflows is redone from terms divided by their count first). No check synchronises with the host:
the dropping is done with masks and weights. The plain functions
(:func:`median_sgd.coordinate_median`, :func:`median_sgd.geometric_median`, :func:`krum`, ...)
still raise ``ValueError`` on NaN or Inf: there a non-finite value is a bug in the caller's code.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Optional

import torch

from ._checks import check_sample_matrix, value_checks
from .bgmd import BGmD, column_stats, bgmd_step, resolve_block_size, take_columns, zero_columns
from .medians import GeometricMedianResult, geometric_median

__all__ = [
    "Aggregator",
    "Mean",
    "CoordinateMedian",
    "GeometricMedian",
    "TrimmedMean",
    "Krum",
    "BGmD",
    "krum",
    "krum_scores",
    "make_aggregator",
    "AGGREGATORS",
]


# --------------------------------------------------------------------------------------------
# Masked rules: the rows of a (..., n, d) matrix with a (..., n) mask of the rows that count.
# Shapes never depend on the mask (no boolean indexing, no host synchronisation). On finite data
# the mean, the medians, Krum and BGmD compute, operation for operation, what the plain functions
# compute (bit for bit: the training chapters' outputs depend on it); the trimmed mean sums the
# same values in another order.


def _finite_rows(G: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` bool: the rows of ``G`` whose entries are all finite (their largest magnitude
    is: NaN and inf propagate through it; one pass, no mask of ``G``'s size)."""
    return torch.isfinite(G.abs().amax(-1))


def _zero_dropped(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``G`` with the rows outside ``ok`` set to 0 (finite placeholders that get weight 0)."""
    return torch.where(ok.unsqueeze(-1), G, 0)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sum_rows_over(terms: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``sum_i terms_i / count`` over dim -2, in the accumulation dtype; 0 where ``count`` is 0.

    ``terms`` (..., n, d) holds 0 in the rows that do not count, ``count`` (..., 1) the number of
    rows that do. Half precision is summed in float32. The plain ``sum / count`` (what ``mean``
    computes, bit for bit) overflows only when the terms are huge; there the sum is redone from
    ``terms / count``, each term at most ``max / count``, whose sum cannot overflow.
    """
    acc = _acc_dtype(terms.dtype)
    safe = count.clamp_min(1)
    fast = terms.sum(-2, dtype=acc) / safe
    scaled = (terms.to(acc) / safe.unsqueeze(-1)).sum(-2)
    out = torch.where(torch.isfinite(fast), fast, scaled)
    return torch.where(count > 0, out, 0)


def _masked_mean(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``mean_{i: ok_i} G_i`` (..., d) in ``G``'s dtype; 0 where no row is ok."""
    count = ok.sum(-1, keepdim=True)
    return _sum_rows_over(_zero_dropped(G, ok), count).to(G.dtype)


def _sorted_with_dropped_last(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Every column of ``G`` sorted, the rows outside ``ok`` moved to the end (as +inf)."""
    return torch.where(ok.unsqueeze(-1), G, torch.inf).sort(dim=-2).values


def _masked_coordinate_median(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``median_{i: ok_i} G_ij`` per coordinate (..., d); the mean of the two middle values for an
    even count (as :func:`median_sgd.coordinate_median`); 0 where no row is ok.

    The middle of two values is ``(a + b) / 2``, or ``a / 2 + b / 2`` where ``a + b`` overflows.
    """
    n, d = G.shape[-2], G.shape[-1]
    m = ok.sum(-1, keepdim=True)  # (..., 1) rows that count
    s = _sorted_with_dropped_last(G, ok)
    lower = torch.div(m - 1, 2, rounding_mode="floor").clamp_min(0)
    upper = torch.div(m, 2, rounding_mode="floor").clamp_max(n - 1)
    shape = (*G.shape[:-2], 1, d)
    a = s.gather(-2, lower.unsqueeze(-1).expand(shape)).squeeze(-2)
    b = s.gather(-2, upper.unsqueeze(-1).expand(shape)).squeeze(-2)
    mid = (a + b) / 2
    mid = torch.where(torch.isfinite(mid), mid, a / 2 + b / 2)
    return torch.where(m > 0, mid, 0)


def _masked_trimmed_mean(G: torch.Tensor, ok: torch.Tensor, t: int) -> torch.Tensor:
    """Per coordinate, the mean of the ok values after dropping ``min(t, (m - 1) // 2)`` of them
    at each end (``m`` ok rows, ``t = floor(trim n)`` for all ``n`` rows); 0 where no row is ok.

    Dropped rows do not lower the number trimmed: the rule still tolerates ``t`` bad values that
    look finite, however many others were dropped, as long as one value is left (down to the
    median when fewer than ``2 t + 1`` rows remain).
    """
    n = G.shape[-2]
    m = ok.sum(-1, keepdim=True)  # (..., 1)
    if t == 0:
        return _masked_mean(G, ok)
    trimmed = torch.minimum(torch.div(m - 1, 2, rounding_mode="floor").clamp_min(0),
                            torch.full_like(m, t))
    s = _sorted_with_dropped_last(G, ok)
    pos = torch.arange(n, device=G.device)
    keep = (pos >= trimmed) & (pos < m - trimmed)  # (..., n): positions t .. m - t - 1
    terms = torch.where(keep.unsqueeze(-1), s, 0)
    return _sum_rows_over(terms, m - 2 * trimmed).to(G.dtype)


def _gm_weights(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weights for :func:`geometric_median`: 1 on the ok rows, 0 elsewhere; all 1 where no row is
    ok (the rows are then zeroed placeholders, whose median is 0)."""
    w = ok.to(dtype)
    return torch.where(ok.any(-1, keepdim=True), w, torch.ones_like(w))


# --------------------------------------------------------------------------------------------
# The aggregators


class Aggregator:
    """Base class: ``agg(G)`` maps ``(..., n, d)`` rows to a ``(..., d)`` update; ``reset()``.

    Rows with a NaN or Inf are dropped (see the module's docstring); ``last_dropped`` counts them.
    """

    name = "aggregator"
    last_dropped: Optional[torch.Tensor] = None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state (a no-op for stateless aggregators)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _rows(self, G: torch.Tensor) -> torch.Tensor:
        """Check the shape and dtype of ``G``; its finite rows (counted in ``last_dropped``)."""
        with value_checks(False):  # NaN and Inf are data here, not a caller's error
            check_sample_matrix(G)
        ok = _finite_rows(G)
        self.last_dropped = G.shape[-2] - ok.sum(-1)
        return ok


class Mean(Aggregator):
    """``mean_i G_i`` over the finite rows: plain mini-batch SGD (breakdown point 0)."""

    name = "mean"

    def __call__(self, G):
        return _masked_mean(G, self._rows(G))


class CoordinateMedian(Aggregator):
    """``median_i G_ij`` per coordinate over the finite rows (CmD), as
    :func:`median_sgd.coordinate_median` computes it."""

    name = "cmd"

    def __call__(self, G):
        return _masked_coordinate_median(G, self._rows(G))


class GeometricMedian(Aggregator):
    """``argmin_z sum_i ||z - G_i||`` over the finite rows (GmD):
    :func:`median_sgd.geometric_median` with weight 1 on the finite rows and 0 on the others.

    ``gm_options`` (``eps``, ``tol``, ``max_iter``, ``fixed_iter``) go to the solver; the result
    of the last call is ``agg.last_gm`` (iterations, convergence).
    """

    name = "gmd"

    def __init__(self, **gm_options) -> None:
        unknown = sorted(set(gm_options) - {"eps", "tol", "max_iter", "fixed_iter"})
        if unknown:
            raise TypeError(f"unknown geometric_median option(s) {unknown}")
        self.gm_options = dict(gm_options)
        self.last_gm: Optional[GeometricMedianResult] = None

    def __call__(self, G):
        ok = self._rows(G)
        self.last_gm = geometric_median(_zero_dropped(G, ok), _gm_weights(ok, G.dtype),
                                        **self.gm_options)
        return self.last_gm.median

    def reset(self) -> None:
        self.last_gm = None

    def __repr__(self) -> str:
        return f"GeometricMedian({', '.join(f'{k}={v!r}' for k, v in self.gm_options.items())})"


class TrimmedMean(Aggregator):
    """Per coordinate, the mean of the finite rows' values after dropping ``floor(trim n)`` at each
    end (``n`` all rows: dropped rows do not lower the number trimmed, see
    :func:`_masked_trimmed_mean`; at least one value is kept)."""

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not (0 <= trim < 0.5):
            raise ValueError(f"trim must be a number in [0, 0.5), got {trim!r}")
        self.trim: float = float(trim)

    def __call__(self, G):
        ok = self._rows(G)
        return _masked_trimmed_mean(G, ok, int(math.floor(self.trim * G.shape[-2])))

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim!r})"


def _check_f(f, n: int) -> int:
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
        raise ValueError(f"f (the number of Byzantine rows) must be an integer >= 0, got {f!r}")
    if n - int(f) - 2 < 1:
        raise ValueError(
            f"Krum needs n - f - 2 >= 1 neighbours (n >= f + 3; Blanchard et al. assume "
            f"n >= 2f + 3), got n = {n}, f = {f}"
        )
    return int(f)


def _krum_scores(G: torch.Tensor, f: int, ok: torch.Tensor) -> torch.Tensor:
    """:func:`krum_scores` of the rows in ``ok``, as if the others had not been sent: the sum over
    the ``m - f - 2`` nearest other ok rows (``m`` ok rows, at least one neighbour, ``f`` as
    given); ``inf`` for the rows outside ``ok``."""
    n = G.shape[-2]
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    work = _zero_dropped(work, ok)
    sq = torch.cdist(work, work).square()  # (..., n, n)
    # Exclude i itself and the dropped rows: push them to +inf (also a distance that overflowed
    # to NaN in cdist's ||a||^2 + ||b||^2 - 2 a.b), then the n - f - 2 smallest of each row.
    eye = torch.eye(n, dtype=torch.bool, device=G.device)
    pair = ok.unsqueeze(-1) & ok.unsqueeze(-2) & ~eye
    sq = torch.where(pair & ~torch.isnan(sq), sq, torch.inf)
    nearest = torch.topk(sq, n - f - 2, dim=-1, largest=False).values  # ascending
    neighbours = (ok.sum(-1) - f - 2).clamp_min(1)[..., None, None]  # m - f - 2 of the m ok rows
    pos = torch.arange(n - f - 2, device=G.device)
    scores = torch.where(pos < neighbours, nearest, 0.0).sum(-1)
    return torch.where(ok, scores, torch.inf).to(G.dtype)


def krum_scores(G: torch.Tensor, f: int) -> torch.Tensor:
    """``score_i = sum of ||G_i - G_j||^2`` over the ``n - f - 2`` rows ``j != i`` closest to ``G_i``.

    Shape ``(..., n)``. Blanchard, El Mhamdi, Guerraoui, Stainer (NeurIPS 2017), eq. of Sec. 4.
    (The self-distance 0 is excluded, unlike the BGmD authors' code.)
    """
    check_sample_matrix(G)
    f = _check_f(f, G.shape[-2])
    return _krum_scores(G, f, torch.ones(G.shape[:-1], dtype=torch.bool, device=G.device))


def _krum(G: torch.Tensor, f: int, m: int, ok: torch.Tensor) -> torch.Tensor:
    """:func:`krum` over the rows in ``ok``: the mean of the ok rows among the ``m`` best."""
    n = G.shape[-2]
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= n:
        raise ValueError(f"m must be an integer in [1, n = {n}], got {m!r}")
    scores = _krum_scores(G, _check_f(f, n), ok)
    best = torch.topk(scores, int(m), dim=-1, largest=False).indices  # (..., m)
    rows = torch.gather(G, -2, best.unsqueeze(-1).expand(*best.shape, G.shape[-1]))
    return _masked_mean(rows, torch.gather(ok, -1, best))


def krum(G: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """Krum (``m = 1``): the row of smallest :func:`krum_scores`; multi-Krum: the mean of the ``m`` best rows."""
    check_sample_matrix(G)
    return _krum(G, f, m, torch.ones(G.shape[:-1], dtype=torch.bool, device=G.device))


class Krum(Aggregator):
    """Krum / multi-Krum with ``f`` Byzantine rows assumed (:func:`krum`), over the finite rows:
    Krum of the ``m`` finite rows as if the others had not been sent, ``f`` unchanged (each score
    sums ``m - f - 2`` neighbours, at least one). A dropped row is never chosen unless fewer than
    ``m`` rows have a finite score; the update averages the finite rows among the chosen."""

    name = "krum"

    def __init__(self, f: int, m: int = 1) -> None:
        if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
            raise ValueError(f"f (the number of Byzantine rows) must be an integer >= 0, got {f!r}")
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        self.f: int = int(f)
        self.m: int = int(m)

    def __call__(self, G):
        return _krum(G, self.f, self.m, self._rows(G))

    def __repr__(self) -> str:
        return f"Krum(f={self.f}, m={self.m})"


class _WorkersBGmD(BGmD):
    """:class:`median_sgd.BGmD` over the finite rows: what ``make_aggregator("bgmd")`` returns.

    The same step as BGmD's (and on finite data the same numbers), with the rows that hold a NaN
    or Inf given weight 0 everywhere: in the column norms that choose the block, in the block's
    geometric median, and in the memory rule (the mean or the median of the finite rows, their
    geometric median). A memory that would overflow saturates at the largest finite value, and a
    row whose block overflows once the memory is added is dropped from that block's median.
    ``last_dropped`` counts the rows dropped.
    """

    last_dropped: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self.last_dropped = None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        with value_checks(False):  # NaN and Inf are data here, not a caller's error
            check_sample_matrix(G)
        n, d = G.shape[-2], G.shape[-1]
        k = resolve_block_size(self.k, d)
        m = self._memory_for(G)
        ok = _finite_rows(G)
        self.last_dropped = n - ok.sum(-1)
        with value_checks(False):
            return self._dropping_step(_zero_dropped(G, ok), ok, m, k)

    def _dropping_step(self, G, ok, m, k):
        count = ok.sum(-1, keepdim=True)  # (..., 1): the rows that count
        # scaled by s, s^2 (so they cannot overflow); the dropped rows are zero: they add nothing
        s, colsum, sq = column_stats(G)
        if m is not None:  # A = G + 1 m^T over the rows that count
            ms_ = m.to(colsum.dtype) * s.unsqueeze(-1)
            colsum_a = colsum + count * ms_
            sq = (sq + ms_ * (2 * colsum + count * ms_)).clamp_min_(0.0)
        else:
            colsum_a = colsum
        sq = torch.nan_to_num(sq, nan=torch.inf)  # an overflowed column (inf - inf) ranks first

        def block_median(idx):
            block = take_columns(G, idx)
            if m is not None:
                block = block + torch.gather(m, -1, idx).unsqueeze(-2)
            block_ok = ok & _finite_rows(block)
            self.last_gm = geometric_median(_zero_dropped(block, block_ok), _gm_weights(block_ok, G.dtype),
                                            **self.gm_options)
            return self.last_gm.median

        def memory_of(idx):
            rule = self.memory_rule
            if rule == "mean":
                new = colsum_a / (count.clamp_min(1) * s.unsqueeze(-1))  # exact unscaling (s = 2^k)
            elif rule == "median":
                # The coordinate-wise median commutes with adding m_j to a whole column.
                med = _masked_coordinate_median(G, ok)
                new = med if m is None else med + m
            else:  # "gm": the residual rows A - C_k(A), which are zero on the block
                A = zero_columns(G.clone() if m is None else G + m.unsqueeze(-2), idx)
                A_ok = ok & _finite_rows(A)
                new = geometric_median(_zero_dropped(A, A_ok), _gm_weights(A_ok, G.dtype),
                                       **self.gm_options).median
            # a memory that overflowed saturates (the next step drops rows that overflow with it)
            return torch.nan_to_num(new.to(G.dtype), nan=0.0)

        idx, update, self.memory = bgmd_step(sq, k, self.mode, self.generator, self.power,
                                             block_median, memory_of if self.memory_rule else None)
        self._record(sq, idx, self.last_gm, G.dtype)
        return update


def _bgmd(k=0.1, **options) -> BGmD:
    return _WorkersBGmD(k, **options)


def _multi_krum(f: int, m: Optional[int] = None) -> Krum:
    # Blanchard et al.'s multi-Krum uses m = n - f rows; n is not known before the first call,
    # so m must be given here.
    if m is None:
        raise ValueError("multi_krum needs m, the number of rows averaged (e.g. n - f)")
    return Krum(f, m)


AGGREGATORS: Dict[str, Callable[..., Aggregator]] = {
    "mean": Mean,
    "sgd": Mean,
    "cmd": CoordinateMedian,
    "coordinate_median": CoordinateMedian,
    "gmd": GeometricMedian,
    "gm": GeometricMedian,
    "geometric_median": GeometricMedian,
    "bgmd": _bgmd,  # type: ignore[dict-item]
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": _multi_krum,
}


def make_aggregator(name: str, **options):
    """An aggregator by name: ``"mean"``/``"sgd"``, ``"cmd"``, ``"gmd"``, ``"bgmd"``,
    ``"trimmed_mean"``, ``"krum"``, ``"multi_krum"`` (aliases: ``"coordinate_median"``, ``"gm"``,
    ``"geometric_median"``); ``options`` are its constructor's keywords (``bgmd``: ``k`` (default
    0.1, the paper's 10%), ``mode``, ``memory``, ``generator``, Weiszfeld options; ``krum``: ``f``,
    ``m``; ``trimmed_mean``: ``trim``; ``gmd``: Weiszfeld options)."""
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(sorted(AGGREGATORS))}")
    try:
        return AGGREGATORS[key](**options)
    except TypeError as err:
        raise TypeError(f"bad options for aggregator {name!r}: {err}") from None
