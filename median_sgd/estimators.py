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

import functools
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._checks import Scalar, check_choice, check_same_kind, check_tau, check_vector
from ._numerics import host_reads_are_free, opmath_dtype, pow2_scale
from .prox import check_p, clip_l1_unchecked, clip_l2_unchecked, clip_lp_unchecked, l2_norm, l2_step_weight, radius_in_range

__all__ = ["DIVERGENCES", "METHODS", "SCOPES", "spp_step", "sgd_step", "spp_step_lp", "sgd_step_lp",
           "lp_norm_grad", "estimator_update", "weight_step", "default_foreach", "SMALL_TENSOR"]

DIVERGENCES = ("sq", "l2", "l1")
METHODS = ("spp", "sgd")
SCOPES = ("param", "global")


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
        return m + clip_l2_unchecked(delta, tau)
    return m + clip_l1_unchecked(delta, tau)


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
    p = check_p(p)
    shape = _check_pair(m, g)
    tau = check_tau(tau, _like(m, shape), "tau")
    return m + clip_lp_unchecked(g - m, tau, p)


def lp_norm_grad(v: torch.Tensor, p: float) -> torch.Tensor:
    """A subgradient of ``||.||_p`` at ``v``: ``sign(v) |v|^(p-1) / ||v||_p^(p-1)`` (0 at ``v = 0``).

    ``p = 1``: ``sign(v)``; ``p = inf``: ``sign(v_j) / #J`` on the set ``J`` of largest ``|v_j|``
    (the minimum-norm subgradient). Computed with ``v`` scaled by its largest entry, so no overflow.
    """
    check_vector(v, "v")
    return _lp_norm_grad(v, check_p(p))


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
    p = check_p(p)
    shape = _check_pair(m, g)
    tau = check_tau(tau, _like(m, shape), "tau", in_range=True)
    return m + tau * _lp_norm_grad(g - m, p)


# --------------------------------------------------------------------------------------------
# The update over lists of tensors, in place (torch.optim's functional form: ``estimator_update``
# dispatches to ``_single_tensor_update``, a loop that finishes each tensor while it is in cache,
# and ``_multi_tensor_update``, ``torch._foreach_*`` kernels for a (device, dtype) bucket)

#: Below this many elements a tensor's arithmetic costs less than a Python-level op on it, so the
#: per-tensor loop hands such tensors (biases, norms) to the multi-tensor kernels in one go.
SMALL_TENSOR = 1 << 16

Foreach = Union[bool, str]
#: ``(tensors, alpha)``: where the update's increments are also added, ``t <- t + alpha (m+ - m)``.
Mirror = Tuple[List[torch.Tensor], float]


def default_foreach(foreach: Optional[bool], tensors: Sequence[torch.Tensor]) -> Foreach:
    """``foreach=None``: multi-tensor kernels on accelerators, ``"auto"`` on the CPU.

    As torch.optim does: on a GPU the step is bound by kernel launches (a ``_foreach_`` op is a
    few launches for all tensors), on the CPU by memory traffic, and a loop that finishes each
    tensor while it is still in cache is faster; small tensors still go through the multi-tensor
    kernels there, where a Python-level loop would cost more than their arithmetic.
    """
    if foreach is not None:
        return bool(foreach)
    return True if all(t.device.type != "cpu" for t in tensors) else "auto"


