"""Gradient estimation in the wild: training with online median estimators (chapter 6).

The workshop paper's method (17): ``m_{t+1} = m_t + C(g_t - m_t)``, ``w_{t+1} = w_t - lr m_{t+1}``,
with ``g_t`` the mini-batch gradient at ``w_t``. The estimator update is an SPP (or SGD) step of
an online median estimator, so the weights follow an estimate of a median of the gradient
distribution, which moves as the weights move. Methods (``METHODS``):

* ``"SGD"``: ``C = Id`` (``m = g``), ``torch.optim.SGD``;
* ``"momentum"``: eq. 11, ``MedianSGD(div="sq", method="spp", tau)`` with ``beta = 1/(1+tau)``
  (eq. 7 with ``tau' = 1 - beta`` is the same update);
* ``"VClip"``: Clip21, ``MedianSGD(div="l2", method="spp", scope="global")``: an online
  geometric median of the whole gradient vector (Lemma 2.1);
* ``"CClip"``: ``MedianSGD(div="l1", method="spp")``: an online coordinate-wise median (Lemma 2.2);
* ``"signed increment"``: ``MedianSGD(div="l1", method="sgd")``, ``m + tau sign(g - m)`` (App. B);
* ``"clipped SGD"``: what practitioners call gradient clipping, ``torch.nn.utils.clip_grad_norm_``
  then ``torch.optim.SGD``: eq. 17 with the estimator reset to ``m_t = 0`` before every step, i.e.
  *one* SPP step towards the geometric median, from 0.

The model is a small MLP (64 - hidden - 10, tanh) on scikit-learn's 8x8 digits
(:func:`median_sgd.data.images.load_digits`), trained with cross-entropy in three settings
(``SETTINGS``): ``"clean"`` mini-batch gradients; ``"heavy-tailed noise"``, where symmetric
alpha-stable noise of scale ``noise_scale`` is added to every coordinate of every mini-batch
gradient; and ``"corrupted batches"``, where each mini-batch gradient is, with probability
``corrupt_prob``, multiplied by ``corrupt_factor`` (a scaled sign flip, as a faulty or adversarial
worker would send). The optimizer only ever sees the transformed gradient.

All runs (method x setting x seed) are trained at once: every run has its own parameter tensors
(so that the optimizers, with one parameter group per run where the scope matters, treat each run
as its own model), the forward and backward passes stack them into one batched MLP, and the
noise is applied by gradient hooks on the stacked tensors. For every seed, all methods and
settings start from the same initial weights and see the same mini-batches and the same noise
(common random numbers). Initial weights, mini-batches and noise are drawn on the CPU from a
generator seeded with ``config.seed`` and moved to the device (a few kilobytes per step), so a run
on a GPU trains from the same draws as the CPU run; only rounding differs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F

from ..optim import MedianSGD
from .._checks import check_real
from . import _random
from ._common import Result, check_dtype, check_fields, progress as progress_bar, resolve_config, scales
from ._common import single_threaded_on_cpu as _single_threaded_on_cpu

__all__ = [
    "METHODS",
    "SETTINGS",
    "InTheWildConfig",
    "CONFIGS",
    "training_curves",
    "final_summary",
    "load_data",
    "init_params",
    "forward",
    "make_optimizer",
    "run",
    "sweep",
]

METHODS = ("SGD", "momentum", "VClip", "CClip", "signed increment", "clipped SGD")
SETTINGS = ("clean", "heavy-tailed noise", "corrupted batches")


@dataclass(frozen=True)
class InTheWildConfig:
    """The experiment's settings; the ``ci`` and ``paper`` scales differ only in sizes."""

    seed: int = 0
    hidden: int = 32
    batch_size: int = 32
    steps: int = 800
    seeds: int = 4
    lr: float = 0.1
    beta: float = 0.9  # momentum: tau = 1/beta - 1 in eq. 11
    tau_vclip: float = 0.5  # radius of Clip21's step (global l2 norm of the innovation)
    tau_cclip: float = 0.01  # per-coordinate radius of CClip's step
    tau_sign: float = 0.005  # per-coordinate step of the signed increment
    tau_clip: float = 1.0  # max_norm of clipped SGD
    noise_alpha: float = 1.0
    noise_scale: float = 0.01
    corrupt_prob: float = 0.2
    corrupt_factor: float = -10.0
    test_fraction: float = 0.2
    eval_every: int = 40
    early_fraction: float = 0.25  # the "early" window of the cosine summary: steps <= this * steps
    sweep_steps: int = 400  # sensitivity sweeps (:func:`sweep`): shorter runs, fewer seeds
    sweep_seeds: int = 2
    methods: Tuple[str, ...] = METHODS
    settings: Tuple[str, ...] = SETTINGS

    def __post_init__(self):
        check_fields(self, ("hidden", "batch_size", "steps", "seeds", "eval_every", "sweep_steps",
                            "sweep_seeds"), 1, integer=True)
        check_fields(self, ("lr", "tau_vclip", "tau_cclip", "tau_sign", "tau_clip", "noise_scale"),
                     0, lo_open=True)
        check_real(self.beta, "beta", 0, 1, lo_open=True, hi_open=True)
        check_real(self.noise_alpha, "noise_alpha", 0, 2, lo_open=True)
        check_real(self.corrupt_prob, "corrupt_prob", 0, 1)
        check_real(self.corrupt_factor, "corrupt_factor")
        check_real(self.early_fraction, "early_fraction", 0, 1, lo_open=True)
        check_real(self.test_fraction, "test_fraction", 0, 1, lo_open=True, hi_open=True)
        for name, allowed in (("methods", METHODS), ("settings", SETTINGS)):
            chosen = getattr(self, name)
            unknown = [c for c in chosen if c not in allowed]
            if not chosen or unknown or len(set(chosen)) != len(chosen):
                raise ValueError(f"{name} must be distinct names from {allowed}, got {chosen}")


