"""Breakdown of the geometric median under gross corruption (chapter "The geometric median";
Fig. 5 of Acharya et al., BGmD).

A sample of ``n`` inliers ``x_i ~ N(0, I_dim)`` (population mean 0); a fraction ``psi`` of them is
corrupted, in one of two ways:

* ``"additive"`` (the paper's Fig. 5 and its gradient attack, Section 7.2): ``x_i + z_i`` with
  ``z_i ~ N(0, noise_std^2 I)`` (``noise_std = 10``: the paper's N(0, 100));
* ``"far"`` (a worst case for the bias): ``x_i + D e_1`` with ``D = far_distance``.

The studies compare the mean with the geometric median (``median_sgd.geometric_median``):

* ``toy_scenes``: the 2-D panels of Fig. 5 (one base sample, corrupted at each panel fraction);
* ``breakdown_curves``: the error ``||estimate - 0||`` over many seeds against ``psi``, with the
  deterministic robustness bound of Minsker (2015, Lemma 2.1): if at most a fraction ``psi < 1/2``
  of the points lie farther than ``r`` from a point ``x``, the geometric median lies within
  ``C_psi r`` of ``x``, ``C_psi = (1 - psi) / sqrt(1 - 2 psi)``. Here ``x = 0`` and ``r`` is the
  largest distance of an uncorrupted point from 0, so the bound holds whatever the corrupted points
  are; the records carry the worst ratio error / bound over the seeds, and the Weiszfeld iterations
  the median needed (they grow as ``psi -> 1/2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from .._checks import check_real
from ..medians import geometric_median
from . import _random
from ._common import Result, check_dtype, resolve_config, scales

__all__ = [
    "GMBreakdownConfig",
    "CONFIGS",
    "MODES",
    "minsker_constant",
    "corrupt",
    "toy_scenes",
    "breakdown_curves",
    "run",
]

MODES = ("additive", "far")


@dataclass(frozen=True)
class GMBreakdownConfig:
    """Sizes and corruption of the chapter's studies (``ci`` and ``paper`` differ only in sizes)."""

    seed: int = 0
    n: int = 100  # points per sample
    dim: int = 2  # Fig. 5 is 2-D
    noise_std: float = 10.0  # "additive": N(0, noise_std^2 I), the paper's N(0, 100)
    far_distance: float = 1e3  # "far": the corrupted points moved by far_distance * e_1
    panel_fractions: tuple = (0.0, 0.1, 0.3, 0.45)  # Fig. 5's panels
    fractions: tuple = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45)
    seeds: int = 150  # 150 x 100 x 2 values: below torch's parallel grain (no thread overhead)
    gm_tol: float = 1e-6
    gm_max_iter: int = 500  # a median on a data point that its neighbours almost balance converges slowly


CONFIGS: Dict[str, GMBreakdownConfig] = scales(
    ci=GMBreakdownConfig(),
    paper=GMBreakdownConfig(
        seeds=10_000,
        fractions=tuple(i / 100 for i in range(0, 50, 2)) + (0.49,),
    ),
)


def minsker_constant(psi: float) -> float:
    """``C_psi = (1 - psi) / sqrt(1 - 2 psi)`` for ``0 <= psi < 1/2`` (Minsker 2015, Lemma 2.1)."""
    check_real(psi, "psi", 0.0, 0.5, hi_open=True)
    return (1.0 - psi) / math.sqrt(1.0 - 2.0 * psi)


