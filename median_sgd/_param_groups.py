"""Parameter groups of the optimizers in :mod:`median_sgd.optim`: checking, filling, loading.

The options are plain Python values: checking them costs no synchronisation, so every step
re-checks them, and a group edited by hand or loaded from a state dict is held to the same
rules as the constructor's arguments. One :class:`GroupRules` per optimizer names its keys,
the defaults of options added after a state dict was saved, and the check of one group.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from ._checks import check_choice, check_real
from ._numerics import host_reads_are_free
from .aggregators import REGISTRY, get_rule
from .estimators import DIVERGENCES, METHODS, SCOPES

__all__ = ["MEDIAN_SGD_RULES", "CLIP21_RULES", "NONFINITE", "INITS", "OneWorker", "CheckedOptimizer",
           "restore_worker_state", "saved_workers", "check_worker_state",
           "GroupRules", "validated", "check_lr", "lr_value", "nonnegative",
           "check_flag", "check_foreach", "check_step_tau", "add_group_validated", "load_validated",
           "fill_optional", "first_nonfinite_group", "check_finite_grads", "effective_grads", "grads_of", "closure_loss"]

NONFINITE = ("propagate", "raise", "mask")
INITS = ("zeros", "grad")

# Stand-ins for ``required`` defaults while validating the rest of the constructor's options.
PLACEHOLDER = {"lr": 0.0, "tau": 1.0, "n_workers": 1}


def nonnegative(value, name: str) -> float:
    """A finite real number ``>= 0``."""
    return check_real(value, name, lo=0.0)


def check_lr(lr) -> None:
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
            nonnegative(float(lr), "lr")
        return
    nonnegative(lr, "lr")


def lr_value(lr):
    """A Python float for a number or a CPU tensor (reading it is free); a device tensor as is."""
    if isinstance(lr, torch.Tensor):
        return float(lr) if host_reads_are_free(lr) else lr.reshape(())
    return float(lr)


def check_flag(group: dict, name: str) -> None:
    if not isinstance(group[name], bool):
        raise TypeError(f"{name} must be a bool, got {group[name]!r}")


def check_foreach(group: dict) -> None:
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None or a bool, got {group['foreach']!r}")


def validated(check: Callable[[dict], None], group: dict, keys: Sequence[str], cls: str,
              index: Optional[int], *, constructing: bool = False) -> None:
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
        group = {k: (v if v is not required else PLACEHOLDER[k]) for k, v in group.items()}
    try:
        check(group)
    except (TypeError, ValueError) as e:
        if constructing:
            raise
        raise type(e)(f"{where}: {e}") from None


class GroupRules:
    """One optimizer's group options: ``keys`` (all), ``optional`` (what a saved group without
    them did before they existed) and ``check(group)`` (raises on a bad option)."""

    def __init__(self, cls: str, keys: Sequence[str], optional: Dict[str, object],
                 check: Callable[[dict], None]) -> None:
        self.cls, self.keys, self.optional, self.check = cls, tuple(keys), optional, check

    def validate(self, group: dict, index: Optional[int] = None) -> None:
        validated(self.check, group, self.keys, self.cls, index)

    def validate_defaults(self, defaults: dict) -> None:
        validated(self.check, defaults, self.keys, self.cls, None, constructing=True)


def check_params(group: dict, name: str) -> None:
    for p in group["params"]:
        if not p.is_floating_point():
            raise TypeError(f"{name} needs real floating-point parameters, got {p.dtype}")


def add_group_validated(opt: Optimizer, param_group: dict, validate) -> None:
    """``Optimizer.add_param_group``, but a group that fails ``validate`` is not kept.

    torch fills in the defaults and appends in one go; a rejected group must not stay behind
    to be moved by the next ``step()``.
    """
    count = len(opt.param_groups)
    Optimizer.add_param_group(opt, param_group)
    if len(opt.param_groups) > count:
        try:
            validate(opt.param_groups[-1], len(opt.param_groups) - 1)
            check_params(opt.param_groups[-1], type(opt).__name__)
        except BaseException:
            opt.param_groups.pop()
            raise


def load_validated(opt: Optimizer, state_dict: dict, finish) -> None:
    """``Optimizer.load_state_dict``, then ``finish()`` (fill, validate); on error nothing changes."""
    before = {"state": opt.state, "param_groups": opt.param_groups}
    Optimizer.load_state_dict(opt, state_dict)
    try:
        finish()
    except BaseException:
        Optimizer.__setstate__(opt, before)
        raise


def fill_optional(groups: Sequence[dict], optional: Dict[str, object]) -> None:
    """Options added after a state dict was saved get the value they had before they existed."""
    for group in groups:
        for key, value in optional.items():
            if key not in group:
                group[key] = copy.deepcopy(value)


def first_nonfinite_group(grads_per_group: Sequence[Tuple[int, List[torch.Tensor]]]) -> Optional[int]:
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


def check_finite_grads(grads_per_group: Sequence[Tuple[int, List[torch.Tensor]]]) -> None:
    """``nonfinite="raise"``: a ValueError, before any parameter is modified, if a gradient of
    these groups holds NaN or Inf (one host synchronisation for all of them)."""
    bad = first_nonfinite_group(grads_per_group) if grads_per_group else None
    if bad is not None:
        raise ValueError(f"a gradient in parameter group {bad} contains NaN or Inf values "
                         f"(nonfinite='raise'; no parameter was modified)")


def effective_grads(params: List[torch.Tensor], grads: List[torch.Tensor], *, maximize: bool,
                    weight_decay: float, decoupled: bool, foreach: bool) -> List[torch.Tensor]:
    """``-g`` for ``maximize``, ``+ weight_decay * w`` for coupled weight decay (new tensors)."""
    if maximize:
        grads = list(torch._foreach_neg(grads)) if foreach else [torch.neg(g) for g in grads]
    if weight_decay != 0 and not decoupled:
        if foreach:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
        else:
            grads = [torch.add(g, p, alpha=weight_decay) for g, p in zip(grads, params)]
    return grads


def check_step_tau(group: dict, params: List[torch.Tensor], cls: str, index: int) -> None:
    """A step of length tau (the subgradient rules) must be finite in every parameter's dtype."""
    tau = group["tau"]
    for dtype in {p.dtype for p in params}:
        if tau > torch.finfo(dtype).max:
            raise ValueError(
                f"parameter group {index}: tau = {tau:g} is beyond the largest {dtype} value "
                f"({torch.finfo(dtype).max:g}); {cls}(method='sgd') moves the estimate by tau"
            )