CONFIGS: Dict[str, InTheWildConfig] = scales(
    ci=InTheWildConfig(),
    paper=InTheWildConfig(steps=4000, seeds=20, eval_every=100, sweep_steps=2000, sweep_seeds=10),
)


# --------------------------------------------------------------------------------------------
# Data and model


def load_data(cfg: InTheWildConfig, *, device="cpu", dtype=torch.float32):
    """``(x_train, y_train, x_test, y_test)``: the digits as 64-vectors, standardised with the
    training set's pixel mean and standard deviation (one value each, as the image loader gives)."""
    from ..data.images import load_digits

    data = load_digits(test_fraction=cfg.test_fraction, seed=cfg.seed)

    def prep(x):
        return data.normalize(x).flatten(1).to(device=device, dtype=dtype)

    return (prep(data.x_train), data.y_train.to(device), prep(data.x_test), data.y_test.to(device))


def init_params(seeds: int, d_in: int, hidden: int, classes: int, *, generator: torch.Generator,
                device="cpu", dtype=torch.float32) -> List[torch.Tensor]:
    """``[W1 (seeds, d_in, hidden), b1 (seeds, hidden), W2 (seeds, hidden, classes), b2]``, each
    uniform on ``+-1/sqrt(fan_in)`` (torch.nn.Linear's default), drawn on ``generator``'s device
    and returned on ``device``."""
    shapes = [((d_in, hidden), d_in), ((hidden,), d_in), ((hidden, classes), hidden), ((classes,), hidden)]
    out = []
    for shape, fan_in in shapes:
        u = _random.rand((seeds, *shape), generator=generator, device=device, dtype=dtype)
        out.append((2 * u - 1) / math.sqrt(fan_in))
    return out


def forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``tanh(x W1 + b1) W2 + b2`` of a batch of MLPs: params stacked over runs ``(R, ...)``,
    ``x`` of shape ``(R, B, d_in)`` (or ``(B, d_in)``, shared by every run)."""
    W1, b1, W2, b2 = params
    if x.dim() == 2:
        x = x.expand(W1.shape[0], *x.shape)
    hidden = torch.tanh(torch.baddbmm(b1.unsqueeze(1), x, W1))
    return torch.baddbmm(b2.unsqueeze(1), hidden, W2)


def _losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-run mean cross-entropy: logits (R, B, C), y (R, B) or (B,) -> (R,)."""
    R, B, C = logits.shape
    y = y.expand(R, B)
    return F.cross_entropy(logits.reshape(R * B, C), y.reshape(R * B), reduction="none").view(R, B).mean(1)


# --------------------------------------------------------------------------------------------
# Optimizers


def make_optimizer(method: str, runs: Sequence[Sequence[torch.Tensor]], cfg: InTheWildConfig):
    """The optimizer of ``method`` for some runs (each a list of parameter tensors)."""
    flat = [p for run in runs for p in run]
    if method in ("SGD", "clipped SGD"):
        return torch.optim.SGD(flat, lr=cfg.lr)
    if method == "momentum":
        return MedianSGD(flat, lr=cfg.lr, tau=1.0 / cfg.beta - 1.0, div="sq", method="spp")
    if method == "VClip":  # one group per run: the l2 norm is that of the run's whole gradient
        return MedianSGD([{"params": list(run)} for run in runs], lr=cfg.lr, tau=cfg.tau_vclip,
                         div="l2", method="spp", scope="global")
    if method == "CClip":
        return MedianSGD(flat, lr=cfg.lr, tau=cfg.tau_cclip, div="l1", method="spp")
    if method == "signed increment":
        return MedianSGD(flat, lr=cfg.lr, tau=cfg.tau_sign, div="l1", method="sgd")
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------
# The run


