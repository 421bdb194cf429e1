"""One step of the online estimators of ``argmin_m E_g D(m - g)`` (the D-median of the gradient).

``D`` is named by ``div``: ``"sq"`` for ``||.||^2 / 2`` (its minimiser is the mean), ``"l2"`` for
``||.||_2`` (the geometric median) and ``"l1"`` for ``||.||_1`` (the coordinate-wise median).

* :func:`spp_step` is the stochastic proximal point step (eqs. 8-10 of the workshop paper),
  ``m+ = g + prox_{tau D}(m - g)``: momentum with ``beta = 1/(1+tau)`` (eq. 11), Clip21 /
  vectorwise clipping (Lemma 2.1) and componentwise clipping (Lemma 2.2).
* :func:`sgd_step` is the stochastic subgradient step (eq. 6), ``m+ = m - tau u`` with
  ``u in dD(m - g)``: momentum with ``beta = 1 - tau`` (eq. 7), adaptive momentum and the signed
  increment (Appendix B).

:func:`spp_step_lp` and :func:`sgd_step_lp` do the same for ``D = ||.||_p``, ``1 <= p <= inf``
(chapter "Beyond the paper"): ``m + clip_{tau,p}(g - m)`` (projection onto the dual-norm ball)
and ``m + tau grad||g - m||_p``.

Derived in the chapter "Online estimators across iterations". ``m`` and ``g`` hold vectors on the
last dimension; leading dimensions broadcast (for example ``m`` of shape ``(d,)`` against ``g``
of shape ``(seeds, d)``). Inputs are never modified.
"""

from __future__ import annotations

import math

import torch

from ._checks import Scalar, check_choice, check_same_kind, check_tau, check_vector
from .prox import _check_p, _clip_l1, _clip_l2, _clip_lp, l2_norm

__all__ = ["DIVERGENCES", "spp_step", "sgd_step", "spp_step_lp", "sgd_step_lp", "lp_norm_grad"]

DIVERGENCES = ("sq", "l2", "l1")


def _check_pair(m: torch.Tensor, g: torch.Tensor) -> torch.Size:
    check_vector(m, "m")
    check_vector(g, "g")
    check_same_kind(m, g, "m", "g")
    if m.shape[-1] != g.shape[-1]:
        raise ValueError(
            f"m and g must have the same vector dimension, got shapes {tuple(m.shape)} and "
            f"{tuple(g.shape)}"
        )
    try:
        return torch.broadcast_shapes(m.shape, g.shape)
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of m {tuple(m.shape)} and g {tuple(g.shape)} do not broadcast"
        ) from None


def spp_step(m: torch.Tensor, g: torch.Tensor, tau: Scalar, div: str) -> torch.Tensor:
    """SPP step ``m+ = argmin_y D(y - g) + ||y - m||^2 / (2 tau) = g + prox_{tau D}(m - g)``.

    ``"sq"``: ``m + tau/(1+tau) (g - m)`` (momentum, ``beta = 1/(1+tau)``);
    ``"l2"``: ``m + clip_l2(g - m, tau)`` (Clip21); ``"l1"``: ``m + clip_l1(g - m, tau)``.
    """
    check_choice(div, "div", DIVERGENCES)
    shape = _check_pair(m, g)
    tau = check_tau(tau, _like(m, shape), "tau")
    delta = g - m
    if div == "sq":
        return m + (tau / (1.0 + tau)) * delta
    if div == "l2":
        return m + _clip_l2(delta, tau)
    return m + _clip_l1(delta, tau)


