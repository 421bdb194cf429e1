"""Robust distributed training (BGmD's Section 7): ``x <- x - agg(attack(gamma [g_1; ...; g_b]))`` over b clients.

Acharya et al. (AISTATS 2022), Section 7; the training loop of the chapters "What BGmD's memory
remembers" and "Robust training experiments". One iteration:

1. ``b`` clients each draw a mini-batch (``split="iid"``: ``b`` disjoint batches of one shuffled
   pass over the training set, the paper's homogeneous setting; ``split="shards"``: each client
   draws from its own label-sorted shards, the heterogeneous one);
2. a feature or label attack corrupts a fresh ``psi``-fraction of all the samples;
3. every client computes the gradient of its mini-batch loss at the same parameters ``x``
   (``grad_mode="vmap"``: one ``torch.func.vmap`` over the clients; ``"loop"``: one backward per
   client, needed for models with batch norm; ``"auto"`` picks);
4. a gradient attack corrupts a fresh ``psi``-fraction of the ``b`` gradient rows;
5. the aggregator maps the ``(b, d)`` matrix ``gamma G`` to an update ``u`` (``d``), and
   ``v <- mu v + u``, ``x <- x - v - gamma lambda x`` (momentum ``mu``, weight decay ``lambda``).

The learning rate ``gamma`` decays by ``lr_decay`` per epoch (the paper's Fashion-MNIST run:
0.99) or follows a cosine schedule. Every ``eval_every`` iterations a record is written: test
accuracy and loss, the mean training loss of the batches since the last record, the wall-clock
time spent training (evaluation excluded) and in the aggregator, and for BGmD the mean relative
residual ``||G - C_k(G)||_F^2 / ||G||_F^2`` (``1 - xi``, the paper's Figs. 7-8). A run stops
early, marked ``diverged``, when the training loss exceeds ``max_loss`` or is not finite (the
authors' rule).

:func:`train` is one run; :func:`run` the grid ``methods x attacks x psis x seeds`` of a config
(a clean ``psi = 0`` run is done once, with attack ``"none"``). Nothing here prints or plots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..aggregators import make_aggregator
from ..attacks import make_attack
from ..data.images import ImageData, load_images, shard_split
from ..models.cnn import LeNet, TinyCNN, count_parameters, resnet18
from .._checks import check_real, value_checks
from ._common import Result, check_fields, only_dtype, progress as progress_bar, resolve_config, scales

__all__ = [
    "Method",
    "method",
    "BGmDTrainingConfig",
    "CONFIGS",
    "MODELS",
    "build_model",
    "client_gradients",
    "train",
    "train_runs",
    "batchable",
    "train_grid",
    "run",
]


@dataclass(frozen=True)
class Method:
    """An aggregation rule to train with: a ``label`` for the records, a name for
    :func:`~median_sgd.aggregators.make_aggregator` and its options (``((key, value), ...)``)."""

    label: str
    aggregator: str
    options: Tuple[Tuple[str, Any], ...] = ()

    def build(self, *, generator: Union[None, torch.Generator, Tuple[torch.Generator, ...]] = None,
              gm_options: Optional[dict] = None):
        """A fresh aggregator (BGmD gets ``generator``, or a tuple of them, one per run; GmD and
        BGmD get the Weiszfeld options)."""
        options = dict(self.options)
        key = self.aggregator.lower()
        if key in ("bgmd", "gmd", "gm", "geometric_median"):
            options = {**(gm_options or {}), **options}
        if key == "bgmd" and "generator" not in options:
            options["generator"] = generator
        return make_aggregator(self.aggregator, **options)


def method(aggregator: str, label: Optional[str] = None, **options) -> Method:
    """``method("bgmd", k=0.1, memory="median")``: a :class:`Method` (the label defaults to the name)."""
    return Method(label or aggregator, aggregator, tuple(sorted(options.items())))


#: The paper's four methods: SGD (mean), CmD, BGmD (k = 10% of d, mean memory), GmD.
PAPER_METHODS = (
    method("mean", "SGD"),
    method("cmd", "CmD"),
    method("bgmd", "BGmD", k=0.1),
    method("gmd", "GmD"),
)


@dataclass(frozen=True)
class BGmDTrainingConfig:
    """One training experiment; the ``ci`` and ``paper`` scales differ only in these values."""

    dataset: str = "digits"
    model: str = "tiny_cnn"
    clients: int = 10  # b: parallel mini-batches (rows of G)
    batch_size: int = 16  # samples per client per iteration
    epochs: float = 30.0
    split: str = "iid"  # or "shards" (heterogeneous)
    lr: float = 0.3
    lr_decay: float = 1.0  # per epoch; "cosine" anneals instead when cosine=True
    cosine: bool = False
    momentum: float = 0.0
    weight_decay: float = 1e-4
    methods: Tuple[Method, ...] = PAPER_METHODS
    attacks: Tuple[str, ...] = ("bit_flip",)
    psis: Tuple[float, ...] = (0.0, 0.2, 0.4)
    seeds: Tuple[int, ...] = (0,)
    gm_max_iter: int = 100
    gm_tol: float = 1e-5
    eval_every: int = 16
    eval_batch: int = 2048
    grad_mode: str = "auto"  # "vmap", "loop" or "auto"
    max_loss: float = 1e3
    data_seed: int = 0

    def __post_init__(self):
        check_fields(self, ("clients", "batch_size", "eval_every", "eval_batch", "gm_max_iter"), 1,
                     integer=True)
        check_fields(self, ("epochs", "lr"), 0, lo_open=True)
        check_real(self.lr_decay, "lr_decay", 0, 1, lo_open=True)
        check_real(self.momentum, "momentum", 0, 1, hi_open=True)
        check_real(self.weight_decay, "weight_decay", 0)
        if self.split not in ("iid", "shards"):
            raise ValueError(f"split must be 'iid' or 'shards', got {self.split!r}")
        if self.grad_mode not in ("vmap", "loop", "auto"):
            raise ValueError(f"grad_mode must be 'vmap', 'loop' or 'auto', got {self.grad_mode!r}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(MODELS)}")
        if not all(isinstance(m, Method) for m in self.methods):
            raise TypeError("methods must be Method objects (see method())")


MODELS = {
    "tiny_cnn": lambda data: TinyCNN(in_channels=data.image_shape[0], num_classes=data.num_classes),
    "lenet": lambda data: LeNet(in_channels=data.image_shape[0], num_classes=data.num_classes,
                                image_size=data.image_shape[-1]),
    "resnet18": lambda data: resnet18(num_classes=data.num_classes, in_channels=data.image_shape[0]),
}


CONFIGS: Dict[str, BGmDTrainingConfig] = scales(
    # Offline, two CPU cores, seconds per run: 8x8 digits, the 412-parameter CNN, 10 clients of
    # 16 samples (8 steps per epoch), lr 0.3 without momentum (the robust rules' best of a small
    # grid on this problem), 30 epochs.
    ci=BGmDTrainingConfig(),
    # Section 7.1's homogeneous Fashion-MNIST setting: LeNet (1.16M parameters), 32 parallel
    # batches of 64, lr 0.01 decayed by 1% per epoch, weight decay 1e-4, 50 epochs, 5 seeds.
    paper=BGmDTrainingConfig(
        dataset="fashion_mnist",
        model="lenet",
        clients=32,
        batch_size=64,
        epochs=50.0,
        lr=0.01,
        lr_decay=0.99,
        psis=(0.0, 0.1, 0.2, 0.4),
        attacks=("bit_flip", "gradient_noise", "feature_noise", "impulse", "backdoor"),
        seeds=(0, 1, 2, 3, 4),
        eval_every=100,
    ),
)


def build_model(name: str, data: ImageData) -> nn.Module:
    """The model ``name`` (``"tiny_cnn"``, ``"lenet"``, ``"resnet18"``) for ``data``'s images."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](data)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def client_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mode: str = "auto"):
    """``(G, losses)``: the ``(b, d)`` matrix of per-client mini-batch gradients (parameters
    flattened in ``model.parameters()`` order) and the ``(b,)`` losses, for client batches ``x``
    (b, B, C, H, W) and ``y`` (b, B). ``mode="vmap"``: ``torch.func.vmap`` over the clients (one
    batched forward and backward; dropout draws differ per client); ``"loop"``: one backward per
    client (batch-norm statistics are then updated client by client); ``"auto"``: vmap unless the
    model has batch norm."""
    if mode == "auto":
        mode = "loop" if _has_batch_norm(model) else "vmap"
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "vmap":  # the clients are the rows of median_sgd.optim.sample_gradients
        from ..optim import sample_gradients

        b = x.shape[0]
        client_losses, per_param = sample_gradients(
            model, F.cross_entropy, x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:]),
            micro_batches=b, store=False)
        return torch.cat([g.reshape(b, -1) for g in per_param], dim=1), client_losses
    if mode != "loop":
        raise ValueError(f"mode must be 'vmap', 'loop' or 'auto', got {mode!r}")
    rows, losses = [], []
    for xb, yb in zip(x, y):
        loss = F.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


