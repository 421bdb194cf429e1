"""Online estimators across iterations: what they converge to, and how they follow a moving target.

Chapter 3 ("Online estimators across iterations"). Six online estimators, one step each of
:func:`~median_sgd.sgd_step` (eq. 6) or :func:`~median_sgd.spp_step` (eqs. 8-10) for
``D = ||.||^2/2``, ``||.||_2`` and ``||.||_1`` (``ESTIMATORS``; the names are the book's), see the
same stream of samples ``g_t`` (common random numbers) and are compared in two studies:

* ``fixed_study``: the samples come from one fixed, skewed, heavy-tailed distribution,
  ``g = g_hat + M xi`` with ``xi`` of i.i.d. Lomax (Pareto II) coordinates of tail index
  ``tail_index`` (finite mean, infinite variance for 1 < tail_index <= 2) and a mixing matrix
  ``M``. Its mean, geometric median and coordinate-wise median are three different points, and
  each estimator settles near the ``D``-median of its divergence (``TARGETS``): momentum near the
  mean, the ``l2`` estimators near the geometric median, the ``l1`` ones near the coordinate-wise
  median. The mean is exact (``g_hat + M E[xi]``); the medians come from a large reference sample.
* ``drift_study``: the distribution moves, ``g_t = x_t + xi_t`` with ``x_t = x_0 + v t u`` (a
  straight line at speed ``v`` per step along ``u = (1, ..., 1)/sqrt(d)``) and symmetric
  alpha-stable noise ``xi_t``, so that all three medians are ``x_t``. A grid of step sizes ``tau``
  shows the trade-off: a small ``tau`` averages the noise away but lags behind (momentum by
  ``v (1 - tau)/tau`` or ``v/tau``; the clipped estimators move at most ``tau`` per step and fall
  behind for good when ``tau`` is below the speed), a large ``tau`` follows the target but keeps
  the noise.

Every seed (and every ``tau``) is a leading batch dimension of one tensor per estimator, the
noise is drawn in chunks, and nothing reads tensor data back to the host inside the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .._checks import check_real, value_checks
from ..estimators import sgd_step, spp_step
from ..medians import coordinate_median, geometric_median
from . import _random
from ._common import Result, check_dtype, check_each, check_fields, progress as progress_bar, resolve_config, scales

__all__ = [
    "ESTIMATORS",
    "TARGETS",
    "target_of",
    "TrackingConfig",
    "CONFIGS",
    "sample_lomax",
    "fixed_study",
    "drift_study",
    "run",
]

#: name -> (method, div): one step of ``sgd_step`` / ``spp_step`` with that divergence.
ESTIMATORS: Dict[str, Tuple[str, str]] = {
    "momentum (SGD)": ("sgd", "sq"),  # eq. 7: beta = 1 - tau
    "momentum": ("spp", "sq"),  # eq. 11: beta = 1/(1+tau)
    "adaptive momentum": ("sgd", "l2"),  # App. B: m + tau (g - m)/||g - m||
    "VClip": ("spp", "l2"),  # eq. 12: m + clip_{tau,2}(g - m) (Clip21)
    "signed increment": ("sgd", "l1"),  # App. B: m + tau sign(g - m)
    "CClip": ("spp", "l1"),  # eq. 15: m + clip_{tau,1}(g - m)
}
#: div -> the D-median it estimates: argmin_m E D(m - g).
TARGETS: Dict[str, str] = {"sq": "mean", "l2": "geometric median", "l1": "coordinate median"}

_STEPS = {"sgd": sgd_step, "spp": spp_step}


def target_of(estimator: str) -> str:
    """The centre an estimator of ``ESTIMATORS`` estimates: ``"mean"``, ``"geometric median"``, ...."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    return TARGETS[ESTIMATORS[estimator][1]]