def sgd_step(m: torch.Tensor, g: torch.Tensor, tau: Scalar, div: str) -> torch.Tensor:
    """Subgradient step ``m+ = m - tau u``, ``u in dD(m - g)`` (``u = 0`` where ``D`` has a kink).

    ``"sq"``: ``(1 - tau) m + tau g`` (momentum, ``beta = 1 - tau``);
    ``"l2"``: ``m + tau (g - m) / ||g - m||_2`` (adaptive momentum, ``m`` if ``g = m``);
    ``"l1"``: ``m + tau sign(g - m)`` (signed increment).
    """
    check_choice(div, "div", DIVERGENCES)
    shape = _check_pair(m, g)
    tau = check_tau(tau, _like(m, shape), "tau", in_range=True)
    delta = g - m
    if div == "sq":
        return m + tau * delta
    if div == "l2":
        # delta / ||delta|| = (delta s) / ||delta s||, scaled where the norm over- or underflows;
        # the subgradient 0 is chosen at delta = 0.
        norm, _, scaled = l2_norm(delta, tiny=True)
        unit = torch.where(norm > 0, scaled / torch.where(norm > 0, norm, 1.0), 0.0)
        return m + tau * unit.to(delta.dtype)
    return m + tau * torch.sign(delta)


def _like(m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A zero-cost stand-in of the broadcast shape, for validating ``tau`` against it."""
    return m.new_empty(()).expand(shape)


def spp_step_lp(m: torch.Tensor, g: torch.Tensor, tau: Scalar, p: float) -> torch.Tensor:
    """SPP step for ``D = ||.||_p``: ``m+ = g + prox_{tau ||.||_p}(m - g) = m + clip_{tau,p}(g - m)``.

    ``clip_{tau,p}`` projects onto the ``tau``-ball of the dual norm ``||.||_q``, ``1/p + 1/q = 1``
    (:func:`~median_sgd.clip_lp`). ``p = 1`` and ``p = 2`` are exactly
    ``spp_step(m, g, tau, "l1")`` and ``spp_step(m, g, tau, "l2")``; ``p = inf`` projects onto the
    ``l_1`` ball.
    """
    p = _check_p(p)
    shape = _check_pair(m, g)
    tau = check_tau(tau, _like(m, shape), "tau")
    return m + _clip_lp(g - m, tau, p)


def lp_norm_grad(v: torch.Tensor, p: float) -> torch.Tensor:
    """A subgradient of ``||.||_p`` at ``v``: ``sign(v) |v|^(p-1) / ||v||_p^(p-1)`` (0 at ``v = 0``).

    ``p = 1``: ``sign(v)``; ``p = inf``: ``sign(v_j) / #J`` on the set ``J`` of largest ``|v_j|``
    (the minimum-norm subgradient). Computed with ``v`` scaled by its largest entry, so no overflow.
    """
    check_vector(v, "v")
    return _lp_norm_grad(v, _check_p(p))


def _lp_norm_grad(v: torch.Tensor, p: float) -> torch.Tensor:
    if p == 1.0:
        return torch.sign(v)
    a = v.abs()
    a_max = a.amax(-1, keepdim=True)
    if p == math.inf:
        top = (a == a_max) & (a_max > 0)
        return torch.sign(v) * top / top.sum(-1, keepdim=True).clamp_min(1)
    u = a / torch.where(a_max > 0, a_max, 1.0)  # in [0, 1], max 1 unless v = 0
    norm = torch.linalg.vector_norm(u, ord=p, dim=-1, keepdim=True)
    return torch.sign(v) * (u / torch.where(norm > 0, norm, 1.0)) ** (p - 1.0)


def sgd_step_lp(m: torch.Tensor, g: torch.Tensor, tau: Scalar, p: float) -> torch.Tensor:
    """Subgradient step for ``D = ||.||_p``: ``m+ = m + tau grad||.||_p(g - m)`` (:func:`~median_sgd.estimators.lp_norm_grad`).

    ``p = 1`` is ``sgd_step(m, g, tau, "l1")`` (signed increment) and ``p = 2`` is
    ``sgd_step(m, g, tau, "l2")`` (adaptive momentum), up to rounding.
    """
    p = _check_p(p)
    shape = _check_pair(m, g)
    tau = check_tau(tau, _like(m, shape), "tau", in_range=True)
    return m + tau * _lp_norm_grad(g - m, p)
