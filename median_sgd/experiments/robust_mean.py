"""The median as a robust estimator of the mean (chapter 1; Fig. 1 of the workshop paper).

Three studies, all vectorised over seeds through the leading batch dimension of the estimators:

* ``scene``: a 2-D sample whose outliers sit on an arc of an outer circle (the workshop paper's
  Fig. 1): the sample mean is dragged towards them, the medians are not.
* ``sample_size``: Cauchy samples (alpha = 1, no mean, median = location) of growing size ``n``:
  the sample mean's error does not shrink with ``n``, the medians' errors shrink like
  ``1/sqrt(n)``. ``tails`` does the same at fixed ``n`` across the tail index ``alpha``.
* ``breakdown``: a growing fraction of the points sent far away: the mean breaks at once
  (breakdown point ``1/n``), the trimmed mean when the fraction passes its trim, the
  coordinate-wise and geometric medians only at 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Union

import torch

from ..medians import coordinate_median, geometric_median, trimmed_mean
from . import _random
from ._common import Result, check_dtype, resolve_config, scales

__all__ = ["RobustMeanConfig", "CONFIGS", "estimators", "outlier_scene", "sample_size_study",
           "tail_study", "breakdown_study", "run"]


@dataclass(frozen=True)
class RobustMeanConfig:
    """Sizes of the chapter's studies (the ``ci`` and ``paper`` scales differ only here)."""

    seed: int = 0
    # Fig. 1 scene (2-D): inliers N(0, I), outliers on an arc of the circle of radius `radius`.
    scene_inliers: int = 120
    scene_outlier_fraction: float = 0.2
    scene_radius: float = 8.0
    scene_arc: float = math.pi / 3
    # Cauchy location estimation in `dim` dimensions, over `seeds` independent samples.
    dim: int = 10
    seeds: int = 400
    sample_sizes: tuple = (5, 11, 21, 51, 101, 201, 501)
    tail_n: int = 51
    tail_alphas: tuple = (2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    trim: float = 0.2
    # Breakdown: n points, a fraction sent to distance `breakdown_distance` along one direction.
    breakdown_n: int = 100
    breakdown_seeds: int = 50
    breakdown_fractions: tuple = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.49)
    breakdown_distance: float = 1e3
    gm_max_iter: int = 2000  # Weiszfeld contracts like (bad weight / good weight) near breakdown


CONFIGS: Dict[str, RobustMeanConfig] = scales(
    ci=RobustMeanConfig(),
    paper=RobustMeanConfig(
        seeds=10_000,
        sample_sizes=(5, 11, 21, 51, 101, 201, 501, 1001, 2001),
        tail_n=101,
        breakdown_n=1000,
        breakdown_seeds=1000,
        breakdown_fractions=tuple(i / 100 for i in range(0, 50, 2)) + (0.49,),
    ),
)


def estimators(
    trim: float = 0.2, gm_max_iter: int = 2000
) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The location estimators compared: each maps a (..., n, d) sample to a (..., d) estimate."""
    return {
        "mean": lambda G: G.mean(dim=-2),
        f"trimmed mean ({trim:.0%})": lambda G: trimmed_mean(G, trim),
        "coordinate median": coordinate_median,
        "geometric median": lambda G: geometric_median(G, max_iter=gm_max_iter).median,
    }


def _generator(seed: int, device) -> torch.Generator:
    # A CPU generator whatever the device: the draws are moved to the device, so a run on a GPU
    # sees the samples of the CPU run (see ._random).
    return _random.generator(seed)


def outlier_scene(cfg: RobustMeanConfig, *, device="cpu", dtype=torch.float64) -> dict:
    """Fig. 1: 2-D inliers around 0 plus outliers on an arc; every estimator's estimate."""
    gen = _generator(cfg.seed, device)
    n_out = round(cfg.scene_outlier_fraction * cfg.scene_inliers / (1 - cfg.scene_outlier_fraction))
    inliers = _random.randn((cfg.scene_inliers, 2), generator=gen, device=device, dtype=dtype)
    angle = math.pi / 4 + cfg.scene_arc * (
        _random.rand(n_out, generator=gen, device=device, dtype=dtype) - 0.5
    )
    radius = cfg.scene_radius * (
        1 + 0.05 * _random.randn(n_out, generator=gen, device=device, dtype=dtype)
    )
    outliers = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    points = torch.cat([inliers, outliers])
    estimates = {
        name: est(points).cpu() for name, est in estimators(cfg.trim, cfg.gm_max_iter).items()
    }
    return {
        "points": points.cpu(),
        "is_outlier": torch.arange(len(points)) >= cfg.scene_inliers,
        "true_mean": torch.zeros(2, dtype=dtype),
        "estimates": estimates,
    }


