"""Optimizers that estimate the median gradient: ``m <- step(m, g)``, ``w <- w - lr m`` (eq. 17).

The workshop paper's "gradient estimator in the wild" (its eq. 17, chapter "Clipping is secretly
estimating the median gradient") splits SGD into two steps: an online estimate ``m`` of the
gradient is updated from the new stochastic gradient ``g``, then the weights take a step along
that estimate. With the stochastic proximal point (SPP) step of :func:`median_sgd.spp_step` the
update of ``m`` is heavy-ball momentum (``div="sq"``), Clip21 / vectorwise clipping (``"l2"``)
or componentwise clipping (``"l1"``); with the subgradient step of :func:`median_sgd.sgd_step`
it is momentum, adaptive momentum or a signed increment.

* :class:`MedianSGD`: that method, as a standard :class:`torch.optim.Optimizer`.
* :class:`Clip21`: Clip21 for distributed / federated learning (Khirirat et al. 2023): one
  estimate per worker, ``g_i <- g_i + clip(grad_i - g_i)``, and the server steps along their mean.
* :class:`SampleMedianSGD` and :func:`sample_gradients`: SGD along a median *across samples*:
  per-sample (or per-micro-batch) gradients from :mod:`torch.func`, aggregated by the coordinate-
  wise or geometric median.

None of the ``step`` methods synchronises with the host unless asked to (``nonfinite="raise"``,
or ``fixed_iter=False`` for a geometric median), so they can run inside CUDA graphs.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from ._checks import check_choice, value_checks
from .estimators import DIVERGENCES
from .medians import coordinate_median, geometric_median, trimmed_mean

__all__ = [
    "MedianSGD",
    "Clip21",
    "SampleMedianSGD",
    "sample_gradients",
    "METHODS",
    "SCOPES",
    "NONFINITE",
    "AGGREGATES",
]

METHODS = ("spp", "sgd")
SCOPES = ("param", "global")
NONFINITE = ("propagate", "raise", "mask")
INITS = ("zeros", "grad")
AGGREGATES = ("mean", "coordinate_median", "trimmed_mean", "geometric_median")
_GM_OPTIONS = ("eps", "tol", "max_iter", "fixed_iter")


# --------------------------------------------------------------------------------------------
# Validation of hyperparameters (plain Python numbers: checking them costs no synchronisation)


def _number(value, name: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (not allow_zero and value == 0):
        bound = "> 0" if positive or not allow_zero else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _check_params(group: dict, name: str) -> None:
    for p in group["params"]:
        if not p.is_floating_point():
            raise TypeError(f"{name} needs real floating-point parameters, got {p.dtype}")


def _choose_foreach(foreach: Optional[bool], params: Sequence[torch.Tensor]):
    """``foreach=None``: multi-tensor kernels on accelerators, ``"auto"`` on the CPU.

    As torch.optim does: on a GPU the step is bound by kernel launches (a ``_foreach_`` op is a
    few launches for all tensors), on the CPU by memory traffic, and a loop that finishes each
    tensor while it is still in cache is faster; small tensors still go through the multi-tensor
    kernels there, where a Python-level loop would cost more than their arithmetic.
    """
    if foreach is not None:
        return bool(foreach)
    return True if all(p.device.type != "cpu" for p in params) else "auto"


def _buckets(*lists: Sequence[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[list]]:
    """Group parallel lists of tensors by the (device, dtype) of the first list."""
    out: Dict[Tuple[torch.device, torch.dtype], List[list]] = defaultdict(lambda: [[] for _ in lists])
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        for bucket, item in zip(out[key], items):
            bucket.append(item)
    return out


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """One host synchronisation: whether every entry of every tensor is finite."""
    flags = [torch.isfinite(t).all() for t in tensors]
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())


def _sign_scale(dtype: torch.dtype, tau: float) -> Optional[int]:
    """``k`` such that ``tau * 2**-k`` is a safe clamping threshold for the sign step, or None.

    ``tau * sign(d) = 2**k * clamp(d, -t, t)`` with ``t = tau * 2**-k`` for every ``|d| >= t``,
    exactly (scaling by a power of two is exact while nothing under- or overflows). ``k = 60``
    puts ``t`` far below any difference that matters; a dtype whose range cannot hold that
    (float16) gets None and the two-pass version.
    """
    tiny = torch.finfo(dtype).tiny
    if tau * 2.0**-60 >= 4 * tiny and tau * 2.0**60 <= torch.finfo(dtype).max / 4:
        return 60
    return None


def _sign_step_(m: torch.Tensor, delta: torch.Tensor, tau: float) -> None:
    """``m += tau * sign(delta)``, NaN kept (``torch.sign(nan)`` is 0, which would hide it).

    Clamping keeps NaN, maps +-Inf and every difference above ``tau * 2**-60`` to ``+-tau``
    (after the exact power-of-two scaling) and 0 to 0. ``delta`` is overwritten.
    """
    k = _sign_scale(delta.dtype, tau)
    if k is None:  # delta * huge is +-inf above the rounding floor; clamp maps it to +-tau
        m.add_(delta.mul_(torch.finfo(delta.dtype).max).clamp_(-tau, tau))
        return
    t = tau * 2.0**-k
    m.add_(delta.clamp_(-t, t), alpha=2.0**k)


def _sign_step_foreach_(ms: List[torch.Tensor], deltas: List[torch.Tensor], tau: float) -> None:
    k = _sign_scale(deltas[0].dtype, tau)
    if k is None:
        torch._foreach_mul_(deltas, torch.finfo(deltas[0].dtype).max)
        torch._foreach_clamp_min_(deltas, -tau)
        torch._foreach_clamp_max_(deltas, tau)
        torch._foreach_add_(ms, deltas)
        return
    t = tau * 2.0**-k
    torch._foreach_clamp_min_(deltas, -t)
    torch._foreach_clamp_max_(deltas, t)
    torch._foreach_add_(ms, deltas, alpha=2.0**k)


def _factor(norm: torch.Tensor, tau: float, method: str) -> torch.Tensor:
    """The weight ``f`` of ``m <- m + f (g - m)`` for ``div="l2"`` from ``||g - m||``."""
    if method == "spp":
        return torch.div(tau, norm.clamp_min(tau))  # tau / max(tau, ||g - m||): clip_l2
    # subgradient step: tau / ||g - m||, and 0 (the subgradient chosen at the kink) when g = m
    return torch.where(norm > 0, torch.div(tau, norm), torch.zeros_like(norm))


def _norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||_2``, accumulated and returned in at least float32 (no half-precision overflow)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(x, dtype=torch.float32)
    return torch.linalg.vector_norm(x)


def _norms_foreach(xs: List[torch.Tensor]) -> torch.Tensor:
    """The stacked norms of a (device, dtype)-homogeneous list, in at least float32."""
    if xs[0].dtype in (torch.float16, torch.bfloat16):
        return torch.stack(torch._foreach_norm(xs, 2, dtype=torch.float32))
    return torch.stack(torch._foreach_norm(xs))


def _norm_of_norms(norms: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sqrt(sum_i n_i^2)`` on ``device``, in at least float32 (no half-precision overflow)."""
    parts = [n.to(device=device, dtype=torch.promote_types(n.dtype, torch.float32)) for n in norms]
    common = parts[0].dtype
    for p in parts[1:]:
        common = torch.promote_types(common, p.dtype)
    return torch.linalg.vector_norm(torch.stack([p.to(common) for p in parts]))