class _ClientSampler:
    """Index batches (b, B) of each iteration: one shuffled pass per epoch (``iid``), or each
    client cycling through a reshuffled pool of its own shards (``shards``)."""

    def __init__(self, data: ImageData, cfg: BGmDTrainingConfig, generator: torch.Generator):
        self.n = len(data.y_train)
        self.b, self.B = cfg.clients, cfg.batch_size
        self.g = generator
        if self.b * self.B > self.n:
            raise ValueError(f"{self.b} clients x {self.B} samples exceed the {self.n} training samples")
        self.per_epoch = self.n // (self.b * self.B)
        self.pools = None
        if cfg.split == "shards":
            self.pools = shard_split(data.y_train, self.b, generator=generator)
            if min(len(p) for p in self.pools) < self.B:
                raise ValueError("a client's shards hold fewer samples than one batch")
            self.orders = [p[torch.randperm(len(p), generator=generator)] for p in self.pools]
            self.pos = [0] * self.b
        self.t = 0

    def next(self) -> torch.Tensor:
        if self.pools is None:
            i = self.t % self.per_epoch
            if i == 0:
                self.perm = torch.randperm(self.n, generator=self.g)
            block = self.perm[i * self.b * self.B:(i + 1) * self.b * self.B]
            self.t += 1
            return block.view(self.b, self.B)
        rows = []
        for c in range(self.b):
            if self.pos[c] + self.B > len(self.orders[c]):
                pool = self.pools[c]
                self.orders[c] = pool[torch.randperm(len(pool), generator=self.g)]
                self.pos[c] = 0
            rows.append(self.orders[c][self.pos[c]:self.pos[c] + self.B])
            self.pos[c] += self.B
        self.t += 1
        return torch.stack(rows)