def _errors(
    samples: torch.Tensor, cfg: RobustMeanConfig, *, per_coordinate: bool
) -> Dict[str, torch.Tensor]:
    """Per-seed error ``||estimate - 0||`` of each estimator (over ``sqrt(d)`` per coordinate)."""
    d = samples.shape[-1] if per_coordinate else 1
    return {
        name: torch.linalg.vector_norm(est(samples), dim=-1) / math.sqrt(d)
        for name, est in estimators(cfg.trim, cfg.gm_max_iter).items()
    }


def _summary(err: torch.Tensor) -> dict:
    q = torch.quantile(err.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"q10": q[0].item(), "median": q[1].item(), "q90": q[2].item()}


def sample_size_study(cfg: RobustMeanConfig, *, device="cpu", dtype=torch.float64) -> List[dict]:
    """Cauchy (alpha = 1) location 0: error quantiles over seeds against the sample size n."""
    gen = _generator(cfg.seed + 1, device)
    records = []
    for n in cfg.sample_sizes:
        samples = _random.stable(1.0, (cfg.seeds, n, cfg.dim), generator=gen, device=device, dtype=dtype)
        for name, err in _errors(samples, cfg, per_coordinate=True).items():
            records.append({"n": n, "estimator": name, **_summary(err)})
    return records


def tail_study(cfg: RobustMeanConfig, *, device="cpu", dtype=torch.float64) -> List[dict]:
    """alpha-stable samples of size ``tail_n``: error quantiles over seeds against alpha."""
    gen = _generator(cfg.seed + 2, device)
    alphas = torch.tensor(cfg.tail_alphas, dtype=torch.float64)  # on the CPU, as the draws
    size = (len(cfg.tail_alphas), cfg.seeds, cfg.tail_n, cfg.dim)
    # Every alpha in one call: alpha broadcasts along the first dimension.
    samples = _random.stable(alphas.view(-1, 1, 1, 1), size, generator=gen, device=device, dtype=dtype)
    records = []
    for name, err in _errors(samples, cfg, per_coordinate=True).items():
        for i, alpha in enumerate(cfg.tail_alphas):
            records.append({"alpha": alpha, "estimator": name, **_summary(err[i])})
    return records


def breakdown_study(cfg: RobustMeanConfig, *, device="cpu", dtype=torch.float64) -> List[dict]:
    """Inliers N(0, I); a fraction of the n points replaced by N(D e_1, I): error against it."""
    gen = _generator(cfg.seed + 3, device)
    n, d = cfg.breakdown_n, cfg.dim
    records = []
    for frac in cfg.breakdown_fractions:
        k = round(frac * n)
        X = _random.randn((cfg.breakdown_seeds, n, d), generator=gen, device=device, dtype=dtype)
        X[:, :k, 0] += cfg.breakdown_distance
        # The bias itself, ||estimate||, not per coordinate.
        for name, err in _errors(X, cfg, per_coordinate=False).items():
            records.append({"fraction": k / n, "estimator": name, **_summary(err)})
    return records


def run(config: Union[str, RobustMeanConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Every study of the chapter at a scale (``"ci"``/``"paper"``) or with a custom config.

    Tables: ``scene`` (a dict), ``sample_size``, ``tails``, ``breakdown`` (no loop is long
    enough for a progress bar: ``progress`` is accepted for the common signature).
    """
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=device, dtype=check_dtype(dtype))
    return Result(
        cfg,
        scene=outlier_scene(cfg, **kw),
        sample_size=sample_size_study(cfg, **kw),
        tails=tail_study(cfg, **kw),
        breakdown=breakdown_study(cfg, **kw),
    )