def estimator_update(
    estimates: List[torch.Tensor],
    samples: List[torch.Tensor],
    *,
    tau: float,
    div: str,
    method: str = "spp",
    scope: str = "param",
    foreach: Foreach = "auto",
    weights: Optional[List[torch.Tensor]] = None,
    lr=0.0,
    shrink=1.0,
    mirror: Optional[Mirror] = None,
    scratch: Optional[dict] = None,
) -> None:
    """``m <- step(m, g, tau, div)`` in place for every pair: :func:`~median_sgd.spp_step` /
    :func:`~median_sgd.sgd_step` on lists.

    Each tensor is one vector (``scope="param"``) or the concatenation of all is
    (``"global"``; it matters only for ``div="l2"``, as ``"sq"`` and ``"l1"`` act coordinate by
    coordinate). With ``weights``, each weight then takes its step ``w <- shrink w - lr m``
    (:func:`weight_step`; in the loop right after its estimate, while both are in cache;
    ``lr``, ``shrink``: numbers or 0-dim tensors on the weights' device). With ``mirror =
    (tensors, alpha)`` the increments are added there too, ``t <- t + alpha (m+ - m)`` (Clip21's
    server average). ``foreach``: ``True`` (multi-tensor kernels for all), ``False`` (a loop over
    all) or ``"auto"`` (the loop for tensors of at least :data:`SMALL_TENSOR` elements).
    ``scratch`` (a dict kept by the caller) holds one buffer per (device, dtype) for the loop's
    differences ``g - m`` (and the views of it the loop uses), so that the loop allocates nothing. Norms of ``g - m`` never overflow
    (nor, for the subgradient step, underflow): they are scaled by powers of two where needed
    (:func:`median_sgd.prox.l2_norm`). Chapter "Clipping is secretly estimating the median
    gradient" (method (17)).
    """
    if not estimates:
        return
    if foreach == "auto":
        loop = [i for i, m in enumerate(estimates) if m.numel() >= SMALL_TENSOR]
        multi = [i for i, m in enumerate(estimates) if m.numel() < SMALL_TENSOR]
    elif foreach:
        loop, multi = [], list(range(len(estimates)))
    else:
        loop, multi = list(range(len(estimates))), []
    ws: List[Optional[torch.Tensor]] = list(weights) if weights is not None else [None] * len(estimates)
    mirrored: List[Optional[torch.Tensor]] = list(mirror[0]) if mirror is not None else [None] * len(estimates)

    def pick(items, index):
        return [items[i] for i in index]

    single = _Lists(pick(estimates, loop), pick(samples, loop), pick(ws, loop), pick(mirrored, loop))
    buckets = [_Lists(*b) for b in _buckets(pick(estimates, multi), pick(samples, multi),
                                             pick(ws, multi), pick(mirrored, multi)).values()]
    rule = _Rule(tau, div, method, lr, shrink, mirror[1] if mirror is not None else 0.0)
    if div == "l2" and scope == "global":
        _global_l2_update(single, buckets, rule, scratch)
        return
    _single_tensor_update(single, rule, scratch)
    for bucket in buckets:
        _multi_tensor_update(bucket, rule)


class _Lists:
    """Parallel lists: estimates, samples, weights and mirrors (None where there are none)."""

    def __init__(self, ms, gs, ws, mirrors) -> None:
        self.ms: List[torch.Tensor] = ms
        self.gs: List[torch.Tensor] = gs
        self.ws: List[Optional[torch.Tensor]] = ws
        self.mirrors: List[Optional[torch.Tensor]] = mirrors


class _Rule:
    """The options of one update: ``tau``, ``div``, ``method``, the weight step and the mirror."""

    def __init__(self, tau: float, div: str, method: str, lr, shrink, alpha: float) -> None:
        self.tau, self.div, self.method = tau, div, method
        self.lr, self.shrink, self.alpha = lr, shrink, alpha
        self.clip = method == "spp"
        self.tiny = method == "sgd"  # the subgradient step needs the direction of even a tiny g - m
        # "sq": m + w (g - m), momentum with beta = 1/(1+tau) (spp) or 1 - tau (sgd)
        self.sq_weight = (tau / (1.0 + tau) if self.clip else tau) if div == "sq" else 0.0


def _buckets(*lists: Sequence) -> Dict[Tuple[torch.device, torch.dtype], List[list]]:
    """Group parallel lists by the (device, dtype) of the first list's tensors."""
    out: Dict[Tuple[torch.device, torch.dtype], List[list]] = defaultdict(lambda: [[] for _ in lists])
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        for bucket, item in zip(out[key], items):
            bucket.append(item)
    return out


