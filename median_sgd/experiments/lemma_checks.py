"""Generic numerical argmins, to check closed-form prox and SPP steps against (chapter 2).

The closed forms of :mod:`median_sgd.prox` and :mod:`median_sgd.estimators` are derived in the
chapter "Proximal operators and clipping". To check them with something that knows none of those
formulas, this module minimises the defining objectives numerically:

* :func:`ellipsoid_argmin`: ``argmin_x f(x)`` for a convex ``f`` by the central-cut ellipsoid
  method, using subgradients from autograd. It needs no smoothness and converges geometrically:
  after ``k`` steps ``f(best) - f* <= (max_E0 f - f*) exp(-k / (2 d (d + 1)))``, if the minimiser
  lies in the starting ball ``E0``.
* :func:`numerical_prox`: ``argmin_y D(y) + ||y - v||^2 / (2 tau)`` (the prox of ``tau D``).
* :func:`numerical_spp_step`: ``argmin_y D(y - g) + ||y - m||^2 / (2 tau)`` (eq. 8 of the
  workshop paper, without the shift identity eq. 10).

``D`` is any convex, nonnegative function of the last dimension for which autograd returns a
subgradient (sums of ``abs``, ``vector_norm``, squares and maxima do; :func:`divergence` gives the
three of the book). Everything is batched over leading dimensions and stays on the input's device.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .._checks import Scalar, check_choice, check_float_tensor, check_real, check_same_kind, check_tau, check_vector

__all__ = ["divergence", "ellipsoid_argmin", "numerical_prox", "numerical_spp_step"]

Objective = Callable[[torch.Tensor], torch.Tensor]

_DIVERGENCES = {
    "sq": lambda x: 0.5 * (x * x).sum(dim=-1),
    "l2": lambda x: torch.linalg.vector_norm(x, dim=-1),
    "l1": lambda x: x.abs().sum(dim=-1),
}


def divergence(div: str) -> Objective:
    """The function ``D`` named by ``div``: ``"sq"`` ``||x||^2 / 2``, ``"l2"`` ``||x||_2``, ``"l1"`` ``||x||_1``.

    It maps ``(..., d)`` to ``(...)``, as the ``f`` of :func:`ellipsoid_argmin` expects.
    """
    check_choice(div, "div", tuple(_DIVERGENCES))
    return _DIVERGENCES[div]


def ellipsoid_argmin(
    f: Objective,
    center: torch.Tensor,
    radius: Scalar,
    *,
    iters: Optional[int] = None,
) -> torch.Tensor:
    """``argmin_x f(x)`` over the ball ``||x - center||_2 <= radius`` by the ellipsoid method.

    ``f`` maps ``(..., d)`` to ``(...)`` (one value per problem), is convex, and autograd must give a
    subgradient of it. Each step cuts the current ellipsoid ``{x : (x - c)^T P^-1 (x - c) <= 1}``
    by the half-space ``{x : u^T (x - c) <= 0}``, ``u`` a subgradient at the centre ``c`` (the
    minimiser lies in it, by convexity), and replaces it by the smallest ellipsoid containing the
    half: ``c <- c - P u~ / (d + 1)``, ``P <- d^2 / (d^2 - 1) (P - 2 / (d + 1) P u~ u~^T P)``,
    ``u~ = u / sqrt(u^T P u)`` (bisection when ``d = 1``), with ``P = B B^T`` updated through
    ``B`` for numerical stability. The ellipsoid's volume shrinks by at
    least ``exp(-1 / (2 (d + 1)))`` per step. Returns the centre with the smallest ``f`` seen.

    ``radius`` is a positive number or a tensor of one radius per problem; ``iters`` defaults to
    ``ceil(2 d (d + 1) log(1 / eps))`` with ``eps`` the dtype's machine epsilon, enough for ``f`` to
    reach its minimum to rounding. Batched over leading dimensions; no host synchronisation.
    """
    check_vector(center, "center")
    d = center.shape[-1]
    radius = check_tau(radius, center, "radius")  # a float, or (..., 1) broadcasting to the batch
    if iters is None:
        iters = math.ceil(2 * d * (d + 1) * math.log(1.0 / torch.finfo(center.dtype).eps))
    iters = int(check_real(iters, "iters", 0, integer=True))

    # P = B B^T is kept in factored form (Shor's space dilation): the update of B keeps P
    # positive semidefinite under rounding, which the update of P itself does not.
    eye = torch.eye(d, dtype=center.dtype, device=center.device)
    r = torch.as_tensor(radius, dtype=center.dtype, device=center.device)
    B = (r[..., None] * eye).expand(*center.shape[:-1], d, d).clone()
    shrink = d / math.sqrt(d * d - 1.0) if d > 1 else 0.5
    dilate = math.sqrt((d - 1.0) / (d + 1.0)) - 1.0 if d > 1 else 0.0
    c = center.detach().clone()
    best_x, best_f = c.clone(), _value(f, c)
    for _ in range(iters):
        value, u = _value_and_subgradient(f, c)
        better = value < best_f
        best_f = torch.where(better, value, best_f)
        best_x = torch.where(better[..., None], c, best_x)
        Btu = (B.transpose(-1, -2) @ u[..., None]).squeeze(-1)
        norm = torch.linalg.vector_norm(Btu, dim=-1, keepdim=True)
        # u = 0 means c is a minimiser; a collapsed ellipsoid (B^T u = 0) means we are done.
        active = norm > 0
        xi = torch.where(active, Btu / torch.where(active, norm, 1.0), 0.0)
        step = (B @ xi[..., None]).squeeze(-1)  # = P u / sqrt(u^T P u)
        c = c - step / (d + 1)
        B_new = shrink * (B + dilate * step[..., :, None] * xi[..., None, :])
        B = torch.where(active[..., None], B_new, B)
    value = _value(f, c)
    better = value < best_f
    return torch.where(better[..., None], c, best_x)


def numerical_prox(D: Objective, v: torch.Tensor, tau: Scalar, **options) -> torch.Tensor:
    """``argmin_y D(y) + ||y - v||^2 / (2 tau)`` (the prox of ``tau D`` at ``v``), numerically.

    ``D >= 0`` bounds the search: the objective at ``y = v`` is ``D(v)``, so the minimiser lies in the
    ball of radius ``sqrt(2 tau D(v))`` around ``v``. ``options`` go to :func:`ellipsoid_argmin`.
    """
    check_vector(v, "v")
    tau_b = check_tau(tau, v)
    v = v.detach()
    objective = lambda y: D(y) + ((y - v) ** 2).sum(dim=-1) / (2 * _squeeze(tau_b))  # noqa: E731
    return ellipsoid_argmin(objective, v, _radius(D(v), tau_b, v), **options)


def numerical_spp_step(D: Objective, m: torch.Tensor, g: torch.Tensor, tau: Scalar, **options) -> torch.Tensor:
    """``argmin_y D(y - g) + ||y - m||^2 / (2 tau)`` (the SPP step eq. 8), numerically.

    Solved as it is written, without the shift ``y = g + y^`` of eq. (10): the minimiser lies in
    the ball of radius ``sqrt(2 tau D(m - g))`` around ``m``.
    """
    check_vector(m, "m")
    check_vector(g, "g")
    check_same_kind(m, g, "m", "g")
    m, g = torch.broadcast_tensors(m.detach(), g.detach())
    tau_b = check_tau(tau, m)
    objective = lambda y: D(y - g) + ((y - m) ** 2).sum(dim=-1) / (2 * _squeeze(tau_b))  # noqa: E731
    return ellipsoid_argmin(objective, m, _radius(D(m - g), tau_b, m), **options)


def _squeeze(tau: Scalar) -> Scalar:
    return tau.squeeze(-1) if isinstance(tau, torch.Tensor) else tau


def _radius(d_value: torch.Tensor, tau: Scalar, like: torch.Tensor) -> torch.Tensor:
    check_float_tensor(d_value, "D(v)")
    if d_value.shape != like.shape[:-1]:
        raise ValueError(
            f"D must map (..., d) to (...): got shape {tuple(d_value.shape)} for input {tuple(like.shape)}"
        )
    r = torch.sqrt(2 * _squeeze(tau) * d_value.clamp_min(0.0))
    # A margin, and a floor so that D(v) = 0 (then y = v) still gives a proper ball.
    floor = torch.finfo(like.dtype).eps * (1.0 + torch.linalg.vector_norm(like, dim=-1))
    return (1.01 * r + floor).expand(like.shape[:-1]).contiguous()


def _value(f: Objective, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return f(x)


def _value_and_subgradient(f: Objective, x: torch.Tensor):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = f(x)
        (u,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), u
