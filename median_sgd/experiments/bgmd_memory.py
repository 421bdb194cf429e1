"""What BGmD's memory remembers: ``sum_t u_t + m_T = sum_t a_t``, ``a_t = [Gm(G_t[:, I_t]); R(G_t[:, J_t])]``.

Chapter "What BGmD's memory remembers". Because the geometric median is translation equivariant,
the memory that BGmD adds to every row passes straight into the update; with a memory rule ``R``
that is translation equivariant too (the paper's mean, a coordinate-wise median, a geometric
median), the updates and the memory satisfy, step by step,

    u_t + m_{t+1} - m_t = a_t,   (a_t)_{I_t} = Gm(G_t[:, I_t]),   (a_t)_{J_t} = R(G_t[:, J_t]),

so over ``T`` steps BGmD moves by ``sum_t a_t - m_T``: every coordinate is aggregated by the
geometric median in the steps where it is in the block and by ``R`` in all the others. With the
paper's mean, that is the (non-robust) mean most of the time.

Two studies:

* :func:`fixed_gradient_check`: rows ``g + sigma s * xi`` around a fixed gradient ``g`` (log-normal
  coordinate scales ``s``), a fresh ``floor(psi n)`` of them flipped to ``-100`` times themselves
  at each step (the paper's scaled bit flip), ``T`` BGmD steps per memory rule, and the full
  geometric median, coordinate median and mean as references. The metric is the relative error
  of the average update, ``||(1/t) sum_{s<=t} u_s - g|| / ||g||``. Also measured: the identity
  above (``identity_residual``), how often each coordinate was outside the block, and the
  prediction of the mean rule's error from it. Batched over (sigma, psi, seed) in one tensor;
  every rule sees the same gradients.
* :func:`memory_training`: the robust training loop of
  :mod:`~median_sgd.experiments.bgmd_training` with BGmD under each memory rule against the
  scaled bit flip.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .._checks import value_checks
from ..attacks import corrupted_mask, n_corrupted, scaled_bit_flip
from ..bgmd import BGmD
from ..medians import coordinate_median, geometric_median
from ._common import Result, check_dtype, progress as progress_bar, resolve_config, scales
from .bgmd_training import CONFIGS as TRAINING_CONFIGS
from .bgmd_training import BGmDTrainingConfig, method, train_grid

__all__ = [
    "RULES",
    "rule_label",
    "MemoryConfig",
    "CONFIGS",
    "fixed_gradient_check",
    "memory_training",
    "run",
]

RULES = ("mean", "median", "gm", None)
REFERENCES = ("GmD", "CmD", "SGD")


def rule_label(rule: Optional[str]) -> str:
    """The records' name of BGmD with memory rule ``rule``."""
    return {"mean": "BGmD, mean memory (paper)", "median": "BGmD, median memory",
            "gm": "BGmD, GM memory", None: "BGmD, no memory"}[rule]


def _training_methods(k: float) -> tuple:
    return tuple(method("bgmd", rule_label(r), k=k, memory=r) for r in RULES)


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes of the chapter's two studies (the ``ci`` and ``paper`` scales differ only here)."""

    seed: int = 0
    # Fixed-gradient check: n rows in d dimensions, T steps, seeds x sigmas x psis problems.
    dim: int = 1000
    rows: int = 10
    steps: int = 100
    seeds: int = 2
    k: float = 0.1
    mode: str = "norm"
    sigmas: Tuple[float, ...] = (0.05, 0.5)
    psis: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.4)
    flip_scale: float = 100.0
    curve_every: int = 5
    gm_tol: float = 1e-6
    gm_max_iter: int = 200
    # Training with each memory rule under the scaled bit flip.
    training: BGmDTrainingConfig = replace(
        TRAINING_CONFIGS["ci"], methods=_training_methods(0.1), attacks=("bit_flip",),
        psis=(0.0, 0.2, 0.4))


CONFIGS: Dict[str, MemoryConfig] = scales(
    ci=MemoryConfig(),
    paper=MemoryConfig(
        dim=100_000, rows=32, steps=1000, seeds=20,
        training=replace(TRAINING_CONFIGS["paper"], methods=_training_methods(0.1),
                         attacks=("bit_flip",), psis=(0.0, 0.2, 0.4), seeds=(0, 1, 2), epochs=10.0),
    ),
)