#: Below this many elements a tensor's arithmetic costs less than a Python-level op on it, so the
#: per-tensor loop hands such tensors (biases, norms) to the multi-tensor kernels in one go.
SMALL_TENSOR = 1 << 16


def _estimator_update(
    ms: List[torch.Tensor],
    gs: List[torch.Tensor],
    *,
    tau: float,
    div: str,
    method: str,
    scope: str,
    foreach,
    weights: Optional[List[torch.Tensor]] = None,
    lr: float = 0.0,
    shrink: float = 1.0,
    scratch: Optional[dict] = None,
) -> None:
    """``m <- step(m, g, tau, div)`` in place for every pair, as spp_step / sgd_step would.

    ``scope="global"`` treats the concatenation of all tensors as one vector (it matters only for
    ``div="l2"``; ``"sq"`` and ``"l1"`` act coordinate by coordinate). With ``weights``, each
    weight tensor then takes its step ``w <- shrink * w - lr * m``; in the loop, right after its
    estimate, while both are still in cache. ``foreach``: ``True`` (multi-tensor kernels for all),
    ``False`` (a loop over all) or ``"auto"`` (the loop for tensors of at least
    :data:`SMALL_TENSOR` elements, multi-tensor kernels for the rest). ``scratch`` (a dict kept
    by the caller) holds one buffer per (device, dtype) for the loop's differences ``g - m``, so
    that the loop allocates nothing (and its speed does not depend on the memory allocator).
    """
    if not ms:
        return
    if foreach == "auto":
        loop = [i for i, m in enumerate(ms) if m.numel() >= SMALL_TENSOR]
        multi = [i for i, m in enumerate(ms) if m.numel() < SMALL_TENSOR]
    elif foreach:
        loop, multi = [], list(range(len(ms)))
    else:
        loop, multi = list(range(len(ms))), []
    ws = weights if weights is not None else [None] * len(ms)
    # multi-tensor part, grouped by (device, dtype): [(estimates, samples, weights)]
    groups = [tuple(b) for b in _buckets([ms[i] for i in multi], [gs[i] for i in multi],
                                          [ws[i] for i in multi]).values()] if multi else []

    def diff(i: int) -> torch.Tensor:
        """``g - m`` for tensor ``i``, written into the scratch buffer when there is one."""
        m, g = ms[i], gs[i]
        if scratch is None or not m.is_contiguous() or not g.is_contiguous():
            return torch.sub(g, m)
        key = (m.device, m.dtype)
        buf = scratch.get(key)
        if buf is None or buf.numel() < m.numel():
            need = max(ms[j].numel() for j in loop if (ms[j].device, ms[j].dtype) == key)
            buf = scratch[key] = torch.empty(need, device=m.device, dtype=m.dtype)
        return torch.sub(g, m, out=buf[: m.numel()].view(m.shape))

    if div == "l2" and scope == "global":
        # Two passes: the norm of the whole difference first, then the steps.
        norms = [_norm(diff(i)) for i in loop]
        deltas = []
        for bm, bg, _ in groups:
            d = torch._foreach_sub(bg, bm)
            norms.append(torch.linalg.vector_norm(_norms_foreach(d)))
            deltas.append(d)
        f = _factor(_norm_of_norms(norms, ms[0].device), tau, method)
        cast = {}
        for i in loop:
            key = (ms[i].device, ms[i].dtype)
            if key not in cast:
                cast[key] = f.to(device=key[0], dtype=key[1])
            ms[i].lerp_(gs[i], cast[key])
            _weight_step(ws[i], ms[i], lr, shrink)
        for (bm, _, bw), d in zip(groups, deltas):
            torch._foreach_mul_(d, f.to(device=d[0].device, dtype=d[0].dtype))
            torch._foreach_add_(bm, d)
            _weight_step_foreach(bw, bm, lr, shrink)
        return

    w_sq = (tau / (1.0 + tau) if method == "spp" else tau) if div == "sq" else 0.0
    for i in loop:
        m, g = ms[i], gs[i]
        if div == "sq":
            m.lerp_(g, w_sq)
        elif div == "l1":
            d = diff(i)
            if method == "spp":
                m.add_(d.clamp_(-tau, tau))
            else:
                _sign_step_(m, d, tau)
        else:  # l2, one vector per tensor: m <- m + f (g - m) = lerp(m, g, f)
            f = _factor(_norm(diff(i)), tau, method)
            m.lerp_(g, f if f.dtype == m.dtype else f.to(m.dtype))
        _weight_step(ws[i], m, lr, shrink)
    for bm, bg, bw in groups:
        if div == "sq":
            torch._foreach_lerp_(bm, bg, w_sq)
        elif div == "l1":
            d = torch._foreach_sub(bg, bm)
            if method == "spp":
                torch._foreach_clamp_min_(d, -tau)
                torch._foreach_clamp_max_(d, tau)
                torch._foreach_add_(bm, d)
            else:
                _sign_step_foreach_(bm, d, tau)
        else:
            d = torch._foreach_sub(bg, bm)
            f = _factor(_norms_foreach(d), tau, method).to(d[0].dtype)
            torch._foreach_mul_(d, list(f.unbind()))
            torch._foreach_add_(bm, d)
        _weight_step_foreach(bw, bm, lr, shrink)