def grads_of(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """The ``.grad`` of parameters known to have one."""
    return cast(List[torch.Tensor], [p.grad for p in params])


def closure_loss(closure: Optional[Callable[[], torch.Tensor]]):
    """``closure()`` with gradients enabled (None without a closure), as ``Optimizer.step`` does."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class CheckedOptimizer(Optimizer):
    """A :class:`torch.optim.Optimizer` whose groups are checked by ``add_param_group``,
    ``load_state_dict`` and every step, by the subclass's ``RULES`` (a :class:`GroupRules`); a
    subclass may add to ``_validate_group``, ``_fill_loaded`` and check loaded state
    (``_check_loaded_state``).
    """

    RULES: GroupRules

    def _validate_group(self, group: dict, index: Optional[int] = None) -> None:
        self.RULES.validate(group, index)

    def _fill_loaded(self) -> None:
        """Fill in options that a loaded (older) state dict's groups lack."""
        fill_optional(self.param_groups, self.RULES.optional)

    def _check_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        """Raise if a loaded parameter's state does not fit it."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch's rules); one whose options are invalid raises and is not added."""
        add_group_validated(self, param_group, self._validate_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; its options are checked like the constructor's (nothing changes on error).

        Options a saved group lacks because they did not exist yet get their old behaviour
        (``scope="param"``, no weight decay, ...); a group without a required option (``lr``,
        ``tau``, ...) is not this optimizer's group (a ``torch.optim.SGD`` state dict, say):
        ValueError.
        """
        def finish():
            self._fill_loaded()
            for index, group in enumerate(self.param_groups):
                self._validate_group(group, index)
            for p, state in self.state.items():
                if isinstance(p, torch.Tensor) and isinstance(state, dict):
                    self._check_loaded_state(p, state)

        load_validated(self, state_dict, finish)

    def _groups_with_grads(self) -> List[Tuple[int, dict, List[torch.Tensor]]]:
        """Every group checked, before any is modified; those with gradients, with their parameters."""
        work = []
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise TypeError(f"{type(self).__name__} does not support sparse gradients")
            if params:
                work.append((index, group, params))
        return work


class OneWorker:
    """What ``torch.amp.GradScaler.step`` needs of an optimizer, for one worker of ``opt``
    (:class:`median_sgd.optim.Clip21`): its ``step()`` is ``opt.worker_step(worker)``."""

    def __init__(self, opt, worker: int) -> None:
        self._opt, self._worker = opt, worker

    @property
    def param_groups(self) -> List[dict]:
        return self._opt.param_groups

    @property
    def state(self):
        return self._opt.state

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = closure_loss(closure)
        self._opt.worker_step(self._worker)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"worker {self._worker} of {self._opt!r}"


# --------------------------------------------------------------------------------------------
# Clip21's state: one estimate per worker, and state dicts saved by earlier versions


def restore_worker_state(opt: Optimizer) -> None:
    """After unpickling: ``n_workers`` pickled as an attribute (earlier versions) goes into the
    groups; the ``"seen"`` flags go back to CPU bools (torch.optim casts loaded floating-point
    state to each parameter's dtype and device, and the flags are read on the host)."""
    legacy = opt.__dict__.pop("n_workers", None)
    if legacy is not None and "n_workers" not in opt.defaults:
        opt.defaults["n_workers"] = legacy
        fill_optional(opt.param_groups, {"n_workers": legacy})
    for s in opt.state.values():
        if isinstance(s, dict) and isinstance(s.get("seen"), torch.Tensor):
            seen = s["seen"]
            if seen.dtype != torch.bool or seen.device.type != "cpu":
                s["seen"] = seen.to(device="cpu").bool()


def saved_workers(state_dict: dict, default: int) -> int:
    """The number of workers a state dict was saved for: read from the shape of its
    ``"workers"`` state where its groups lack ``n_workers`` (saved before it was an option)."""
    if all(g.get("n_workers") is not None for g in state_dict.get("param_groups", [])):
        return default
    shapes = {tuple(s["workers"].shape)[:1] for s in state_dict.get("state", {}).values()
              if isinstance(s, dict) and isinstance(s.get("workers"), torch.Tensor)}
    return shapes.pop()[0] if len(shapes) == 1 else default


def check_worker_state(p: torch.Tensor, state: dict, n_workers: int) -> None:
    """A loaded parameter's worker estimates and flags must fit ``n_workers`` workers."""
    workers, seen = state.get("workers"), state.get("seen")
    if workers is not None and tuple(workers.shape) != (n_workers, *p.shape):
        raise ValueError(
            f"the state dict's worker estimates of shape {tuple(workers.shape)} do not "
            f"fit {n_workers} workers of a parameter of shape {tuple(p.shape)}"
        )
    if seen is not None and seen.numel() != n_workers:
        raise ValueError(f"the state dict's 'seen' flags are for {seen.numel()} "
                         f"workers, this Clip21 has {n_workers}")


# --------------------------------------------------------------------------------------------
# The options of MedianSGD and Clip21


def _check_median_group(group: dict) -> None:
    check_lr(group["lr"])
    check_real(group["tau"], "tau", lo=0.0, lo_open=True)
    check_choice(group["div"], "div", DIVERGENCES)
    check_choice(group["method"], "method", METHODS)
    check_choice(group["scope"], "scope", SCOPES)
    nonnegative(group["weight_decay"], "weight_decay")
    check_choice(group["init"], "init", INITS)
    check_choice(group["nonfinite"], "nonfinite", NONFINITE)
    check_flag(group, "decoupled_weight_decay")
    check_flag(group, "maximize")
    check_foreach(group)


MEDIAN_SGD_RULES = GroupRules(
    "MedianSGD",
    ("lr", "tau", "div", "method", "scope", "weight_decay", "decoupled_weight_decay", "maximize",
     "init", "nonfinite", "foreach"),
    # what a saved group without these options did before they existed
    {"scope": "param", "weight_decay": 0.0, "decoupled_weight_decay": False, "maximize": False,
     "init": "zeros", "nonfinite": "propagate", "foreach": None},
    _check_median_group,
)


def _check_clip21_group(group: dict) -> None:
    check_lr(group["lr"])
    check_real(group["tau"], "tau", lo=0.0, lo_open=True)
    check_real(group["n_workers"], "n_workers", lo=1, integer=True)
    check_choice(group["div"], "div", ("l2", "l1"))
    check_choice(group["scope"], "scope", SCOPES)
    check_choice(group["init"], "init", INITS)
    nonnegative(group["weight_decay"], "weight_decay")
    check_foreach(group)


CLIP21_RULES = GroupRules(
    "Clip21", ("lr", "tau", "n_workers", "div", "scope", "init", "weight_decay", "foreach"),
    {"scope": "global", "init": "zeros", "weight_decay": 0.0, "foreach": None}, _check_clip21_group)


# --------------------------------------------------------------------------------------------
# The options of SampleMedianSGD: its rules, their names and options are the registry's

_GM = REGISTRY["geometric_median"]
#: gm_options' defaults: what the optimizer runs differently from geometric_median (the
#: registry's reason: a fixed iteration count, no wait for the host)
SAMPLE_MEDIAN_GM_DEFAULTS = {name: value for name, value in _GM.defaults("optimizer").items()
                             if _GM.defaults("aggregator").get(name) != value}


def _check_sample_group(group: dict) -> None:
    check_lr(group["lr"])
    get_rule(group["aggregate"], "optimizer", what="aggregate")
    check_choice(group["scope"], "scope", SCOPES)
    REGISTRY["trimmed_mean"].check({"trim": group["trim"]}, "optimizer")
    if not isinstance(group["gm_options"], dict):
        raise TypeError(f"gm_options must be a dict, got {type(group['gm_options']).__name__}")
    _GM.check(group["gm_options"], "optimizer")
    nonnegative(group["weight_decay"], "weight_decay")
    check_flag(group, "maximize")


SAMPLE_MEDIAN_RULES = GroupRules(
    "SampleMedianSGD", ("lr", "aggregate", "scope", "trim", "gm_options", "weight_decay", "maximize"),
    {"scope": "global", "trim": 0.1, "gm_options": SAMPLE_MEDIAN_GM_DEFAULTS, "weight_decay": 0.0,
     "maximize": False}, _check_sample_group)
