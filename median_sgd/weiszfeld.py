"""The Weiszfeld iteration, once: ``z <- z + sum_i b_i (x_i - z) / sum_i b_i``, ``b_i = w_i / max(||x_i - z||, nu)``.

Derived in the chapters "The median as a robust estimator of the mean" (the smoothed iteration,
its floor ``nu`` and stopping rule) and "Scaling out" (the same rounds over the ranks of a
process group). :func:`weiszfeld` is the loop: the smoothing floor (:func:`distance_floor`), the
weights, the stopping rule, frozen converged problems and the sync-free fixed-iteration mode. It
reaches the rows ``x_i`` only through a *backend*, which holds the iterate and answers

* ``distances()``: ``(dist, w, w_sum)``, the distances ``||x_i - z||`` (..., n) with the weights
  of the rows that count (a row that does not count has weight 0 and distance 0) and their sum;
* ``resolution()`` (...,): the rounding of the iterate itself (a median distance at or below it
  means ``z`` sits on at least half of the weight); ``noise()`` (..., 1): the distances' own
  rounding, to which the floor is raised;
* ``step(beta, beta_sum, active)``: moves ``z`` by ``sum_i beta_i (x_i - z) / sum_i beta_i``
  where ``active`` (frozen elsewhere) and returns the norm of the resultant ``sum_i beta_i (x_i - z)``.

Backends: :class:`LocalRows` (a ``(..., n, d)`` tensor in this process: scaled by a power of two,
carried as centre plus offset, read in column blocks, with a Gram-matrix pre-iteration for few
rows of many coordinates; what :func:`median_sgd.geometric_median` runs) and :class:`RankRows`
(one row per rank, over a reduction protocol: :class:`ProcessGroupRanks`, the all-reduce and
all-gather rounds of ``torch.distributed``, or :class:`SimulatedRanks`, every rank in one
process; what the DDP hook's ``"gm"`` and ``"bgmd"`` rules run).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._numerics import known_all, midpoint, pow2_scale, scaled_l2_norm
from ._ranks import CollectiveCounter, ProcessGroupRanks, SimulatedRanks

__all__ = ["weiszfeld", "distance_floor", "local_weiszfeld", "weighted_mean", "ranks_weiszfeld", "LocalRows", "RankRows", "ProcessGroupRanks",
           "SimulatedRanks", "CollectiveCounter"]

# The Gram (coefficient) iteration pays off when n is small against d: its set-up costs n^2 d
# multiply-adds once, an exact iteration about n d memory reads every time.
_GRAM_MAX_N = 64
_GRAM_MIN_SIZE = 1 << 16
# Column blocks of at most this many elements (1 MiB in float32): temporaries stay in cache and
# below the allocator's mmap threshold, instead of a fresh G-sized array every iteration.
_BLOCK_ELEMENTS = 1 << 18
# On a GPU a block is a few kernel launches whatever its size (each costs microseconds) and the
# device's cache is larger: blocks of up to 2**24 elements (64 MiB in float32).
_BLOCK_ELEMENTS_DEVICE = 1 << 24
# The Gram matrix sums its products over at most this many columns in the work dtype (then in
# float64): its entries are then within about _GRAM_ERR machine epsilons of exact (relative to
# sqrt(K_ii K_jj); measured: at most ~3).
_GRAM_BLOCK_COLUMNS = 1 << 14
_GRAM_ERR = 16
# The Gram iteration's steps are trusted while its distances' errors (the noise, a weight) are
# at most this fraction of the total weight.
_GRAM_TRUSTED = 2.0**-10


def _syncs_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (the CPU) rather than a device
    synchronisation: the adaptive loop then checks convergence every iteration. Tests patch it
    to run the device code paths on the CPU."""
    return device.type == "cpu"


def max_abs(X: torch.Tensor, dims) -> torch.Tensor:
    """``max |X|`` over ``dims`` (exact)."""
    return torch.linalg.vector_norm(X, ord=float("inf"), dim=dims)


