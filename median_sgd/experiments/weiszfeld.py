"""Weiszfeld's iteration under the microscope (chapter "The geometric median").

``z_{k+1} = sum_i beta_i G_i / sum_i beta_i`` with ``beta_i = w_i / max(||z_k - G_i||, nu)``:

* ``nu = 0`` is Weiszfeld's original iteration (1937), undefined when an iterate lands on a data
  point (the weights divide by zero: the path turns into NaN);
* ``nu > 0`` is the smoothed iteration of RFA (Pillutla, Kakade and Harchaoui, 2022), a
  majorise-minimise method for the smoothed objective :func:`smoothed_objective`
  ``f_nu(z) = sum_i w_i h_nu(||z - G_i||)`` with ``h_nu(r) = r`` for ``r >= nu`` and
  ``r^2 / (2 nu) + nu / 2`` below (a Huber function), so ``f <= f_nu <= f + nu sum_i w_i / 2``.

These are teaching tools that record whole paths; the solver to use is
``median_sgd.geometric_median`` (relative floor, stopping rule, batched, sync-free mode).
:func:`objective_trace` records the objective along *that* solver's iterates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import check_float_tensor, check_real, check_sample_matrix
from ..medians import geometric_median, geometric_median_objective
from ..weiszfeld import weiszfeld

__all__ = ["weiszfeld_path", "smoothed_objective", "objective_trace"]


def _check_weights(G: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return G.new_ones(G.shape[:-1])
    check_float_tensor(weights, "weights", min_dim=1)
    if weights.shape[-1] != G.shape[-2]:
        raise ValueError(f"weights must have shape (..., n) with n = {G.shape[-2]}, got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or bool((weights.sum(-1) <= 0).any()):
        raise ValueError("weights must be nonnegative with a positive sum")
    return weights.to(G.dtype).expand(G.shape[:-1])


def _check_nu(nu, *, allow_zero: bool) -> float:
    return check_real(nu, "nu", 0.0, lo_open=not allow_zero)


def weiszfeld_path(
    G: torch.Tensor,
    iters: int,
    *,
    nu: float = 0.0,
    weights: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The iterates ``z_0, ..., z_iters`` of (smoothed) Weiszfeld: shape ``(iters + 1, ..., d)``.

    ``z_0`` is ``start`` (default: the weighted mean). ``nu = 0``: the original iteration, NaN
    from the first iterate that hits a data point on. ``G`` (..., n, d) is not modified.
    """
    check_sample_matrix(G)
    iters = int(check_real(iters, "iters", 0, integer=True))
    nu = _check_nu(nu, allow_zero=True)
    w = _check_weights(G, weights)
    if start is None:
        z = (w.unsqueeze(-1) * G).sum(-2) / w.sum(-1, keepdim=True)
    else:
        check_float_tensor(start, "start", min_dim=1)
        if start.shape != G.shape[:-2] + G.shape[-1:]:
            raise ValueError(f"start must have shape {tuple(G.shape[:-2] + G.shape[-1:])}, got {tuple(start.shape)}")
        z = start.to(G.dtype)
    rows = _PathRows(G, w, z)
    # tol = -inf: no iterate is ever frozen as converged, the path runs all ``iters`` steps
    weiszfeld(rows, eps=1.0, tol=-math.inf, max_iter=max(iters, 1), fixed_iter=True,
              budget=iters, nu=nu)
    path = rows.path
    return torch.stack(path)


class _PathRows:
    """:func:`median_sgd.weiszfeld.weiszfeld`'s backend for the plain iteration: the rows of ``G``
    as they are (no scaling, no centring, no rounding floor), every iterate recorded."""

    uniform = False

    def __init__(self, G, w, start) -> None:
        self.G, self.w, self.w_sum = G, w, w.sum(-1)
        self.path = [start]

    def distances(self):
        return torch.linalg.vector_norm(self.G - self.path[-1].unsqueeze(-2), dim=-1), self.w, self.w_sum

    def resolution(self):
        return 0.0

    def noise(self):
        return self.w_sum.new_zeros(())

    def step(self, beta, beta_sum, active):
        # nu = 0: 1/0 = inf on a data point, then inf/inf = NaN (Weiszfeld's original iteration)
        z = (beta.unsqueeze(-1) * self.G).sum(-2) / beta_sum
        self.path.append(z)
        return torch.zeros_like(self.w_sum)


def smoothed_objective(
    G: torch.Tensor, z: torch.Tensor, nu: float, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``f_nu(z) = sum_i w_i h_nu(||z - G_i||)``, ``h_nu(r) = r`` if ``r >= nu`` else ``r^2/(2 nu) + nu/2``.

    ``nu > 0``. Shape (...,): one value per problem. Continuously differentiable, and
    ``f(z) <= f_nu(z) <= f(z) + nu sum_i w_i / 2`` with ``f`` the geometric-median objective.
    """
    check_sample_matrix(G)
    check_float_tensor(z, "z", min_dim=1)
    if z.shape[-1] != G.shape[-1]:
        raise ValueError(f"z must have d = {G.shape[-1]} entries, got shape {tuple(z.shape)}")
    nu = _check_nu(nu, allow_zero=False)
    w = _check_weights(G, weights)
    r = torch.linalg.vector_norm(G - z.unsqueeze(-2), dim=-1)
    h = torch.where(r >= nu, r, r * r / (2 * nu) + nu / 2)
    return (w * h).sum(-1)


def objective_trace(G: torch.Tensor, iters: int, **gm_options) -> torch.Tensor:
    """``f(z_k)`` for ``k = 0..iters`` along ``median_sgd.geometric_median``'s own iterates.

    ``z_0`` is the mean (the solver's start) and ``z_k`` its answer with ``max_iter=k, tol=0``
    (it can stop earlier only at an exact optimum). Shape ``(iters + 1, ...)``. Reruns the solver
    for each ``k``: quadratic in ``iters``, meant for small problems.
    """
    check_sample_matrix(G)
    iters = int(check_real(iters, "iters", 0, integer=True))
    if "max_iter" in gm_options or "tol" in gm_options:
        raise ValueError("objective_trace sets max_iter and tol itself")
    values = [geometric_median_objective(G, G.mean(-2))]
    for k in range(1, iters + 1):
        z = geometric_median(G, max_iter=k, tol=0.0, **gm_options).median
        values.append(geometric_median_objective(G, z))
    return torch.stack(values)