def _scratch_view(scratch: dict, key: Tuple[torch.device, torch.dtype], offset: int,
                  shape: torch.Size, need: int) -> torch.Tensor:
    """A view of ``shape`` at ``offset`` into the caller's scratch buffer for ``key`` (device,
    dtype), allocated with ``need`` elements when missing or too small. The views are kept with
    the buffer: building one costs more than the arithmetic on a small tensor."""
    buf = scratch.get(key)
    end = offset + shape.numel()
    if buf is None or buf.numel() < end:
        buf = scratch[key] = torch.empty(max(need, end), device=key[0], dtype=key[1])
        scratch[key, "views"] = {}
    views = scratch[key, "views"]
    view = views.get((offset, shape))
    if view is None:
        view = views[offset, shape] = buf[offset: end].view(shape)
    return view


def _largest(ms: Sequence[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], int]:
    need: Dict[Tuple[torch.device, torch.dtype], int] = defaultdict(int)
    for m in ms:
        key = (m.device, m.dtype)
        need[key] = max(need[key], m.numel())
    return need


#: The loop's ``"l2"`` norms are taken over runs of consecutive tensors (of one device and
#: dtype) of at most this many elements together (or one larger tensor): the run's differences
#: into the scratch buffer, their norms and one host check, then the run's updates. Small
#: tensors share a run (one check for many); a large one is a run of its own, so that its
#: difference, estimate and sample are still in cache for its update (longer runs push them out
#: of the cache between the two and cost more than the checks they save).
L2_RUN = 1 << 16

#: On the CPU each difference lies in the scratch buffer as rows of this many elements (its last
#: row padded with zeros, which add nothing to a sum of squares), and a tensor's norm is the norm
#: of its rows' norms: one kernel for all rows of a run, parallel over rows. The norm kernel of a
#: whole tensor is one serial, latency-bound accumulation; between the parallel elementwise
#: kernels around it, it leaves the other cores idle and stalls the next kernel (the idle thread
#: must be woken). Rows of a few thousand elements cost the kernel nothing per row.
NORM_ROW = 4096