@torch.no_grad()
def _evaluate(model: nn.Module, data: ImageData, xs: torch.Tensor, batch: int) -> Tuple[float, float]:
    was_training = model.training
    model.eval()
    correct, loss = 0.0, 0.0
    for start in range(0, len(xs), batch):
        out = model(xs[start:start + batch])
        y = data.y_test[start:start + batch]
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(xs), loss / len(xs)


def _run_fields(cfg: BGmDTrainingConfig, method: Method, attack: str, psi: float, seed: int,
                d: int) -> dict:
    """The fields every record of one run shares."""
    return dict(method=method.label, aggregator=method.aggregator, attack=attack, psi=psi,
                seed=seed, dataset=cfg.dataset, model=cfg.model, d=d, clients=cfg.clients)


def _record(base: dict, t: int, per_epoch: int, train_s: float, agg_s: float, lr: float,
            train_loss: float, acc: float, test_loss: float, residual: Optional[float],
            diverged: bool) -> dict:
    """One record of a run (the fields of :func:`train`'s docstring)."""
    return dict(base, iteration=t, epoch=t / per_epoch, time_s=train_s, aggregation_s=agg_s,
                lr=lr, train_loss=train_loss, test_accuracy=acc, test_loss=test_loss,
                relative_residual=residual, diverged=diverged)


