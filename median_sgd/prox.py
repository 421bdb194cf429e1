"""Proximal operators of norms and the clipping operators they induce.

``prox_{tau D}(v) = argmin_y D(y) + ||y - v||^2 / (2 tau)``. For a norm ``D`` the Moreau
decomposition gives ``prox_{tau D}(v) = v - Proj_{tau B_*}(v)`` with ``B_*`` the unit ball of the
dual norm, and that projection is a clipping operator (``clip_l2`` for ``l2``, ``clip_l1`` for
``l1``). Lemmas A.1 and A.2 of the workshop paper follow:
``g + prox_{tau D}(m - g) = m + clip(g - m)``. Derived in the chapter "Proximal operators and
clipping". :func:`prox_lp` and :func:`clip_lp` extend this to every ``l_p`` norm, ``1 <= p <= inf``
(chapter "Beyond the paper"): the dual ball is the ``l_q`` ball, ``1/p + 1/q = 1``, and for
``1 < p < inf`` its projection is computed by a batched Newton iteration on one scalar.

Every function acts on the last dimension of ``v`` (the vector); leading dimensions are batch
dimensions. ``tau`` is a positive number or a tensor with one value per problem (broadcasting
against ``v.shape[:-1]``). Inputs are never modified; dtype and device are kept.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ._checks import Scalar, check_tau, check_vector
from ._numerics import host_reads_are_free, opmath_dtype, pow2_scale

__all__ = ["prox_l1", "prox_l2", "prox_sq", "clip_l1", "clip_l2", "prox_lp", "clip_lp"]


def prox_l1(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Soft thresholding: ``prox_{tau ||.||_1}(v)_i = sign(v_i) max(|v_i| - tau, 0)``."""
    check_vector(v, "v")
    tau = check_tau(tau, v)
    return torch.sign(v) * torch.clamp_min(v.abs() - radius_in_range(tau, v.dtype), 0.0)


def prox_l2(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Block soft thresholding: ``prox_{tau ||.||_2}(v) = max(1 - tau / ||v||_2, 0) v``."""
    check_vector(v, "v")
    tau = check_tau(tau, v)
    norm, scale, vs = l2_norm(v)
    # ||v|| = norm / scale; tau / 0 = inf, so the zero vector maps to 0 (no epsilon needed).
    ratio = torch.div(tau, norm) if scale is None else torch.div(tau * scale, norm)
    return _times(vs if scale is None else v, torch.clamp_min(1.0 - ratio, 0.0), v.dtype)


def prox_sq(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Shrinkage: ``prox_{tau ||.||^2 / 2}(v) = v / (1 + tau)``."""
    check_vector(v, "v")
    tau = check_tau(tau, v)
    return v / (1.0 + radius_in_range(tau, v.dtype))


def clip_l1(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Componentwise clipping: ``clip_{tau,1}(v)_i = min(max(v_i, -tau), tau)``."""
    check_vector(v, "v")
    return clip_l1_unchecked(v, check_tau(tau, v))


def clip_l2(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Vectorwise clipping: ``clip_{tau,2}(v) = tau / max(tau, ||v||_2) * v`` (exact, 0 -> 0)."""
    check_vector(v, "v")
    return clip_l2_unchecked(v, check_tau(tau, v))


# ---------------------------------------------------------------------------------------------
# Norms that do not overflow

def l2_norm(x: torch.Tensor, dim: Optional[int] = -1, *, tiny: bool = False):
    """``||x||_2 = n / s`` without overflow: returns ``(n, s, xs)`` with ``xs = x s`` and ``n = ||xs||``.

    ``n`` is in the arithmetic dtype (float32 for float16 / bfloat16 data, whose squares
    overflow their own range); ``s`` is ``None`` (meaning 1, and ``xs`` is ``x`` itself) or a
    tensor of powers of two, one per vector (``keepdim`` shape; 0-dim for ``dim=None``, the
    whole tensor). Powers of two scale exactly, so where ``s`` is 1 the result is bit for bit
    the plain norm. As LAPACK's ``nrm2`` does, a vector is scaled by its largest magnitude
    (to about ``2**32``) only where its sum of squares would overflow (``tiny=True``: or
    underflow to 0, which matters for ``x / ||x||``). Float16 data never needs it (float32
    holds any sum of float16 squares). On the CPU the check is a free host read and the common
    path costs one flag test; elsewhere (and under ``torch.compile``) every vector is scaled,
    without reading anything on the host: one max-magnitude reduction and one scaled copy more.
    """
    work = opmath_dtype(x.dtype)
    keepdim = dim is not None
    plain_dtype = work if work != x.dtype else None
    if x.numel() == 0 or (x.dtype == torch.float16 and not tiny):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=plain_dtype), None, x
    if host_reads_are_free(x):
        n = torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=plain_dtype)
        if tiny:
            lo, hi = (float(t) for t in torch.aminmax(n))
            fine = lo > 0 and not math.isinf(hi)
        else:
            # NaN is fine: the norm of NaN data
            fine = not math.isinf(float(n if n.dim() == 0 else n.amax()))
        if fine:
            return n, None, x
    a = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    s = _power_of_two_scale(a.to(work), tiny)
    xs = x.to(work) * s
    return torch.linalg.vector_norm(xs, dim=dim, keepdim=keepdim), s, xs


