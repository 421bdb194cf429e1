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

from typing import Callable, Dict, List, Optional

import torch
from torch.optim.optimizer import required

from . import _param_groups as groups
from ._checks import check_real, value_checks
from ._param_groups import (CLIP21_RULES, MEDIAN_SGD_RULES, NONFINITE, SAMPLE_MEDIAN_GM_DEFAULTS,
                            SAMPLE_MEDIAN_RULES, CheckedOptimizer, OneWorker, closure_loss,
                            grads_of, lr_value)
from ._per_sample import grad_samples_of, sample_gradients
from .aggregators import REGISTRY, get_rule
from .estimators import METHODS, SCOPES, default_foreach, estimator_update, weight_step
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

# the rules SampleMedianSGD runs: those of the registry that run in the optimizer
AGGREGATES = tuple(name for name, rule in REGISTRY.items() if "optimizer" in rule.places)


# --------------------------------------------------------------------------------------------
# SGD along an online median of the gradient


class MedianSGD(CheckedOptimizer):
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

    State per parameter: ``"estimate"`` (``m``, the parameter's shape, dtype and device). The
    step is one :func:`median_sgd.estimators.estimator_update` call per group (norms that never
    overflow; no host synchronisation except ``nonfinite="raise"``). The options of every group
    are checked at every step and on ``load_state_dict``, before anything is modified.
    """

    RULES = MEDIAN_SGD_RULES

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
        defaults = dict(lr=lr, tau=tau, div=div, method=method, scope=scope,
                        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                        maximize=maximize, init=init, nonfinite=nonfinite, foreach=foreach)
        MEDIAN_SGD_RULES.validate_defaults(defaults)
        self._scratch: dict = {}  # work buffers of the loop path (not state: never saved)
        super().__init__(params, defaults)

    def _check_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        m = state.get("estimate")
        if m is not None and m.shape != p.shape:
            raise ValueError(f"the state dict's estimate of shape {tuple(m.shape)} does not fit a "
                             f"parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """One step for every parameter with a gradient; returns ``closure()`` if given.

        Every group is checked before any is modified: its options (cheap, Python values only),
        its gradients' layout and, for ``nonfinite="raise"``, their values (one host
        synchronisation for all such groups together).
        """
        loss = closure_loss(closure)
        work = self._groups_with_grads()
        for index, group, params in work:
            if group["method"] == "sgd":
                groups.check_step_tau(group, params, "MedianSGD", index)
        groups.check_finite_grads([(index, grads_of(params)) for index, group, params in work
                                   if group["nonfinite"] == "raise"])
        for _, group, params in work:
            self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: List[torch.Tensor]) -> None:
        """Collect the group's samples and estimates, then one :func:`estimator_update` call."""
        foreach = default_foreach(group["foreach"], params)
        lr, wd = lr_value(group["lr"]), group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        grads = groups.effective_grads(params, grads_of(params), maximize=group["maximize"],
                                       weight_decay=wd, decoupled=decoupled, foreach=foreach is True)
        mask = group["nonfinite"] == "mask"
        shrink = 1.0 - lr * wd if (wd != 0 and decoupled) else 1.0
        old = []  # parameters with an estimate; under init="grad" the others start at m_1 = g_1
        for p, g in zip(params, grads):
            state = self.state[p]
            if "estimate" in state:
                old.append((p, state["estimate"], g))
            elif group["init"] == "grad":
                if mask:  # non-finite entries are missing: a zero first estimate there
                    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
                state["estimate"] = g.clone(memory_format=torch.preserve_format)
                weight_step(p, state["estimate"], lr, shrink)
            else:
                state["estimate"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                old.append((p, state["estimate"], g))
        ws, ms, gs = ([t[k] for t in old] for k in range(3))
        if mask:  # non-finite entries are missing data: a zero innovation g - m there
            gs = [torch.where(torch.isfinite(g), g, m) for g, m in zip(gs, ms)]
        estimator_update(ms, gs, tau=group["tau"], div=group["div"], method=group["method"],
                         scope=group["scope"], foreach=foreach, weights=ws, lr=lr, shrink=shrink,
                         scratch=self.__dict__.setdefault("_scratch", {}))


# --------------------------------------------------------------------------------------------
# Clip21: one estimator per worker, the server averages


class Clip21(CheckedOptimizer):
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

    RULES = CLIP21_RULES

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
        check_real(n_workers, "n_workers", lo=1, integer=True)
        defaults = dict(lr=lr, tau=tau, n_workers=int(n_workers), div=div, scope=scope, init=init,
                        weight_decay=weight_decay, foreach=foreach)
        CLIP21_RULES.validate_defaults(defaults)
        super().__init__(params, defaults)

    @property
    def n_workers(self) -> int:
        """The number of workers (kept in ``defaults`` and every group: saved, copied, pickled)."""
        return self.defaults["n_workers"]

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        groups.restore_worker_state(self)

    def _validate_group(self, group: dict, index: Optional[int] = None) -> None:
        super()._validate_group(group, index)
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
        self._saved_workers = groups.saved_workers(state_dict, self.n_workers)
        try:
            super().load_state_dict(state_dict)
        finally:
            del self._saved_workers

    def _fill_loaded(self) -> None:
        groups.fill_optional(self.param_groups, {"n_workers": self._saved_workers, **CLIP21_RULES.optional})

    def _check_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        groups.check_worker_state(p, state, self.n_workers)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "workers" not in state:
            state["workers"] = p.new_zeros((self.n_workers, *p.shape))
            state["estimate"] = torch.zeros_like(p)
            state["seen"] = torch.zeros(self.n_workers, dtype=torch.bool)
        return state

    def worker(self, worker: int) -> OneWorker:
        """An optimizer-like view of worker ``worker``: its ``step()`` is ``worker_step(worker)``.

        For ``torch.amp.GradScaler.step`` (see the class docstring); it shares this optimizer's
        ``param_groups`` and ``state``.
        """
        self._check_worker(worker)
        return OneWorker(self, worker)

    def _check_worker(self, worker) -> None:
        check_real(worker, "worker", lo=0, hi=self.n_workers - 1, integer=True)

    @torch.no_grad()
    def worker_step(self, worker: int) -> None:
        """Worker ``worker`` reads its gradient from ``p.grad``: ``g_i <- g_i + clip(grad - g_i)``.

        The server's average moves by ``c_i / n_workers`` at once. Parameters without a gradient
        are left alone. With ``init="grad"``, a parameter's first gradient from this worker is
        sent as it is (and the others of the group are clipped together, as usual).
        """
        self._check_worker(worker)
        for _, group, params in self._groups_with_grads():
            foreach = default_foreach(group["foreach"], params) is True
            grads = groups.effective_grads(params, grads_of(params), maximize=False,
                                           weight_decay=group["weight_decay"], decoupled=False,
                                           foreach=foreach)
            # the worker's estimates g_i (views, updated in place) and the server's mean g
            old: List[tuple] = []
            for p, grad in zip(params, grads):
                state = self._state_of(p)
                g_i, g = state["workers"][worker], state["estimate"]
                # the flags live on the CPU: reading them is no synchronisation
                if group["init"] == "grad" and not bool(state["seen"][worker]):
                    message = torch.sub(grad, g_i)  # the first message is the gradient itself
                    g_i.add_(message)
                    g.add_(message, alpha=1.0 / self.n_workers)
                    state["seen"][worker] = True
                else:
                    old.append((g_i, grad, g))
            # the worker's SPP step on its slice, g_i <- g_i + c_i, c_i = clip(grad - g_i);
            # the server's mean moves by c_i / n
            estimator_update([t[0] for t in old], [t[1] for t in old], tau=group["tau"],
                             div=group["div"], method="spp", scope=group["scope"],
                             foreach=foreach, mirror=([t[2] for t in old], 1.0 / self.n_workers))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """The server's step ``w <- w - lr mean_i g_i``; returns ``closure()`` if given."""
        loss = closure_loss(closure)
        self._server_step()
        return loss

    def _server_step(self) -> None:
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
        for group in self.param_groups:
            lr = lr_value(group["lr"])
            for p in group["params"]:
                state = self.state.get(p)
                if state and "estimate" in state:
                    weight_step(p, state["estimate"], lr)


# --------------------------------------------------------------------------------------------
# SGD along a median across samples


class SampleMedianSGD(CheckedOptimizer):
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

    RULES = SAMPLE_MEDIAN_RULES

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
        options = {**SAMPLE_MEDIAN_GM_DEFAULTS, **(gm_options or {})}
        defaults = dict(lr=lr, aggregate=aggregate, scope=scope, trim=trim, gm_options=options,
                        weight_decay=weight_decay, maximize=maximize)
        SAMPLE_MEDIAN_RULES.validate_defaults(defaults)
        super().__init__(params, defaults)

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
        loss = closure_loss(closure)
        self._step_samples()
        return loss

    def _step_samples(self) -> None:
        work = []
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
            params = [p for p in group["params"] if getattr(p, "grad_sample", None) is not None]
            if params:
                work.append((group, params, *grad_samples_of(params)))
        for group, params, samples, n in work:
            with value_checks(False):
                updates = self._aggregate(group, samples, n)
            sign = -1.0 if group["maximize"] else 1.0
            lr = lr_value(group["lr"])
            for p, u in zip(params, updates):
                if group["weight_decay"] != 0:
                    u = u.add(p, alpha=sign * group["weight_decay"])
                weight_step(p, u, -lr if sign < 0 else lr)

    @staticmethod
    def _aggregate(group: dict, samples: List[torch.Tensor], n: int) -> List[torch.Tensor]:
        rule = get_rule(group["aggregate"], "optimizer").name  # an alias ("cmd", "gm") as well
        rows = [s.reshape(n, -1) for s in samples]
        if rule == "geometric_median" and group["scope"] == "global":
            G = torch.cat([r.to(rows[0]) for r in rows], dim=1) if len(rows) > 1 else rows[0]
            flat = geometric_median(G, **group["gm_options"]).median
            sizes = [r.shape[1] for r in rows]
            return [piece.view_as(s[0]) for piece, s in zip(flat.split(sizes), samples)]
        return [_ROWS_RULES[rule](r, group).view_as(s[0]) for r, s in zip(rows, samples)]


# each rule of the optimizer place, on the (n, d) rows of one tensor, with the group's options
_ROWS_RULES: Dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "mean": lambda rows, group: rows.mean(0),
    "coordinate_median": lambda rows, group: coordinate_median(rows),
    "trimmed_mean": lambda rows, group: trimmed_mean(rows, group["trim"]),
    "geometric_median": lambda rows, group: geometric_median(rows, **group["gm_options"]).median,
}
assert set(_ROWS_RULES) == set(AGGREGATES), "every rule of the optimizer place runs here"