@dataclass(frozen=True)
class TrackingConfig:
    """Settings of both studies (the ``ci`` and ``paper`` scales differ only in sizes)."""

    seed: int = 0
    seeds: int = 32
    estimators: Tuple[str, ...] = tuple(ESTIMATORS)
    chunk: int = 250  # iterations of noise drawn at once
    # (a) fixed distribution g = g_hat + M xi, xi_i ~ Lomax(tail_index), g_hat ~ N(0, I).
    fixed_steps: int = 4000
    fixed_tau: float = 0.01  # the paper's tau in its Fig. 2
    tail_index: float = 1.5
    mixing: Tuple[Tuple[float, ...], ...] = ((1.0, 1.0), (1.0, -1.0))
    reference_samples: int = 50_000  # for the coordinate-wise and geometric medians
    curve_points: int = 60  # log-spaced iterations kept for the convergence curves
    # (b) drifting distribution g_t = x_0 + v t u + xi_t, xi ~ symmetric alpha-stable.
    drift_dim: int = 10
    drift_steps: int = 2000
    drift_speed: float = 0.01  # v: l2 distance the target moves per step
    drift_alpha: float = 1.5
    drift_taus: Tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

    def __post_init__(self):
        check_fields(self, ("seeds", "chunk", "fixed_steps", "reference_samples", "curve_points",
                            "drift_dim", "drift_steps"), 1, integer=True)
        check_fields(self, ("fixed_tau", "drift_speed"), 0, lo_open=True)
        # both > 1 so that the mean exists
        check_real(self.tail_index, "tail_index", 1, lo_open=True)
        check_real(self.drift_alpha, "drift_alpha", 1, 2, lo_open=True)
        check_each(self.drift_taus, "drift_taus", 0, 1, lo_open=True)
        d = len(self.mixing)
        if d == 0 or any(len(row) != d for row in self.mixing):
            raise ValueError(f"mixing must be a square (d, d) tuple of rows, got {self.mixing!r}")
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            raise ValueError(f"unknown estimators {unknown}; expected some of {list(ESTIMATORS)}")

    @property
    def dim(self) -> int:
        """Dimension of the fixed study (that of ``mixing``)."""
        return len(self.mixing)


CONFIGS: Dict[str, TrackingConfig] = scales(
    ci=TrackingConfig(),
    paper=TrackingConfig(
        seeds=256,
        fixed_steps=20_000,
        reference_samples=1_000_000,
        curve_points=120,
        drift_steps=10_000,
        drift_taus=tuple(round(10 ** (-3 + 0.25 * i), 6) for i in range(13)),
    ),
)


