"""Estimating a fixed gradient under alpha-stable noise (chapter 4; Fig. 2 of the workshop paper).

A target ``g_hat ~ N(0, I_d)`` is drawn once per seed. Every iteration draws a sample ``g_t`` whose
coordinates are independent symmetric alpha-stable with location ``g_hat_i`` (skewness 0, scale
``config.scale``), and every online estimator takes one step ``m_{t+1} = step(m_t, g_t, tau)`` from
``m_0 = 0``. The metric is the relative error ``||m_t - g_hat||_2 / ||g_hat||_2``.

The whole experiment is one batched run: the estimates have shape ``(alphas, seeds, d)``, every
noise level and seed advances in the same tensor operation, the noise is drawn in chunks of
``config.chunk`` iterations by one :func:`~median_sgd.sample_stable` call each, and nothing reads
tensor data back to the host inside the loop (value checks are switched off after one validation).
The noise is drawn on the CPU from a generator seeded with ``config.seed`` and moved to the
device, so a run on a GPU sees the samples of the CPU run (its errors agree up to rounding).
:func:`simulate` is that run, returning the error trajectories on the device; :func:`run` turns
them into tidy records for the chapter.

Estimators (``ESTIMATORS``): the paper's three SPP estimators (eqs. 11, 12, 15) -- ``"momentum"``
(``D = ||.||^2/2``, ``beta = 1/(1+tau)``), ``"VClip"`` (``D = ||.||_2``, Clip21) and ``"CClip"``
(``D = ||.||_1``) -- and, as our addition, the three explicit subgradient (SGD, eq. 6) versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .._checks import value_checks
from ..estimators import sgd_step, spp_step
from . import _random
from ._common import Result, check_dtype, check_each, check_fields, progress as progress_bar, resolve_config, scales

__all__ = [
    "ESTIMATORS",
    "PAPER_ESTIMATORS",
    "StableNoiseConfig",
    "CONFIGS",
    "simulate",
    "summarise",
    "run",
]

#: name -> (method, div): one step of ``spp_step`` / ``sgd_step`` with that divergence.
ESTIMATORS: Dict[str, Tuple[str, str]] = {
    "momentum": ("spp", "sq"),  # eq. 11: beta = 1/(1+tau)
    "VClip": ("spp", "l2"),  # eq. 12: m + clip_{tau,2}(g - m) (Clip21)
    "CClip": ("spp", "l1"),  # eq. 15: m + clip_{tau,1}(g - m)
    "momentum (SGD)": ("sgd", "sq"),  # eq. 7: beta = 1 - tau
    "adaptive momentum": ("sgd", "l2"),  # App. B: m + tau (g - m)/||g - m||
    "signed increment": ("sgd", "l1"),  # App. B: m + tau sign(g - m)
}
#: The estimators drawn in the paper's Fig. 2.
PAPER_ESTIMATORS = ("momentum", "VClip", "CClip")

_STEPS = {"spp": spp_step, "sgd": sgd_step}


@dataclass(frozen=True)
class StableNoiseConfig:
    """The experiment's settings (paper: d = 10, tau = 0.01, 1000 iterations, 50 seeds)."""

    seed: int = 0
    dim: int = 10
    steps: int = 1000
    seeds: int = 50
    tau: float = 0.01
    #: the noise levels, as 1/alpha (the paper's x-axis; 0.5 is Gaussian, 1 is Cauchy)
    inv_alphas: Tuple[float, ...] = tuple(round(0.5 + 0.1 * i, 2) for i in range(11))
    scale: float = 1.0  # the stable law's scale (not stated in the paper; scipy's default)
    estimators: Tuple[str, ...] = tuple(ESTIMATORS)
    chunk: int = 100  # iterations of noise drawn per sample_stable call
    curve_every: int = 10  # the convergence records keep every curve_every-th iteration

    def __post_init__(self):
        check_fields(self, ("dim", "steps", "seeds", "chunk", "curve_every"), 1, integer=True)
        check_fields(self, ("tau", "scale"), 0, lo_open=True)
        check_each(self.inv_alphas, "inv_alphas (1/alpha, alpha <= 2)", 0.5)
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            raise ValueError(f"unknown estimators {unknown}; expected some of {list(ESTIMATORS)}")

    @property
    def alphas(self) -> Tuple[float, ...]:
        return tuple(1.0 / a for a in self.inv_alphas)


CONFIGS: Dict[str, StableNoiseConfig] = scales(
    # Both scales run the paper's full size (d, tau, iterations, seeds); the paper scale only
    # samples the noise level twice as finely.
    ci=StableNoiseConfig(),
    paper=StableNoiseConfig(inv_alphas=tuple(round(0.5 + 0.05 * i, 2) for i in range(21))),
)