class _Window:
    """Sums of the training losses and BGmD residuals since the last evaluation, one per run
    (``shape`` ``()`` for one run, ``(R,)`` for ``R``), on the device: no host sync per step."""

    def __init__(self, shape, device) -> None:
        self.loss_sum = torch.zeros(shape, device=device)
        self.residual_sum = torch.zeros(shape, device=device)
        self.count = 0
        self.has_residual = False

    def add(self, loss: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        if residual is not None:
            self.residual_sum += residual
            self.has_residual = True
        self.loss_sum += loss
        self.count += 1

    def means(self) -> Tuple[List[float], List[Optional[float]]]:
        """The window's mean losses and residuals per run (None without residuals), divided on
        the host; the sums start again from zero."""
        losses = [v / self.count for v in self.loss_sum.reshape(-1).tolist()]
        residuals: List[Optional[float]] = (
            [v / self.count for v in self.residual_sum.reshape(-1).tolist()]
            if self.has_residual else [None] * len(losses))
        self.loss_sum.zero_()
        self.residual_sum.zero_()
        self.count = 0
        return losses, residuals


def _aggregate(agg, G: torch.Tensor, device: torch.device, sync_timing: bool):
    """``(u, seconds, residual)``: the aggregator's update of ``G``, its wall-clock time (after
    synchronising a GPU first and last when ``sync_timing``) and its ``last_residual`` (or None)."""
    if sync_timing and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    u = agg(G)
    if sync_timing and device.type == "cuda":
        torch.cuda.synchronize(device)
    return u, time.perf_counter() - start, getattr(agg, "last_residual", None)


@torch.no_grad()
def _momentum_step(params: Sequence[torch.Tensor], velocity: torch.Tensor, u: torch.Tensor, lr: float,
                   cfg: BGmDTrainingConfig) -> None:
    """``v <- momentum v + u``, ``x <- (x - v)(1 - lr weight_decay)`` for the flat ``velocity``
    ``(..., d)`` cut into the ``params`` in order (one run, or ``R`` stacked runs ``(R, *shape)``
    against ``(R, d)``)."""
    velocity.mul_(cfg.momentum).add_(u)
    runs = velocity[..., 0].numel()  # 1, or R
    offset = 0
    for p in params:
        n = p.numel() // runs
        p.sub_(velocity[..., offset:offset + n].view_as(p))
        if cfg.weight_decay:
            p.mul_(1 - lr * cfg.weight_decay)
        offset += n


def _lr_at(cfg: BGmDTrainingConfig, t: int, per_epoch: int, total: int) -> float:
    if cfg.cosine:
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t / total))
    return cfg.lr * cfg.lr_decay ** (t // per_epoch)


def train(
    cfg: BGmDTrainingConfig,
    method: Method,
    attack: str = "none",
    psi: float = 0.0,
    seed: int = 0,
    *,
    data: Optional[ImageData] = None,
    device="cpu",
    progress: bool = False,
    sync_timing: bool = False,
) -> List[dict]:
    """One training run: records every ``cfg.eval_every`` iterations (and at the end).

    ``data`` (loaded from ``cfg.dataset`` when not given) is moved to ``device``. The seed fixes
    the model's initialisation, the batches, the attack's draws, BGmD's block sampling and
    dropout; torch's global random state is restored afterwards. All but dropout (LeNet's, on
    the device's global generator) are drawn on CPU generators and moved, so a run on a GPU
    draws the same batches, corrupted samples and rows and block keys as on the CPU; what
    differs is rounding, which a long run can amplify. ``sync_timing=True`` waits for
    the GPU around the aggregator so that ``aggregation_s`` is exact on CUDA (on the CPU it is
    always exact).
    """
    device = torch.device(device)
    if data is None:
        data = load_images(cfg.dataset, seed=cfg.data_seed)
    data = data.to(device)
    atk = make_attack(attack, psi)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), value_checks(False):
        torch.manual_seed(seed)
        model = build_model(cfg.model, data).to(device)
        model.train()
        gen_cpu = torch.Generator().manual_seed(seed + 1)
        # The attack's draws and BGmD's block keys: a CPU generator too, drawn on the CPU and
        # moved (attacks._draw, bgmd._exponential), so that a GPU run corrupts the same rows
        # and samples as the CPU run. (On the CPU: the stream of the former device generator.)
        gen_draw = torch.Generator().manual_seed(seed + 2)
        gm_options = {"max_iter": cfg.gm_max_iter, "tol": cfg.gm_tol}
        agg = method.build(generator=gen_draw, gm_options=gm_options)
        sampler = _ClientSampler(data, cfg, gen_cpu)
        total = max(1, int(round(cfg.epochs * sampler.per_epoch)))
        params = [p for p in model.parameters() if p.requires_grad]
        d = count_parameters(model)
        x_test = data.normalize(data.x_test)
        velocity = torch.zeros(d, device=device)
        base = _run_fields(cfg, method, attack, psi, seed, d)
        records: List[dict] = []
        window = _Window((), device)
        train_s = agg_s = 0.0
        bar = progress_bar(enabled=progress, total=total, desc=f"{method.label} {attack} {psi:g}", unit="it")
        for t in range(1, total + 1):
            start = time.perf_counter()
            lr = _lr_at(cfg, t - 1, sampler.per_epoch, total)
            idx = sampler.next().to(device)
            xb, yb = atk.batch(data.x_train[idx], data.y_train[idx], generator=gen_draw)
            G, losses = client_gradients(model, data.normalize(xb), yb, mode=cfg.grad_mode)
            G = atk.gradients(G, generator=gen_draw)
            u, seconds, residual = _aggregate(agg, lr * G, device, sync_timing)
            agg_s += seconds
            _momentum_step(params, velocity, u, lr, cfg)
            window.add(losses.mean().detach(), residual)
            train_s += time.perf_counter() - start
            bar.update(1)
            if t % cfg.eval_every == 0 or t == total:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                (train_loss,), (residual,) = window.means()
                diverged = not math.isfinite(train_loss) or train_loss > cfg.max_loss
                acc, test_loss = (float("nan"), float("nan")) if diverged else _evaluate(
                    model, data, x_test, cfg.eval_batch)
                records.append(_record(
                    base, t, sampler.per_epoch, train_s, agg_s, lr, train_loss, acc, test_loss,
                    residual, diverged))
                if diverged:
                    break
        bar.close()
    return records


