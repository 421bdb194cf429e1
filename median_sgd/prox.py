"""Proximal operators of norms and the clipping operators they induce.

``prox_{tau D}(v) = argmin_y D(y) + ||y - v||^2 / (2 tau)``. For a norm ``D`` the Moreau
decomposition gives ``prox_{tau D}(v) = v - Proj_{tau B_*}(v)`` with ``B_*`` the unit ball of the
dual norm, and that projection is a clipping operator (``clip_l2`` for ``l2``, ``clip_l1`` for
``l1``). Lemmas A.1 and A.2 of the workshop paper follow:
``g + prox_{tau D}(m - g) = m + clip(g - m)``. Derived in the chapter "Proximal operators and
clipping".

Every function acts on the last dimension of ``v`` (the vector); leading dimensions are batch
dimensions. ``tau`` is a positive number or a tensor with one value per problem (broadcasting
against ``v.shape[:-1]``). Inputs are never modified; dtype and device are kept.
"""

from __future__ import annotations

import torch

from ._checks import Scalar, check_tau, check_vector

__all__ = ["prox_l1", "prox_l2", "prox_sq", "clip_l1", "clip_l2"]


def prox_l1(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Soft thresholding: ``prox_{tau ||.||_1}(v)_i = sign(v_i) max(|v_i| - tau, 0)``."""
    check_vector(v, "v")
    return torch.sign(v) * torch.clamp_min(v.abs() - check_tau(tau, v), 0.0)


def prox_l2(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Block soft thresholding: ``prox_{tau ||.||_2}(v) = max(1 - tau / ||v||_2, 0) v``."""
    check_vector(v, "v")
    tau = check_tau(tau, v)
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # tau / 0 = inf, so the zero vector maps to 0 (no epsilon needed).
    return torch.clamp_min(1.0 - tau / norm, 0.0) * v


def prox_sq(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Shrinkage: ``prox_{tau ||.||^2 / 2}(v) = v / (1 + tau)``."""
    check_vector(v, "v")
    tau = check_tau(tau, v)
    return v / (1.0 + tau)


def clip_l1(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Componentwise clipping: ``clip_{tau,1}(v)_i = min(max(v_i, -tau), tau)``."""
    check_vector(v, "v")
    return _clip_l1(v, check_tau(tau, v))


def clip_l2(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Vectorwise clipping: ``clip_{tau,2}(v) = tau / max(tau, ||v||_2) * v`` (exact, 0 -> 0)."""
    check_vector(v, "v")
    return _clip_l2(v, check_tau(tau, v))


# Unchecked kernels, for callers that validated ``v`` and shaped ``tau`` with ``check_tau``.


def _clip_l1(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    if isinstance(tau, float):
        return torch.clamp(v, -tau, tau)
    return torch.minimum(torch.maximum(v, -tau), tau)


def _clip_l2(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # torch.div, not ``tau / tensor``: for a Python number PyTorch evaluates the latter as
    # ``tensor.reciprocal() * tau``, which is not exactly 1 when ||v|| <= tau.
    return torch.div(tau, torch.clamp_min(norm, tau)) * v