def sample_lomax(tail_index: float, size, *, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Lomax (Pareto II) samples ``U^(-1/a) - 1``, ``U ~ U(0, 1]``: ``P(xi > x) = (1 + x)^-a``.

    Mean ``1/(a - 1)`` for ``a > 1``, median ``2^(1/a) - 1``; the variance is infinite for ``a <= 2``.
    Drawn on ``generator``'s device and returned on ``device`` (default: the generator's device,
    else the CPU).
    """
    check_real(tail_index, "tail_index", 0, lo_open=True)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = _random.rand(size, generator=generator, device=device, dtype=dtype)
    # 1 - u lies in (0, 1]: no division by zero.
    return (1.0 - u) ** (-1.0 / tail_index) - 1.0


def _summary(x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """10%, 50% and 90% quantiles over the last dimension (the seeds)."""
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype, device=x.device), dim=-1)
    return {"q10": q[0], "median": q[1], "q90": q[2]}


def _log_steps(steps: int, points: int) -> List[int]:
    grid = {0, steps} | {round(math.exp(math.log(steps) * i / (points - 1))) for i in range(points)}
    return sorted(grid)


def fixed_study(
    config: Union[str, TrackingConfig] = "ci", *, device="cpu", dtype=torch.float64, progress: bool = False
) -> dict:
    """Every estimator from ``m_0 = 0`` on samples of a fixed skewed heavy-tailed distribution.

    Returns a dict with ``targets`` (``"location"`` ``g_hat`` and the ``"mean"``, ``"geometric
    median"`` and ``"coordinate median"`` of the distribution, each ``(d,)``), ``curves`` (records
    ``step, estimator, target, q10, median, q90``: the distance ``||m_t - target||`` over seeds at
    log-spaced steps), ``final`` (records ``estimator, target, distance, q10, median, q90``: the
    distance to each target of the tail average of ``m_t`` over the second half of the run,
    pooled over seeds for ``distance`` and per seed for the quantiles), ``tail_average``
    (estimator -> that pooled ``(d,)`` average), ``tail_average_seeds`` (estimator -> the
    ``(seeds, d)`` tail averages of each seed), ``trace`` (estimator ->
    ``(steps + 1, d)`` path of the first seed) and ``samples`` (the first seed's first samples).
    Everything is returned on the CPU.
    """
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed)  # CPU draws, moved: the same run on every device
    kw: Dict[str, Any] = dict(device=device, dtype=dtype)
    mixing = torch.tensor(cfg.mixing, **kw)
    d = cfg.dim
    location = _random.randn(d, generator=gen, **kw)
    reference = location + sample_lomax(cfg.tail_index, (cfg.reference_samples, d), generator=gen, **kw) @ mixing.T
    targets = {
        "location": location,
        "mean": location + mixing @ torch.full((d,), 1.0 / (cfg.tail_index - 1.0), **kw),
        "geometric median": geometric_median(
            reference, tol=max(1e-10, 10 * torch.finfo(dtype).eps), max_iter=10_000
        ).median,
        "coordinate median": coordinate_median(reference),
    }
    del reference
    centres = torch.stack([targets[t] for t in TARGETS.values()])  # (3, d)

    names, T = cfg.estimators, cfg.fixed_steps
    steps = [(_STEPS[ESTIMATORS[e][0]], ESTIMATORS[e][1]) for e in names]
    m = [torch.zeros(cfg.seeds, d, **kw) for _ in names]
    log_steps = _log_steps(T, cfg.curve_points)
    # distances[i, e, c, s] = ||m_{log_steps[i]} - centre c|| for seed s
    distances = torch.empty(len(log_steps), len(names), len(centres), cfg.seeds, **kw)
    distances[0] = torch.linalg.vector_norm(centres, dim=-1)[None, :, None]
    trace = torch.zeros(T + 1, len(names), d, **kw)
    tail_start = T // 2  # the tail average is over m_t, t = tail_start + 1 .. T
    tail_sum = torch.zeros(len(names), cfg.seeds, d, **kw)
    samples: Optional[torch.Tensor] = None
    chunks = range(0, T, cfg.chunk)
    with value_checks(False):  # the inputs are ours and finite; no host sync inside the loop
        for start in progress_bar(chunks, enabled=progress, desc="fixed distribution", unit="chunk"):
            k = min(cfg.chunk, T - start)
            g = location + sample_lomax(cfg.tail_index, (k, cfg.seeds, d), generator=gen, **kw) @ mixing.T
            if start == 0:
                samples = g[: min(k, 500), 0]
            per_estimator = []
            for e, (step, div) in enumerate(steps):
                path = []
                for i in range(k):
                    m[e] = step(m[e], g[i], cfg.fixed_tau, div)
                    path.append(m[e])
                per_estimator.append(torch.stack(path))  # (k, seeds, d): m_{start+1} .. m_{start+k}
            paths = torch.stack(per_estimator, dim=1)  # (k, estimators, seeds, d)
            trace[start + 1 : start + 1 + k] = paths[:, :, 0]
            first = max(tail_start + 1, start + 1)
            if first <= start + k:
                tail_sum += paths[first - start - 1 :].sum(dim=0)
            for i, t in enumerate(log_steps):
                if start < t <= start + k:
                    diff = paths[t - start - 1][:, None] - centres[None, :, None]  # (e, c, seeds, d)
                    distances[i] = torch.linalg.vector_norm(diff, dim=-1)
    tail_mean = tail_sum / (T - tail_start)  # (estimators, seeds, d)

    assert samples is not None  # fixed_steps >= 1 (checked by the config): set at start == 0
    distances = distances.cpu()
    curve = _summary(distances)  # each (steps, estimators, centres)
    per_seed = torch.linalg.vector_norm(tail_mean[:, None] - centres[None, :, None], dim=-1).cpu()
    pooled = torch.linalg.vector_norm(tail_mean.mean(dim=1)[:, None] - centres[None], dim=-1).cpu()
    final_q = _summary(per_seed)  # each (estimators, centres)
    curves, final = [], []
    for e, name in enumerate(names):
        for c, centre in enumerate(TARGETS.values()):
            final.append({"estimator": name, "target": centre, "distance": pooled[e, c].item(),
                          **{k: v[e, c].item() for k, v in final_q.items()}})
            for i, t in enumerate(log_steps):
                curves.append({"step": t, "estimator": name, "target": centre,
                               **{k: v[i, e, c].item() for k, v in curve.items()}})
    return {
        "targets": {k: v.cpu() for k, v in targets.items()},
        "curves": curves,
        "final": final,
        "tail_average": {name: tail_mean[e].mean(dim=0).cpu() for e, name in enumerate(names)},
        "tail_average_seeds": {name: tail_mean[e].cpu() for e, name in enumerate(names)},
        "trace": {name: trace[:, e].cpu() for e, name in enumerate(names)},
        "samples": samples.cpu(),
    }


def drift_study(
    config: Union[str, TrackingConfig] = "ci", *, device="cpu", dtype=torch.float64, progress: bool = False
) -> dict:
    """Every estimator and step size following a target that moves at constant speed.

    ``x_t = x_0 + v t u``; every estimator starts on target (``m_0 = x_0``) and, after seeing
    ``g_t = x_t + xi_t``, is compared with ``x_t``: ``e_t = ||m_{t+1} - x_t||`` and the lag
    ``<x_t - m_{t+1}, u>`` along the motion. Returns a dict with ``records`` (``estimator, tau,
    q10, median, q90``: the time-averaged error over the second half of the run, quantiles over
    seeds; ``lag``: the time-averaged lag, mean over seeds; ``final_lag``: the lag at the last
    step, median over seeds), ``trace`` (estimator -> ``(steps, taus)``: ``<m_{t+1}, u>`` of the
    first seed) and ``target_trace`` (``(steps,)``: ``<x_t, u>``), on the CPU.
    """
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed + 1)  # CPU draws, moved: the same run on every device
    kw: Dict[str, Any] = dict(device=device, dtype=dtype)
    d, T, names = cfg.drift_dim, cfg.drift_steps, cfg.estimators
    n_tau = len(cfg.drift_taus)
    steps = [(_STEPS[ESTIMATORS[e][0]], ESTIMATORS[e][1]) for e in names]
    u = torch.full((d,), 1.0 / math.sqrt(d), **kw)
    x0 = _random.randn(d, generator=gen, **kw)
    tau = torch.tensor(cfg.drift_taus, **kw).view(n_tau, 1)  # one step size per row of the batch
    m = [x0.expand(n_tau, cfg.seeds, d).clone() for _ in names]
    tail_start = T // 2
    err_sum = torch.zeros(len(names), n_tau, cfg.seeds, **kw)
    lag_sum = torch.zeros(len(names), n_tau, cfg.seeds, **kw)
    trace = torch.empty(T, len(names), n_tau, **kw)
    final_lag: Optional[torch.Tensor] = None
    chunks = range(0, T, cfg.chunk)
    with value_checks(False):
        for start in progress_bar(chunks, enabled=progress, desc="drifting distribution", unit="chunk"):
            k = min(cfg.chunk, T - start)
            t = torch.arange(start, start + k, **kw)
            x = x0 + (cfg.drift_speed * t)[:, None] * u  # (k, d): x_t
            g = x[:, None] + _random.stable(cfg.drift_alpha, (k, cfg.seeds, d), generator=gen, **kw)
            per_estimator = []
            for e, (step, div) in enumerate(steps):
                path = []
                for i in range(k):
                    # (seeds, d) sample against (taus, seeds, d) estimates: every tau sees it.
                    m[e] = step(m[e], g[i], tau, div)
                    path.append(m[e])
                per_estimator.append(torch.stack(path))
            paths = torch.stack(per_estimator, dim=1)  # (k, estimators, taus, seeds, d): m_{t+1}
            behind = x[:, None, None, None] - paths
            err = torch.linalg.vector_norm(behind, dim=-1)  # (k, e, taus, seeds)
            lag = behind @ u
            trace[start : start + k] = paths[..., 0, :] @ u
            first = max(tail_start, start)
            if first < start + k:
                err_sum += err[first - start :].sum(dim=0)
                lag_sum += lag[first - start :].sum(dim=0)
            final_lag = lag[-1]
    n_tail = T - tail_start
    err_mean, lag_mean = (err_sum / n_tail).cpu(), (lag_sum / n_tail).cpu()
    assert final_lag is not None  # drift_steps >= 1 (checked by the config)
    final_lag = final_lag.cpu().median(dim=-1).values
    q = _summary(err_mean)  # each (e, taus)
    records = []
    for e, name in enumerate(names):
        for j, tau_j in enumerate(cfg.drift_taus):
            records.append({"estimator": name, "tau": tau_j,
                            **{k: v[e, j].item() for k, v in q.items()},
                            "lag": lag_mean[e, j].mean().item(), "final_lag": final_lag[e, j].item()})
    times = torch.arange(T, dtype=dtype)
    return {
        "records": records,
        "trace": {name: trace[:, e].cpu() for e, name in enumerate(names)},
        "target_trace": (x0.cpu() @ u.cpu()) + cfg.drift_speed * times,
    }


def run(config: Union[str, TrackingConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Both studies at a scale (``"ci"``/``"paper"``) or with a custom config.

    Tables (dicts of records and traces, on the CPU): ``fixed`` (:func:`fixed_study`) and
    ``drift`` (:func:`drift_study`).
    """
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=device, dtype=check_dtype(dtype), progress=progress)
    return Result(cfg, fixed=fixed_study(cfg, **kw), drift=drift_study(cfg, **kw))