def _stacked_models(cfg: BGmDTrainingConfig, data: ImageData, seeds: Sequence[int], device):
    """``(model, params)``: a template model and each trainable parameter stacked over the
    runs, ``(R, *shape)``; run ``r``'s model is initialised after ``torch.manual_seed(seeds[r])``,
    as :func:`train` initialises it."""
    template = None
    per_run = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(cfg.model, data).to(device)
        per_run.append({name: p.detach() for name, p in model.named_parameters() if p.requires_grad})
        template = template or model
    assert template is not None
    params = {name: torch.stack([run[name] for run in per_run]) for name in per_run[0]}
    return template, params


def _runs_gradients(model: nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor):
    """``(G, losses)``: the ``(R, b, d)`` client gradients of every run and the ``(R, b)`` losses,
    for stacked parameters ``params`` (``(R, *shape)``) and batches ``x`` (R, b, B, C, H, W),
    ``y`` (R, b, B): :func:`client_gradients`' ``vmap`` over the clients, vmapped over the runs."""
    from torch.func import functional_call, grad, vmap

    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def client_loss(run_params, xb, yb):
        loss = F.cross_entropy(functional_call(model, ({**run_params, **frozen}, buffers), (xb,)), yb)
        return loss, loss.detach()

    per_client = vmap(grad(client_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    grads, losses = vmap(per_client, in_dims=(0, 0, 0), randomness="different")(params, x, y)
    R, b = y.shape[:2]
    return torch.cat([grads[name].reshape(R, b, -1) for name in params], dim=2), losses


@torch.no_grad()
def _evaluate_runs(model: nn.Module, params: Dict[str, torch.Tensor], data: ImageData,
                   xs: torch.Tensor, batch: int) -> Tuple[List[float], List[float]]:
    """:func:`_evaluate` of every run at once: lists of ``R`` accuracies and mean test losses."""
    from torch.func import functional_call, vmap

    was_training = model.training
    model.eval()
    R = next(iter(params.values())).shape[0]
    correct, loss = [0.0] * R, [0.0] * R
    forward = vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))
    for start in range(0, len(xs), batch):
        out = forward(params, xs[start:start + batch])  # (R, N, classes)
        y = data.y_test[start:start + batch]
        losses = F.cross_entropy(out.transpose(1, 2), y.expand(R, -1), reduction="none").sum(-1)
        hits = (out.argmax(-1) == y).sum(-1)
        for r, (value, count) in enumerate(zip(losses.tolist(), hits.tolist())):
            loss[r] += value
            correct[r] += count
    model.train(was_training)
    return [c / len(xs) for c in correct], [v / len(xs) for v in loss]


def batchable(cfg: BGmDTrainingConfig, data: ImageData) -> bool:
    """Whether :func:`train_runs` can train ``cfg``'s model on ``data``: not with batch norm
    (:func:`train` updates its running statistics client by client, ``grad_mode="loop"``), nor
    with ``grad_mode="loop"``."""
    if cfg.grad_mode == "loop":
        return False
    with torch.random.fork_rng(devices=[]):  # building the model draws; the caller's state stays
        return not _has_batch_norm(build_model(cfg.model, data))