def _weight_step(w: Optional[torch.Tensor], m: torch.Tensor, lr: float, shrink: float) -> None:
    """``w <- shrink * w - lr * m`` (nothing without a weight)."""
    if w is not None:
        if shrink != 1.0:
            w.mul_(shrink)
        w.add_(m, alpha=-lr)


def _weight_step_foreach(ws, ms, lr: float, shrink: float) -> None:
    if ws and ws[0] is not None:
        if shrink != 1.0:
            torch._foreach_mul_(ws, shrink)
        torch._foreach_add_(ws, ms, alpha=-lr)


def _effective_grads(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    *,
    maximize: bool,
    weight_decay: float,
    decoupled: bool,
    foreach: bool,
) -> List[torch.Tensor]:
    """``-g`` for ``maximize``, ``+ weight_decay * w`` for coupled weight decay (new tensors)."""
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [torch.neg(g) for g in grads]
    if weight_decay != 0 and not decoupled:
        if foreach:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        else:
            grads = [torch.add(g, p, alpha=weight_decay) for g, p in zip(grads, params)]
    return grads


def _mask_nonfinite(grads: List[torch.Tensor], ms: List[torch.Tensor]) -> List[torch.Tensor]:
    """Non-finite gradient entries become the current estimate: a zero innovation ``g - m``."""
    return [torch.where(torch.isfinite(g), g, m) for g, m in zip(grads, ms)]


