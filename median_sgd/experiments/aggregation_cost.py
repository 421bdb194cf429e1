"""Measured cost of aggregating ``n`` vectors of dimension ``d`` (chapters "The geometric median"
and "BGmD").

One Weiszfeld iteration reads the ``(n, d)`` matrix a constant number of times: ``O(nd)``, like
the mean. :func:`gm_cost_study` measures it across ``d`` (at fixed ``n``) and across ``n`` (at
fixed ``d``), next to the mean and the coordinate-wise median, and counts the iterations the
solver needs to reach its tolerance (they do not grow with ``d``).

Timings are seconds on whatever machine runs the study, so records hold machine-dependent
numbers: compare ratios and slopes, not values. Each is the minimum over ``repeats`` calls after a
warm-up call. On the CPU the clock is the process's CPU time (``time.process_time``) and the study
runs on ``threads`` threads (one by default; the previous setting is restored): the work of the
computation, undisturbed by other processes sharing the machine or by idle threads spinning. On
CUDA it is wall-clock time, with the device synchronised before the clock is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Union

import torch

from ..medians import coordinate_median, geometric_median
from .._checks import check_real
from . import _random
from ._common import Result, check_dtype, cpu_threads, resolve_config, scales

__all__ = [
    "AggregationCostConfig",
    "CONFIGS",
    "cpu_threads",
    "time_call",
    "gm_cost_study",
    "bgmd_cost_study",
    "loglog_slope",
    "run",
]


@dataclass(frozen=True)
class AggregationCostConfig:
    """Sizes of the timing studies (``ci`` and ``paper`` differ only in sizes)."""

    seed: int = 0
    n: int = 16  # rows (gradients) in the sweep over d
    dims: tuple = (2**12, 2**14, 2**16, 2**18, 2**19)
    ns: tuple = (8, 16, 32, 64, 128)  # rows in the sweep over n
    n_sweep_dim: int = 2**15
    gm_iters: int = 5  # Weiszfeld iterations per timed call (fixed, so the time per iteration is exact)
    repeats: int = 5
    corrupted_fraction: float = 0.2  # for the iteration counts: that many rows moved far away
    threads: int = 1  # CPU threads while timing
    # BGmD across the block size k = beta d (chapter "Block geometric median descent")
    k_n: int = 16
    k_dim: int = 2**18
    k_fractions: tuple = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    k_iters: tuple = (5, 50)  # fixed Weiszfeld iterations K: the 1/eps^2 factor of Proposition 1


CONFIGS: Dict[str, AggregationCostConfig] = scales(
    ci=AggregationCostConfig(),
    paper=AggregationCostConfig(
        dims=(2**12, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24),
        ns=(8, 16, 32, 64, 128, 256, 512),
        n_sweep_dim=2**18,
        repeats=11,
        k_dim=2**22,
    ),
)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, repeats: int = 5, device="cpu") -> float:
    """Seconds of one call of ``fn()``: the minimum over ``repeats`` calls after one warm-up call.

    CPU time of the process on a CPU device, wall-clock time (synchronised) on CUDA.
    """
    check_real(repeats, "repeats", 1, integer=True)
    cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        _sync(device)
        best = min(best, clock() - start)
    return best


def _sample(n: int, d: int, cfg: AggregationCostConfig, gen, device, dtype) -> torch.Tensor:
    # drawn on the generator's device (the CPU: the same matrix on every device), then moved
    G = _random.randn((n, d), generator=gen, device=device, dtype=dtype)
    n_bad = round(cfg.corrupted_fraction * n)
    G[:n_bad] += 10.0  # corrupted rows: far away in every coordinate
    return G


def _methods(cfg: AggregationCostConfig) -> Dict[str, Callable[[torch.Tensor], object]]:
    return {
        "mean": lambda G: G.mean(-2),
        "coordinate median": coordinate_median,
        "Weiszfeld iteration": lambda G: geometric_median(G, max_iter=cfg.gm_iters, fixed_iter=True),
    }


def gm_cost_study(
    config: Union[str, AggregationCostConfig] = "ci", *, device="cpu", dtype=torch.float32
) -> List[dict]:
    """Records ``{"sweep", "n", "d", "method", "seconds"}`` (per Weiszfeld iteration for the GM),
    plus ``{"sweep": "iterations", "n", "d", "iterations", "converged"}`` for the solver at its
    default tolerance on the sweep over ``d``."""
    cfg = resolve_config(config, CONFIGS)
    with cpu_threads(cfg.threads):
        return _gm_cost_study(cfg, device=device, dtype=dtype)


def _gm_cost_study(cfg: AggregationCostConfig, *, device, dtype) -> List[dict]:
    gen = _random.generator(cfg.seed)
    records = []
    sizes = [("d", cfg.n, d) for d in cfg.dims] + [("n", n, cfg.n_sweep_dim) for n in cfg.ns]
    for sweep, n, d in sizes:
        G = _sample(n, d, cfg, gen, device, dtype)
        for name, fn in _methods(cfg).items():
            seconds = time_call(lambda: fn(G), repeats=cfg.repeats, device=device)
            if name == "Weiszfeld iteration":
                seconds /= cfg.gm_iters
            records.append({"sweep": sweep, "n": n, "d": d, "method": name, "seconds": seconds})
        if sweep == "d":
            res = geometric_median(G)
            records.append({"sweep": "iterations", "n": n, "d": d,
                            "iterations": int(res.n_iter), "converged": bool(res.converged)})
    return records


def bgmd_cost_study(
    config: Union[str, AggregationCostConfig] = "ci", *, device="cpu", dtype=torch.float32
) -> List[dict]:
    """BGmD's cost per aggregation against ``beta = k/d`` (Proposition 1: ``O(k/eps^2 + bd)``).

    On one ``(k_n, k_dim)`` matrix (a fifth of the rows corrupted), records
    ``{"k", "beta", "method", "solver", "seconds"}`` for

    * ``"BGmD"``: one call of a :class:`median_sgd.BGmD` aggregator (norm sampling, mean memory,
      in its steady state: the memory is already set);
    * ``"block selection"``: :func:`median_sgd.select_block` alone (the ``O(bd)`` part; without
      the input's finiteness check, which BGmD does once per call);
    * ``"Gm of the block"``: :func:`median_sgd.geometric_median` of the ``(n, k)`` block alone;

    each with ``solver="K=..."`` (exactly ``K`` Weiszfeld iterations for each ``K`` in
    ``k_iters``: the ``1/eps^2`` factor of the proposition, held fixed) and ``solver="default"``
    (the library's default tolerance and adaptive mode). The baselines ``"GmD"`` (the full
    geometric median, every solver) and ``"mean"`` have ``beta = 1``.
    """
    cfg = resolve_config(config, CONFIGS)
    with cpu_threads(cfg.threads):
        return _bgmd_cost_study(cfg, device=device, dtype=dtype)


def _bgmd_cost_study(cfg: AggregationCostConfig, *, device, dtype) -> List[dict]:
    from .._checks import value_checks
    from ..bgmd import BGmD, resolve_block_size, select_block

    G = _sample(cfg.k_n, cfg.k_dim, cfg, _random.generator(cfg.seed), device, dtype)
    # The block selection's random keys come from a generator on the device, as in training: a
    # CPU generator would add a draw on the host and a copy to every timed call.
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    d = cfg.k_dim
    solvers = {f"K={K}": {"max_iter": K, "fixed_iter": True} for K in cfg.k_iters}
    solvers["default"] = {}

    def timed(fn):
        return time_call(fn, repeats=cfg.repeats, device=device)

    records = [{"k": d, "beta": 1.0, "method": "mean", "solver": "-", "seconds": timed(lambda: G.mean(-2))}]
    for solver, opts in solvers.items():
        records.append({"k": d, "beta": 1.0, "method": "GmD", "solver": solver,
                        "seconds": timed(lambda: geometric_median(G, **opts))})
    for beta in cfg.k_fractions:
        k = resolve_block_size(float(beta), d)
        idx = select_block(G, k, generator=gen)
        block = G[:, idx]
        with value_checks(False):  # as inside BGmD, which validates G once per call
            select_s = timed(lambda: select_block(G, k, generator=gen))
        for solver, opts in solvers.items():
            agg = BGmD(k, mode="norm", memory="mean", generator=gen, **opts)
            agg(G)  # the memory is set from now on
            rows = {
                "BGmD": timed(lambda: agg(G)),
                "block selection": select_s,
                "Gm of the block": timed(lambda: geometric_median(block, **opts)),
            }
            for method, seconds in rows.items():
                records.append({"k": k, "beta": k / d, "method": method, "solver": solver,
                                "seconds": seconds})
    return records


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the exponent ``p`` in ``y ~ x^p``."""
    x = torch.log(torch.as_tensor(xs, dtype=torch.float64))
    y = torch.log(torch.as_tensor(ys, dtype=torch.float64))
    if x.numel() < 2 or x.shape != y.shape:
        raise ValueError("need at least two (x, y) pairs of equal length")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def run(config: Union[str, AggregationCostConfig] = "ci", *, device="cpu", dtype=torch.float32,
        progress: bool = False) -> Result:
    """Both timing studies: tables ``gm_cost`` (:func:`gm_cost_study`) and ``bgmd_cost``
    (:func:`bgmd_cost_study`); ``progress`` is accepted for the common signature."""
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=device, dtype=check_dtype(dtype))
    return Result(cfg, gm_cost=gm_cost_study(cfg, **kw), bgmd_cost=bgmd_cost_study(cfg, **kw))