def train_runs(
    cfg: BGmDTrainingConfig,
    method: Method,
    runs: Sequence[Tuple[str, float, int]],
    *,
    data: Optional[ImageData] = None,
    device="cpu",
    progress: bool = False,
    sync_timing: bool = False,
) -> List[dict]:
    """``R`` independent runs ``(attack, psi, seed)`` of one method, trained as one program:
    ``x_r <- x_r - agg_r(attack_r(gamma G_r))`` for all ``r`` at once; the records of
    :func:`train` for each run, run after run.

    The parameters of the runs are stacked on a leading dimension and the client gradients are
    one ``torch.func.vmap`` over the runs of :func:`client_gradients`' ``vmap`` over the clients
    (``functional_call``); the aggregator maps the ``(R, b, d)`` rows to ``(R, d)`` updates (the
    medians batch over leading dimensions; BGmD keeps one memory and one block generator per
    run); the attacks are applied run by run, each with its own generator; runs with the same
    seed share their index batches. Every run draws exactly what :func:`train` draws for it
    (its initialisation, batches, corrupted samples and rows, blocks), so the records agree
    with :func:`train`'s up to rounding: a batched convolution or Weiszfeld iteration may sum
    in another order (see ``tests/test_experiments_bgmd.py`` for the measured closeness), which
    a long or chaotic run can amplify. Dropout (LeNet's) draws from torch's global generator
    under ``vmap``, not the per-run streams of :func:`train`: same distribution, other draws.

    ``time_s`` and ``aggregation_s`` of a record are the batch's wall-clock times divided by
    ``R``: one run's share. A diverged run stops recording (its rows are zeroed from then on;
    the others go on). Models with batch norm cannot be batched (:func:`batchable`).
    """
    return [record for run_records in _train_batch(cfg, method, runs, data, device, progress,
                                                   sync_timing)
            for record in run_records]


def _train_batch(cfg: BGmDTrainingConfig, method: Method, runs: Sequence[Tuple[str, float, int]],
                 data: Optional[ImageData], device, progress: bool,
                 sync_timing: bool) -> List[List[dict]]:
    """:func:`train_runs`, the records of each run in a list of their own."""
    if not runs:
        return []
    device = torch.device(device)
    if data is None:
        data = load_images(cfg.dataset, seed=cfg.data_seed)
    if not batchable(cfg, data):
        raise ValueError(f"model {cfg.model!r} with grad_mode={cfg.grad_mode!r} cannot be batched "
                         "(batch norm, or grad_mode='loop'); use train()")
    data = data.to(device)
    R = len(runs)
    attacks = [make_attack(attack, psi) for attack, psi, _ in runs]
    seeds = [int(seed) for _, _, seed in runs]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), value_checks(False):
        model, params = _stacked_models(cfg, data, seeds, device)
        model.train()
        # one sampler per distinct seed (runs that share a seed share its batches), and one draw
        # generator per run: the attack's draws, then BGmD's block keys, as in train()
        samplers = {seed: _ClientSampler(data, cfg, torch.Generator().manual_seed(seed + 1))
                    for seed in dict.fromkeys(seeds)}
        gen_draws = [torch.Generator().manual_seed(seed + 2) for seed in seeds]
        gm_options = {"max_iter": cfg.gm_max_iter, "tol": cfg.gm_tol}
        agg = method.build(generator=tuple(gen_draws), gm_options=gm_options)
        per_epoch = next(iter(samplers.values())).per_epoch
        total = max(1, int(round(cfg.epochs * per_epoch)))
        d = sum(p[0].numel() for p in params.values())
        x_test = data.normalize(data.x_test)
        velocity = torch.zeros(R, d, device=device)
        bases = [_run_fields(cfg, method, attack, psi, seed, d) for attack, psi, seed in runs]
        records: List[List[dict]] = [[] for _ in runs]
        active = torch.ones(R, dtype=torch.bool, device=device)
        live = [True] * R
        window = _Window((R,), device)
        train_s = agg_s = 0.0
        bar = progress_bar(enabled=progress, total=total, desc=f"{method.label} x{R}", unit="it")
        for t in range(1, total + 1):
            start = time.perf_counter()
            lr = _lr_at(cfg, t - 1, per_epoch, total)
            idx = {seed: sampler.next().to(device) for seed, sampler in samplers.items()}
            xs, ys = [], []
            for r, atk in enumerate(attacks):
                xb, yb = atk.batch(data.x_train[idx[seeds[r]]], data.y_train[idx[seeds[r]]],
                                   generator=gen_draws[r])
                xs.append(xb)
                ys.append(yb)
            G, losses = _runs_gradients(model, params, data.normalize(torch.stack(xs)), torch.stack(ys))
            G = torch.stack([atk.gradients(G[r], generator=gen_draws[r])
                             for r, atk in enumerate(attacks)])
            if not all(live):  # a diverged run's rows are zero from then on: no overflow
                G = torch.where(active[:, None, None], G, 0.0)
            u, seconds, residual = _aggregate(agg, lr * G, device, sync_timing)
            agg_s += seconds
            _momentum_step(list(params.values()), velocity, u, lr, cfg)
            window.add(losses.mean(-1).detach(), residual)
            train_s += time.perf_counter() - start
            bar.update(1)
            if t % cfg.eval_every == 0 or t == total:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                # divided on the host, as train() divides
                train_losses, residuals = window.means()
                accs, test_losses = _evaluate_runs(model, params, data, x_test, cfg.eval_batch)
                for r in range(R):
                    if not live[r]:
                        continue
                    diverged = not math.isfinite(train_losses[r]) or train_losses[r] > cfg.max_loss
                    acc, test_loss = (math.nan, math.nan) if diverged else (accs[r], test_losses[r])
                    records[r].append(_record(bases[r], t, per_epoch, train_s / R, agg_s / R, lr,
                                              train_losses[r], acc, test_loss, residuals[r], diverged))
                    if diverged:
                        live[r] = False
                        active[r] = False
                if not any(live):
                    break
        bar.close()
    return records


