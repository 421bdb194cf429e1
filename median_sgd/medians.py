"""Medians across samples: coordinate-wise median, geometric median (Weiszfeld), trimmed mean.

A sample matrix ``G`` has shape ``(..., n, d)``: ``n`` samples (rows) of ``d``-dimensional
vectors; leading dimensions are independent problems solved at once. Each function returns the
``(..., d)`` aggregate with ``G``'s dtype and device and never modifies ``G``. Derived in the
chapter "The median as a robust estimator of the mean".

Any finite input gives a finite result: sums that could overflow are taken of values scaled by a
power of two first (exact, so ordinary inputs give the same bits as the plain formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_choice, check_finite, check_float_tensor, check_real, value_checks_enabled
from ._numerics import opmath_dtype
from ._numerics import pow2_scale as _pow2_scale
from .weiszfeld import local_weiszfeld, max_abs, weighted_coordinate_median, weighted_mean

__all__ = [
    "coordinate_median",
    "trimmed_mean",
    "geometric_median",
    "geometric_median_objective",
    "GeometricMedianResult",
]

_HALF = (torch.float16, torch.bfloat16)


def _mean_rows(X: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
    """``sum_i X_i / m`` over the rows (dimension -2) of ``X`` (..., m, d), without overflow.

    The sum runs over ``X_i p`` with ``p = 2**-ceil(log2 m)`` (then ``/ (m p)``): each partial sum
    is at most ``max |X|``, so finite rows give a finite mean, and the scaling is exact, so the
    result is the plain mean up to the order of summation. Half precision accumulates in float32.
    ``owned``: ``X`` may be scaled in place (a temporary of the caller's).
    """
    if X.dtype in _HALF:
        return _mean_rows(X.float(), owned=True).to(X.dtype)
    m = X.shape[-2]
    p = 2.0 ** -((m - 1).bit_length())  # m p in (1/2, 1]
    if X.device.type == "cpu":
        # on the CPU a matrix-vector product (BLAS) is the fastest sum over rows
        total = torch.matmul(X.new_full((m,), p), X)
    else:
        # elsewhere a reduction: a matrix product could run in TF32 (torch.backends.cuda.matmul)
        total = (X.mul_(p) if owned else X * p).sum(-2)
    return total / (m * p)


def coordinate_median(G: torch.Tensor) -> torch.Tensor:
    """``median_j G[..., :, j]`` per coordinate; the mean of the two middle values when n is even.

    Uses ``kthvalue`` (no size limit, unlike ``torch.quantile``'s 2**24 elements). The two middle
    values are averaged without overflow (``a/2 + b/2`` where ``(a + b)/2`` would overflow). The
    selection is the one :func:`geometric_median`'s robust start makes
    (``median_sgd.weiszfeld.weighted_coordinate_median`` with equal weights).
    """
    _check_sample_matrix_fast(G)
    return weighted_coordinate_median(G, None, uniform=True)


def trimmed_mean(G: torch.Tensor, trim: float) -> torch.Tensor:
    """Per coordinate, the mean of the values left after dropping ``floor(trim n)`` from each end.

    ``0 <= trim < 1/2`` (a real number: Python or numpy); ``trim = 0`` is the mean. Matches
    ``scipy.stats.trim_mean(G, trim, axis=-2)``. Finite values give a finite mean (the sum is
    taken of scaled values; half precision accumulates in float32).
    """
    _check_sample_matrix_fast(G)
    trim = check_real(trim, "trim", 0.0, 0.5, hi_open=True)
    n = G.shape[-2]
    k = int(math.floor(trim * n))
    if k == 0:
        return _mean_rows(G)
    kept = torch.sort(G, dim=-2).values[..., k : n - k, :]
    return _mean_rows(kept, owned=True)


@dataclass(frozen=True)
class GeometricMedianResult:
    """What :func:`geometric_median` returns.

    ``median`` (..., d): the estimate; ``n_iter`` (...): Weiszfeld iterations each problem used;
    ``converged`` (...): whether each problem met the stopping rule within ``max_iter``.
    """

    median: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


def geometric_median(
    G: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-8,
    tol: float = 1e-6,
    max_iter: int = 100,
    fixed_iter: bool = False,
    init: str = "mean",
) -> GeometricMedianResult:
    """``argmin_z sum_i w_i ||z - G_i||_2`` by smoothed Weiszfeld, started at the weighted mean
    (``init="mean"``) or at a robust start (``init="median"``: the weighted coordinate-wise
    median, or the medoid where the Gram route below is taken).

    One iteration: ``r_i = ||G_i - z||``, ``b_i = w_i / max(r_i, eps s)``,
    ``z <- z + sum_i b_i (G_i - z) / sum_i b_i``, where ``s`` is the weighted median of the
    distances ``r_i`` (a robust scale: ``eps`` is relative, the result is scale-equivariant, and
    far outliers cannot inflate the floor), floored at the distances' rounding noise. The floor
    keeps every iterate finite when it lands on a data point or when all points coincide.

    Stopping rule (relative, scale-free): a problem has converged once
    ``||sum_i b_i (G_i - z)|| - sum_{i near z} w_i (1 - r_i / (eps s)) <= tol * sum_i w_i``: the
    weighted average of the unit vectors pointing from ``z`` to the points has norm at most
    ``tol`` (it is 0 at the geometric median, by first-order optimality, and at most 1), except
    that points within the floor of ``z`` may absorb up to their weight of it, which is the
    optimality condition when the median is a data point (the floor is at least the distances'
    rounding noise, but only the smoothing floor ``eps s`` absorbs). Converged problems keep their
    result while the others go on.

    Precision: the iteration is translation- and scale-equivariant in floating point too. It
    works on the data scaled by a power of two (``max |G| -> 1``, exact), so that no norm
    overflows or underflows however large or small the values (any finite input gives a finite
    answer); and it carries the iterate as a centre (the previous iterate, rounded) plus an
    offset, computing ``G_i - z`` as ``(G_i - centre) - offset``: data sharing a large common
    component (far from the origin relative to their spread) converge as well as centred data,
    and ``tol`` may be far below the data's relative precision. The answer is rounded to ``G``'s
    dtype at the end. (Half precision is iterated in float32.)

    ``fixed_iter=False`` stops once every problem has converged. On a GPU that costs a host
    synchronisation per check (every iteration for the first four, then every fourth; frozen
    problems keep their result). ``fixed_iter=True`` always runs ``max_iter`` iterations with no
    host synchronisation (for CUDA graphs and ``torch.compile``); its results equal the adaptive
    mode's bit for bit (where the latter does not take the Gram route below).

    Speed: an iteration reads ``G`` once, in column blocks so that no temporary as large as ``G``
    is made: each block gives its part of the new iterate (a weighted sum of the rows) and the
    rows' distances to it. When few samples have many coordinates (``n <= 64`` and
    ``n d >= 2**16``), the adaptive mode first iterates on the coefficients ``c`` of
    ``z = sum_j c_j G_j`` (every Weiszfeld iterate is such a combination) using the ``n x n``
    Gram matrix of the centred rows (one pass over ``G``; the iteration in float64): an
    iteration then costs ``O(n^2)`` instead of ``O(n d)``. It hands the result to the exact
    iteration above, which checks the stopping rule on ``G`` itself and goes on if needed, so
    the answer satisfies the same rule and agrees with ``fixed_iter=True`` up to rounding.

    Start: the mean is cheap (one read of ``G``) but not robust. Rows at distance ``D`` from the
    others put it at about ``D`` times their weight's share, and from there each iteration
    divides the distance only by about the ratio of the inliers' weight to the outliers'.
    One row of 1e300 among 32 in float64 is still ~1e149 away after the default 100
    iterations, and 4 rows of 1e30 among 10 in float32 ~1e12 away. The coordinate-wise median
    lies in the inliers' range in every coordinate while the outliers hold less than half the
    weight, however far they are. Weiszfeld then converges from there as if they were absent.
    It costs a sort of each column (a selection when the weights are uniform), which on a CPU
    takes longer than the iterations (several times a whole solve from the mean for a few dozen
    rows: pass ``init="mean"`` where the rows are trusted). Where the adaptive mode takes the
    Gram route (few rows, many coordinates: below), the start is instead the medoid, the row of
    positive weight with the smallest weighted sum of distances to the others, found from the
    Gram matrix in ``O(n^2)``: as robust (far rows cannot make it a far row while they hold less
    than half the weight), at no extra pass over ``G``. The aggregators
    (``make_aggregator("gmd")``, ``"bgmd"``) and the DDP hook start there by default. Both
    starts converge to the same median, up to ``tol``.

    ``weights`` (..., n) are nonnegative with a positive sum per problem. The breakdown point is
    1/2: fewer than half of the total weight in outliers, however far, moves the median a bounded
    amount. Gradients flow through the final Weiszfeld step (the weights ``b_i`` are treated as
    constants), as in the RFA reference implementation; the value returned is the last iterate.
    """
    _check_sample_matrix_fast(G, values=False)  # finiteness: below, from the mean
    n = G.shape[-2]
    batch = G.shape[:-2]
    eps = check_real(eps, "eps", 0.0, lo_open=True)
    tol = check_real(tol, "tol", 0.0)
    max_iter = int(check_real(max_iter, "max_iter", 1, integer=True))
    if not isinstance(fixed_iter, bool):
        raise TypeError(f"fixed_iter must be a bool (True or False), got {fixed_iter!r}")
    check_choice(init, "init", ("mean", "median"))

    # Half precision: iterate in float32 and return the input's dtype.
    work_dtype = opmath_dtype(G.dtype)
    X = G.to(work_dtype)
    if weights is None:
        w = X.new_ones(())
        w = w.expand(*batch, n)
    else:
        check_float_tensor(weights, "weights", min_dim=1)
        if weights.device != G.device:
            raise ValueError(f"weights must be on G's device {G.device}, got {weights.device}")
        if weights.shape[-1] != n:
            raise ValueError(
                f"weights must have shape (..., n) with n = {n} samples, got {tuple(weights.shape)}"
            )
        try:
            fits = torch.broadcast_shapes(weights.shape[:-1], batch) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} do not broadcast to G's batch shape "
                f"{tuple(batch)}"
            )
        check_finite(weights, "weights")
        if value_checks_enabled():
            if bool((weights < 0).any()):
                raise ValueError("weights must be nonnegative")
            if bool((weights.sum(-1) <= 0).any()):
                raise ValueError("weights must have a positive sum for every problem")
        w = weights.to(work_dtype)
        # The iteration is invariant to scaling the weights; by a power of two (exact) that brings
        # the largest to 1, their sums cannot overflow.
        w = (w * _pow2_scale(max_abs(w.detach(), -1)).unsqueeze(-1)).expand(*batch, n)

    uniform = weights is None
    with torch.no_grad():
        X0 = X.detach()
        w0 = w.detach()
        w_sum = w0.sum(-1)  # (...,)
        start = weighted_mean(X0, w0, w_sum, uniform)
        if value_checks_enabled():
            # NaN and +-Inf propagate through sums, so a finite mean proves finite data (no pass
            # of its own; its sum, not isfinite, which writes masks as large as the mean); zero
            # weights could hide a row, so weighted problems sum G instead
            probe = start.sum() if uniform else X0.sum()
            if not bool(torch.isfinite(probe)):
                check_finite(G, "G")  # decides (a non-finite sum may also be an overflow)
        rows, n_iter, done, floor = local_weiszfeld(X0, w0, w_sum, start, uniform=uniform, eps=eps, tol=tol,
                                                    max_iter=max_iter, fixed_iter=fixed_iter,
                                                    robust=init == "median")
        z = rows.median()

    if torch.is_grad_enabled() and (G.requires_grad or (weights is not None and weights.requires_grad)):
        # One differentiable Weiszfeld step from the (detached) solution: the "one-step" gradient.
        # Its value equals the solution (the step's own value is rounded in the work dtype).
        with torch.no_grad():
            bound = torch.maximum(rows.distances_to_result(), floor)
        b = w / bound
        step = torch.matmul((b / b.sum(-1, keepdim=True)).unsqueeze(-2), X).squeeze(-2)
        z = z + (step - step.detach())
    return GeometricMedianResult(median=z.to(G.dtype), n_iter=n_iter, converged=done)


def _check_sample_matrix_fast(G, values: bool = True) -> None:
    """:func:`check_sample_matrix` with a cheaper finiteness test (none with ``values=False``).

    A sum is finite only if every term is (NaN and +-Inf propagate through additions), so one
    reduction replaces ``isfinite(G).all()`` (which writes a G-sized mask); only when the sum is
    not finite, which overflow can also cause, does the exact test decide.
    """
    check_float_tensor(G, "G", min_dim=2)
    n, d = G.shape[-2], G.shape[-1]
    if n == 0:
        raise ValueError(f"G has no samples (n = 0): shape {tuple(G.shape)}")
    if d == 0:
        raise ValueError(f"G has empty vectors (d = 0): shape {tuple(G.shape)}")
    if values and value_checks_enabled() and not bool(torch.isfinite(G.sum())):
        check_finite(G, "G")


def geometric_median_objective(
    G: torch.Tensor, z: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``sum_i w_i ||z - G_i||_2`` for each problem: shape (...,), in ``G``'s dtype.

    Computed in the wider of ``G``'s and ``z``'s dtypes (at least float32), on values scaled by
    a power of two so that no norm overflows; ``weights`` (..., n) must be nonnegative.
    """
    _check_sample_matrix_fast(G)
    check_float_tensor(z, "z", min_dim=1)
    if z.shape[-1] != G.shape[-1]:
        raise ValueError(f"z must have d = {G.shape[-1]} entries, got shape {tuple(z.shape)}")
    if z.device != G.device:
        raise ValueError(f"z must be on G's device {G.device}, got {z.device}")
    check_finite(z, "z")
    dtype = torch.promote_types(G.dtype, z.dtype)
    if weights is not None:
        check_float_tensor(weights, "weights", min_dim=1)
        if weights.device != G.device:
            raise ValueError(f"weights must be on G's device {G.device}, got {weights.device}")
        if weights.shape[-1] != G.shape[-2]:
            raise ValueError(
                f"weights must have shape (..., n) with n = {G.shape[-2]} samples, got {tuple(weights.shape)}"
            )
        check_finite(weights, "weights")
        if value_checks_enabled() and bool((weights < 0).any()):
            raise ValueError("weights must be nonnegative")
        dtype = torch.promote_types(dtype, weights.dtype)
    dtype = opmath_dtype(dtype)
    Gw, zw = G.to(dtype), z.to(dtype)
    s = _pow2_scale(torch.maximum(max_abs(Gw, (-2, -1)), max_abs(zw, -1)))  # (...,)
    diff = torch.addcmul((zw * s.unsqueeze(-1)).neg().unsqueeze(-2), Gw, s[..., None, None])
    dist = torch.linalg.vector_norm(diff, dim=-1)  # (..., n), scaled by s
    total = dist.sum(-1) if weights is None else (weights.to(dtype) * dist).sum(-1)
    return (total / s).to(G.dtype)