def _power_of_two_scale(a: torch.Tensor, tiny: bool) -> torch.Tensor:
    """``2**-k`` with ``a 2**-k`` in ``[2**32, 2**33)``: sums of up to ``2**60`` squares stay finite.

    Only large vectors are scaled down (``k >= 0``; with ``tiny``, small ones are scaled up,
    within the dtype's range). ``a`` = Inf or NaN gives 1 (the norm is then Inf or NaN).
    """
    s = pow2_scale(a, 33)
    return s if tiny else s.clamp(max=1.0)


def radius_in_range(tau: Scalar, dtype: torch.dtype) -> Scalar:
    """A Python ``tau`` above the largest value of ``dtype`` becomes what it rounds to there (inf).

    PyTorch refuses to convert such a number into a tensor's dtype (``RuntimeError``); as a
    clipping radius, tau beyond the range means no clipping, which inf states exactly.
    """
    if isinstance(tau, float) and tau > torch.finfo(opmath_dtype(dtype)).max:
        return math.inf
    return tau


def _times(v: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``factor * v`` in the arithmetic dtype, returned in ``dtype`` (a float32 factor on float16
    data may be below float16's normal range)."""
    out = factor * v
    return out if out.dtype == dtype else out.to(dtype)


# Unchecked kernels, for callers that validated ``v`` and shaped ``tau`` with ``check_tau``.


def clip_l1_unchecked(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    if isinstance(tau, float):
        tau = radius_in_range(tau, v.dtype)
        return torch.clamp(v, -tau, tau)  # type: ignore[arg-type]  # a float: clamp takes numbers
    return torch.minimum(torch.maximum(v, -tau), tau)  # type: ignore[arg-type]  # a tensor here


def l2_step_weight(norm: torch.Tensor, scale: Optional[torch.Tensor], tau: Scalar, *,
                   clip: bool = True, of_scaled: bool = False) -> torch.Tensor:
    """The weight ``f`` of the step ``f v`` along ``v`` with ``||v||_2 = norm / scale`` (:func:`l2_norm`).

    ``clip=True``: ``tau / max(tau, ||v||)`` (:func:`clip_l2`: exactly 1 inside the ball);
    ``clip=False``: ``tau / ||v||``, and 0 where ``v = 0`` (a step of length ``tau`` along ``v``,
    the subgradient 0 chosen at the kink). With ``of_scaled`` the weight applies to the scaled
    vector ``v scale`` instead, so it never leaves the range (``tau / ||v||`` itself can be below
    the smallest normal number when ``||v||`` overflows). The one clipping rule of the package:
    :func:`clip_l2`, the estimators' ``"l2"`` steps and Clip21 use it.
    """
    if scale is None:
        if not clip:
            return torch.where(norm > 0, torch.div(tau, norm), torch.zeros_like(norm))
        # torch.div, not ``tau / tensor``: for a Python number PyTorch evaluates the latter as
        # ``tensor.reciprocal() * tau``, which is not exactly tau / ||v||.
        if not isinstance(tau, torch.Tensor) and tau <= torch.finfo(norm.dtype).max:
            return torch.div(tau, norm.clamp_min(tau))
        return torch.where(norm <= tau, 1.0, torch.div(tau, norm))  # inf / inf would be NaN
    ratio = torch.div(tau, norm)  # tau / ||v scale||: in range, the scaled norm is ~2**32
    if clip:
        inside = norm <= tau * scale
        return torch.where(inside, 1.0 / scale if of_scaled else 1.0, ratio if of_scaled else ratio * scale)
    return torch.where(norm > 0, ratio if of_scaled else ratio * scale, 0.0)


def clip_l2_unchecked(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    norm, scale, vs = l2_norm(v)
    # 1 where ||v|| <= tau (exactly: no rounding inside the ball), tau / ||v|| outside
    return _times(vs, l2_step_weight(norm, scale, tau, of_scaled=True), v.dtype)


# ---------------------------------------------------------------------------------------------
# General l_p norms (chapter "Beyond the paper")
# ---------------------------------------------------------------------------------------------

#: Largest finite ``p`` of the Newton solver (its iteration counts are tested up to here); use
#: ``p = inf`` beyond. Finite ``p`` must also be at least ``LP_MIN_ABOVE_ONE`` (or exactly 1).
LP_MAX_FINITE = 20.0
LP_MIN_ABOVE_ONE = 1.01
# Iterations of the projection onto the l_q ball. Each outer (safeguarded Newton) step on the
# multiplier solves the d scalar equations afresh with ``_LP_INNER`` Newton steps from a start
# within a factor 2 of the root (enough for ~1e-12 relative accuracy for every supported p).
# The outer count ``_LP_OUTER`` is what float64 needs on hard cases plus a margin
# (tests/test_prox_lp.py). On the CPU the outer loop stops once every problem's multiplier has
# converged (reading that flag costs nothing there); on other devices, and under torch.compile,
# it runs the full count, so it never synchronises with the host.
_LP_INNER, _LP_OUTER = 8, 12


def check_p(p) -> float:
    """``p`` must be a real number with ``1 <= p <= LP_MAX_FINITE`` or ``p = inf``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number, got {type(p).__name__}")
    p = float(p)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"p must be >= 1 (an l_p norm), got {p}")
    if 1.0 < p < LP_MIN_ABOVE_ONE:
        raise ValueError(f"p = {p} is not supported: use p = 1 or p >= {LP_MIN_ABOVE_ONE}")
    if math.isfinite(p) and p > LP_MAX_FINITE:
        raise ValueError(
            f"p = {p} is not supported: finite p must be <= {LP_MAX_FINITE:g} (use p = inf beyond)"
        )
    return p


def dual_exponent(p: float) -> float:
    """``q`` with ``1/p + 1/q = 1`` (``1 -> inf``, ``inf -> 1``)."""
    p = check_p(p)
    if p == 1.0:
        return math.inf
    if p == math.inf:
        return 1.0
    return p / (p - 1.0)


def clip_lp(v: torch.Tensor, tau: Scalar, p: float) -> torch.Tensor:
    """Projection onto the dual ball: ``clip_{tau,p}(v) = argmin_{||x||_q <= tau} ||x - v||_2``, ``1/p + 1/q = 1``.

    ``p = 1`` is :func:`clip_l1` (the box), ``p = 2`` is :func:`clip_l2`, ``p = inf`` projects onto
    the ``l_1`` ball (sort-based). For ``1 < p < inf`` the projection is
    ``x_i = sign(v_i) tau y_i`` with ``y_i + mu y_i^(q-1) = |v_i| / tau`` and ``sum_i y_i^q = 1``:
    a Newton iteration on the scalar multiplier ``mu`` (started at ``||v/tau||_p``, where
    ``sum_i y_i^q <= 1``) around Newton iterations on ``log y_i`` (a convex equation), with fixed
    iteration counts (no host synchronisation), accurate to ~1e-14 relative in float64.
    """
    check_vector(v, "v")
    p = check_p(p)
    return clip_lp_unchecked(v, check_tau(tau, v), p)


def prox_lp(v: torch.Tensor, tau: Scalar, p: float) -> torch.Tensor:
    """Moreau decomposition: ``prox_{tau ||.||_p}(v) = v - clip_{tau,p}(v)`` (projection onto the dual ball).

    ``p = 1`` equals :func:`prox_l1` and ``p = 2`` :func:`prox_l2` up to rounding.
    """
    check_vector(v, "v")
    p = check_p(p)
    return v - clip_lp_unchecked(v, check_tau(tau, v), p)


def clip_lp_unchecked(v: torch.Tensor, tau: Scalar, p: float) -> torch.Tensor:
    if p == 1.0:
        return clip_l1_unchecked(v, tau)
    if p == 2.0:
        return clip_l2_unchecked(v, tau)
    work = v if v.dtype in (torch.float32, torch.float64) else v.float()
    if p == math.inf:
        out = _project_l1_ball(work, tau)
    else:
        out = _project_lq_ball(work, tau, p / (p - 1.0))
    return out.to(v.dtype)


def _project_l1_ball(v: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """Sort-based projection onto ``{||x||_1 <= tau}`` (Duchi et al., 2008), batched.

    With ``u`` the sorted magnitudes (descending), the threshold is ``theta = u_rho - r``,
    ``r = (tau - D_rho) / rho``, where ``D_j = sum_{i<j} (u_i - u_j)`` and ``rho`` is the number
    of ``j`` with ``D_j < tau``. ``D`` is accumulated from the gaps ``j (u_j - u_{j+1}) >= 0``
    (no cancellation), and the result ``|v_i| - theta = (|v_i| - u_rho) + r`` is formed from
    differences, so tau is not lost next to entries far larger than it (``u_j j`` and the
    cumulative sums of the textbook form round tau away, and overflow).
    """
    a = v.abs()
    u = torch.sort(a, dim=-1, descending=True).values
    j = torch.arange(1, v.shape[-1], device=v.device, dtype=v.dtype)
    gaps = (u[..., :-1] - u[..., 1:]) * j  # j (u_j - u_{j+1}), j = 1..d-1
    D = torch.cat([torch.zeros_like(u[..., :1]), torch.cumsum(gaps, dim=-1)], dim=-1)
    rho = (D < tau).sum(-1, keepdim=True).clamp_min(1)  # D_1 = 0 < tau: rho >= 1
    shift = (tau - D.gather(-1, rho - 1)) / rho.to(v.dtype)
    out = torch.sign(v) * torch.clamp_min((a - u.gather(-1, rho - 1)) + shift, 0.0)
    inside = a.sum(-1, keepdim=True) <= tau
    return torch.where(inside, v, out)


def _lq_inner(log_b, log_mu, k, iters, early_exit=False):
    """Solve ``y + mu y^k = b`` for ``t = log y``: Newton on ``G(t) = t + log(1 + mu e^((k-1) t)) - log b``.

    ``G`` is convex and increasing (``G' = 1 + (k-1) sigmoid(.)`` lies between ``min(1, k)`` and
    ``max(1, k)``). The start ``min(log b, (log b - log mu)/k)`` lies right of the root (each
    term alone is at most ``b``) by at most ``log 2 max(1, 1/k)`` (the larger term is at least
    ``b/2``), and from there Newton decreases monotonically to the root. With ``early_exit`` (the
    CPU path) the loop stops once no step exceeds a few ulps of ``t``.
    """
    t = torch.minimum(log_b, (log_b - log_mu) / k)
    zero = torch.zeros((), device=log_b.device, dtype=log_b.dtype)
    tol = 8.0 * torch.finfo(log_b.dtype).eps
    for _ in range(iters):
        z = torch.add(log_mu, t, alpha=k - 1.0)
        softplus = torch.logaddexp(z, zero)  # log(1 + e^z)
        slope = torch.exp(z - softplus).mul_(k - 1.0).add_(1.0)  # 1 + (k-1) sigmoid(z)
        step = (t + softplus - log_b) / slope
        t = t - step
        if early_exit and bool((step.abs() <= tol * (1.0 + t.abs())).all()):
            break
    return t


def _project_lq_ball(v: torch.Tensor, tau: Scalar, q: float) -> torch.Tensor:
    """Projection onto ``{||x||_q <= tau}`` for ``1 < q < inf``, batched over leading dimensions.

    ``x_i = sign(v_i) tau y_i`` where ``y_i(mu)`` solves ``y + mu y^(q-1) = |v_i|/tau`` and the
    multiplier ``mu > 0`` solves ``psi(mu) = (sum_i y_i^q)^(-1/p) - 1 = 0`` (``psi`` increases;
    ``psi(0) < 0`` outside the ball and ``psi(||v/tau||_p) >= 0``): Newton on ``psi`` (with the
    implicit derivative of ``y``), kept inside the bracket: a step that leaves it is replaced by
    the bracket's secant point.
    """
    p = q / (q - 1.0)
    k = q - 1.0
    b = v.abs() / tau  # project b >= 0 onto the unit ball, then scale back
    b_max = b.amax(-1, keepdim=True)
    scaled = b / torch.where(b_max > 0, b_max, 1.0)  # norms without overflow
    inside = b_max * torch.linalg.vector_norm(scaled, ord=q, dim=-1, keepdim=True) <= 1.0
    positive = b > 0
    log_b = torch.log(torch.where(positive, b, 1.0))
    # hi = ||b||_p: there y_i <= (b_i/mu)^(1/(q-1)) gives sum_i y_i^q <= 1, so mu* <= hi.
    hi = b_max * torch.linalg.vector_norm(scaled, ord=p, dim=-1, keepdim=True)
    hi = torch.where(inside, 1.0, hi)  # rows inside the ball: any positive value, discarded
    lo = torch.zeros_like(hi)
    # psi(0) = ||b||_q^(-q/p) - 1 < 0 (y = b at mu = 0); psi(hi) >= 0 is computed in step one
    log_norm_q = torch.log(b_max) + torch.log(torch.linalg.vector_norm(scaled, ord=q, dim=-1, keepdim=True))
    psi_lo = torch.exp(-(q / p) * torch.where(inside, 0.0, log_norm_q)) - 1.0
    psi_hi = torch.ones_like(hi)
    mu = hi
    minus_inf = torch.full((), -math.inf, device=v.device, dtype=v.dtype)
    early_exit = v.device.type == "cpu" and not torch.compiler.is_compiling()
    # a Newton step below 64 eps: the next one would change mu only at the rounding level
    tol = 64.0 * torch.finfo(v.dtype).eps
    for _ in range(_LP_OUTER):
        t = torch.where(positive, _lq_inner(log_b, torch.log(mu), k, _LP_INNER, early_exit), minus_inf)
        log_phi = torch.logsumexp(q * t, dim=-1, keepdim=True)  # phi = sum_i y_i^q
        psi = torch.exp(-log_phi / p) - 1.0
        above = psi >= 0
        hi, psi_hi = torch.where(above, mu, hi), torch.where(above, psi, psi_hi)
        lo, psi_lo = torch.where(above, lo, mu), torch.where(above, psi_lo, psi)
        # dpsi/dmu = (q-1) phi^(-1/p) sum_i w_i / (y_i^(2-q) + mu (q-1)), w_i = y_i^q / phi
        w = torch.exp(q * t - log_phi)
        dpsi = k * (psi + 1.0) * (w / (torch.exp((2.0 - q) * t) + mu * k)).sum(-1, keepdim=True)
        new = mu - psi / dpsi
        # safeguard: a Newton step that leaves the bracket is replaced by the secant of the bracket
        secant = lo - psi_lo * (hi - lo) / (psi_hi - psi_lo)
        new = torch.where((new >= lo) & (new <= hi), new, secant)
        new = torch.where((new >= lo) & (new <= hi), new, (lo + hi) / 2)
        converged = inside | ((new - mu).abs() <= tol * mu)
        mu = new
        if early_exit and bool(converged.all()):
            break
    y = torch.where(positive, torch.exp(_lq_inner(log_b, torch.log(mu), k, _LP_INNER, early_exit)), 0.0)
    return torch.where(inside, v, torch.sign(v) * tau * y)
