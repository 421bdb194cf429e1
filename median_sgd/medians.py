"""Medians across samples: coordinate-wise median, geometric median (Weiszfeld), trimmed mean.

A sample matrix ``G`` has shape ``(..., n, d)``: ``n`` samples (rows) of ``d``-dimensional
vectors; leading dimensions are independent problems solved at once. Each function returns the
``(..., d)`` aggregate with ``G``'s dtype and device and never modifies ``G``. Derived in the
chapter "The median as a robust estimator of the mean".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_finite, check_float_tensor, value_checks_enabled

__all__ = [
    "coordinate_median",
    "trimmed_mean",
    "geometric_median",
    "geometric_median_objective",
    "GeometricMedianResult",
]


def coordinate_median(G: torch.Tensor) -> torch.Tensor:
    """``median_j G[..., :, j]`` per coordinate; the mean of the two middle values when n is even.

    Uses ``kthvalue`` (no size limit, unlike ``torch.quantile``'s 2**24 elements).
    """
    _check_sample_matrix_fast(G)
    n = G.shape[-2]
    lower = torch.kthvalue(G, (n + 1) // 2, dim=-2).values
    if n % 2 == 1:
        return lower
    upper = torch.kthvalue(G, n // 2 + 1, dim=-2).values
    return (lower + upper) / 2


def trimmed_mean(G: torch.Tensor, trim: float) -> torch.Tensor:
    """Per coordinate, the mean of the values left after dropping ``floor(trim n)`` from each end.

    ``0 <= trim < 1/2``; ``trim = 0`` is the mean. Matches ``scipy.stats.trim_mean(G, trim, axis=-2)``.
    """
    _check_sample_matrix_fast(G)
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not (0.0 <= trim < 0.5):
        raise ValueError(f"trim must be a number in [0, 0.5), got {trim!r}")
    n = G.shape[-2]
    k = int(math.floor(trim * n))
    if k == 0:
        return G.mean(dim=-2)
    kept = torch.sort(G, dim=-2).values[..., k : n - k, :]
    return kept.mean(dim=-2)


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
) -> GeometricMedianResult:
    """``argmin_z sum_i w_i ||z - G_i||_2`` by smoothed Weiszfeld, started at the weighted mean.

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
    optimality condition when the median is a data point. ``tol`` should exceed the relative
    precision of the data's dtype (float32 data far from the origin relative to its spread may
    not reach ``1e-6``: ``converged`` then reports it). Converged problems are frozen while the
    others go on.

    ``fixed_iter=False`` stops once every problem has converged. On a GPU that costs a host
    synchronisation per check (every iteration for the first four, then every fourth; frozen
    problems make the extra iterations zero steps). ``fixed_iter=True`` always runs ``max_iter``
    iterations with no host synchronisation (for CUDA graphs and ``torch.compile``).

    Speed: every iteration reads ``G`` twice (distances, then the weighted sum), in column blocks
    so that no temporary as large as ``G`` is made. When few samples have many coordinates
    (``n <= 64`` and ``n d >= 2**16``), the adaptive mode instead iterates on the coefficients
    ``c`` of ``z = sum_j c_j G_j`` (every Weiszfeld iterate is such a combination) using the
    ``n x n`` Gram matrix ``G G^T`` (one pass over ``G``; the iteration in float64): an iteration
    then costs ``O(n^2)`` instead of ``O(n d)``. It hands the result to the exact iteration above, which
    checks the stopping rule on ``G`` itself and goes on if needed, so the answer satisfies the
    same rule and agrees with ``fixed_iter=True`` up to rounding (bit for bit otherwise).

    ``weights`` (..., n) are nonnegative with a positive sum per problem. The breakdown point is
    1/2: fewer than half of the total weight in outliers, however far, moves the median a bounded
    amount. Gradients flow through the final Weiszfeld step (the weights ``b_i`` are treated as
    constants), as in the RFA reference implementation.
    """
    _check_sample_matrix_fast(G, values=False)  # finiteness: below, from the mean
    n, d = G.shape[-2], G.shape[-1]
    batch = G.shape[:-2]
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")

    # Half precision: iterate in float32 and return the input's dtype.
    work_dtype = torch.float32 if G.dtype in (torch.float16, torch.bfloat16) else G.dtype
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
        w = weights.to(work_dtype).expand(*batch, n)

    uniform = weights is None
    with torch.no_grad():
        X0 = X.detach()
        w0 = w.detach()
        w_sum = w0.sum(-1)  # (...,)
        z = torch.matmul(w0.unsqueeze(-2), X0).squeeze(-2) / w_sum.unsqueeze(-1)
        if value_checks_enabled():
            # NaN and +-Inf propagate through sums, so a finite mean proves finite data (no pass
            # of its own); zero weights could hide a row, so weighted problems sum G instead
            probe = z if uniform else X0.sum()
            if not bool(torch.isfinite(probe).all()):
                check_finite(G, "G")  # decides (a non-finite sum may also be an overflow)
        done = torch.zeros(batch, dtype=torch.bool, device=G.device)
        n_iter = torch.zeros(batch, dtype=torch.int64, device=G.device)
        rounding = 4 * torch.finfo(work_dtype).eps
        cols = _block_columns(X0)
        budget = max_iter
        if not fixed_iter and max_iter > 1 and n <= _GRAM_MAX_N and n * d >= _GRAM_MIN_SIZE:
            c, n_iter = _weiszfeld_gram(X0, w0, w_sum, eps, tol, max_iter - 1, rounding, uniform)
            z = torch.matmul(c.to(work_dtype).unsqueeze(-2), X0).squeeze(-2)
            budget = max_iter - int(n_iter.min()) if n_iter.numel() else 1
        check = _check_schedule(G.device)
        tol_w = tol * w_sum
        floor = None
        for it in range(budget):
            dist, diff = _distances(X0, z, cols)
            floor = _distance_floor(dist, w0, w_sum, torch.linalg.vector_norm(z, dim=-1), eps, rounding,
                                    uniform=uniform)  # (..., 1)
            beta = w0 / torch.maximum(dist, floor)
            beta_sum = beta.sum(-1, keepdim=True)
            # the Weiszfeld step z_next - z = resultant / sum(beta), resultant = sum_i beta_i (G_i - z)
            if diff is not None:
                resultant = torch.matmul(beta.unsqueeze(-2), diff).squeeze(-2)
                res_norm = torch.linalg.vector_norm(resultant, dim=-1)
                z_next = torch.addcdiv(z, resultant, beta_sum)
            else:
                # sum_i beta_i G_i / sum(beta) reads G once and writes nothing of its size; its
                # rounding (~ eps max|G|) is that of storing z in the work dtype.
                z_next = torch.matmul((beta / beta_sum).unsqueeze(-2), X0).squeeze(-2)
                res_norm = beta_sum.squeeze(-1) * torch.linalg.vector_norm(z_next - z, dim=-1)
            active = ~done if budget == max_iter else ~done & (n_iter < max_iter)
            z = torch.where(active.unsqueeze(-1), z_next, z)
            n_iter = n_iter + active
            # First-order optimality of sum_i w_i ||z - G_i||: the resultant of the unit vectors
            # must vanish, except that points within the floor of z (z on a data point) may
            # absorb up to their weight of it (the subdifferential of ||.|| at 0 is the unit ball).
            absorbed = (w0 * torch.clamp_min(1.0 - dist / floor, 0.0)).sum(-1)
            done = done | ((res_norm - absorbed <= tol_w) & active)
            if not fixed_iter and check(it) and bool((done | (n_iter >= max_iter)).all()):
                break

    if torch.is_grad_enabled() and (G.requires_grad or (weights is not None and weights.requires_grad)):
        # One differentiable Weiszfeld step from the (detached) solution: the "one-step" gradient.
        dist, _ = _distances(X0, z, cols)
        b = w / torch.maximum(dist, floor)
        z = torch.matmul(b.unsqueeze(-2), X).squeeze(-2) / b.sum(-1, keepdim=True)
    return GeometricMedianResult(median=z.to(G.dtype), n_iter=n_iter, converged=done)


# The Gram (coefficient) iteration pays off when n is small against d: its set-up costs n^2 d
# multiply-adds once, an exact iteration about 2 n d memory reads every time.
_GRAM_MAX_N = 64
_GRAM_MIN_SIZE = 1 << 16
# Column blocks of at most this many elements (1 MiB in float32): temporaries stay in cache and
# below the allocator's mmap threshold, instead of a fresh G-sized array every iteration.
_BLOCK_ELEMENTS = 1 << 18
# The Gram matrix sums its products over at most this many columns in the work dtype (then in
# float64): its entries are then within about _GRAM_ERR machine epsilons of exact (relative to
# sqrt(K_ii K_jj); measured: at most ~3).
_GRAM_BLOCK_COLUMNS = 1 << 14
_GRAM_ERR = 16


def _block_columns(X: torch.Tensor) -> int:
    rows = max(1, X.numel() // X.shape[-1])
    return max(1, _BLOCK_ELEMENTS // rows)


def _check_schedule(device: torch.device):
    """When the adaptive loop asks the host whether every problem has converged."""
    if device.type == "cpu":
        return lambda it: True  # free on the CPU
    return lambda it: it < 4 or it % 4 == 3


def _distances(X, z, cols):
    """``||X_i - z||`` (..., n), and ``X - z`` when it fits in one block (else None)."""
    d = X.shape[-1]
    if cols >= d:
        diff = X - z.unsqueeze(-2)
        return torch.linalg.vector_norm(diff, dim=-1), diff
    sq = None
    for start in range(0, d, cols):
        block = X[..., start : start + cols] - z[..., None, start : start + cols]
        part = torch.linalg.vector_norm(block, dim=-1).square()
        sq = part if sq is None else sq + part
    return sq.sqrt(), None


def _weiszfeld_gram(X, w, w_sum, eps, tol, max_iter, rounding, uniform):
    """Weiszfeld on the coefficients ``c`` of ``z = sum_j c_j X_j`` (``sum_j c_j = 1``).

    With the Gram matrix ``K = X X^T`` (products in the work dtype, summed in float64 over column
    blocks), ``||X_i - z||^2 = K_ii - 2 (K c)_i + c^T K c`` and ``||z||^2 = c^T K c``; the Weiszfeld
    update is ``c <- b / sum b`` and the resultant's norm is ``sqrt(u^T K u)``,
    ``u = b - (sum b) c``. A distance computed so carries K's rounding, a relative error of about
    ``delta_i = _GRAM_ERR eps (K_ii + c^T K c) / r_i^2``, large near a data point or when the
    samples lie far from the origin relative to their spread; a problem stops here once its
    stopping quantity is within ``tol`` plus ``sum_i w_i delta_i`` of zero: beyond that this
    iteration cannot tell, and the exact one takes over. Returns ``c`` at the last iterate
    *before* the step whose test passed (the exact iteration repeats that step on the data) and
    the number of steps taken.
    """
    f64 = torch.float64
    n, d = X.shape[-2], X.shape[-1]
    batch = X.shape[:-2]
    K = torch.zeros(*batch, n, n, dtype=f64, device=X.device)
    for start in range(0, d, _GRAM_BLOCK_COLUMNS):
        block = X[..., start : start + _GRAM_BLOCK_COLUMNS]
        K = K + torch.matmul(block, block.mT).to(f64)
    w64, w_sum64 = w.to(f64), w_sum.to(f64)
    K_diag = K.diagonal(dim1=-2, dim2=-1)
    rel_err = _GRAM_ERR * torch.finfo(X.dtype).eps
    c = w64 / w_sum64.unsqueeze(-1)
    done = torch.zeros(batch, dtype=torch.bool, device=X.device)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=X.device)
    check = _check_schedule(X.device)
    for it in range(max_iter):
        Kc = torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        cKc = (c * Kc).sum(-1, keepdim=True)
        dist_sq = (K_diag - 2 * Kc + cKc).clamp_min(0.0)
        dist = dist_sq.sqrt()
        z_norm = cKc.squeeze(-1).clamp_min(0.0).sqrt()
        floor = _distance_floor(dist, w64, w_sum64, z_norm, eps, rounding, uniform=uniform)
        beta = w64 / torch.maximum(dist, floor)
        beta_sum = beta.sum(-1)
        u = beta - beta_sum.unsqueeze(-1) * c
        res_sq = (u * torch.matmul(K, u.unsqueeze(-1)).squeeze(-1)).sum(-1)
        absorbed = (w64 * torch.clamp_min(1.0 - dist / floor, 0.0)).sum(-1)
        stationarity = res_sq.clamp_min(0.0).sqrt() - absorbed
        noise = (w64 * (rel_err * (K_diag + cKc) / dist_sq.clamp_min(floor.square())).clamp_max(1.0)).sum(-1)
        done = done | (stationarity <= tol * w_sum64 + noise)
        c = torch.where(done.unsqueeze(-1), c, beta / beta_sum.unsqueeze(-1))
        n_iter = n_iter + ~done
        if check(it) and bool(done.all()):
            break
    return c, n_iter


def _distance_floor(dist, w, w_sum, z_norm, eps, rounding, *, uniform):
    """The smoothing floor of Weiszfeld's weights, shape (..., 1).

    ``eps`` times the weighted median distance from ``z``: a robust scale, which outliers (less
    than half of the weight), however far, cannot inflate; and at least the rounding noise of the
    distances, ``~ machine epsilon * ||z||``, below which a point is indistinguishable from ``z``.
    Falls back to the mean distance when at least half of the weight sits on ``z`` (then ``z`` is
    optimal), and to 1 when every point coincides with ``z`` (then any floor works).
    """
    if uniform:
        med = dist.median(dim=-1).values
    else:
        sorted_dist, order = dist.sort(dim=-1)
        cum = w.gather(-1, order).cumsum(-1)
        k = (cum < 0.5 * w_sum.unsqueeze(-1)).sum(-1, keepdim=True).clamp_max(dist.shape[-1] - 1)
        med = sorted_dist.gather(-1, k).squeeze(-1)
    mean = dist.mean(-1) if uniform else (w * dist).sum(-1) / w_sum
    scale = torch.where(med > 0, med, torch.where(mean > 0, mean, 1.0))
    noise = rounding * z_norm
    return torch.maximum(eps * scale, noise).unsqueeze(-1)


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
    """``sum_i w_i ||z - G_i||_2`` for each problem: shape (...,)."""
    _check_sample_matrix_fast(G)
    check_float_tensor(z, "z", min_dim=1)
    if z.shape[-1] != G.shape[-1]:
        raise ValueError(f"z must have d = {G.shape[-1]} entries, got shape {tuple(z.shape)}")
    dist = torch.linalg.vector_norm(G - z.unsqueeze(-2), dim=-1)
    if weights is None:
        return dist.sum(-1)
    return (weights * dist).sum(-1)