def corrupt(
    X: torch.Tensor,
    n_bad: int,
    mode: str,
    *,
    noise_std: float = 10.0,
    far_distance: float = 1e3,
    generator: Optional[torch.Generator] = None,
):
    """Corrupt the first ``n_bad`` rows of each sample ``X`` (..., n, d); returns ``(Y, is_bad)``.

    The points are i.i.d., so corrupting the first rows is corrupting a random subset. ``X`` is not
    modified; ``is_bad`` is a bool tensor of shape (n,).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
    n = X.shape[-2]
    check_real(n_bad, "n_bad", 0, n, integer=True)
    is_bad = torch.arange(n, device=X.device) < n_bad
    Y = X.clone()
    if n_bad == 0:
        return Y, is_bad
    if mode == "additive":
        shape = (*X.shape[:-2], n_bad, X.shape[-1])
        # drawn on the generator's device (the CPU in the studies), then moved to X's
        noise = _random.randn(shape, generator=generator, device=X.device, dtype=X.dtype)
        Y[..., :n_bad, :] += noise_std * noise
    else:
        Y[..., :n_bad, 0] += far_distance
    return Y, is_bad


def _generator(seed: int, device) -> torch.Generator:
    # A CPU generator whatever the device: the draws are moved to the device, so a run on a GPU
    # sees the samples of the CPU run (see ._random).
    return _random.generator(seed)


def _gm(Y: torch.Tensor, cfg: GMBreakdownConfig):
    return geometric_median(Y, tol=cfg.gm_tol, max_iter=cfg.gm_max_iter)


def toy_scenes(cfg: GMBreakdownConfig, *, device="cpu", dtype=torch.float64) -> List[dict]:
    """Fig. 5: one 2-D sample, additively corrupted at each panel fraction; mean and median."""
    gen = _generator(cfg.seed, device)
    X = _random.randn((cfg.n, cfg.dim), generator=gen, device=device, dtype=dtype)
    scenes = []
    for psi in cfg.panel_fractions:
        n_bad = round(psi * cfg.n)
        Y, is_bad = corrupt(X, n_bad, "additive", noise_std=cfg.noise_std,
                            far_distance=cfg.far_distance, generator=gen)
        gm = _gm(Y, cfg)
        scenes.append({
            "fraction": n_bad / cfg.n,
            "points": Y.cpu(),
            "is_bad": is_bad.cpu(),
            "true_mean": torch.zeros(cfg.dim, dtype=dtype),
            "estimates": {"mean": Y.mean(-2).cpu(), "geometric median": gm.median.cpu()},
            "converged": bool(gm.converged),
        })
    return scenes


def _quantiles(v: torch.Tensor) -> dict:
    q = torch.quantile(v.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"q10": q[0].item(), "median": q[1].item(), "q90": q[2].item()}


def breakdown_curves(cfg: GMBreakdownConfig, *, device="cpu", dtype=torch.float64) -> List[dict]:
    """Error of the mean and of the geometric median against the corrupted fraction, per mode.

    One record per (mode, fraction, estimator) with the error quantiles over ``seeds`` samples;
    the geometric median's records also carry ``bound_ratio`` (the largest error / Minsker bound
    over the seeds: at most 1 if the bound holds), ``bound_median`` (the bound's median over the
    seeds), ``iterations`` (median Weiszfeld iterations) and ``converged`` (the fraction of the
    seeds whose solver met its tolerance within ``gm_max_iter`` iterations).
    """
    records = []
    for m, mode in enumerate(MODES):
        gen = _generator(cfg.seed + 1 + m, device)
        for psi in cfg.fractions:
            n_bad = round(psi * cfg.n)
            X = _random.randn((cfg.seeds, cfg.n, cfg.dim), generator=gen, device=device, dtype=dtype)
            Y, is_bad = corrupt(X, n_bad, mode, noise_std=cfg.noise_std,
                                far_distance=cfg.far_distance, generator=gen)
            frac = n_bad / cfg.n
            mean_err = torch.linalg.vector_norm(Y.mean(-2), dim=-1)
            gm = _gm(Y, cfg)
            gm_err = torch.linalg.vector_norm(gm.median, dim=-1)
            r = torch.linalg.vector_norm(X[:, ~is_bad, :], dim=-1).amax(-1)  # uncorrupted radius
            bound = minsker_constant(frac) * r
            base = {"mode": mode, "fraction": frac}
            records.append({**base, "estimator": "mean", **_quantiles(mean_err)})
            records.append({
                **base, "estimator": "geometric median", **_quantiles(gm_err),
                "bound_ratio": (gm_err / bound).max().item(),
                "bound_median": bound.median().item(),
                "iterations": gm.n_iter.double().median().item(),
                "converged": gm.converged.double().mean().item(),
            })
    return records


def run(config: Union[str, GMBreakdownConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Both studies at a scale (``"ci"``/``"paper"``) or with a custom config.

    Tables: ``scenes`` (:func:`toy_scenes`) and ``curves`` (:func:`breakdown_curves`);
    ``progress`` is accepted for the common signature (no loop is long).
    """
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=device, dtype=check_dtype(dtype))
    return Result(cfg, scenes=toy_scenes(cfg, **kw), curves=breakdown_curves(cfg, **kw))