def _rows(n: int) -> int:
    """The rows of :data:`NORM_ROW` elements that hold ``n`` elements."""
    return -(-n // NORM_ROW)


def _runs(ms: Sequence[torch.Tensor]) -> Tuple[List[List[int]], Dict[Tuple[torch.device, torch.dtype], int]]:
    """The runs (lists of consecutive indices) and the scratch a run needs (its rows) at most,
    per (device, dtype)."""
    runs: List[List[int]] = []
    need: Dict[Tuple[torch.device, torch.dtype], int] = defaultdict(int)
    size, padded, last = 0, 0, None
    for i, m in enumerate(ms):
        key = (m.device, m.dtype)
        if runs and key == last and size + m.numel() <= L2_RUN:
            runs[-1].append(i)
            size += m.numel()
            padded += _rows(m.numel()) * NORM_ROW
        else:
            runs.append([i])
            size, padded, last = m.numel(), _rows(m.numel()) * NORM_ROW, key
        need[key] = max(need[key], padded)
    return runs, need


def _row_differences(ms: Sequence[torch.Tensor], gs: Sequence[torch.Tensor], scratch: dict,
                     need: int) -> Tuple[List[torch.Tensor], torch.Tensor, List[int]]:
    """``g - m`` for each pair (one device and dtype) in the scratch buffer, each starting a row
    of :data:`NORM_ROW` elements, its last row padded with zeros: ``(differences, rows, rows
    per tensor)`` with ``rows`` the ``(rows, NORM_ROW)`` view of them all."""
    key = (ms[0].device, ms[0].dtype)
    counts = [_rows(m.numel()) for m in ms]
    # the view of all rows first: the buffer is (re)allocated before any difference is in it
    rows = _scratch_view(scratch, key, 0, torch.Size([sum(counts), NORM_ROW]), need)
    out, offset = [], 0
    for m, g, count in zip(ms, gs, counts):
        n = m.numel()
        out.append(torch.sub(g, m, out=_scratch_view(scratch, key, offset, m.shape, need)))
        if n % NORM_ROW:
            _scratch_view(scratch, key, offset + n, torch.Size([count * NORM_ROW - n]), need).zero_()
        offset += count * NORM_ROW
    return out, rows, counts


def _wide(d: torch.Tensor) -> torch.Tensor:
    """float16 differences in float32, where the weight of an ``"l2"`` step (as small as
    tau / ||g - m||) stays in range."""
    return d.float() if d.dtype == torch.float16 else d


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


class _L1Plan:
    """The ``"l1"`` increment ``m+ - m`` from ``d = g - m`` for one dtype, in place on ``d``:
    ``clip_l1(d, tau)``, or ``tau sign(d)`` (exact, NaN kept: :func:`_sign_plan`) whose result
    is ``alpha`` times the increment."""

    def __init__(self, rule: _Rule, d: torch.Tensor) -> None:
        self.clip = rule.clip
        if self.clip:
            self.bound = float(radius_in_range(rule.tau, d.dtype))
            self.alpha = 1.0
        else:
            muls, big, self.t, self.alpha = _sign_plan(d.dtype, rule.tau)
            # a 0-dim tensor: d.mul_ with a Python number costs twice as much on the CPU
            self.scales = [torch.tensor(big, dtype=d.dtype, device=d.device)] * muls

    def increment_(self, d: torch.Tensor) -> torch.Tensor:
        if self.clip:
            return d.clamp_(-self.bound, self.bound)
        for big in self.scales:
            d.mul_(big)
        return d.clamp_(-self.t, self.t)


def _add_increment_(m: torch.Tensor, mirror: Optional[torch.Tensor], u: torch.Tensor, alpha: float,
                    rule: _Rule) -> None:
    m.add_(u, alpha=alpha) if alpha != 1.0 else m.add_(u)
    if mirror is not None:
        mirror.add_(u, alpha=alpha * rule.alpha)


Weight = Union[float, torch.Tensor]


def _lerp_(m: torch.Tensor, g: torch.Tensor, f: Weight) -> None:
    """``m <- m + f (g - m)``; for float16 in float32, where ``f`` (down to tau / ||g - m||)
    can be below float16's normal range. ``f``: a tensor in the arithmetic dtype, or a Python
    number already rounded as :func:`_lerp_weights` rounds it."""
    if m.dtype == torch.float16:
        m.add_(g.float().sub_(m).mul_(f))
    elif isinstance(f, torch.Tensor) and f.dtype != m.dtype:
        m.lerp_(g, f.to(m.dtype))
    else:
        m.lerp_(g, f)


def _lerp_weights(f: torch.Tensor, dtype: torch.dtype) -> List[float]:
    """The ``"l2"`` weights ``f`` (in the arithmetic dtype) as Python numbers, rounded to the
    precision :func:`_lerp_` applies a tensor weight in (``dtype``'s, float32 for float16): the
    same steps bit for bit, without a 0-dim tensor per step (CPU tensors only)."""
    if dtype != torch.float16 and f.dtype != dtype:
        f = f.to(dtype)
    return f.tolist() if f.dim() == 1 else [f.item()]


def _single_tensor_update(lists: _Lists, rule: _Rule, scratch: Optional[dict],
                          l2_weight: Optional[torch.Tensor] = None) -> None:
    """The loop: each tensor's estimate, then its weight, while both are in cache.

    ``l2_weight``: the ``"l2"`` weight of every unscaled difference (the global scope's, from
    the norm of all of them); else each tensor's own, from the norms of a run of tensors at a
    time (:data:`L2_RUN`). Without a mirror the ``"sq"`` and ``"l2"`` steps are one fused
    ``lerp_`` each and the difference is never kept.
    """
    if rule.div == "l2":
        _l2_loop(lists, rule, scratch, l2_weight)
        return
    need = _largest(lists.ms)
    plans: Dict[Tuple[torch.device, torch.dtype], _L1Plan] = {}
    lr, shrink = rule.lr, rule.shrink
    for m, g, w, mirror in zip(lists.ms, lists.gs, lists.ws, lists.mirrors):
        if rule.div == "sq" and mirror is None:
            m.lerp_(g, rule.sq_weight)
        elif rule.div == "sq":
            _add_increment_(m, mirror, torch.sub(g, m).mul_(rule.sq_weight), 1.0, rule)
        else:
            key = (m.device, m.dtype)
            if scratch is None or mirror is not None:
                d = torch.sub(g, m)
            else:
                d = torch.sub(g, m, out=_scratch_view(scratch, key, 0, m.shape, need[key]))
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = _L1Plan(rule, d)
            _add_increment_(m, mirror, plan.increment_(d), plan.alpha, rule)
        if w is not None:
            weight_step(w, m, lr, shrink)


def _l2_loop(lists: _Lists, rule: _Rule, scratch: Optional[dict], l2_weight: Optional[torch.Tensor]) -> None:
    """The loop's ``"l2"`` steps: with the global weight ``l2_weight``, or run by run."""
    if l2_weight is not None:
        cast: Dict[Tuple[torch.device, torch.dtype], Weight] = {}
        # last tensor first: the norms' pass ended with it, so it may still be in cache
        for i in reversed(range(len(lists.ms))):
            m = lists.ms[i]
            key = (m.device, m.dtype)
            if key not in cast:
                f = l2_weight.to(device=m.device, dtype=opmath_dtype(m.dtype))
                cast[key] = _lerp_weights(f, m.dtype)[0] if host_reads_are_free(f) else f
            _l2_step(lists, i, cast[key], rule)
        return
    runs, need = _runs(lists.ms)
    for run in runs:
        norms, scales = _run_norms(lists, run, rule, scratch, need)
        weights: Sequence[Weight]
        if scales is None:  # one weight computation for the whole run (on the CPU: numbers)
            # the subgradient step's norms are all > 0 here: its weight is tau / n
            f = l2_step_weight(norms, None, rule.tau) if rule.clip else torch.div(rule.tau, norms)
            weights = _lerp_weights(f, lists.ms[run[0]].dtype)
        else:
            weights = [l2_step_weight(n, s, rule.tau, clip=rule.clip) for n, s in zip(norms, scales)]
        for i, weight in zip(run, weights):
            _l2_step(lists, i, weight, rule)


def _run_norms(lists: _Lists, run: List[int], rule: _Rule, scratch: Optional[dict],
               need: Dict[Tuple[torch.device, torch.dtype], int]):
    """The norms ``n / s`` of the run's differences, as :func:`median_sgd.prox.l2_norm` gives them
    (up to the order of summation).

    On the CPU with a scratch buffer, the norms of the rows of all differences first (one
    kernel, :data:`NORM_ROW`), then each tensor's norm from its rows' norms, and one host check:
    ``(stacked norms, None)`` when none needs scaling. Else, and off the CPU, ``l2_norm`` of
    each: ``(norms, scales)``, lists.
    """
    ms, gs = [lists.ms[i] for i in run], [lists.gs[i] for i in run]
    key = (ms[0].device, ms[0].dtype)
    if scratch is not None and host_reads_are_free(ms[0]):
        ds, rows, counts = _row_differences(ms, gs, scratch, need[key])
        work = opmath_dtype(key[1])
        row_norms = torch.linalg.vector_norm(rows, dim=1, dtype=work if work != key[1] else None)
        if len(ds) == 1:
            n = torch.linalg.vector_norm(row_norms, dim=0, keepdim=True)
        else:
            n = torch.stack(torch._foreach_norm(row_norms.split(counts)))
        if _plain_norms_fine(n, rule.tiny):
            return n, None
    else:
        ds = [torch.sub(g, m) for m, g in zip(ms, gs)]
    pairs = [l2_norm(d, None, tiny=rule.tiny) for d in ds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plain_norms_fine(n: torch.Tensor, tiny: bool) -> bool:
    """Whether unscaled norms (a CPU tensor) are what :func:`median_sgd.prox.l2_norm` would
    return: none overflowed to Inf (NaN is fine: the norm of NaN data) and, with ``tiny``, none
    is 0 (NaN then is not fine, as there)."""
    if tiny:
        lo, hi = (float(n),) * 2 if n.numel() == 1 else (float(t) for t in torch.aminmax(n))
        return lo > 0 and not math.isinf(hi)
    # norms are >= 0: their sum is finite unless one is Inf or NaN (or they add up past the range)
    total = float(n) if n.numel() == 1 else float(n.sum())
    return math.isfinite(total) or (math.isnan(total) and not bool(torch.isinf(n).any()))


def _l2_step(lists: _Lists, i: int, f: Weight, rule: _Rule) -> None:
    """``m <- m + f (g - m)`` for tensor ``i`` (and its mirror), then its weight step."""
    m, g, mirror = lists.ms[i], lists.gs[i], lists.mirrors[i]
    if mirror is None:
        _lerp_(m, g, f)
    else:
        d = _wide(torch.sub(g, m))
        _add_increment_(m, mirror, d.mul_(f.to(d.dtype) if isinstance(f, torch.Tensor) else f), 1.0, rule)
    weight_step(lists.ws[i], m, rule.lr, rule.shrink)


def _multi_tensor_update(bucket: _Lists, rule: _Rule) -> None:
    """``torch._foreach_*`` kernels for one (device, dtype) bucket: a few launches for all."""
    bm, bg = bucket.ms, bucket.gs
    if rule.div == "sq" and bucket.mirrors[0] is None:
        torch._foreach_lerp_(bm, bg, rule.sq_weight)
    elif rule.div == "sq":
        d = list(torch._foreach_sub(bg, bm))
        torch._foreach_mul_(d, rule.sq_weight)
        _foreach_add_increments_(bucket, d, 1.0, rule)
    elif rule.div == "l1":
        d = list(torch._foreach_sub(bg, bm))
        if rule.clip:
            bound = float(radius_in_range(rule.tau, d[0].dtype))
            torch._foreach_clamp_min_(d, -bound)
            torch._foreach_clamp_max_(d, bound)
            _foreach_add_increments_(bucket, d, 1.0, rule)
        else:
            muls, big, t, alpha = _sign_plan(d[0].dtype, rule.tau)
            if d[0].device.type == "cpu":
                # on the CPU, _foreach_mul_ with a Python number is ~4x slower than with a 0-dim tensor
                scale: Union[float, torch.Tensor] = torch.tensor(big, dtype=d[0].dtype)
            else:
                scale = big
            for _ in range(muls):
                torch._foreach_mul_(d, scale)
            torch._foreach_clamp_min_(d, -t)
            torch._foreach_clamp_max_(d, t)
            _foreach_add_increments_(bucket, d, alpha, rule)
    else:
        d = _foreach_differences(bg, bm)
        n, s = _foreach_norms_(d, rule.tiny, safe=bg[0].dtype == torch.float16)
        if s is None and _lerps_on_host(bucket):
            # the loop's step, one lerp_ per tensor with a number: no 0-dim weights, no scaled copies
            f = l2_step_weight(n, None, rule.tau, clip=rule.clip)
            torch._foreach_lerp_(bm, bg, _lerp_weights(f, bm[0].dtype))
        else:
            f = l2_step_weight(n, s, rule.tau, clip=rule.clip, of_scaled=True).to(d[0].dtype)
            torch._foreach_mul_(d, list(f.unbind()))
            _foreach_add_increments_(bucket, d, 1.0, rule)
    _foreach_weight_step(bucket.ws, bm, rule.lr, rule.shrink)


def _lerps_on_host(bucket: _Lists) -> bool:
    """Whether a bucket's ``"l2"`` steps can be ``_foreach_lerp_`` with numbers, as the loop's:
    CPU tensors (weights read for free), no mirror, not float16 (stepped in float32)."""
    m = bucket.ms[0]
    return bucket.mirrors[0] is None and m.dtype != torch.float16 and host_reads_are_free(m)


def _foreach_add_increments_(bucket: _Lists, d: List[torch.Tensor], alpha: float, rule: _Rule) -> None:
    if alpha != 1.0:
        torch._foreach_add_(bucket.ms, d, alpha=alpha)
    else:
        torch._foreach_add_(bucket.ms, d)
    if bucket.mirrors[0] is not None:
        torch._foreach_add_(bucket.mirrors, d, alpha=alpha * rule.alpha)  # type: ignore[arg-type]


def _foreach_differences(gs: List[torch.Tensor], ms: List[torch.Tensor]) -> List[torch.Tensor]:
    """``g - m`` for a (device, dtype) bucket, float16 in float32 (:func:`_wide`)."""
    deltas = torch._foreach_sub(gs, ms)
    return [_wide(d) for d in deltas] if deltas[0].dtype == torch.float16 else list(deltas)


def _foreach_norms_(deltas: List[torch.Tensor], tiny: bool, safe: bool = False
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The stacked norms ``n / s`` of a bucket (:func:`median_sgd.prox.l2_norm` per tensor).

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
    s = pow2_scale(a, 33)
    s = s if tiny else s.clamp(max=1.0)  # only large vectors are scaled down, unless tiny
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


def _global_l2_update(single: _Lists, buckets: List[_Lists], rule: _Rule, scratch: Optional[dict]) -> None:
    """``"l2"`` on the concatenation of all tensors: the norm of the whole difference first (the
    loop's differences are recomputed in the second pass, not kept), then the steps."""
    norms: List[torch.Tensor] = []
    scales: List[Optional[torch.Tensor]] = []
    runs, need = _runs(single.ms)
    for run in runs:
        n, s = _run_norms(single, run, rule, scratch, need)
        if s is None:
            norms.append(n)  # type: ignore[arg-type]
            scales.append(None)
        else:
            norms += n
            scales += s
    deltas = []
    for bucket in buckets:
        d = _foreach_differences(bucket.gs, bucket.ms)
        n, s = _foreach_norms_(d, rule.tiny, safe=bucket.gs[0].dtype == torch.float16)
        norms.append(n)
        scales.append(s)
        deltas.append((d, s))
    device = (single.ms or buckets[0].ms)[0].device
    n, s = _combined_norm(norms, scales, device, rule.tiny)
    f = l2_step_weight(n, s, rule.tau, clip=rule.clip)  # the weight of the unscaled difference
    _single_tensor_update(single, rule, scratch, l2_weight=f)
    for bucket, (d, s_part) in zip(buckets, deltas):
        here = f.to(device=d[0].device, dtype=opmath_dtype(d[0].dtype))
        if s_part is None and _lerps_on_host(bucket):  # the loop's step (see _multi_tensor_update)
            torch._foreach_lerp_(bucket.ms, bucket.gs, _lerp_weights(here, bucket.ms[0].dtype)[0])
        else:
            if s_part is None:
                torch._foreach_mul_(d, here.to(d[0].dtype))
            else:  # these deltas were scaled by s_part in place
                torch._foreach_mul_(d, list((here / s_part.to(here)).to(d[0].dtype).unbind()))
            _foreach_add_increments_(bucket, d, 1.0, rule)
        _foreach_weight_step(bucket.ws, bucket.ms, rule.lr, rule.shrink)


def weight_step(w: Optional[torch.Tensor], m: torch.Tensor, lr, shrink=1.0) -> None:
    """``w <- shrink w - lr m`` in place (nothing without a weight); ``lr``, ``shrink``: numbers
    or 0-dim tensors on ``w``'s device (a tensor lr is never read on the host)."""
    if w is None:
        return
    if isinstance(shrink, torch.Tensor) or shrink != 1.0:
        w.mul_(shrink)
    if isinstance(lr, torch.Tensor):
        w.sub_(m * lr)
    else:
        w.add_(m, alpha=-lr)


def _foreach_weight_step(ws: List[Optional[torch.Tensor]], ms: List[torch.Tensor], lr, shrink) -> None:
    if not ws or ws[0] is None:
        return
    if isinstance(shrink, torch.Tensor) or shrink != 1.0:
        torch._foreach_mul_(ws, shrink)  # type: ignore[arg-type]
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(ws, torch._foreach_mul(ms, lr))  # type: ignore[arg-type]
    else:
        torch._foreach_add_(ws, ms, alpha=-lr)  # type: ignore[arg-type]