def _problems(cfg: MemoryConfig, device, dtype):
    """Per-problem (sigma, psi, seed) labels, gradients g (P, d) and scales s (P, d)."""
    labels = [(s, p, i) for s in cfg.sigmas for p in cfg.psis for i in range(cfg.seeds)]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    scales = torch.exp(torch.randn(cfg.seeds, cfg.dim, generator=gen, dtype=torch.float64))
    grads = scales * torch.randn(cfg.seeds, cfg.dim, generator=gen, dtype=torch.float64)
    idx = torch.tensor([i for _, _, i in labels])
    g = grads[idx].to(device=device, dtype=dtype)
    s = scales[idx].to(device=device, dtype=dtype)
    sigma = torch.tensor([x for x, _, _ in labels], device=device, dtype=dtype)
    return labels, g, s, sigma


def _rows_stream(cfg: MemoryConfig, g, s, sigma, labels, device):
    """The T gradient matrices (P, n, d), the same sequence for every rule (one seeded generator)."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    P, n = len(labels), cfg.rows
    groups: Dict[float, List[int]] = {}
    for j, (_, p, _) in enumerate(labels):
        groups.setdefault(p, []).append(j)
    for _ in range(cfg.steps):
        noise = torch.randn(P, n, cfg.dim, generator=gen, dtype=torch.float64).to(device=device, dtype=g.dtype)
        G = g.unsqueeze(-2) + (sigma.view(-1, 1, 1) * s.unsqueeze(-2)) * noise
        mask = torch.zeros(P, n, dtype=torch.bool)
        for p, members in groups.items():
            mask[members] = corrupted_mask((len(members), n), p, generator=gen)
        yield scaled_bit_flip(G, mask.to(device), cfg.flip_scale)


def _rule_aggregate(G, idx, rule, gm_options):
    """``a_t``: Gm of the block of ``G`` on ``I_t``, the memory rule on the other columns."""
    P, n, d = G.shape
    k = idx.shape[-1]
    expand = idx.unsqueeze(-2).expand(P, n, k)
    block = geometric_median(torch.gather(G, -1, expand), **gm_options).median
    if rule is None:
        rest = torch.zeros(P, d, dtype=G.dtype, device=G.device)
    elif rule == "mean":
        rest = G.mean(-2)
    elif rule == "median":
        rest = coordinate_median(G)
    else:
        rest = geometric_median(G.scatter(-1, expand, 0.0), **gm_options).median
    return rest.scatter(-1, idx, block)


def _quantiles(x: torch.Tensor) -> dict:
    q = torch.quantile(x.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"q10": q[0].item(), "median": q[1].item(), "q90": q[2].item()}


def fixed_gradient_check(cfg: MemoryConfig, *, device="cpu", dtype=torch.float64,
                         progress: bool = False,
                         methods: Optional[Sequence[str]] = None) -> Dict[str, List[dict]]:
    """The fixed-gradient study: ``{"final": [...], "curves": [...]}`` tidy records.

    ``final``, one record per (method, sigma, psi): quantiles over seeds of the relative error of
    the average update after ``steps`` steps (``median``, ``q10``, ``q90``), the memory's norm
    relative to ``||g||`` (``memory_norm``), the median error once the memory is flushed,
    ``||(sum u + m_T) / T - g|| / ||g||`` (``flushed``: the lag removed), for BGmD the largest
    relative ``identity_residual`` ``||sum u + m_T - sum a|| / ||sum a||`` over seeds, the outside-the-block weight
    ``||f * g|| / ||g||`` (``f_j``: fraction of steps coordinate ``j`` was outside the block;
    ``outside``) and, for the mean rule, the error predicted from it, ``(scale + 1) (b / n)
    ||f * g|| / ||g||`` with ``b = floor(psi n)`` flipped rows (``predicted``).
    ``curves``: the median error over seeds every ``curve_every`` steps. ``methods``: the labels
    to run (:func:`rule_label` of the memory rules, ``"GmD"``, ``"CmD"``, ``"SGD"``; default all).
    """
    device = torch.device(device)
    labels, g, s, sigma = _problems(cfg, device, dtype)
    g_norm = torch.linalg.vector_norm(g, dim=-1)
    gm_options: Dict[str, Any] = {"tol": cfg.gm_tol, "max_iter": cfg.gm_max_iter}
    every: List[Tuple[str, Optional[str]]] = [(rule_label(r), r) for r in RULES] + [(name, None) for name in REFERENCES]
    if methods is None:
        runs = every
    else:
        if isinstance(methods, str):
            raise TypeError("methods must be a sequence of labels, not a string")
        known = dict(every)
        unknown = [m for m in methods if m not in known]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty subset of {list(known)}, got {methods!r}")
        runs = [(m, known[m]) for m in methods]
    final, curves = [], []
    bar = progress_bar(enabled=progress, total=len(runs) * cfg.steps, desc="fixed gradient", unit="step")
    with value_checks(False):
        for label, rule in runs:
            is_bgmd = label.startswith("BGmD")
            agg = BGmD(cfg.k, mode=cfg.mode, memory=rule,
                       generator=torch.Generator().manual_seed(cfg.seed + 2),  # CPU keys, moved
                       **gm_options) if is_bgmd else None
            total_u = torch.zeros_like(g)
            total_a = torch.zeros_like(g)
            outside = torch.zeros_like(g)
            err_t = []
            for t, G in enumerate(_rows_stream(cfg, g, s, sigma, labels, device), start=1):
                if is_bgmd:
                    assert agg is not None  # built above for every BGmD label
                    u = agg(G)
                    block = agg.last_block
                    assert block is not None  # set by every call
                    total_a += _rule_aggregate(G, block, rule, gm_options)
                    outside += 1.0
                    outside.scatter_(-1, block, outside.gather(-1, block) - 1.0)
                elif label == "GmD":
                    u = geometric_median(G, **gm_options).median
                elif label == "CmD":
                    u = coordinate_median(G)
                else:
                    u = G.mean(-2)
                total_u += u
                if t % cfg.curve_every == 0 or t == cfg.steps:
                    err_t.append((t, torch.linalg.vector_norm(total_u / t - g, dim=-1) / g_norm))
                bar.update(1)
            memory = agg.memory if agg is not None and agg.memory is not None else torch.zeros_like(g)
            flushed = torch.linalg.vector_norm((total_u + memory) / cfg.steps - g, dim=-1) / g_norm
            memory_rel = torch.linalg.vector_norm(memory, dim=-1) / g_norm
            if is_bgmd:
                identity = (torch.linalg.vector_norm(total_u + memory - total_a, dim=-1)
                            / torch.linalg.vector_norm(total_a, dim=-1))
                f = outside / cfg.steps
                weight = torch.linalg.vector_norm(f * g, dim=-1) / g_norm
            for sig in cfg.sigmas:
                for psi in cfg.psis:
                    sel = torch.tensor([j for j, (a, b, _) in enumerate(labels)
                                        if a == sig and b == psi], device=device)
                    base = {"method": label, "memory": rule if is_bgmd else None, "sigma": sig,
                            "psi": psi}
                    rec = dict(base, **_quantiles(err_t[-1][1][sel]),
                               memory_norm=float(memory_rel[sel].median()),
                               flushed=float(flushed[sel].median()))
                    if is_bgmd:
                        rec["identity_residual"] = float(identity[sel].max())
                        rec["outside"] = float(weight[sel].median())
                        flipped = n_corrupted(cfg.rows, psi) / cfg.rows
                        rec["predicted"] = ((cfg.flip_scale + 1) * flipped
                                            * float(weight[sel].median()) if rule == "mean" else None)
                    final.append(rec)
                    for t, err in err_t:
                        curves.append(dict(base, step=t, error=float(err[sel].median())))
    bar.close()
    return {"final": final, "curves": curves}


def memory_training(cfg: MemoryConfig, *, device="cpu", progress: bool = False) -> List[dict]:
    """Robust training with each memory rule (records of :func:`~.bgmd_training.train`)."""
    return train_grid(cfg.training, device=device, progress=progress)


def run(config="ci", *, device="cpu", dtype=torch.float64, progress: bool = False) -> Result:
    """Both studies at a scale (``"ci"``/``"paper"``) or with a custom config.

    Tables: ``final`` and ``curves`` (:func:`fixed_gradient_check`, in ``dtype``) and
    ``training`` (:func:`memory_training`, the models' float32).
    """
    cfg = resolve_config(config, CONFIGS)
    check = fixed_gradient_check(cfg, device=device, dtype=check_dtype(dtype), progress=progress)
    return Result(cfg, **check, training=memory_training(cfg, device=device, progress=progress))
