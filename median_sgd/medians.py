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

from ._checks import check_finite, check_float_tensor, check_sample_matrix, value_checks_enabled

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
    check_sample_matrix(G)
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
    check_sample_matrix(G)
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

    ``fixed_iter=False`` stops once every problem has converged, which costs one host
    synchronisation per iteration on a GPU. ``fixed_iter=True`` always runs ``max_iter``
    iterations with no host synchronisation (for CUDA graphs and ``torch.compile``); the result
    is the same up to the frozen problems' extra zero steps.

    ``weights`` (..., n) are nonnegative with a positive sum per problem. The breakdown point is
    1/2: fewer than half of the total weight in outliers, however far, moves the median a bounded
    amount. Gradients flow through the final Weiszfeld step (the weights ``b_i`` are treated as
    constants), as in the RFA reference implementation.
    """
    check_sample_matrix(G)
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

    with torch.no_grad():
        X0 = X.detach()
        w0 = w.detach()
        w_sum = w0.sum(-1)  # (...,)
        z = torch.matmul(w0.unsqueeze(-2), X0).squeeze(-2) / w_sum.unsqueeze(-1)
        done = torch.zeros(batch, dtype=torch.bool, device=G.device)
        n_iter = torch.zeros(batch, dtype=torch.int64, device=G.device)
        rounding = 4 * torch.finfo(work_dtype).eps
        for _ in range(max_iter):
            diff = X0 - z.unsqueeze(-2)  # (..., n, d)
            dist = torch.linalg.vector_norm(diff, dim=-1)  # (..., n)
            floor = _distance_floor(dist, w0, w_sum, z, eps, rounding, uniform=weights is None)
            beta = w0 / torch.maximum(dist, floor)
            resultant = torch.matmul(beta.unsqueeze(-2), diff).squeeze(-2)  # (..., d)
            beta_sum = beta.sum(-1)
            step = resultant / beta_sum.unsqueeze(-1)
            active = ~done
            z = torch.where(active.unsqueeze(-1), z + step, z)
            n_iter = n_iter + active.to(torch.int64)
            # First-order optimality of sum_i w_i ||z - G_i||: the resultant of the unit vectors
            # must vanish, except that points within the floor of z (z on a data point) may
            # absorb up to their weight of it (the subdifferential of ||.|| at 0 is the unit ball).
            absorbed = (w0 * torch.clamp_min(1.0 - dist / floor, 0.0)).sum(-1)
            stationarity = torch.linalg.vector_norm(resultant, dim=-1) - absorbed
            done = done | (stationarity <= tol * w_sum)
            if not fixed_iter and bool(done.all()):
                break

    if torch.is_grad_enabled() and (G.requires_grad or (weights is not None and weights.requires_grad)):
        # One differentiable Weiszfeld step from the (detached) solution: the "one-step" gradient.
        dist = torch.linalg.vector_norm(X0 - z.unsqueeze(-2), dim=-1)
        b = w / torch.maximum(dist, floor)
        z = torch.matmul(b.unsqueeze(-2), X).squeeze(-2) / b.sum(-1, keepdim=True)
    return GeometricMedianResult(median=z.to(G.dtype), n_iter=n_iter, converged=done)


def _distance_floor(dist, w, w_sum, z, eps, rounding, *, uniform):
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
    mean = (w * dist).sum(-1) / w_sum
    scale = torch.where(med > 0, med, torch.where(mean > 0, mean, torch.ones_like(mean)))
    noise = rounding * torch.linalg.vector_norm(z, dim=-1)
    return torch.maximum(eps * scale, noise).unsqueeze(-1)


def geometric_median_objective(
    G: torch.Tensor, z: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``sum_i w_i ||z - G_i||_2`` for each problem: shape (...,)."""
    check_sample_matrix(G)
    check_float_tensor(z, "z", min_dim=1)
    if z.shape[-1] != G.shape[-1]:
        raise ValueError(f"z must have d = {G.shape[-1]} entries, got shape {tuple(z.shape)}")
    dist = torch.linalg.vector_norm(G - z.unsqueeze(-2), dim=-1)
    if weights is None:
        return dist.sum(-1)
    return (weights * dist).sum(-1)