def train_grid(cfg: BGmDTrainingConfig, *, device="cpu", progress: bool = False,
               data: Optional[ImageData] = None, batched: bool = False,
               max_runs: Optional[int] = None) -> List[dict]:
    """Every run of the grid ``cfg.methods x cfg.attacks x cfg.psis x cfg.seeds``: tidy records
    (see :func:`train`). ``psi = 0`` is run once per method and seed, as attack ``"none"``.

    ``batched=True``: each method's runs are trained together by :func:`train_runs` (at most
    ``max_runs`` per program; all by default), the same records in the same order, equal up to
    rounding; a model that cannot be batched (:func:`batchable`) is trained run by run."""
    if data is None:
        data = load_images(cfg.dataset, seed=cfg.data_seed)
    if max_runs is not None:
        max_runs = int(check_real(max_runs, "max_runs", 1, integer=True))
    grid = []
    for psi in cfg.psis:
        for attack in (("none",) if psi == 0 else cfg.attacks):
            for i, _ in enumerate(cfg.methods):
                for seed in cfg.seeds:
                    grid.append((i, attack, psi, seed))
    if not (batched and batchable(cfg, data)):
        records: List[dict] = []
        for i, attack, psi, seed in progress_bar(grid, enabled=progress, desc="runs", unit="run"):
            records += train(cfg, cfg.methods[i], attack, psi, seed, data=data, device=device,
                             progress=False)
        return records
    by_run: Dict[int, List[dict]] = {}
    for i, m in enumerate(progress_bar(cfg.methods, enabled=progress, desc="methods", unit="method")):
        positions = [j for j, entry in enumerate(grid) if entry[0] == i]
        size = max_runs or len(positions)
        for start in range(0, len(positions), size):
            chunk = positions[start:start + size]
            runs = [grid[j][1:] for j in chunk]
            for j, run_records in zip(chunk, _train_batch(cfg, m, runs, data, device, False, False)):
                by_run[j] = run_records
    return [record for j in range(len(grid)) for record in by_run[j]]


def run(config="ci", *, device="cpu", dtype: Optional[torch.dtype] = None, progress: bool = False,
        data: Optional[ImageData] = None, batched: bool = False,
        max_runs: Optional[int] = None) -> Result:
    """The training grid of a scale (``"ci"``/``"paper"``) or a custom config: table ``records``
    (:func:`train_grid`, run by run or ``batched``). ``dtype``: the models' float32 only (the
    common signature)."""
    cfg = resolve_config(config, CONFIGS)
    only_dtype(dtype)
    return Result(cfg, records=train_grid(cfg, device=device, progress=progress, data=data,
                                          batched=batched, max_runs=max_runs))
