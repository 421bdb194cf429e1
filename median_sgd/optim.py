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

import copy
import functools
import math
import numbers
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from ._checks import check_choice, value_checks
from .aggregators import REGISTRY, get_rule
from .estimators import DIVERGENCES
from .medians import coordinate_median, geometric_median, trimmed_mean
from .prox import _in_range, _power_of_two_scale, host_reads_are_free, l2_norm, opmath_dtype

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
# Validation of hyperparameters (plain Python values: checking them costs no synchronisation,
# so every step re-checks them: a group edited by hand or loaded from a state dict is held to
# the same rules as the constructor's arguments)


def _number(value, name: str, *, positive: bool = False, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (not allow_zero and value == 0):
        bound = "> 0" if positive or not allow_zero else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _check_lr(lr) -> None:
    """``lr``: a real number ``>= 0`` or a one-element floating tensor (as torch.optim accepts).

    A tensor's value is checked only where reading it costs nothing (on the CPU): on a GPU it
    would be a host synchronisation, and a tensor lr is there for CUDA graphs and schedulers.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"a tensor lr must have a real floating dtype, got {lr.dtype}")
        if host_reads_are_free(lr):
            _number(float(lr), "lr")
        return
    _number(lr, "lr")


def _lr_value(lr):
    """A Python float for a number or a CPU tensor (reading it is free); a device tensor as is."""
    if isinstance(lr, torch.Tensor):
        return float(lr) if host_reads_are_free(lr) else lr.reshape(())
    return float(lr)


def _flag(group: dict, name: str) -> None:
    if not isinstance(group[name], bool):
        raise TypeError(f"{name} must be a bool, got {group[name]!r}")


def _foreach_option(group: dict) -> None:
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None or a bool, got {group['foreach']!r}")


def _validated(check, group: dict, keys: Sequence[str], cls: str, index: Optional[int],
               *, constructing: bool = False) -> None:
    """Run ``check(group)`` after making sure the group has every key ``cls`` uses.

    Errors name the group (``parameter group 2: unknown div 'l3' ...``). While constructing,
    the defaults may hold ``required`` (lr, tau): torch asks each group for them.
    """
    missing = [k for k in keys if k not in group]
    where = "the defaults" if constructing else (
        "a parameter group" if index is None else f"parameter group {index}")
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(map(repr, missing))}: not a {cls} parameter group "
            f"(a state dict of another optimizer?)"
        )
    if constructing:
        group = {k: (v if v is not required else _PLACEHOLDER[k]) for k, v in group.items()}
    try:
        check(group)
    except (TypeError, ValueError) as e:
        if constructing:
            raise
        raise type(e)(f"{where}: {e}") from None


# Stand-ins for ``required`` defaults while validating the rest of the constructor's options.
_PLACEHOLDER = {"lr": 0.0, "tau": 1.0, "n_workers": 1}


def _add_group_validated(opt: Optimizer, param_group: dict, validate) -> None:
    """``Optimizer.add_param_group``, but a group that fails ``validate`` is not kept.

    torch fills in the defaults and appends in one go; a rejected group must not stay behind
    to be moved by the next ``step()``.
    """
    count = len(opt.param_groups)
    Optimizer.add_param_group(opt, param_group)
    if len(opt.param_groups) > count:
        try:
            validate(opt.param_groups[-1], len(opt.param_groups) - 1)
            _check_params(opt.param_groups[-1], type(opt).__name__)
        except BaseException:
            opt.param_groups.pop()
            raise


def _load_validated(opt: Optimizer, state_dict: dict, finish) -> None:
    """``Optimizer.load_state_dict``, then ``finish()`` (fill, validate); on error nothing changes."""
    before = {"state": opt.state, "param_groups": opt.param_groups}
    Optimizer.load_state_dict(opt, state_dict)
    try:
        finish()
    except BaseException:
        Optimizer.__setstate__(opt, before)
        raise


def _fill_optional(groups: Sequence[dict], optional: Dict[str, object]) -> None:
    """Options added after a state dict was saved get the value they had before they existed."""
    for group in groups:
        for key, value in optional.items():
            if key not in group:
                group[key] = copy.deepcopy(value)


def _check_params(group: dict, name: str) -> None:
    for p in group["params"]:
        if not p.is_floating_point():
            raise TypeError(f"{name} needs real floating-point parameters, got {p.dtype}")


def _check_step_tau(group: dict, params: Sequence[torch.Tensor], cls: str, index: int) -> None:
    """A step of length tau (the subgradient rules) must be finite in every parameter's dtype."""
    tau = group["tau"]
    for dtype in {p.dtype for p in params}:
        if tau > torch.finfo(dtype).max:
            raise ValueError(
                f"parameter group {index}: tau = {tau:g} is beyond the largest {dtype} value "
                f"({torch.finfo(dtype).max:g}); {cls}(method='sgd') moves the estimate by tau"
            )


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


def _first_nonfinite_group(grads_per_group: Sequence[Tuple[int, List[torch.Tensor]]]) -> Optional[int]:
    """One host synchronisation for all groups: the index of the first group whose gradients
    hold NaN or Inf, or None."""
    flags = []
    for _, grads in grads_per_group:
        per_tensor = [torch.isfinite(g).all() for g in grads]
        device = per_tensor[0].device
        flags.append(torch.stack([f.to(device) for f in per_tensor]).all())
    device = flags[0].device
    ok = torch.stack([f.to(device) for f in flags]).tolist()
    for (index, _), fine in zip(grads_per_group, ok):
        if not fine:
            return index
    return None


# --------------------------------------------------------------------------------------------
# The update m <- step(m, g, tau, div), in place, for lists of tensors


@functools.lru_cache(maxsize=256)
def _sign_plan(dtype: torch.dtype, tau: float) -> Tuple[int, float, float, float]:
    """``(muls, big, t, alpha)``: ``m + alpha * clamp(d * big**muls, -t, t) = m + tau * sign(d)``, exactly.

    Every nonzero ``|d|`` is at least the smallest subnormal ``2**-D``; ``big = 2**E`` (the
    largest power of two), applied ``muls`` times, lifts it to ``2**(muls E - D)``, at least the
    clamping bound ``t = tau 2**-j``, so every nonzero difference (and +-Inf) clamps to ``+-t``,
    0 stays 0 and NaN stays NaN (``torch.sign(nan)`` is 0, which would hide it). Scaling by
    powers of two is exact, so ``alpha t = 2**j t`` is tau rounded to ``dtype``.
    """
    fi = torch.finfo(dtype)
    top = math.frexp(fi.max)[1] - 1  # E: 2**E is the largest power of two
    low = 1 - math.frexp(fi.smallest_normal * fi.eps)[1]  # D: 2**-D is the smallest subnormal
    tau_d = float(torch.tensor(tau, dtype=dtype))
    exponent = math.frexp(tau_d)[1]  # tau_d < 2**exponent
    for muls in (1, 2):
        j = max(0, exponent + low - muls * top)
        if j <= top:
            return muls, 2.0**top, tau_d * 2.0**-j, 2.0**j
    raise AssertionError("unreachable: two scalings reach every finite tau")


def _sign_step_(m: torch.Tensor, delta: torch.Tensor, tau: float) -> None:
    """``m += tau * sign(delta)``, exactly, NaN kept (:func:`_sign_plan`). ``delta`` is overwritten."""
    muls, big, t, alpha = _sign_plan(delta.dtype, tau)
    for _ in range(muls):
        delta.mul_(big)
    m.add_(delta.clamp_(-t, t), alpha=alpha)


def _sign_step_foreach_(ms: List[torch.Tensor], deltas: List[torch.Tensor], tau: float) -> None:
    muls, big, t, alpha = _sign_plan(deltas[0].dtype, tau)
    if deltas[0].device.type == "cpu":
        # on the CPU, _foreach_mul_ with a Python number is ~4x slower than with a 0-dim tensor
        big = torch.tensor(big, dtype=deltas[0].dtype)  # type: ignore[assignment]
    for _ in range(muls):
        torch._foreach_mul_(deltas, big)
    torch._foreach_clamp_min_(deltas, -t)
    torch._foreach_clamp_max_(deltas, t)
    torch._foreach_add_(ms, deltas, alpha=alpha)


def _factor(norm: torch.Tensor, scale: Optional[torch.Tensor], tau: float, method: str,
            *, of_scaled: bool = False) -> torch.Tensor:
    """The weight ``f`` of ``m <- m + f (g - m)`` for ``div="l2"``, from ``||g - m|| = norm / scale``.

    ``"spp"``: ``tau / max(tau, ||g - m||)`` (clip_l2; exactly 1 inside the ball); ``"sgd"``:
    ``tau / ||g - m||``, and 0 (the subgradient chosen at the kink) where ``g = m``. With
    ``of_scaled`` the weight applies to the scaled difference ``(g - m) scale`` instead.
    """
    if scale is None:
        if method == "spp":
            if tau <= torch.finfo(norm.dtype).max:
                return torch.div(tau, norm.clamp_min(tau))
            return torch.where(norm <= tau, 1.0, torch.div(tau, norm))  # tau is inf in this dtype
        return torch.where(norm > 0, torch.div(tau, norm), torch.zeros_like(norm))
    ratio = torch.div(tau, norm)  # tau / ||(g - m) scale||: in range, the scaled norm is ~2**32
    if method == "spp":
        inside = norm <= tau * scale
        return torch.where(inside, 1.0 / scale if of_scaled else 1.0, ratio if of_scaled else ratio * scale)
    return torch.where(norm > 0, ratio if of_scaled else ratio * scale, 0.0)


def _foreach_deltas(gs: List[torch.Tensor], ms: List[torch.Tensor]) -> List[torch.Tensor]:
    """``g - m`` for a (device, dtype)-homogeneous list; float16 in float32, where the weight of
    an ``"l2"`` step (as small as tau / ||g - m||) stays in range."""
    deltas = torch._foreach_sub(gs, ms)
    if deltas[0].dtype == torch.float16:
        deltas = [d.float() for d in deltas]  # type: ignore[assignment]
    return deltas  # type: ignore[return-value]


def _foreach_norms_(deltas: List[torch.Tensor], tiny: bool, safe: bool = False
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The stacked norms ``n / s`` of a homogeneous list (:func:`median_sgd.prox.l2_norm` per tensor).

    Where scaling is needed the deltas are scaled in place (``deltas[i] *= s[i]``) and ``s`` is
    returned; else ``s`` is None. Half precision sums in float32. ``safe``: the deltas are
    float32 copies of float16 differences, which need no scaling.
    """
    dtype = deltas[0].dtype
    work = opmath_dtype(dtype)
    kwargs = {"dtype": work} if work != dtype else {}
    if safe:  # float32 sums of (differences of) float16 values neither over- nor underflow
        return torch.stack(torch._foreach_norm(deltas, 2, **kwargs)), None
    if host_reads_are_free(deltas[0]):
        n = torch.stack(torch._foreach_norm(deltas, 2, **kwargs))
        lo, hi = (float(t) for t in torch.aminmax(n))
        if not math.isinf(hi) and (lo > 0 or not tiny):
            return n, None
    a = torch.stack(torch._foreach_norm(deltas, math.inf)).to(work)
    s = _power_of_two_scale(a, tiny)
    torch._foreach_mul_(deltas, list(s.to(dtype).unbind()))
    return torch.stack(torch._foreach_norm(deltas, 2, **kwargs)), s


def _combined_norm(norms: Sequence[torch.Tensor], scales: Sequence[Optional[torch.Tensor]],
                   device: torch.device, tiny: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The norm of the concatenation from per-part norms ``n_i / s_i``, as ``(n, s)``: no overflow.

    Parts with a scale are first brought to the smallest scale (powers of two: exact), then the
    vector of part norms is itself normed without overflow.
    """
    parts = [n.reshape(-1).to(device) for n in norms]
    common = parts[0].dtype
    for p in parts[1:]:
        common = torch.promote_types(common, p.dtype)
    N = torch.cat([p.to(common) for p in parts])
    if all(s is None for s in scales):
        n, s, _ = l2_norm(N, None, tiny=tiny)
        return n, s
    S = torch.cat([torch.ones_like(p.to(common)) if s is None else s.reshape(-1).to(device, common)
                   for p, s in zip(parts, scales)])
    smallest = S.amin()
    n, s, _ = l2_norm(N * (smallest / S), None, tiny=tiny)
    return n, smallest if s is None else smallest * s


#: Below this many elements a tensor's arithmetic costs less than a Python-level op on it, so the
#: per-tensor loop hands such tensors (biases, norms) to the multi-tensor kernels in one go.
SMALL_TENSOR = 1 << 16


def _lerp_(m: torch.Tensor, g: torch.Tensor, f: torch.Tensor) -> None:
    """``m <- m + f (g - m)``; for float16 in float32, where ``f`` (down to tau / ||g - m||)
    can be below float16's normal range."""
    if m.dtype == torch.float16:
        m.add_(g.float().sub_(m).mul_(f))
    else:
        m.lerp_(g, f if f.dtype == m.dtype else f.to(m.dtype))


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
    lr=0.0,
    shrink=1.0,
    scratch: Optional[dict] = None,
) -> None:
    """``m <- step(m, g, tau, div)`` in place for every pair, as spp_step / sgd_step would.

    ``scope="global"`` treats the concatenation of all tensors as one vector (it matters only for
    ``div="l2"``; ``"sq"`` and ``"l1"`` act coordinate by coordinate). With ``weights``, each
    weight tensor then takes its step ``w <- shrink * w - lr * m``; in the loop, right after its
    estimate, while both are still in cache (``lr``, ``shrink``: numbers, or 0-dim tensors on
    the weights' device). ``foreach``: ``True`` (multi-tensor kernels for all),
    ``False`` (a loop over all) or ``"auto"`` (the loop for tensors of at least
    :data:`SMALL_TENSOR` elements, multi-tensor kernels for the rest). ``scratch`` (a dict kept
    by the caller) holds one buffer per (device, dtype) for the loop's differences ``g - m``, so
    that the loop allocates nothing (and its speed does not depend on the memory allocator).

    Norms of ``g - m`` never overflow (nor, for the subgradient step, underflow): they are
    scaled by powers of two where needed (:func:`median_sgd.prox.l2_norm`).
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
                                          [ws[i] for i in multi]).values()] if multi else []  # type: ignore[misc]
    tiny = method == "sgd"  # the subgradient step needs the direction of even a tiny g - m

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
        norms, scales = [], []
        for i in loop:
            n, s, _ = l2_norm(diff(i), None, tiny=tiny)
            norms.append(n)
            scales.append(s)
        deltas = []
        for bm, bg, _ in groups:
            d = _foreach_deltas(bg, bm)
            n, s = _foreach_norms_(d, tiny, safe=bg[0].dtype == torch.float16)
            norms.append(n)
            scales.append(s)
            deltas.append((d, s))
        n, s = _combined_norm(norms, scales, ms[0].device, tiny)
        f = _factor(n, s, tau, method)  # the weight of the unscaled difference
        cast = {}
        for i in loop:
            key = (ms[i].device, ms[i].dtype)
            if key not in cast:
                cast[key] = f.to(device=key[0], dtype=opmath_dtype(key[1]))
            _lerp_(ms[i], gs[i], cast[key])
            _weight_step(ws[i], ms[i], lr, shrink)
        for (bm, _, bw), (d, s_part) in zip(groups, deltas):
            here = f.to(device=d[0].device, dtype=opmath_dtype(d[0].dtype))
            if s_part is None:
                torch._foreach_mul_(d, here.to(d[0].dtype))
            else:  # these deltas were scaled by s_part in place
                weights_ = (here / s_part.to(here)).to(d[0].dtype)
                torch._foreach_mul_(d, list(weights_.unbind()))
            torch._foreach_add_(bm, d)
            _weight_step_foreach(bw, bm, lr, shrink)
        return

    w_sq = (tau / (1.0 + tau) if method == "spp" else tau) if div == "sq" else 0.0
    for i in loop:
        m, g = ms[i], gs[i]
        if div == "sq":
            m.lerp_(g, w_sq)
        elif div == "l1":
            d = diff(i)  # type: ignore[assignment]
            if method == "spp":
                bound = _in_range(tau, d.dtype)  # type: ignore[attr-defined]
                m.add_(d.clamp_(-bound, bound))  # type: ignore[attr-defined]
            else:
                _sign_step_(m, d, tau)  # type: ignore[arg-type]
        else:  # l2, one vector per tensor: m <- m + f (g - m) = lerp(m, g, f)
            n, s, _ = l2_norm(diff(i), None, tiny=tiny)
            _lerp_(m, g, _factor(n, s, tau, method))
        _weight_step(ws[i], m, lr, shrink)
    for bm, bg, bw in groups:
        if div == "sq":
            torch._foreach_lerp_(bm, bg, w_sq)
        elif div == "l1":
            d = torch._foreach_sub(bg, bm)  # type: ignore[assignment]
            if method == "spp":
                bound = _in_range(tau, d[0].dtype)
                torch._foreach_clamp_min_(d, -bound)  # type: ignore[arg-type]
                torch._foreach_clamp_max_(d, bound)  # type: ignore[arg-type]
                torch._foreach_add_(bm, d)
            else:
                _sign_step_foreach_(bm, d, tau)
        else:
            d = _foreach_deltas(bg, bm)
            n, s = _foreach_norms_(d, tiny, safe=bg[0].dtype == torch.float16)
            f = _factor(n, s, tau, method, of_scaled=True).to(d[0].dtype)
            torch._foreach_mul_(d, list(f.unbind()))
            torch._foreach_add_(bm, d)
        _weight_step_foreach(bw, bm, lr, shrink)


def _weight_step(w: Optional[torch.Tensor], m: torch.Tensor, lr, shrink) -> None:
    """``w <- shrink * w - lr * m`` (nothing without a weight)."""
    if w is None:
        return
    if isinstance(shrink, torch.Tensor) or shrink != 1.0:
        w.mul_(shrink)
    if isinstance(lr, torch.Tensor):
        w.sub_(m * lr)
    else:
        w.add_(m, alpha=-lr)


def _weight_step_foreach(ws, ms, lr, shrink) -> None:
    if not ws or ws[0] is None:
        return
    if isinstance(shrink, torch.Tensor) or shrink != 1.0:
        torch._foreach_mul_(ws, shrink)
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(ws, torch._foreach_mul(ms, lr))
    else:
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
        grads = torch._foreach_neg(grads) if foreach else [torch.neg(g) for g in grads]  # type: ignore[assignment]
    if weight_decay != 0 and not decoupled:
        if foreach:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)  # type: ignore[assignment]
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
        lr: the step size (``>= 0``): a number, or a one-element tensor (for schedulers and CUDA
            graphs; read on the host only when it is a CPU tensor).
        tau: the step size of the estimator, and the clipping radius of the SPP rules (``> 0``).
            A radius beyond the parameters' dtype means no clipping; the subgradient rules move
            the estimate by tau, so there tau beyond the dtype's range is a ``ValueError``.
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
            others turn it into NaN. ``"raise"``: a ``ValueError`` before anything (in any
            group) is modified (one host synchronisation per step for all such groups). ``"mask"``: non-finite entries are
            missing data: they are replaced by the current estimate, so their innovation is 0
            (sync-free, two extra elementwise passes).
        foreach: ``True`` for multi-tensor (``torch._foreach_*``) kernels, ``False`` for a loop
            over tensors, ``None`` (default) for foreach on accelerators and, on the CPU, the loop
            for tensors of at least 65,536 elements and multi-tensor kernels for the smaller ones.

    State per parameter: ``"estimate"`` (``m``, the parameter's shape, dtype and device). No step
    synchronises with the host (except ``nonfinite="raise"``). Norms of ``g - m`` never overflow
    (nor underflow, where the direction matters): they are scaled by a power of two where the
    plain sum of squares would (:func:`median_sgd.prox.l2_norm`; on a GPU every ``"l2"`` norm
    takes that path, a max-magnitude reduction and a scaling pass more, as nothing is read on
    the host there). The options of every group are checked at every step and on
    ``load_state_dict`` (Python values only: no synchronisation), before anything is modified.
    """

    def __init__(
        self,
        params,
        lr: float = required,  # type: ignore[assignment]
        tau: float = required,  # type: ignore[assignment]
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
        _validated(_check_median_group, defaults, _MEDIAN_KEYS, "MedianSGD", None, constructing=True)
        self._scratch: dict = {}  # work buffers of the loop path (not state: never saved)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch's rules); one whose options are invalid raises and is not added."""
        _add_group_validated(self, param_group, _validate_median_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; its options are checked like the constructor's (nothing changes on error).

        Options a saved group lacks because they did not exist yet get their old behaviour
        (``scope="param"``, no weight decay, ...); a group without ``lr``, ``tau``, ``div`` or
        ``method`` is not a MedianSGD group (a ``torch.optim.SGD`` state dict, say): ValueError.
        """
        def finish():
            _fill_optional(self.param_groups, _MEDIAN_OPTIONAL)
            for index, group in enumerate(self.param_groups):
                _validate_median_group(group, index)
            for p, state in self.state.items():
                m = state.get("estimate") if isinstance(state, dict) else None
                if isinstance(p, torch.Tensor) and m is not None and m.shape != p.shape:
                    raise ValueError(
                        f"the state dict's estimate of shape {tuple(m.shape)} does not fit a "
                        f"parameter of shape {tuple(p.shape)}"
                    )

        _load_validated(self, state_dict, finish)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """One step for every parameter with a gradient; returns ``closure()`` if given.

        Every group is checked before any is modified: its options (cheap, Python values only),
        its gradients' layout and, for ``nonfinite="raise"``, their values (one host
        synchronisation for all such groups together).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            _validate_median_group(group, index)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise TypeError("MedianSGD does not support sparse gradients")
            if group["method"] == "sgd":
                _check_step_tau(group, params, "MedianSGD", index)
            work.append((index, group, params))
        checked = [(index, [p.grad for p in params]) for index, group, params in work
                   if group["nonfinite"] == "raise"]
        if checked:
            bad = _first_nonfinite_group(checked)
            if bad is not None:
                raise ValueError(
                    f"a gradient in parameter group {bad} contains NaN or Inf values "
                    f"(nonfinite='raise'; no parameter was modified)"
                )
        for _, group, params in work:
            self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: List[torch.Tensor]) -> None:
        grads: List[torch.Tensor] = [p.grad for p in params]  # type: ignore[misc]  # params have grads
        foreach = _choose_foreach(group["foreach"], params)
        lr, wd = _lr_value(group["lr"]), group["weight_decay"]
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
            _weight_step(params[i], m, lr, shrink)


_MEDIAN_KEYS = ("lr", "tau", "div", "method", "scope", "weight_decay", "decoupled_weight_decay",
                "maximize", "init", "nonfinite", "foreach")
# What a saved group without these options did before they existed.
_MEDIAN_OPTIONAL = {"scope": "param", "weight_decay": 0.0, "decoupled_weight_decay": False,
                    "maximize": False, "init": "zeros", "nonfinite": "propagate", "foreach": None}


def _check_median_group(group: dict) -> None:
    _check_lr(group["lr"])
    _number(group["tau"], "tau", positive=True)
    check_choice(group["div"], "div", DIVERGENCES)
    check_choice(group["method"], "method", METHODS)
    check_choice(group["scope"], "scope", SCOPES)
    _number(group["weight_decay"], "weight_decay")
    check_choice(group["init"], "init", INITS)
    check_choice(group["nonfinite"], "nonfinite", NONFINITE)
    _flag(group, "decoupled_weight_decay")
    _flag(group, "maximize")
    _foreach_option(group)


def _validate_median_group(group: dict, index: Optional[int] = None) -> None:
    _validated(_check_median_group, group, _MEDIAN_KEYS, "MedianSGD", index)


# --------------------------------------------------------------------------------------------
# Clip21: one estimator per worker, the server averages


def _clipped_innovations(
    ms: List[torch.Tensor], gs: List[torch.Tensor], *, tau: float, div: str, scope: str, foreach: bool
) -> List[torch.Tensor]:
    """The messages ``clip(g - m)`` (new tensors): ``clip_l1`` per entry, ``clip_l2`` per tensor
    (``scope="param"``) or of the concatenation of all of them (``"global"``). Norms never
    overflow (:func:`median_sgd.prox.l2_norm`); float16 messages are computed in float32."""
    if not ms:
        return []
    if foreach:
        deltas = torch._foreach_sub(gs, ms)
    else:
        deltas = [torch.sub(g, m) for g, m in zip(gs, ms)]  # type: ignore[assignment]
    if div == "l1":
        for key, (ds,) in _buckets(deltas).items():
            bound = _in_range(tau, key[1])
            if foreach:
                torch._foreach_clamp_min_(ds, -bound)  # type: ignore[arg-type]
                torch._foreach_clamp_max_(ds, bound)  # type: ignore[arg-type]
            else:
                for d in ds:
                    d.clamp_(-bound, bound)
        return deltas  # type: ignore[return-value]
    deltas = [d.float() if d.dtype == torch.float16 else d for d in deltas]  # type: ignore[assignment]
    norms, scales = zip(*[l2_norm(d, None)[:2] for d in deltas])
    if scope == "global":
        n, s = _combined_norm(norms, scales, deltas[0].device, tiny=False)
        f = _factor(n, s, tau, "spp")
        factors = [f.to(device=d.device, dtype=d.dtype) for d in deltas]
    else:
        factors = [_factor(n, s, tau, "spp").to(d.dtype) for n, s, d in zip(norms, scales, deltas)]
    if foreach:
        torch._foreach_mul_(deltas, factors)
    else:
        for d, f in zip(deltas, factors):
            d.mul_(f)
    return deltas  # type: ignore[return-value]


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

    With mixed precision, each worker's gradient goes through ``torch.amp.GradScaler`` on its
    own: :meth:`worker` gives an optimizer-like view whose ``step()`` is ``worker_step(i)``, so
    the scaler unscales the gradient, skips the worker (it keeps its last estimate) when the
    gradient holds Inf or NaN, and adapts the scale after each worker; the server's ``step()``
    reads no gradient and is called directly::

        for i, batch in enumerate(batches):
            opt.zero_grad()
            with torch.autocast(device_type, dtype=torch.float16):
                loss = loss_fn(model, batch)
            scaler.scale(loss).backward()
            # unscale, check, then worker_step(i) unless Inf/NaN:
            scaler.step(opt.worker(i))
            scaler.update()
        opt.step()

    Args:
        params, lr, tau: as in :class:`MedianSGD`.
        n_workers: the number of workers (``>= 1``); part of the state (saved in every
            parameter group; a state dict for another number of workers is refused).
        div: ``"l2"`` (Clip21, default) or ``"l1"`` (componentwise clipping of the innovation).
        scope: ``"global"`` (default, Clip21: each worker's whole update is one vector) or
            ``"param"`` (one clipping per parameter tensor).
        init: ``"zeros"`` (``g_i = 0`` at first) or ``"grad"`` (a worker's first gradient of a
            parameter is sent unclipped, ``g_i = grad_i``, the usual error-feedback
            initialisation; tracked per worker and parameter).
        weight_decay: coupled L2 penalty added to each worker's gradient before clipping.
        foreach: as in :class:`MedianSGD`.

    State per parameter: ``"workers"`` (the ``(n_workers, *shape)`` estimates ``g_i``) and
    ``"estimate"`` (the server's ``g``); ``"seen"`` (bool per worker, kept on the CPU, so
    reading it never synchronises).
    """

    def __init__(
        self,
        params,
        lr: float = required,  # type: ignore[assignment]
        tau: float = required,  # type: ignore[assignment]
        n_workers: int = required,  # type: ignore[assignment]
        *,
        div: str = "l2",
        scope: str = "global",
        init: str = "zeros",
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
    ) -> None:
        if n_workers is required:
            raise TypeError("Clip21() missing required argument: 'n_workers'")
        _check_n_workers(n_workers)
        defaults = dict(lr=lr, tau=tau, n_workers=int(n_workers), div=div, scope=scope, init=init,
                        weight_decay=weight_decay, foreach=foreach)
        _validated(_check_clip21_group, defaults, _CLIP21_KEYS, "Clip21", None, constructing=True)
        super().__init__(params, defaults)

    @property
    def n_workers(self) -> int:
        """The number of workers (kept in ``defaults`` and every group: saved, copied, pickled)."""
        return self.defaults["n_workers"]

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        legacy = self.__dict__.pop("n_workers", None)  # pickled when it was an attribute
        if legacy is not None and "n_workers" not in self.defaults:
            self.defaults["n_workers"] = legacy
            _fill_optional(self.param_groups, {"n_workers": legacy})
        # torch.optim casts loaded floating-point state to each parameter's dtype and device;
        # "seen" is a bool flag read on the host, so it goes back to a CPU bool tensor.
        for s in self.state.values():
            if isinstance(s, dict) and isinstance(s.get("seen"), torch.Tensor):
                seen = s["seen"]
                if seen.dtype != torch.bool or seen.device.type != "cpu":
                    s["seen"] = seen.to(device="cpu").bool()

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch's rules); one whose options are invalid raises and is not added."""
        _add_group_validated(self, param_group, self._validate_group)

    def _validate_group(self, group: dict, index: Optional[int] = None) -> None:
        _validated(_check_clip21_group, group, _CLIP21_KEYS, "Clip21", index)
        if group["n_workers"] != self.n_workers:
            where = "a parameter group" if index is None else f"parameter group {index}"
            raise ValueError(
                f"{where} has n_workers = {group['n_workers']}, this Clip21 has {self.n_workers} "
                f"workers (a state dict saved for another number of workers?)"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; refused (nothing changes) if it was saved for another ``n_workers``.

        A state dict saved before ``n_workers`` was part of it is read from the shape of its
        ``"workers"`` state.
        """
        saved = [g.get("n_workers") for g in state_dict.get("param_groups", [])]
        if any(n is None for n in saved):
            shapes = {tuple(s["workers"].shape)[:1] for s in state_dict.get("state", {}).values()
                      if isinstance(s, dict) and isinstance(s.get("workers"), torch.Tensor)}
            inferred = shapes.pop()[0] if len(shapes) == 1 else self.n_workers

        def finish():
            if any(n is None for n in saved):
                _fill_optional(self.param_groups, {"n_workers": inferred})
            _fill_optional(self.param_groups, _CLIP21_OPTIONAL)
            for index, group in enumerate(self.param_groups):
                self._validate_group(group, index)
            for p, state in self.state.items():
                if not (isinstance(p, torch.Tensor) and isinstance(state, dict)):
                    continue
                workers, seen = state.get("workers"), state.get("seen")
                if workers is not None and tuple(workers.shape) != (self.n_workers, *p.shape):
                    raise ValueError(
                        f"the state dict's worker estimates of shape {tuple(workers.shape)} do not "
                        f"fit {self.n_workers} workers of a parameter of shape {tuple(p.shape)}"
                    )
                if seen is not None and seen.numel() != self.n_workers:
                    raise ValueError(f"the state dict's 'seen' flags are for {seen.numel()} "
                                     f"workers, this Clip21 has {self.n_workers}")

        _load_validated(self, state_dict, finish)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "workers" not in state:
            state["workers"] = p.new_zeros((self.n_workers, *p.shape))
            state["estimate"] = torch.zeros_like(p)
            state["seen"] = torch.zeros(self.n_workers, dtype=torch.bool)
        return state

    def worker(self, worker: int) -> "_Clip21Worker":
        """An optimizer-like view of worker ``worker``: its ``step()`` is ``worker_step(worker)``.

        For ``torch.amp.GradScaler.step`` (see the class docstring); it shares this optimizer's
        ``param_groups`` and ``state``.
        """
        self._check_worker(worker)
        return _Clip21Worker(self, worker)

    def _check_worker(self, worker) -> None:
        if isinstance(worker, bool) or not isinstance(worker, numbers.Integral) or not (
            0 <= worker < self.n_workers  # type: ignore[operator]
        ):
            raise ValueError(f"worker must be an integer in [0, {self.n_workers}), got {worker!r}")

    @torch.no_grad()
    def worker_step(self, worker: int) -> None:
        """Worker ``worker`` reads its gradient from ``p.grad``: ``g_i <- g_i + clip(grad - g_i)``.

        The server's average moves by ``c_i / n_workers`` at once. Parameters without a gradient
        are left alone. With ``init="grad"``, a parameter's first gradient from this worker is
        sent as it is (and the others of the group are clipped together, as usual).
        """
        self._check_worker(worker)
        work = []
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise TypeError("Clip21 does not support sparse gradients")
            work.append((group, params))
        for group, params in work:
            foreach = _choose_foreach(group["foreach"], params) is True
            grads = _effective_grads(params, [p.grad for p in params], maximize=False,
                                     weight_decay=group["weight_decay"], decoupled=False,
                                     foreach=foreach)
            states = [self._state_of(p) for p in params]
            gi = [s["workers"][worker] for s in states]  # views: updated in place
            # the flags live on the CPU: reading them is no synchronisation
            first = [group["init"] == "grad" and not bool(s["seen"][worker]) for s in states]
            messages: List[Optional[torch.Tensor]] = [None] * len(params)
            old = [k for k, f in enumerate(first) if not f]
            clipped = _clipped_innovations([gi[k] for k in old], [grads[k] for k in old],
                                           tau=group["tau"], div=group["div"],
                                           scope=group["scope"], foreach=foreach)
            for k, c in zip(old, clipped):
                messages[k] = c
            for k, f in enumerate(first):
                if f:  # the first message is the gradient itself
                    messages[k] = torch.sub(grads[k], gi[k])
                    states[k]["seen"][worker] = True
            # the worker adds its message c_i to its estimate, the server's mean moves by c_i / n
            for g, s, c in zip(gi, states, messages):  # type: ignore[assignment]
                g.add_(c)
                s["estimate"].add_(c, alpha=1.0 / self.n_workers)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """The server's step ``w <- w - lr mean_i g_i``; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._server_step()
        return loss

    def _server_step(self) -> None:
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
        for group in self.param_groups:
            lr = _lr_value(group["lr"])
            for p in group["params"]:
                state = self.state.get(p)
                if state and "estimate" in state:
                    _weight_step(p, state["estimate"], lr, 1.0)


class _Clip21Worker:
    """What ``torch.amp.GradScaler.step`` needs of an optimizer, for one Clip21 worker."""

    def __init__(self, opt: Clip21, worker: int) -> None:
        self._opt, self._worker = opt, worker

    @property
    def param_groups(self) -> List[dict]:
        return self._opt.param_groups

    @property
    def state(self):
        return self._opt.state

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._opt.worker_step(self._worker)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"worker {self._worker} of {self._opt!r}"


_CLIP21_KEYS = ("lr", "tau", "n_workers", "div", "scope", "init", "weight_decay", "foreach")
_CLIP21_OPTIONAL = {"scope": "global", "init": "zeros", "weight_decay": 0.0, "foreach": None}


def _check_n_workers(n_workers) -> None:
    if isinstance(n_workers, bool) or not isinstance(n_workers, numbers.Integral) or n_workers < 1:
        raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")


def _check_clip21_group(group: dict) -> None:
    _check_lr(group["lr"])
    _number(group["tau"], "tau", positive=True)
    _check_n_workers(group["n_workers"])
    check_choice(group["div"], "div", ("l2", "l1"))
    check_choice(group["scope"], "scope", SCOPES)
    check_choice(group["init"], "init", INITS)
    _number(group["weight_decay"], "weight_decay")
    _foreach_option(group)


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
        lr: float = required,  # type: ignore[assignment]
        aggregate: str = "coordinate_median",
        *,
        scope: str = "global",
        trim: float = 0.1,
        gm_options: Optional[dict] = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        if gm_options is not None and not isinstance(gm_options, dict):
            raise TypeError(f"gm_options must be a dict, got {type(gm_options).__name__}")
        options = {"max_iter": 10, "fixed_iter": True}
        options.update(gm_options or {})
        defaults = dict(lr=lr, aggregate=aggregate, scope=scope, trim=trim, gm_options=options,
                        weight_decay=weight_decay, maximize=maximize)
        _validated(_check_sample_group, defaults, _SAMPLE_KEYS, "SampleMedianSGD", None,
                   constructing=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch's rules); one whose options are invalid raises and is not added."""
        _add_group_validated(self, param_group, _validate_sample_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; its options are checked like the constructor's (nothing changes on error)."""
        def finish():
            _fill_optional(self.param_groups, _SAMPLE_OPTIONAL)
            for index, group in enumerate(self.param_groups):
                _validate_sample_group(group, index)

        _load_validated(self, state_dict, finish)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """One step along the aggregate of ``p.grad_sample``; returns ``closure()`` if given.

        Every group (options and ``grad_sample`` shapes) is checked before any is modified.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_samples()
        return loss

    def _step_samples(self) -> None:
        work = []
        for index, group in enumerate(self.param_groups):
            _validate_sample_group(group, index)
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
            work.append((group, params, samples, n))
        for group, params, samples, n in work:
            with value_checks(False):
                updates = self._aggregate(group, samples, n)
            sign = -1.0 if group["maximize"] else 1.0
            lr = _lr_value(group["lr"])
            for p, u in zip(params, updates):
                if group["weight_decay"] != 0:
                    u = u.add(p, alpha=sign * group["weight_decay"])
                _weight_step(p, u, -lr if sign < 0 else lr, 1.0)

    @staticmethod
    def _aggregate(group: dict, samples: List[torch.Tensor], n: int) -> List[torch.Tensor]:
        rule = get_rule(group["aggregate"], "optimizer").name  # an alias ("cmd", "gm") as well
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


_SAMPLE_KEYS = ("lr", "aggregate", "scope", "trim", "gm_options", "weight_decay", "maximize")
_SAMPLE_OPTIONAL = {"scope": "global", "trim": 0.1, "gm_options": {"max_iter": 10, "fixed_iter": True},
                    "weight_decay": 0.0, "maximize": False}


def _check_sample_group(group: dict) -> None:
    _check_lr(group["lr"])
    # the rules, their names and their options: the registry of median_sgd.aggregators
    get_rule(group["aggregate"], "optimizer", what="aggregate")
    check_choice(group["scope"], "scope", SCOPES)
    REGISTRY["trimmed_mean"].check({"trim": group["trim"]}, "optimizer")
    options = group["gm_options"]
    if not isinstance(options, dict):
        raise TypeError(f"gm_options must be a dict, got {type(options).__name__}")
    REGISTRY["geometric_median"].check(options, "optimizer")
    _number(group["weight_decay"], "weight_decay")
    _flag(group, "maximize")


def _validate_sample_group(group: dict, index: Optional[int] = None) -> None:
    _validated(_check_sample_group, group, _SAMPLE_KEYS, "SampleMedianSGD", index)