def block_columns(X: torch.Tensor) -> int:
    """How many columns of ``X`` (..., n, d) a block of a column-block pass holds."""
    rows = max(1, X.numel() // X.shape[-1])
    elements = _BLOCK_ELEMENTS if X.device.type == "cpu" else _BLOCK_ELEMENTS_DEVICE
    return max(1, elements // rows)


def max_abs_matrix(X: torch.Tensor) -> torch.Tensor:
    """``max |X|`` over the last two dimensions of ``X`` (..., n, d): shape (...,).

    On the CPU, where the infinity norm is a slow reduction, ``aminmax`` for one contiguous
    matrix, else the column blocks' ``|X|`` maxima (temporaries in cache).
    """
    if X.device.type != "cpu":
        return max_abs(X, (-2, -1))
    if X.dim() == 2 and X.is_contiguous():
        lo, hi = torch.aminmax(X)
        return torch.maximum(hi, -lo)
    cols, out = block_columns(X), None
    for start in range(0, X.shape[-1], cols):
        part = X[..., start : start + cols].abs().amax(dim=(-2, -1))
        out = part if out is None else torch.maximum(out, part)
    return out  # type: ignore[return-value]  # X has at least one column: set in the loop


def check_schedule(device: torch.device):
    """When the adaptive loop asks the host whether every problem has converged."""
    if _syncs_are_free(device):
        return lambda it: True  # free on the CPU
    return lambda it: it < 4 or it % 4 == 3


def distance_floor(dist, w, w_sum, resolution, eps, *, uniform):
    """``eps * median_w(dist)``: the smoothing floor of Weiszfeld's weights, shape (..., 1).

    The weighted median distance from ``z`` is a robust scale, which outliers (less than half of
    the weight), however far, cannot inflate. Falls back to the mean distance when at least half
    of the weight sits on ``z`` (the median distance is at most ``resolution`` (...,), the
    rounding of ``z`` itself: then ``z`` is optimal, and the points there must fall within the
    floor, which would otherwise shrink with them and leave Weiszfeld creeping towards the
    point), and to 1 when every point coincides with ``z`` (then any floor works). Rows of weight
    0 do not count (their distance must be finite). Callers raise it to the rounding noise of
    their distances, below which a point is indistinguishable from ``z``.
    """
    if uniform:
        med = dist.median(dim=-1).values
    else:
        sorted_dist, order = dist.sort(dim=-1)
        cum = w.gather(-1, order).cumsum(-1)
        k = (cum < 0.5 * w_sum.unsqueeze(-1)).sum(-1, keepdim=True).clamp_max(dist.shape[-1] - 1)
        med = sorted_dist.gather(-1, k).squeeze(-1)
    mean = dist.mean(-1) if uniform else (w * dist).sum(-1) / w_sum
    scale = torch.where(med > resolution, med, torch.where(mean > 0, mean, 1.0))
    return (eps * scale).unsqueeze(-1)


def weiszfeld(rows, *, eps: float, tol: float, max_iter: int, fixed_iter: bool,
              n_iter: Optional[torch.Tensor] = None, budget: Optional[int] = None,
              nu: Optional[float] = None):
    """Smoothed Weiszfeld on the backend ``rows`` from its current iterate: ``(n_iter, done, floor)``.

    One iteration: ``r_i = ||x_i - z||``, ``b_i = w_i / max(r_i, nu)`` with the floor
    ``nu = max(eps s, noise)`` (``s``: :func:`distance_floor`'s robust scale), then
    ``z <- z + sum_i b_i (x_i - z) / sum_i b_i``. A problem has converged once
    ``||sum_i b_i (x_i - z)|| - sum_{i near z} w_i (1 - r_i / (eps s)) <= tol * sum_i w_i``: the
    weighted average of the unit vectors from ``z`` to the points has norm at most ``tol``,
    except that points within the smoothing floor ``eps s`` of ``z`` may absorb up to their
    weight of it (the subdifferential of ``||.||`` at 0 is the unit ball: the optimality
    condition when the median is a data point). Not within the noise: right after a long move,
    points that differ by less than its rounding only look coincident with ``z``.

    Converged problems keep their iterate while the others go on (so the answer does not depend
    on how long the others take, and ``fixed_iter=True``, which always runs ``budget`` steps with
    no host synchronisation, gives the adaptive mode's bits). ``n_iter`` (...,) counts the steps
    already taken by a pre-iteration (then ``budget`` is what is left of ``max_iter``). ``floor``
    is the last iteration's ``nu`` (..., 1). A given ``nu`` replaces the relative floor
    ``eps s`` by that absolute one (RFA's smoothing; ``nu = 0``: Weiszfeld's original iteration).
    """
    dist, w, w_sum = rows.distances()
    batch = w_sum.shape
    device = w_sum.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    if n_iter is None:
        n_iter = torch.zeros(batch, dtype=torch.int64, device=device)
    budget = max_iter if budget is None else budget
    check = check_schedule(device)
    floor = None
    for it in range(budget):
        if it:
            dist, w, w_sum = rows.distances()
        if nu is None:
            smooth = distance_floor(dist, w, w_sum, rows.resolution(), eps, uniform=rows.uniform)
        else:
            smooth = dist.new_full((*dist.shape[:-1], 1), nu)
        floor = torch.maximum(smooth, rows.noise())
        beta = w / torch.maximum(dist, floor)
        beta_sum = beta.sum(-1, keepdim=True)
        near = torch.clamp_min(1.0 - dist / smooth, 0.0)
        absorbed = (near if rows.uniform else w * near).sum(-1)
        active = ~done if budget == max_iter else ~done & (n_iter < max_iter)
        res_norm = rows.step(beta, beta_sum, active)
        n_iter = n_iter + active
        done = done | ((res_norm - absorbed <= tol * w_sum) & active)
        if not fixed_iter and check(it) and bool(
            (done if budget == max_iter else done | (n_iter >= max_iter)).all()
        ):
            break
    return n_iter, done, floor


# --------------------------------------------------------------------------------------------
# Rows in this process


def weighted_mean(X, w, w_sum, uniform):
    """``sum_i w_i X_i / sum_i w_i`` (..., d), with the weights scaled by a power of two so that
    ``sum w = [1/2, 1)``: no partial sum exceeds ``max |X|`` (no overflow), and the bits are those
    of the unscaled formula otherwise. (The division in place: one (..., d) vector, not two.)"""
    if uniform:
        n = X.shape[-2]
        p = 2.0 ** -((n - 1).bit_length())
        return torch.matmul(w.mul(p).unsqueeze(-2), X).squeeze(-2).div_(n * p)
    p = pow2_scale(w_sum)
    return torch.matmul((w * p.unsqueeze(-1)).unsqueeze(-2), X).squeeze(-2).div_((w_sum * p).unsqueeze(-1))


def weighted_coordinate_median(X, w, uniform):
    """Per coordinate, the weighted median of the rows of ``X`` (..., n, d) with weights ``w``
    (..., n): the value at which the cumulative weight of the sorted column reaches half the
    total, midway between two values where it reaches exactly half (for equal weights the mean of
    the two middle values, as :func:`median_sgd.coordinate_median`). Rows of weight 0 never
    count. The middle of two values is :func:`~median_sgd._numerics.midpoint` (no overflow).
    ``w`` is not read when ``uniform``."""
    n = X.shape[-2]
    if uniform:
        a = torch.kthvalue(X, (n + 1) // 2, dim=-2).values  # no size limit (torch.quantile's)
        if n % 2:
            return a
        b = torch.kthvalue(X, n // 2 + 1, dim=-2).values
    else:
        values, order = X.sort(dim=-2)
        cum = w.unsqueeze(-1).expand(X.shape).gather(-2, order).cumsum(-2)
        half = cum[..., -1:, :] / 2
        lo = (cum < half).sum(-2, keepdim=True).clamp_max(n - 1)  # first with cum >= half
        hi = (cum <= half).sum(-2, keepdim=True).clamp_max(n - 1)  # first with cum > half
        a = values.gather(-2, lo).squeeze(-2)
        b = values.gather(-2, hi).squeeze(-2)
    return midpoint(a, b)


def _scaled_top(dtype: torch.dtype, d: int) -> int:
    """The exponent ``t`` to which sums of ``d`` squares scale the largest entry: ``2**t`` in size,
    the largest sum of squares (of differences) is below the dtype's largest value, and values
    ``2**(2 t)`` times smaller still square to nonzero numbers: float32 data holding both ~1 and
    ~3e38 (2**128 apart) keep the ~1-sized distances (a scale to 1 would lose them to underflow)."""
    max_exp = int(math.log2(torch.finfo(dtype).max)) + 1  # 128 for float32
    return (max_exp - 4 - (d - 1).bit_length()) // 2


class LocalRows:
    """The rows of ``X`` (..., n, d) in this process, with weights ``w`` (..., n) (sum ``w_sum``).

    The iteration is translation- and scale-equivariant in floating point too: it works on
    ``X s`` (``s`` a power of two bringing ``max |X|`` to the middle of the dtype's range: no sum
    of squares over- or underflows, exact), and carries the iterate as a centre (the previous
    iterate, rounded; kept negated, ``neg``) plus an offset, computing ``X_i s - z`` as
    ``(X_i s + neg) - offset``: data sharing a large common component converge as well as centred
    data. An iteration reads ``X`` once, in column blocks (no temporary as large as ``X``): each
    block gives its part of the new iterate and the rows' distances to it. ``start`` is the first
    iterate (the weighted mean); :meth:`gram_start` replaces it by the Gram pre-iteration.
    """

    def __init__(self, X, w, w_sum, start, *, uniform: bool) -> None:
        self.X, self.w, self.w_sum, self.uniform = X, w, w_sum, uniform
        d = X.shape[-1]
        self.amax = max_abs_matrix(X)
        self.s = pow2_scale(self.amax, _scaled_top(X.dtype, d))  # (...,)
        self.s_rows = self.s[..., None, None]
        self.neg = start * -self.s[..., None]
        self.cols = block_columns(X)
        self.buffer = X.new_empty(*X.shape[:-2], d) if self.cols < d else None
        # the column blocks' temporaries, one buffer for them all (not fresh memory per block)
        self.blocks = X.new_empty(X.numel() // d * self.cols) if self.cols < d else None
        self.resolution_unit = torch.finfo(X.dtype).eps
        self.rounding = 4 * self.resolution_unit
        self.beta = w  # the iterate is sum_i beta_i X_i / sum_i beta_i
        self.answer = None  # the answer's buffer in :meth:`step`

    def gram_start(self, eps: float, tol: float, max_iter: int, medoid: bool = False):
        """Iterate on the coefficients first (:func:`_weiszfeld_gram`; from the medoid with
        ``medoid``, else from the weighted mean's); returns its ``n_iter``."""
        c, n_iter = _weiszfeld_gram(self.X, self.s_rows, self.neg, self.amax, self.w, self.w_sum,
                                    eps, tol, max_iter, self.rounding, self.uniform, medoid=medoid)
        self.beta = c.to(self.X.dtype)
        return n_iter

    def begin_at_centre(self) -> None:
        """The first iterate is ``start`` itself (one that is not a combination of the rows, such
        as the coordinate-wise median): a pass for its distances only."""
        self.offset = torch.zeros_like(self.neg)
        self.dist = _distances(self.X, self.s_rows, self.neg, self.cols, self.blocks)
        self.rounded = self.neg
        self.result = self.rounded
        self._neg_free = False  # the centre is the iterate too

    def begin(self) -> None:
        """The first pass: the iterate ``sum_i beta_i X_i / sum_i beta_i`` and its distances."""
        self.offset, self.dist = self._pass(self.beta / self.beta.sum(-1, keepdim=True))
        self.rounded = self.neg - self.offset  # -z in working precision
        self.result = self.rounded
        self._neg_free = True

    def _pass(self, omega):
        return _weiszfeld_pass(self.X, self.s_rows, self.neg, omega, self.cols, self.buffer,
                               self.blocks)

    def distances(self):
        return self.dist, self.w, self.w_sum

    def resolution(self):
        # the rounding of the iterate itself (of the answer)
        return self.resolution_unit * torch.linalg.vector_norm(self.rounded, dim=-1)

    def noise(self):
        # the distances were computed relative to the centre, with a rounding relative to the offset
        return self.rounding * torch.linalg.vector_norm(self.offset, dim=-1, keepdim=True)

    def step(self, beta, beta_sum, active):
        # The step's (..., d) vectors reuse memory: the centre given up holds the rest, then the
        # next iterate; the answer is that iterate itself while every problem is active (a host
        # read: on the CPU). A fresh vector of millions of entries is fresh pages from the
        # operating system, which on a CPU costs several times the arithmetic (measured: 1.7 ms
        # for 4 MB, a subtraction 0.16 ms). Same operations, same bits.
        spare = self.neg if self._neg_free else torch.empty_like(self.neg)
        # Re-centre on the iterate rounded: z = -rounded + rest, exactly when the offset is
        # smaller than the centre (when it moves a lot, precision does not matter yet).
        rest = torch.sub(self.rounded, self.neg, out=spare).add_(self.offset)
        self.neg, self._neg_free = self.rounded, True
        self.offset, self.dist = self._pass(beta / beta_sum)
        # z_next - z = resultant / sum(beta), resultant = sum_i beta_i (X_i - z); the norm of
        # rest - offset, its negative (exact)
        res_norm = beta_sum.squeeze(-1) * torch.linalg.vector_norm(rest.sub_(self.offset), dim=-1)
        self.rounded = torch.sub(self.neg, self.offset, out=spare)
        if _syncs_are_free(active.device) and known_all(active):
            self.result = self.rounded
        else:
            if self.answer is None:
                self.answer = torch.empty_like(self.neg)
            self.result = torch.where(active.unsqueeze(-1), self.rounded, self.result, out=self.answer)
        return res_norm

    def median(self):
        """The answer, unscaled: ``z`` (..., d) (exact: ``s`` is a power of two)."""
        return self.result / -self.s[..., None]

    def distances_to_result(self):
        """``||X_i s - z||`` (..., n) at the answer (scaled)."""
        return _distances(self.X, self.s_rows, self.result, self.cols, self.blocks)


def local_weiszfeld(X, w, w_sum, start, *, uniform, eps, tol, max_iter, fixed_iter,
                    robust=False):
    """Weiszfeld on the rows of ``X`` (..., n, d): ``(rows, n_iter, done, floor)`` with ``rows``
    the :class:`LocalRows` at the answer (``rows.median()``).

    ``start`` is their weighted mean (:func:`weighted_mean`): the centre of the scaled
    coordinates, and, unless ``robust``, the first iterate. The adaptive mode first iterates on
    the Gram matrix when few rows have many coordinates (``n <= 64`` and ``n d >= 2**16``), then
    hands over to the exact iteration, which checks the stopping rule on ``X`` itself and goes
    on if needed. ``robust``: a start that far rows cannot drag away. On the Gram route the
    medoid (:func:`_weiszfeld_gram`, from the Gram matrix it forms anyway), and the exact
    iteration is then centred on the Gram iterate (one pass more); elsewhere the weighted
    coordinate-wise median (:func:`weighted_coordinate_median`, a sort of each column). Either
    is the exact iteration's first iterate and centre.
    """
    n, d = X.shape[-2], X.shape[-1]
    gram = not fixed_iter and max_iter > 1 and n <= _GRAM_MAX_N and n * d >= _GRAM_MIN_SIZE
    if robust and not gram:
        rows = LocalRows(X, w, w_sum, weighted_coordinate_median(X, w, uniform), uniform=uniform)
        rows.begin_at_centre()
        n_iter, done, floor = weiszfeld(rows, eps=eps, tol=tol, max_iter=max_iter,
                                        fixed_iter=fixed_iter)
        return rows, n_iter, done, floor
    rows = LocalRows(X, w, w_sum, start, uniform=uniform)
    n_iter, budget = None, max_iter
    if gram:
        n_iter = rows.gram_start(eps, tol, max_iter - 1, medoid=robust)
        budget = max_iter - int(n_iter.min()) if n_iter.numel() else 1
    if robust:
        # Re-centre on the Gram iterate itself, computed on X: precision relative to a mean that
        # far rows dragged away is lost (and with it the inliers' spread, in K too).
        c = rows.beta
        rows.neg = weighted_mean(X, c, c.sum(-1), False) * -rows.s[..., None]
        rows.begin_at_centre()
    else:
        rows.begin()
    n_iter, done, floor = weiszfeld(rows, eps=eps, tol=tol, max_iter=max_iter,
                                    fixed_iter=fixed_iter, n_iter=n_iter, budget=budget)
    return rows, n_iter, done, floor


def _centred_block(X, s, neg, start, cols, blocks):
    """``X[..., start:start+cols] s + neg[..., start:start+cols]``: into ``blocks`` (a flat buffer
    of at least the block's size) when given, else a new tensor."""
    part = X[..., start : start + cols]
    if blocks is None:
        return torch.addcmul(neg[..., start : start + cols], part, s)
    return torch.addcmul(neg[..., start : start + cols], part, s,
                         out=blocks[: part.numel()].view(part.shape))


def _weiszfeld_pass(X, s, neg, omega, cols, out=None, blocks=None):
    """One pass over ``X`` (..., n, d) in column blocks, in scaled coordinates ``X s + neg``.

    ``neg`` (..., d) is the centre, negated; ``omega`` (..., n) the Weiszfeld weights, summing to
    1. Returns the offset ``y = sum_i omega_i (X_i s + neg)`` of the iterate ``z = -neg + y``
    (..., d; written into ``out`` when given) and the distances ``||X_i s - z||`` (..., n).
    ``blocks``: a buffer for the blocks (:func:`_centred_block`).
    Each block is read once: ``D = X s + neg`` (exact up to one rounding relative to ``|D|``),
    its part of ``y``, then ``D - y``. Rows and centre are at most about 1 in size after
    scaling, so the sums of squares can neither overflow nor underflow.
    """
    d = X.shape[-1]
    omega = omega.unsqueeze(-2)  # (..., 1, n)
    neg = neg.unsqueeze(-2)  # (..., 1, d)
    if cols >= d:
        D = torch.addcmul(neg, X, s)
        y = torch.matmul(omega, D)
        return y.squeeze(-2), torch.linalg.vector_norm(D.sub_(y), dim=-1)
    y_out = out.unsqueeze(-2) if out is not None else X.new_empty(*X.shape[:-2], 1, d)
    sq = None
    for start in range(0, d, cols):
        D = _centred_block(X, s, neg, start, cols, blocks)
        y = y_out[..., start : start + cols]
        torch.matmul(omega, D, out=y) if y.is_contiguous() else y.copy_(torch.matmul(omega, D))
        part = torch.linalg.vector_norm(D.sub_(y), dim=-1).square()
        sq = part if sq is None else sq + part
    return y_out.squeeze(-2), sq.sqrt()


def _distances(X, s, neg, cols, blocks=None):
    """``||X_i s + neg||`` (..., n): the (scaled) distances to the point ``-neg`` (..., d)."""
    d = X.shape[-1]
    neg = neg.unsqueeze(-2)
    sq = None
    for start in range(0, d, cols):
        D = _centred_block(X, s, neg, start, cols, None if cols >= d else blocks)
        part = torch.linalg.vector_norm(D, dim=-1)
        if cols >= d:
            return part
        sq = part.square() if sq is None else sq + part.square()
    return sq.sqrt()


def _weiszfeld_gram(X, s, neg, amax, w, w_sum, eps, tol, max_iter, rounding, uniform,
                    medoid=False):
    """Weiszfeld on the coefficients ``c`` of ``z = sum_j c_j X_j`` (``sum_j c_j = 1``), from the
    weighted mean's ``c = w / sum w`` or, with ``medoid``, from the row of positive weight with
    the smallest weighted sum of distances to the rows (the best row for the objective: like the
    coordinate-wise median, far rows cannot drag it away while they hold less than half the
    weight; O(n^2) from ``K``, no pass over ``X``).

    With the Gram matrix ``K = Y Y^T`` of the scaled rows ``Y = X s`` (:func:`_gram_matrix`:
    centred, ``Y = X s + neg``, when a component common to all rows would cancel),
    ``||Y_i - y||^2 = K_ii - 2 (K c)_i + c^T K c`` and
    ``||y||^2 = c^T K c`` for ``y = sum_j c_j Y_j``; the Weiszfeld update is ``c <- b / sum b``
    and the resultant's norm is ``sqrt(u^T K u)``, ``u = b - (sum b) c``. A distance computed so
    carries K's rounding, a relative error of about
    ``delta_i = _GRAM_ERR eps (K_ii + c^T K c) / r_i^2``, large near a data point; a problem stops
    here once its stopping quantity is below ``tol`` by ``sum_i w_i delta_i`` (converged for
    certain), or is within that of ``tol`` (beyond that this iteration cannot tell), at two
    iterates in a row where the noise is small (at most ``_GRAM_TRUSTED`` of the weight), and
    the exact one takes over. Returns ``c`` at the last iterate *before* the
    step whose test passed (the exact iteration repeats that step on the data) and the number of
    steps taken.
    """
    f64 = torch.float64
    batch = X.shape[:-2]
    resolution = torch.finfo(X.dtype).eps * torch.linalg.vector_norm(neg, dim=-1).to(f64)
    w64, w_sum64 = w.to(f64), w_sum.to(f64)
    K = _gram_matrix(X, s, neg, amax, w64 / w_sum64.unsqueeze(-1))
    K_diag = K.diagonal(dim1=-2, dim2=-1)
    rel_err = _GRAM_ERR * torch.finfo(X.dtype).eps
    c = w64 / w_sum64.unsqueeze(-1)
    if medoid:
        pair_sq = K_diag.unsqueeze(-1) + K_diag.unsqueeze(-2) - 2 * K
        score = torch.matmul(pair_sq.clamp_min(0.0).sqrt(), w64.unsqueeze(-1)).squeeze(-1)
        score = torch.where(w64 > 0, score, torch.inf)
        best = score.argmin(-1, keepdim=True)
        c = torch.zeros_like(c).scatter_(-1, best, 1.0)
    done = torch.zeros(batch, dtype=torch.bool, device=X.device)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=X.device)
    was_within = done
    check = check_schedule(X.device)
    for it in range(max_iter):
        Kc = torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        cKc = (c * Kc).sum(-1, keepdim=True)
        dist_sq = (K_diag - 2 * Kc + cKc).clamp_min(0.0)
        dist = dist_sq.sqrt()
        z_norm = cKc.squeeze(-1).clamp_min(0.0).sqrt()
        floor = torch.maximum(distance_floor(dist, w64, w_sum64, resolution, eps, uniform=uniform),
                              (rounding * z_norm).unsqueeze(-1))
        beta = w64 / torch.maximum(dist, floor)
        beta_sum = beta.sum(-1)
        u = beta - beta_sum.unsqueeze(-1) * c
        res_sq = (u * torch.matmul(K, u.unsqueeze(-1)).squeeze(-1)).sum(-1)
        absorbed = (w64 * torch.clamp_min(1.0 - dist / floor, 0.0)).sum(-1)
        stationarity = res_sq.clamp_min(0.0).sqrt() - absorbed
        noise = (w64 * (rel_err * (K_diag + cKc) / dist_sq.clamp_min(floor.square())).clamp_max(1.0)).sum(-1)
        # Converged for certain (below the tolerance by the noise), or possibly (within the
        # noise of it). Possibly: one step more where the distances are still accurate (their
        # errors weigh at most _GRAM_TRUSTED of the weight), at n^2 work and no pass over X.
        # Stopping at the first such step left the exact test on the boundary in float32
        # (1.6001e-5 against 1.6e-5 at 16 x 10^6), which then cost a second pass over X. Where
        # the distances are not accurate (far rows: K cannot resolve the others), stop there:
        # a step would be noise. Where the noise is negligible (float64), this stops where the
        # exact iteration would.
        within = stationarity <= tol * w_sum64 + noise
        trusted = noise <= _GRAM_TRUSTED * w_sum64
        done = done | (stationarity + noise <= tol * w_sum64) | (within & (was_within | ~trusted))
        was_within = within
        c = torch.where(done.unsqueeze(-1), c, beta / beta_sum.unsqueeze(-1))
        n_iter = n_iter + ~done
        if check(it) and bool(done.all()):
            break
    return c, n_iter


def _gram_matrix(X, s, neg, amax, c0):
    """``K = Y Y^T`` (..., n, n) in float64 for :func:`_weiszfeld_gram`, ``Y`` the scaled rows.

    First the plain products ``X X^T`` (no temporaries: the matrix product reads ``X`` in place),
    scaled by ``s^2`` afterwards. They are used unless the entries could over- or underflow in
    the work dtype (``max |X|`` far from 1) or the rows share a component much larger than their
    spread (the trace of the centred matrix, ``tr K - 2 1^T K c0 + n c0^T K c0`` with ``c0`` the
    mean's coefficients, below 2**-8 of ``tr K``): then ``Y = X s + neg``, centred on the start
    and scaled, block by block (a temporary per block). The choice reads values on the host: this
    route is taken by the adaptive mode only.
    """
    f64 = torch.float64
    n, d = X.shape[-2], X.shape[-1]
    batch = X.shape[:-2]
    finfo = torch.finfo(X.dtype)
    bound = 2.0 ** ((int(math.log2(finfo.max)) - 8 - (d - 1).bit_length()) // 2)
    if bool(((amax < bound) & (amax > 1.0 / bound)).all()):
        K = torch.zeros(*batch, n, n, dtype=f64, device=X.device)
        for start in range(0, d, _GRAM_BLOCK_COLUMNS):
            block = X[..., start : start + _GRAM_BLOCK_COLUMNS]
            K = K + torch.matmul(block, block.mT).to(f64)
        K = K * s.to(f64).square()
        trace = K.diagonal(dim1=-2, dim2=-1).sum(-1)
        Kc0 = torch.matmul(K, c0.unsqueeze(-1)).squeeze(-1)
        centred = trace - 2 * Kc0.sum(-1) + n * (c0 * Kc0).sum(-1)
        if bool((centred >= trace * 2.0**-8).all()):
            return K
    neg = neg.unsqueeze(-2)  # the centre, negated
    K = torch.zeros(*batch, n, n, dtype=f64, device=X.device)
    cols = min(_GRAM_BLOCK_COLUMNS, block_columns(X))  # the centred block is a temporary
    for start in range(0, d, cols):
        block = torch.addcmul(neg[..., start : start + cols], X[..., start : start + cols], s)
        K = K + torch.matmul(block, block.mT).to(f64)
    return K


# --------------------------------------------------------------------------------------------
# One row per rank (the collectives: median_sgd._ranks)


class RankRows:
    """Each rank's row ``y`` (its ``(k,)`` vector; ``(world, k)`` simulated) over ``ranks``.

    The iterate is carried relative to ``centre`` (shared by every rank): Weiszfeld's iteration
    is translation equivariant, so iterating on ``y - centre`` from 0 gives iterates, and a
    rounding noise ``~ machine epsilon * ||z||``, on the scale of the ranks' spread rather than
    of a large component all gradients share. A round all-gathers the ranks' distances (one
    number each; a rank whose row is not finite, ``good`` false, sends NaN, and a distance too
    large for the dtype counts as not finite: weight 0, the limit of ``1 / distance``) and
    all-reduces ``sum_r beta_r (y_r - z)`` (one row). Every input of a decision is gathered or
    reduced, so every rank computes the same iterate.
    """

    uniform = False  # the weights are 0 or 1: whether a rank counts this round

    def __init__(self, y, good, centre, ranks) -> None:
        self.yc = y - centre
        self.good, self.centre, self.ranks = good, centre, ranks
        self.z = torch.zeros_like(centre)
        self.rounding = 4 * torch.finfo(y.dtype).eps

    def distances(self):
        self.diff = self.yc - self.z
        mine = torch.where(self.good, scaled_l2_norm(self.diff), torch.nan)
        gathered = self.ranks.gather_numbers(mine)  # (..., world), the same on every rank
        self.ok = torch.isfinite(gathered)
        w = self.ok.to(gathered.dtype)
        return torch.where(self.ok, gathered, 0.0), w, w.sum(-1)

    def resolution(self):
        # the distances are computed from y - centre (rounded relative to the spread, not to the
        # centre), so a median distance of 0 is the only sign that z sits on half of the ranks
        return 0.0

    def noise(self):
        return self.rounding * scaled_l2_norm(self.z).unsqueeze(-1)

    def step(self, beta, beta_sum, active):
        ranks = self.ranks
        pull = torch.where(ranks.mine(self.ok).unsqueeze(-1), ranks.mine(beta).unsqueeze(-1) * self.diff,
                           0.0)
        resultant = ranks.all_reduce(pull, inplace=True)
        step = torch.where(beta_sum > 0, resultant / beta_sum, 0.0)
        self.z = torch.where(active.unsqueeze(-1), self.z + step, self.z)
        return scaled_l2_norm(resultant)

    def median(self):
        return self.centre + self.z


def ranks_weiszfeld(y, good, centre, ranks, *, eps, tol, max_iter, fixed_iter):
    """The geometric median of the ranks' rows ``y`` that are ``good``, by :func:`weiszfeld`
    rounds from ``centre``: the same on every rank."""
    rows = RankRows(y, good, centre, ranks)
    weiszfeld(rows, eps=eps, tol=tol, max_iter=max_iter, fixed_iter=fixed_iter)
    return rows.median()