@_single_threaded_on_cpu
def run(config: Union[str, InTheWildConfig] = "ci", *, device="cpu", dtype=torch.float32,
        progress: bool = False) -> Result:
    """Train every (method, setting, seed) run (:func:`training_curves`) and summarise it.

    Tables: ``curves``, one record per (setting, method, seed, step) with ``test_loss``,
    ``test_accuracy``, ``train_loss`` (full training set, clean), ``grad_norm`` (the norm of the
    full-batch clean gradient ``nabla L(w_t)``) and ``cosine`` (between the estimate ``m_t`` the
    last step moved along and ``nabla L(w_t)``); ``final`` (:func:`final_summary`).
    """
    cfg = resolve_config(config, CONFIGS)
    curves = training_curves(cfg, device=device, dtype=check_dtype(dtype), progress=progress)
    return Result(cfg, curves=curves, final=final_summary(curves, cfg))


@_single_threaded_on_cpu
def training_curves(cfg: InTheWildConfig, *, device="cpu", dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> List[dict]:
    """Train every (method, setting, seed) run at once; evaluate every ``eval_every`` steps.

    All runs are one batch of parameters (ordered method, setting, seed); every step draws the
    mini-batches and the noise of each seed once, shared by every method and setting.
    """
    device = torch.device(device)
    x_train, y_train, x_test, y_test = load_data(cfg, device=device, dtype=dtype)
    n_train, d_in = x_train.shape
    classes = int(y_train.max()) + 1
    M, E, S = len(cfg.methods), len(cfg.settings), cfg.seeds
    R = M * E * S  # runs, ordered (method, setting, seed)
    gen = _random.generator(cfg.seed)  # every draw on the CPU, then moved (see ._random)

    init = init_params(S, d_in, cfg.hidden, classes, generator=gen, device=device, dtype=dtype)
    leaves = [[p[s].clone().requires_grad_(True) for p in init]
              for _ in range(M) for _ in range(E) for s in range(S)]
    runs_of = {m: leaves[i * E * S:(i + 1) * E * S] for i, m in enumerate(cfg.methods)}
    optimizers = {m: make_optimizer(m, runs, cfg) for m, runs in runs_of.items()}
    sizes = [p[0].numel() for p in init]  # entries of each parameter tensor of one run

    setting_index = {name: i for i, name in enumerate(cfg.settings)}
    curves: List[dict] = []

    def stacked():
        return [torch.stack([run[j] for run in leaves]) for j in range(4)]

    def evaluate(step: int) -> None:
        with torch.no_grad():
            params = [p.detach() for p in stacked()]
            logits = forward(params, x_test)
            test_loss = _losses(logits, y_test)
            acc = (logits.argmax(-1) == y_test).to(dtype).mean(-1)
        params = [p.detach().requires_grad_(True) for p in stacked()]
        train_loss = _losses(forward(params, x_train), y_train)
        grads = torch.autograd.grad(train_loss.sum(), params)
        full = torch.cat([g.reshape(R, -1) for g in grads], dim=1)
        direction = torch.cat([_direction(run, optimizers[cfg.methods[r // (E * S)]], cfg.methods[r // (E * S)])
                               for r, run in enumerate(leaves)], dim=0)
        cosine = F.cosine_similarity(direction, full, dim=1, eps=1e-30)
        grad_norm = torch.linalg.vector_norm(full, dim=1)
        values = torch.stack([test_loss, acc, train_loss.detach(), cosine, grad_norm]).cpu()
        for r in range(R):
            method, setting, seed = cfg.methods[r // (E * S)], cfg.settings[(r // S) % E], r % S
            loss, accuracy, train, cos, norm = (v.item() for v in values[:, r])
            curves.append({"setting": setting, "method": method, "seed": seed, "step": step,
                           "test_loss": loss if math.isfinite(loss) else math.inf,
                           "test_accuracy": accuracy,
                           "train_loss": train if math.isfinite(train) else math.inf,
                           "cosine": cos if math.isfinite(cos) else math.nan,
                           "grad_norm": norm if math.isfinite(norm) else math.inf})

    total = sum(sizes)
    for step in progress_bar(range(cfg.steps + 1), enabled=progress, desc="in the wild", unit="step"):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
        if step == cfg.steps:
            break
        # Mini-batches and noise of this step, per seed; shared by every method and setting.
        idx = _random.randint(n_train, (S, cfg.batch_size), generator=gen, device=device)
        factor = torch.ones(M, E, S, device=device, dtype=dtype)
        noise = None
        if "corrupted batches" in setting_index:
            coin = _random.rand(S, generator=gen, device=device) < cfg.corrupt_prob
            factor[:, setting_index["corrupted batches"]] = torch.where(
                coin, torch.tensor(cfg.corrupt_factor, dtype=dtype, device=device), 1.0)
        if "heavy-tailed noise" in setting_index:
            xi = _random.stable(cfg.noise_alpha, (S, total), scale=cfg.noise_scale, generator=gen,
                                device=device, dtype=dtype)
            noise = torch.zeros(M, E, S, total, device=device, dtype=dtype)
            noise[:, setting_index["heavy-tailed noise"]] = xi
            noise = noise.view(R, total)
        factor = factor.view(R)

        params = stacked()
        offset = 0
        for p, size in zip(params, sizes):
            shape = (R,) + (1,) * (p.dim() - 1)
            part = None if noise is None else noise[:, offset:offset + size].view(p.shape)
            offset += size
            p.register_hook(lambda g, part=part, shape=shape: (
                g * factor.view(shape) if part is None else g * factor.view(shape) + part))
        x = x_train[idx].repeat(M * E, 1, 1)  # (R, B, d_in), run r uses seed r % S's batch
        y = y_train[idx].repeat(M * E, 1)
        loss = _losses(forward(params, x), y).sum()
        for run in leaves:
            for p in run:
                p.grad = None
        loss.backward()
        if "clipped SGD" in runs_of:
            for run in runs_of["clipped SGD"]:
                torch.nn.utils.clip_grad_norm_(run, cfg.tau_clip)
        for opt in optimizers.values():
            opt.step()

    return curves


def _direction(run: Sequence[torch.Tensor], optimizer, method: str) -> torch.Tensor:
    """The vector the run's last weight step moved along (1, D): its estimate ``m``, or for
    (clipped) SGD the (clipped) gradient it used; zeros before the first step."""
    parts = []
    for p in run:
        if method in ("SGD", "clipped SGD"):
            v = p.grad
        else:
            v = optimizer.state[p].get("estimate") if p in optimizer.state else None
        parts.append(torch.zeros_like(p).flatten() if v is None else v.detach().flatten())
    return torch.cat(parts).unsqueeze(0)


def final_summary(curves: List[dict], cfg: InTheWildConfig) -> List[dict]:
    """Per (setting, method): the mean, min and max over seeds of the last evaluation's test
    accuracy and test loss, and ``cosine_early``, the mean cosine over seeds and the
    evaluations at steps ``0 < t <= early_fraction * steps``."""
    last = max(r["step"] for r in curves)
    out = []
    for setting in cfg.settings:
        for method in cfg.methods:
            rows = [r for r in curves if r["step"] == last and r["setting"] == setting and r["method"] == method]
            acc = [r["test_accuracy"] for r in rows]
            loss = [r["test_loss"] for r in rows]
            early = [r["cosine"] for r in curves if r["setting"] == setting and r["method"] == method
                     and 0 < r["step"] <= cfg.early_fraction * last]
            early = [c for c in early if math.isfinite(c)]
            out.append({"setting": setting, "method": method,
                        "accuracy_mean": sum(acc) / len(acc), "accuracy_min": min(acc),
                        "accuracy_max": max(acc), "loss_mean": sum(loss) / len(loss),
                        "loss_min": min(loss), "loss_max": max(loss),
                        "cosine_early": sum(early) / len(early) if early else math.nan})
    return out


def sweep(
    config: Union[str, InTheWildConfig],
    parameter: str,
    values: Sequence[float],
    *,
    methods: Sequence[str],
    settings: Sequence[str] = SETTINGS,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> List[dict]:
    """Sensitivity to one hyperparameter: the ``final`` records of :func:`run` for each value.

    Each value trains ``methods`` x ``settings`` with ``sweep_steps`` steps and ``sweep_seeds``
    seeds (and evaluates only at the end); the records gain ``parameter`` and ``value``.
    """
    cfg = resolve_config(config, CONFIGS)
    names = {f.name for f in dataclasses.fields(cfg)}
    if parameter not in names or parameter in ("methods", "settings", "seed"):
        raise ValueError(f"cannot sweep {parameter!r}; expected a numeric field of InTheWildConfig")
    records = []
    for value in values:
        short = dataclasses.replace(cfg, steps=cfg.sweep_steps, seeds=cfg.sweep_seeds,
                                    eval_every=cfg.sweep_steps, methods=tuple(methods),
                                    settings=tuple(settings), **cast(Dict[str, Any], {parameter: value}))
        result = run(short, device=device, dtype=dtype, progress=progress)
        records += [{"parameter": parameter, "value": value, **r} for r in result.final]
    return records