class MedianSGD(Optimizer):
    r"""``m <- step(m, g, tau, div)``; ``w <- w - lr m``: SGD along an online median of the gradient.

    The workshop paper's method (17) (chapter "Clipping is secretly estimating the median
    gradient"): ``step`` is :func:`median_sgd.spp_step` (``method="spp"``) or
    :func:`median_sgd.sgd_step` (``method="sgd"``) for the divergence ``div``:

    ======  ==================================  ====================================
    div     method="spp"                        method="sgd"
    ======  ==================================  ====================================
    "sq"    ``m + tau/(1+tau) (g - m)``         ``m + tau (g - m)``
            (momentum, beta = 1/(1+tau))        (momentum, beta = 1 - tau)
    "l2"    ``m + clip_l2(g - m, tau)``         ``m + tau (g - m)/||g - m||``
            (Clip21, the geometric median)      (adaptive momentum)
    "l1"    ``m + clip_l1(g - m, tau)``         ``m + tau sign(g - m)``
            (componentwise, coordinate median)  (signed increment)
    ======  ==================================  ====================================

    **What is clipped, what is averaged, in which order.** Each step, for each parameter group:

    1. the sample is ``g = grad`` (``-grad`` with ``maximize``), plus ``weight_decay * w`` for the
       default coupled weight decay (so the decay term is part of the sample, clipped with it;
       ``decoupled_weight_decay=True`` instead shrinks ``w <- (1 - lr weight_decay) w`` first and
       never clips it);
    2. the *innovation* ``g - m`` is clipped (``"l1"``/``"l2"``), never the raw gradient and
       never the update, and added to the estimate: ``m <- m + clip(g - m)``. The averaging is
       across iterations, in ``m``; clipping comes first and acts on the difference from it;
    3. the weights move along the new, unclipped estimate: ``w <- w - lr m``.

    So this is neither "clip the gradient, then momentum" (momentum of clipped gradients) nor
    "momentum, then clip the update": with ``m`` reset to 0 before every step, ``"l2"`` would be
    standard clipped SGD; keeping ``m`` makes it an online estimator of the geometric median of
    the gradient distribution (and ``"l1"`` of its coordinate-wise median).

    Args:
        params: parameters or parameter groups (any group may override the options below).
        lr: the step size (``>= 0``).
        tau: the step size of the estimator, and the clipping radius of the SPP rules (``> 0``).
        div: ``"l1"``, ``"l2"`` or ``"sq"`` (the divergence ``D`` whose median is estimated).
        method: ``"spp"`` (proximal point; stable for every ``tau``) or ``"sgd"`` (subgradient).
        scope: for ``div="l2"``: ``"param"`` clips each parameter tensor as its own vector,
            ``"global"`` the concatenation of all parameters of the group (one group, the usual
            case: the whole model). ``"sq"`` and ``"l1"`` act per coordinate, so the scope does
            not change them.
        weight_decay: L2 penalty (``>= 0``), coupled unless ``decoupled_weight_decay``.
        maximize: ascend instead of descend.
        init: the first estimate: ``"zeros"`` (``m_0 = 0``, the paper's choice) or ``"grad"``
            (the first sample is taken as it is, ``m_1 = g_1``, as torch's momentum does).
        nonfinite: what a NaN or +-Inf gradient entry does. ``"propagate"`` (default; no check,
            no host synchronisation): NaN reaches the estimate and then the weights for every
            rule, so a broken gradient is never hidden; an Inf is an outlier like any other: the
            ``"l1"`` rules move the estimate by exactly ``tau`` (the limit of their step), the
            others turn it into NaN. ``"raise"``: a ``ValueError`` before anything is modified
            (one host synchronisation per group and step). ``"mask"``: non-finite entries are
            missing data: they are replaced by the current estimate, so their innovation is 0
            (sync-free, two extra elementwise passes).
        foreach: ``True`` for multi-tensor (``torch._foreach_*``) kernels, ``False`` for a loop
            over tensors, ``None`` (default) for foreach on accelerators and, on the CPU, the loop
            for tensors of at least 65,536 elements and multi-tensor kernels for the smaller ones.

    State per parameter: ``"estimate"`` (``m``, the parameter's shape, dtype and device). No step
    synchronises with the host (except ``nonfinite="raise"``).
    """

    def __init__(
        self,
        params,
        lr: float,
        tau: float,
        div: str = "l1",
        method: str = "spp",
        scope: str = "param",
        *,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        init: str = "zeros",
        nonfinite: str = "propagate",
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            tau=tau,
            div=div,
            method=method,
            scope=scope,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            init=init,
            nonfinite=nonfinite,
            foreach=foreach,
        )
        _validate_median_group(defaults)
        self._scratch: dict = {}  # work buffers of the loop path (not state: never saved)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_median_group(group)
        _check_params(group, type(self).__name__)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One step for every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._step_group(group, index)
        return loss

    def _step_group(self, group: dict, index: int) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise TypeError("MedianSGD does not support sparse gradients")
        foreach = _choose_foreach(group["foreach"], params)
        if group["nonfinite"] == "raise" and not _all_finite(grads):
            raise ValueError(f"a gradient in parameter group {index} contains NaN or Inf values")
        lr, wd = group["lr"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        grads = _effective_grads(params, grads, maximize=group["maximize"], weight_decay=wd,
                                 decoupled=decoupled, foreach=foreach is True)

        fresh, old = [], []  # parameters seen for the first time under init="grad", and the rest
        for i, p in enumerate(params):
            state = self.state[p]
            if "estimate" not in state:
                if group["init"] == "grad":
                    fresh.append(i)
                    continue
                state["estimate"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            old.append(i)
        ms = [self.state[params[i]]["estimate"] for i in old]
        gs = [grads[i] for i in old]
        if group["nonfinite"] == "mask":
            gs = _mask_nonfinite(gs, ms)
        shrink = 1.0 - lr * wd if (wd != 0 and decoupled) else 1.0
        _estimator_update(ms, gs, tau=group["tau"], div=group["div"], method=group["method"],
                          scope=group["scope"], foreach=foreach, weights=[params[i] for i in old],
                          lr=lr, shrink=shrink,
                          scratch=self.__dict__.setdefault("_scratch", {}))
        for i in fresh:  # m_1 = g_1, and the weights step along it
            g = grads[i]
            if group["nonfinite"] == "mask":
                g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
            m = g.clone(memory_format=torch.preserve_format)
            self.state[params[i]]["estimate"] = m
            if shrink != 1.0:
                params[i].mul_(shrink)
            params[i].add_(m, alpha=-lr)


def _validate_median_group(group: dict) -> None:
    _number(group["lr"], "lr")
    _number(group["tau"], "tau", positive=True)
    check_choice(group["div"], "div", DIVERGENCES)
    check_choice(group["method"], "method", METHODS)
    check_choice(group["scope"], "scope", SCOPES)
    _number(group["weight_decay"], "weight_decay")
    check_choice(group["init"], "init", INITS)
    check_choice(group["nonfinite"], "nonfinite", NONFINITE)
    for flag in ("decoupled_weight_decay", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None or a bool, got {group['foreach']!r}")


# --------------------------------------------------------------------------------------------
# Clip21: one estimator per worker, the server averages


def _clipped_innovations(
    ms: List[torch.Tensor], gs: List[torch.Tensor], *, tau: float, div: str, scope: str, foreach: bool
) -> List[torch.Tensor]:
    """The messages ``clip(g - m)`` (new tensors): ``clip_l1`` per entry, ``clip_l2`` per tensor
    (``scope="param"``) or of the concatenation of all of them (``"global"``)."""
    if foreach:
        deltas = torch._foreach_sub(gs, ms)
    else:
        deltas = [torch.sub(g, m) for g, m in zip(gs, ms)]
    if div == "l1":
        if foreach:
            torch._foreach_clamp_min_(deltas, -tau)
            torch._foreach_clamp_max_(deltas, tau)
        else:
            for d in deltas:
                d.clamp_(-tau, tau)
        return deltas
    norms = [_norm(d) for d in deltas]
    if scope == "global":
        f = _factor(_norm_of_norms(norms, deltas[0].device), tau, "spp")
        factors = [f.to(device=d.device, dtype=d.dtype) for d in deltas]
    else:
        factors = [_factor(n, tau, "spp").to(d.dtype) for n, d in zip(norms, deltas)]
    if foreach:
        torch._foreach_mul_(deltas, factors)
    else:
        for d, f in zip(deltas, factors):
            d.mul_(f)
    return deltas


class Clip21(Optimizer):
    r"""Clip21: ``g_i <- g_i + clip(grad_i - g_i)`` per worker, ``w <- w - lr mean_i g_i``.

    Khirirat et al. (2023): error feedback for clipping in distributed / federated learning
    (chapter "Clipping is secretly estimating the median gradient": per worker it is the SPP
    estimator of :class:`MedianSGD` with ``div="l2"``, an online geometric median of that
    worker's gradients). Each of ``n_workers`` workers keeps an estimate ``g_i`` of its own
    gradient, and sends only the clipped innovation ``c_i = clip_tau(grad_i - g_i)`` (norm at
    most ``tau``: bounded communication and sensitivity); the server keeps ``g = mean_i g_i``
    up to date by ``g <- g + c_i / n`` and steps along it. Order within a round: every worker
    computes its gradient at the current weights and updates its estimate (clip, then add), then
    the server takes one step along the average of the estimates, unclipped.

    Use it in a single process that simulates the workers::

        opt = Clip21(model.parameters(), lr=0.1, tau=1.0, n_workers=n)
        for batches in rounds:                 # one batch per worker
            for i, batch in enumerate(batches):
                opt.zero_grad()
                loss_fn(model, batch).backward()
                opt.worker_step(i)             # reads p.grad as worker i's gradient
            opt.step()                         # w <- w - lr * mean_i g_i

    Workers may skip a round (partial participation): the server keeps their last estimate.

    Args:
        params, lr, tau: as in :class:`MedianSGD`.
        n_workers: the number of workers (``>= 1``).
        div: ``"l2"`` (Clip21, default) or ``"l1"`` (componentwise clipping of the innovation).
        scope: ``"global"`` (default, Clip21: each worker's whole update is one vector) or
            ``"param"`` (one clipping per parameter tensor).
        init: ``"zeros"`` (``g_i = 0`` at first) or ``"grad"`` (a worker's first gradient is sent
            unclipped, ``g_i = grad_i``, the usual error-feedback initialisation).
        weight_decay: coupled L2 penalty added to each worker's gradient before clipping.
        foreach: as in :class:`MedianSGD`.

    State per parameter: ``"workers"`` (the ``(n_workers, *shape)`` estimates ``g_i``) and
    ``"estimate"`` (the server's ``g``); ``"seen"`` (bool per worker) for ``init="grad"``.
    """

    def __init__(
        self,
        params,
        lr: float,
        tau: float,
        n_workers: int,
        *,
        div: str = "l2",
        scope: str = "global",
        init: str = "zeros",
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
    ) -> None:
        if isinstance(n_workers, bool) or not isinstance(n_workers, numbers.Integral) or n_workers < 1:
            raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        self.n_workers = int(n_workers)
        defaults = dict(lr=lr, tau=tau, div=div, scope=scope, init=init,
                        weight_decay=weight_decay, foreach=foreach)
        _validate_clip21_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_clip21_group(group)
        _check_params(group, type(self).__name__)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "workers" not in state:
            state["workers"] = p.new_zeros((self.n_workers, *p.shape))
            state["estimate"] = torch.zeros_like(p)
            state["seen"] = torch.zeros(self.n_workers, dtype=torch.bool)
        return state

    @torch.no_grad()
    def worker_step(self, worker: int) -> None:
        """Worker ``worker`` reads its gradient from ``p.grad``: ``g_i <- g_i + clip(grad - g_i)``.

        The server's average moves by ``c_i / n_workers`` at once. Parameters without a gradient
        are left alone.
        """
        if isinstance(worker, bool) or not isinstance(worker, numbers.Integral) or not (
            0 <= worker < self.n_workers
        ):
            raise ValueError(f"worker must be an integer in [0, {self.n_workers}), got {worker!r}")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise TypeError("Clip21 does not support sparse gradients")
            foreach = _choose_foreach(group["foreach"], params) is True
            grads = _effective_grads(params, [p.grad for p in params], maximize=False,
                                     weight_decay=group["weight_decay"], decoupled=False,
                                     foreach=foreach)
            states = [self._state_of(p) for p in params]
            gi = [s["workers"][worker] for s in states]  # views: updated in place
            if group["init"] == "grad" and not bool(states[0]["seen"][worker]):
                # the first message is the gradient itself (the flags live on the CPU: no sync)
                messages = [torch.sub(g, m) for g, m in zip(grads, gi)]
                for s in states:
                    s["seen"][worker] = True
            else:
                messages = _clipped_innovations(gi, grads, tau=group["tau"], div=group["div"],
                                                scope=group["scope"], foreach=foreach)
            # the worker adds its message c_i to its estimate, the server's mean moves by c_i / n
            if foreach:
                torch._foreach_add_(gi, messages)
                torch._foreach_add_([s["estimate"] for s in states], messages,
                                    alpha=1.0 / self.n_workers)
            else:
                for g, s, c in zip(gi, states, messages):
                    g.add_(c)
                    s["estimate"].add_(c, alpha=1.0 / self.n_workers)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """The server's step ``w <- w - lr mean_i g_i``; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "estimate" in state:
                    p.add_(state["estimate"], alpha=-group["lr"])
        return loss


def _validate_clip21_group(group: dict) -> None:
    _number(group["lr"], "lr")
    _number(group["tau"], "tau", positive=True)
    check_choice(group["div"], "div", ("l2", "l1"))
    check_choice(group["scope"], "scope", SCOPES)
    check_choice(group["init"], "init", INITS)
    _number(group["weight_decay"], "weight_decay")
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None or a bool, got {group['foreach']!r}")


# --------------------------------------------------------------------------------------------
# SGD along a median across samples


def sample_gradients(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    micro_batches: Optional[int] = None,
    store: bool = True,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per-sample (or per-micro-batch) gradients ``G[i] = grad loss_fn(model(x_i), y_i)``, by torch.func.

    ``micro_batches=None`` gives one row per sample (each sample is run as a batch of one);
    ``micro_batches=n`` splits the batch into ``n`` equal consecutive micro-batches (the batch
    size must be divisible by ``n``) and gives the gradient of each micro-batch's loss.
    ``loss_fn(output, target)`` must return the (mean) loss of a micro-batch as a scalar, like
    ``torch.nn.CrossEntropyLoss()``. Computed with ``torch.func.vmap(grad(...))`` over
    ``functional_call`` (one vectorised backward for all rows; dropout draws differ per row).
    Models whose forward updates buffers (BatchNorm in training mode) cannot be vmapped: put them
    in eval mode or use ``torch.func.replace_all_batch_norm_modules_``.

    Returns ``(losses, grads)``: the ``(n,)`` row losses (detached) and, for every parameter
    with ``requires_grad`` in ``model.parameters()`` order, its ``(n, *shape)`` gradients; with
    ``store=True`` each is also stored as ``p.grad_sample`` (Opacus' convention), which
    :class:`SampleMedianSGD` reads.
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets need the same leading batch size, got {tuple(inputs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    batch = inputs.shape[0]
    rows = batch if micro_batches is None else micro_batches
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"micro_batches must be None or an integer >= 1, got {micro_batches!r}")
    if batch % rows != 0:
        raise ValueError(f"the batch size {batch} is not divisible into {rows} micro-batches")
    size = batch // rows
    xs = inputs.reshape(rows, size, *inputs.shape[1:])
    ys = targets.reshape(rows, size, *targets.shape[1:])

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires a gradient")
    trainable = {name: p.detach() for name, p in named}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def row_loss(params, x, y):
        out = functional_call(model, ({**params, **frozen}, buffers), (x,))
        loss = loss_fn(out, y)
        return loss, loss.detach()

    grads, losses = vmap(grad(row_loss, has_aux=True), in_dims=(None, 0, 0),
                         randomness="different")(trainable, xs, ys)
    out = [grads[name] for name, _ in named]
    if store:
        for (_, p), g in zip(named, out):
            p.grad_sample = g
    return losses, out


class SampleMedianSGD(Optimizer):
    r"""``w <- w - lr agg_i(G_i)``: SGD along a median of ``n`` sample gradients (``p.grad_sample``).

    The "median across samples" of the full paper (chapter "Clipping is secretly estimating the
    median gradient"): each step aggregates ``n`` per-sample or per-micro-batch gradients, stored
    as ``p.grad_sample`` of shape ``(n, *p.shape)`` (see :func:`sample_gradients`, or Opacus),
    with ``aggregate``:

    * ``"coordinate_median"``: :func:`median_sgd.coordinate_median`, per coordinate;
    * ``"trimmed_mean"``: :func:`median_sgd.trimmed_mean` with ``trim`` (per coordinate);
    * ``"geometric_median"``: :func:`median_sgd.geometric_median` of the rows, over the whole
      group (``scope="global"``, one vector per sample) or per parameter tensor (``"param"``),
      with ``gm_options`` (default ``max_iter=10, fixed_iter=True``: no host synchronisation);
    * ``"mean"``: plain SGD on the mini-batch mean, for comparison.

    Weight decay (coupled) is added to the aggregate, not to the samples (a deterministic term
    needs no robust estimate). ``zero_grad`` clears ``grad_sample`` too.
    """

    def __init__(
        self,
        params,
        lr: float,
        aggregate: str = "coordinate_median",
        *,
        scope: str = "global",
        trim: float = 0.1,
        gm_options: Optional[dict] = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        options = {"max_iter": 10, "fixed_iter": True}
        options.update(gm_options or {})
        defaults = dict(lr=lr, aggregate=aggregate, scope=scope, trim=trim, gm_options=options,
                        weight_decay=weight_decay, maximize=maximize)
        _validate_sample_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_sample_group(group)
        _check_params(group, type(self).__name__)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One step along the aggregate of ``p.grad_sample``; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if getattr(p, "grad_sample", None) is not None]
            if not params:
                continue
            samples = [p.grad_sample for p in params]
            n = samples[0].shape[0]
            for p, s in zip(params, samples):
                if s.shape != (n, *p.shape) or s.dtype != p.dtype or s.device != p.device:
                    raise ValueError(
                        f"grad_sample of a parameter of shape {tuple(p.shape)} ({p.dtype}, "
                        f"{p.device}) must have shape {(n, *p.shape)}, its dtype and device; got "
                        f"{tuple(s.shape)} ({s.dtype}, {s.device})"
                    )
            with value_checks(False):
                updates = self._aggregate(group, samples, n)
            sign = -1.0 if group["maximize"] else 1.0
            for p, u in zip(params, updates):
                if group["weight_decay"] != 0:
                    u = u.add(p, alpha=sign * group["weight_decay"])
                p.add_(u, alpha=-sign * group["lr"])
        return loss

    @staticmethod
    def _aggregate(group: dict, samples: List[torch.Tensor], n: int) -> List[torch.Tensor]:
        rule = group["aggregate"]
        rows = [s.reshape(n, -1) for s in samples]
        if rule == "geometric_median" and group["scope"] == "global":
            G = torch.cat([r.to(rows[0]) for r in rows], dim=1) if len(rows) > 1 else rows[0]
            flat = geometric_median(G, **group["gm_options"]).median
            sizes = [r.shape[1] for r in rows]
            return [piece.view_as(s[0]) for piece, s in zip(flat.split(sizes), samples)]
        out = []
        for r, s in zip(rows, samples):
            if rule == "mean":
                a = r.mean(0)
            elif rule == "coordinate_median":
                a = coordinate_median(r)
            elif rule == "trimmed_mean":
                a = trimmed_mean(r, group["trim"])
            else:
                a = geometric_median(r, **group["gm_options"]).median
            out.append(a.view_as(s[0]))
        return out


def _validate_sample_group(group: dict) -> None:
    _number(group["lr"], "lr")
    check_choice(group["aggregate"], "aggregate", AGGREGATES)
    check_choice(group["scope"], "scope", SCOPES)
    trim = group["trim"]
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not (0.0 <= trim < 0.5):
        raise ValueError(f"trim must be a number in [0, 0.5), got {trim!r}")
    options = group["gm_options"]
    if not isinstance(options, dict):
        raise TypeError(f"gm_options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_GM_OPTIONS))
    if unknown:
        raise TypeError(f"unknown geometric_median option(s) {unknown}; expected some of {list(_GM_OPTIONS)}")
    _number(group["weight_decay"], "weight_decay")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"maximize must be a bool, got {group['maximize']!r}")