def simulate(
    config: Union[str, StableNoiseConfig] = "ci",
    *,
    device="cpu",
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One batched run of every estimator, noise level and seed: the timed core of :func:`run`.

    Returns ``(errors, target)`` on ``device``: ``errors[t, e, a, s] = ||m_t - g_hat_s|| /
    ||g_hat_s||`` for ``t = 0..steps`` (``m_0 = 0``, so ``errors[0] = 1``), estimator ``e`` of
    ``config.estimators``, noise level ``a`` of ``config.inv_alphas`` and seed ``s``; ``target``
    holds the ``(seeds, d)`` vectors ``g_hat``. No host synchronisation happens inside the loop
    (on a GPU, time it with ``torch.cuda.synchronize()`` after the call).
    """
    cfg = resolve_config(config, CONFIGS)
    check_dtype(dtype)
    device = torch.device(device)
    # Every draw comes from a CPU generator and is moved to the device: the same numbers on
    # every device (see ._random). The target stays on the CPU too, as the noise's location.
    gen = _random.generator(cfg.seed)
    n_alpha, n_est = len(cfg.inv_alphas), len(cfg.estimators)
    target_cpu = torch.randn(cfg.seeds, cfg.dim, generator=gen, dtype=dtype)
    target = _random.to_device(target_cpu, device)
    target_norm = torch.linalg.vector_norm(target, dim=-1)  # (seeds,)
    alpha = 1.0 / torch.tensor(cfg.inv_alphas, dtype=torch.float64)
    alpha = alpha.view(1, n_alpha, 1, 1)  # broadcasts over (chunk, alphas, seeds, d)
    steps = [(_STEPS[ESTIMATORS[e][0]], ESTIMATORS[e][1]) for e in cfg.estimators]

    m = [torch.zeros(n_alpha, cfg.seeds, cfg.dim, device=device, dtype=dtype) for _ in steps]
    errors = torch.empty(cfg.steps + 1, n_est, n_alpha, cfg.seeds, device=device, dtype=dtype)
    errors[0] = 1.0
    chunks = range(0, cfg.steps, cfg.chunk)
    with value_checks(False):  # inputs validated above; the loop must not sync with the host
        for start in progress_bar(chunks, enabled=progress, desc="stable noise", unit="chunk"):
            k = min(cfg.chunk, cfg.steps - start)
            noise = _random.stable(alpha, (k, n_alpha, cfg.seeds, cfg.dim), loc=target_cpu,
                                   scale=cfg.scale, generator=gen, device=device, dtype=dtype)
            for e, (step, div) in enumerate(steps):
                trajectory = []
                estimate = m[e]
                for i in range(k):
                    estimate = step(estimate, noise[i], cfg.tau, div)
                    trajectory.append(estimate)
                m[e] = estimate
                # (k, alphas, seeds, d) -> relative errors, one reduction per chunk
                dist = torch.linalg.vector_norm(torch.stack(trajectory) - target, dim=-1)
                errors[start + 1 : start + 1 + k, e] = dist / target_norm
    return errors, target


def _summary(x: torch.Tensor) -> dict:
    """min / median / max / mean over the last dimension (the seeds); the median of an even count
    is the mean of the two middle values."""
    return {"min": x.min(-1).values, "median": x.quantile(0.5, dim=-1), "max": x.max(-1).values,
            "mean": x.mean(-1)}


def summarise(cfg: StableNoiseConfig, errors: torch.Tensor) -> Tuple[List[dict], List[dict]]:
    """``(final, curves)``: the seed summaries of :func:`simulate`'s CPU ``errors`` as records.

    ``final``: one record per (noise level, estimator) with the ``min``/``median``/``max``/``mean``
    over seeds of the final relative error (Fig. 2 left). ``curves``: the same summary every
    ``curve_every`` iterations (and at the last one), per noise level and estimator (Fig. 2
    right). Each record also names ``alpha`` and ``inv_alpha`` (= 1/alpha, as configured).
    """
    steps = sorted(set(range(0, cfg.steps + 1, cfg.curve_every)) | {cfg.steps})
    curve = _summary(errors[steps])  # each (len(steps), estimators, alphas)
    last = _summary(errors[-1])
    final: List[dict] = []
    curves: List[dict] = []
    for a, inv_alpha in enumerate(cfg.inv_alphas):
        for e, name in enumerate(cfg.estimators):
            base = {"alpha": 1.0 / inv_alpha, "inv_alpha": inv_alpha, "estimator": name}
            final.append({**base, **{k: v[e, a].item() for k, v in last.items()}})
            for i, t in enumerate(steps):
                curves.append({**base, "step": t, **{k: v[i, e, a].item() for k, v in curve.items()}})
    return final, curves


def run(config: Union[str, StableNoiseConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Fig. 2's experiment (:func:`simulate`), summarised over seeds (:func:`summarise`).

    Tables: ``final`` and ``curves`` (records), ``errors`` (the ``(steps + 1, estimators,
    alphas, seeds)`` tensor of :func:`simulate`, on the CPU) and ``target`` (``(seeds, d)``).
    """
    cfg = resolve_config(config, CONFIGS)
    errors, target = simulate(cfg, device=device, dtype=dtype, progress=progress)
    errors, target = errors.cpu(), target.cpu()  # one transfer
    final, curves = summarise(cfg, errors)
    return Result(cfg, final=final, curves=curves, errors=errors, target=target)


def alpha_index(config: StableNoiseConfig, inv_alphas: Sequence[float]) -> List[int]:
    """Positions of the given 1/alpha values in ``config.inv_alphas`` (for slicing ``errors``)."""
    missing = [a for a in inv_alphas if a not in config.inv_alphas]
    if missing:
        raise ValueError(f"1/alpha values {missing} are not in the config's {config.inv_alphas}")
    return [config.inv_alphas.index(a) for a in inv_alphas]
