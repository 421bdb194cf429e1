"""Beyond the paper (chapter 8): the open questions of the workshop paper answered by experiment.

* :func:`lp_study`: which ``l_p`` median? The SPP step for ``D = ||.||_p``,
  ``m+ = m + clip_{tau,p}(g - m)`` (:func:`~median_sgd.spp_step_lp`), for ``p`` from 1 (CClip) to 2
  (VClip) and beyond, on the Fig. 2 task (``d = 10``, a target ``g_hat ~ N(0, I)``, heavy-tailed or
  contaminated noise). Two step-size rules: the paper's fixed ``tau`` for every ``p``, and a
  *matched* ``tau_p = tau d^(1/q)`` (``1/p + 1/q = 1``) under which every ``p``'s dual ball has the
  vector of entries ``+-tau`` on its boundary (the same step for dense directions). Robustness is
  the final error; speed is the number of iterations until the median error first falls below a
  threshold.
* :func:`batch_size_study`: each iteration draws ``n`` samples, aggregates them (mean or
  coordinate-wise median) and feeds the result to momentum, VClip or CClip.
* :func:`clip21_study`: Clip21 (per-worker VClip on the workers' gradients) against clipping each
  worker's gradient, on a heterogeneous distributed least-squares problem.
* :func:`centered_clipping_study`: iterating the average of per-sample SPP steps (DP-SGD's
  per-sample clipping, re-centred) converges to the geometric median.
* :func:`sign_study`: sign methods follow the median: the expected sign of a sample has the sign of
  its median, not of its mean, and a majority vote of signs is the sign of the coordinate median.

Each study is vectorised over seeds (and noise models, step-size rules) through the estimators'
leading batch dimensions, and returns tidy records; :func:`run` runs them all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .._checks import value_checks
from ..estimators import spp_step, spp_step_lp
from ..medians import coordinate_median, geometric_median
from ..prox import clip_l2, dual_exponent
from . import _random
from ._common import Result, check_dtype, check_each, check_fields, progress as progress_bar, resolve_config, scales

__all__ = [
    "NOISE_MODELS",
    "BeyondConfig",
    "CONFIGS",
    "draw_noise",
    "lp_taus",
    "lp_study",
    "lp_step_seconds",
    "batch_size_study",
    "clip21_study",
    "centered_clipping_study",
    "sign_study",
    "run",
]

#: Noise models of the l_p study: name -> alpha of an i.i.d. stable coordinate law, or None for
#: the contaminated Gaussian (whole samples replaced by far outliers).
NOISE_MODELS: Dict[str, Optional[float]] = {
    "gaussian": 2.0,
    "cauchy": 1.0,
    "stable 2/3": 2.0 / 3.0,
    "contaminated": None,
}

_BATCH_ESTIMATORS = {"momentum": "sq", "VClip": "l2", "CClip": "l1"}
_AGGREGATORS = ("mean", "coordinate median")


@dataclass(frozen=True)
class BeyondConfig:
    """Sizes and settings of the chapter's studies (``ci`` and ``paper`` differ only in sizes)."""

    seed: int = 0
    dim: int = 10
    seeds: int = 20
    # (a) the choice of l_p
    lp_ps: Tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, math.inf)
    lp_steps: int = 1000
    lp_tau: float = 0.01
    lp_noise: Tuple[str, ...] = tuple(NOISE_MODELS)
    lp_threshold: float = 0.3
    contamination: float = 0.1  # fraction of samples replaced by outliers ("contaminated")
    outlier_scale: float = 100.0  # outliers are g_hat + outlier_scale * N(0, I)
    curve_every: int = 10
    chunk: int = 100
    # (b) the sample size n feeding the estimator
    batch_sizes: Tuple[int, ...] = (1, 3, 9, 27)  # odd: the median is the middle sample
    batch_steps: int = 500
    batch_tau: float = 0.02  # tau * steps = 10, as in Fig. 2
    batch_inv_alphas: Tuple[float, ...] = (0.5, 1.0, 1.5)
    # (c) Clip21 on heterogeneous least squares
    clip21_workers: int = 8
    clip21_dim: int = 20
    clip21_rows: int = 30
    clip21_steps: int = 1000
    clip21_tau: float = 0.1
    # (c) centred clipping as a geometric-median solver
    cc_samples: int = 40
    cc_dim: int = 5
    cc_outliers: float = 0.25
    cc_tau: float = 0.05
    cc_steps: int = 2000
    # (c) sign methods
    sign_samples: int = 200_000

    def __post_init__(self):
        check_fields(self, ("dim", "seeds", "lp_steps", "curve_every", "chunk", "batch_steps",
                            "clip21_workers", "clip21_dim", "clip21_rows", "clip21_steps",
                            "cc_samples", "cc_dim", "cc_steps", "sign_samples"), 1, integer=True)
        check_fields(self, ("lp_tau", "batch_tau", "clip21_tau", "cc_tau", "lp_threshold",
                            "outlier_scale"), 0, lo_open=True)
        check_fields(self, ("contamination", "cc_outliers"), 0, 0.5, hi_open=True)
        unknown = [m for m in self.lp_noise if m not in NOISE_MODELS]
        if unknown or not self.lp_noise:
            raise ValueError(f"unknown noise models {unknown}; expected some of {list(NOISE_MODELS)}")
        for p in self.lp_ps:
            dual_exponent(p)  # raises on a bad p
        check_each(self.batch_sizes, "batch_sizes", 1, integer=True)
        check_each(self.batch_inv_alphas, "batch_inv_alphas", 0.5)


CONFIGS: Dict[str, BeyondConfig] = scales(
    ci=BeyondConfig(),
    paper=BeyondConfig(seeds=50, lp_ps=(1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, math.inf),
                          batch_sizes=(1, 3, 9, 27, 81),
                          batch_inv_alphas=(0.5, 0.75, 1.0, 1.25, 1.5)),
)


def _summary(x: torch.Tensor) -> dict:
    """min / median / max over the last dimension (seeds) as tensors; median of an even count is
    the mean of the two middle values."""
    return {"min": x.min(-1).values, "median": x.quantile(0.5, dim=-1), "max": x.max(-1).values}


# ---------------------------------------------------------------------------------------------
# (a) The choice of l_p
# ---------------------------------------------------------------------------------------------


def draw_noise(models, size, *, contamination: float = 0.1, outlier_scale: float = 100.0,
               generator=None, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """Noise of shape ``(k, len(models), *rest)`` for ``size = (k, *rest)`` (vectors last).

    A stable model draws i.i.d. symmetric alpha-stable coordinates (scale 1); ``"contaminated"``
    draws ``N(0, I)`` vectors of which a fraction ``contamination`` is replaced by
    ``outlier_scale * N(0, I)``. Every law is symmetric about 0, so 0 is its (coordinate-wise and
    geometric) median. The noise is drawn on ``generator``'s device and returned on ``device``.
    """
    k, rest = size[0], tuple(size[1:])
    unknown = [m for m in models if m not in NOISE_MODELS]
    if unknown:
        raise ValueError(f"unknown noise models {unknown}; expected some of {list(NOISE_MODELS)}")
    parts = []
    stable = [m for m in models if NOISE_MODELS[m] is not None]
    drawn = {}
    if stable:
        alpha = torch.tensor([NOISE_MODELS[m] for m in stable], dtype=torch.float64)
        X = _random.stable(alpha.view(1, -1, *([1] * len(rest))), (k, len(stable), *rest),
                           generator=generator, device=device, dtype=dtype)
        drawn.update({m: X[:, i] for i, m in enumerate(stable)})
    if "contaminated" in models:
        base = _random.randn((k, *rest), generator=generator, device=device, dtype=dtype)
        far = outlier_scale * _random.randn((k, *rest), generator=generator, device=device, dtype=dtype)
        bad = _random.rand((k, *rest[:-1], 1), generator=generator, device=device) < contamination
        drawn["contaminated"] = torch.where(bad, far, base)
    for m in models:
        parts.append(drawn[m])
    return torch.stack(parts, dim=1)


def lp_taus(cfg: BeyondConfig, p: float) -> Tuple[float, float]:
    """The two step-size rules for ``p``: fixed ``tau`` and matched ``tau d^(1/q)``."""
    q = dual_exponent(p)
    return cfg.lp_tau, cfg.lp_tau * cfg.dim ** (0.0 if q == math.inf else 1.0 / q)


def _steps_to(curve: torch.Tensor, steps: List[int], threshold: float) -> Optional[int]:
    below = (curve <= threshold).nonzero()
    return int(steps[int(below[0])]) if len(below) else None


def lp_study(config: Union[str, BeyondConfig] = "ci", *, device="cpu", dtype=torch.float64,
             progress: bool = False) -> Tuple[List[dict], List[dict]]:
    """SPP with ``D = ||.||_p`` for every ``p`` of the config, both step-size rules, every noise model.

    Returns ``(final, curves)``. ``final``: one record per (p, rule, noise) with the final relative
    error's ``min``/``median``/``max`` over seeds, ``tau``, and ``steps_to_threshold`` (the first
    recorded iteration at which the median relative error is at most ``lp_threshold``, ``None`` if
    never). ``curves``: the median relative error every ``curve_every`` iterations. Every ``p``
    sees the same noise (common random numbers).
    """
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed)
    S, d, M = cfg.seeds, cfg.dim, len(cfg.lp_noise)
    target = _random.randn((S, d), generator=gen, device=device, dtype=dtype)
    target_norm = torch.linalg.vector_norm(target, dim=-1)
    noise_state = gen.get_state()
    rules = ("fixed", "matched")
    record_steps = list(range(0, cfg.lp_steps + 1, cfg.curve_every))
    if record_steps[-1] != cfg.lp_steps:
        record_steps.append(cfg.lp_steps)
    final, curves = [], []
    for p in progress_bar(cfg.lp_ps, enabled=progress, desc="l_p study"):
        gen.set_state(noise_state)  # the same noise for every p
        tau = torch.tensor(lp_taus(cfg, p), device=device, dtype=dtype).view(2, 1, 1)
        m = torch.zeros(2, M, S, d, device=device, dtype=dtype)  # (rules, noise models, seeds, d)
        errors = torch.empty(cfg.lp_steps + 1, 2, M, S, device=device, dtype=dtype)
        errors[0] = 1.0
        with value_checks(False):
            for start in range(0, cfg.lp_steps, cfg.chunk):
                k = min(cfg.chunk, cfg.lp_steps - start)
                noise = draw_noise(cfg.lp_noise, (k, S, d), contamination=cfg.contamination,
                                   outlier_scale=cfg.outlier_scale, generator=gen, device=device,
                                   dtype=dtype) + target
                trajectory = []
                for i in range(k):
                    m = spp_step_lp(m, noise[i], tau, p)
                    trajectory.append(m)
                dist = torch.linalg.vector_norm(torch.stack(trajectory) - target, dim=-1)
                errors[start + 1 : start + 1 + k] = dist / target_norm
        errors = errors.cpu()
        stats = _summary(errors[-1])
        med_curve = errors[record_steps].quantile(0.5, dim=-1)  # (steps, rules, models)
        for r, rule in enumerate(rules):
            for j, noise_name in enumerate(cfg.lp_noise):
                base = {"p": p, "rule": rule, "noise": noise_name}
                final.append({**base, "tau": float(tau[r]), **{k: v[r, j].item() for k, v in stats.items()},
                              "steps_to_threshold": _steps_to(med_curve[:, r, j], record_steps,
                                                              cfg.lp_threshold)})
                for i, t in enumerate(record_steps):
                    curves.append({**base, "step": t, "median": med_curve[i, r, j].item()})
    return final, curves


def lp_step_seconds(p: float, *, batch: Tuple[int, ...] = (2, 4, 20), dim: int = 10,
                    repeat: int = 5, number: int = 20, device="cpu", dtype=torch.float64) -> float:
    """Wall-clock seconds of one batched :func:`~median_sgd.spp_step_lp` call (the best of
    ``repeat`` timings of ``number`` calls), on the l_p study's batch shape."""
    device = torch.device(device)
    gen = _random.generator(0)
    m = torch.zeros(*batch, dim, device=device, dtype=dtype)
    g = _random.stable(1.0, (*batch, dim), generator=gen, device=device, dtype=dtype)
    best = math.inf
    with value_checks(False):
        spp_step_lp(m, g, 0.01, p)  # warm-up
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(number):
                spp_step_lp(m, g, 0.01, p)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - start) / number)
    return best


# ---------------------------------------------------------------------------------------------
# (b) The sample size n
# ---------------------------------------------------------------------------------------------


def _aggregate(samples: torch.Tensor, how: str) -> torch.Tensor:
    return samples.mean(dim=-2) if how == "mean" else coordinate_median(samples)


def batch_size_study(config: Union[str, BeyondConfig] = "ci", *, device="cpu",
                     dtype=torch.float64, progress: bool = False) -> Tuple[List[dict], List[dict]]:
    """Each iteration aggregates ``n`` alpha-stable samples (mean or coordinate-wise median) and
    feeds the aggregate to momentum, VClip and CClip (SPP, ``batch_tau``), for every ``n``.

    Returns ``(final, curves)``: records per (n, aggregator, estimator, inv_alpha) with the final
    relative error's ``min``/``median``/``max`` over seeds and ``samples`` (= n * iterations, the
    cost); ``curves`` holds the median error every ``curve_every`` iterations with its ``samples``.
    """
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed + 1)
    S, d, A = cfg.seeds, cfg.dim, len(cfg.batch_inv_alphas)
    target_cpu = torch.randn((S, d), generator=gen, dtype=dtype)  # also the noise's location
    target = _random.to_device(target_cpu, device)
    target_norm = torch.linalg.vector_norm(target, dim=-1)
    alpha = (1.0 / torch.tensor(cfg.batch_inv_alphas, dtype=torch.float64))
    alpha = alpha.view(1, A, 1, 1, 1)  # over (chunk, alphas, seeds, n, d)
    combos = [(a, e) for a in _AGGREGATORS for e in _BATCH_ESTIMATORS]
    record_steps = list(range(0, cfg.batch_steps + 1, cfg.curve_every))
    if record_steps[-1] != cfg.batch_steps:
        record_steps.append(cfg.batch_steps)
    final, curves = [], []
    for n in progress_bar(cfg.batch_sizes, enabled=progress, desc="sample sizes"):
        m = [torch.zeros(A, S, d, device=device, dtype=dtype) for _ in combos]
        errors = torch.empty(cfg.batch_steps + 1, len(combos), A, S, device=device, dtype=dtype)
        errors[0] = 1.0
        with value_checks(False):
            for start in range(0, cfg.batch_steps, cfg.chunk):
                k = min(cfg.chunk, cfg.batch_steps - start)
                samples = _random.stable(alpha, (k, A, S, n, d), loc=target_cpu.unsqueeze(-2),
                                         generator=gen, device=device, dtype=dtype)
                aggregated = {how: _aggregate(samples, how) for how in _AGGREGATORS}
                for c, (how, est) in enumerate(combos):
                    trajectory, estimate = [], m[c]
                    for i in range(k):
                        estimate = spp_step(estimate, aggregated[how][i], cfg.batch_tau,
                                            _BATCH_ESTIMATORS[est])
                        trajectory.append(estimate)
                    m[c] = estimate
                    dist = torch.linalg.vector_norm(torch.stack(trajectory) - target, dim=-1)
                    errors[start + 1 : start + 1 + k, c] = dist / target_norm
        errors = errors.cpu()
        stats = _summary(errors[-1])
        med_curve = errors[record_steps].quantile(0.5, dim=-1)
        for c, (how, est) in enumerate(combos):
            for a, inv_alpha in enumerate(cfg.batch_inv_alphas):
                base = {"n": n, "aggregator": how, "estimator": est, "inv_alpha": inv_alpha}
                final.append({**base, "samples": n * cfg.batch_steps,
                              **{k: v[c, a].item() for k, v in stats.items()}})
                for i, t in enumerate(record_steps):
                    curves.append({**base, "step": t, "samples": n * t, "median": med_curve[i, c, a].item()})
    return final, curves


# ---------------------------------------------------------------------------------------------
# (c) Connections: Clip21, per-sample clipping (DP-SGD), sign methods
# ---------------------------------------------------------------------------------------------


def clip21_study(config: Union[str, BeyondConfig] = "ci", *, device="cpu",
                 dtype=torch.float64) -> dict:
    """Distributed least squares ``f(x) = mean_i f_i(x)``, ``f_i(x) = ||A_i x - b_i||^2 / (2 r)``,
    with heterogeneous workers. Three methods, step ``1/L``, the same ``tau`` for both clippings:

    * ``"GD"``: ``x <- x - lr mean_i grad f_i(x)``;
    * ``"clipped GD"``: ``x <- x - lr mean_i clip_l2(grad f_i(x), tau)`` (clip each worker);
    * ``"Clip21"``: each worker keeps ``g_i <- spp_step(g_i, grad f_i(x), tau, "l2")`` (VClip
      tracking its own gradient); ``x <- x - lr mean_i g_i`` (Khirirat et al., 2023).

    Returns ``{"steps": ..., "grad_norm": {method: tensor (steps + 1,)}, "distance": {method: ...},
    "worker_grad_norms": tensor (workers,) at the optimum, "tau": ...}``: ``||grad f(x_t)||`` and
    ``||x_t - x*||``.
    """
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed + 2)
    W, d, r = cfg.clip21_workers, cfg.clip21_dim, cfg.clip21_rows
    A = _random.randn((W, r, d), generator=gen, device=device, dtype=dtype)
    # heterogeneous: each worker has its own solution, far from the others'
    x_i = 3.0 * _random.randn((W, d, 1), generator=gen, device=device, dtype=dtype)
    b = A @ x_i + 0.1 * _random.randn((W, r, 1), generator=gen, device=device, dtype=dtype)
    H_i = A.transpose(-1, -2) @ A / r  # (W, d, d): the workers' Hessians
    c_i = (A.transpose(-1, -2) @ b).squeeze(-1) / r  # (W, d): grad f_i(x) = H_i x - c_i
    H = H_i.mean(0)
    x_star = torch.linalg.solve(H, c_i.mean(0))
    lr = 1.0 / torch.linalg.eigvalsh(H).max().item()

    def grads(X):  # X (methods, d) -> (methods, W, d): every worker's gradient at every x
        # elementwise product and sum, not matmul: a BLAS call per tiny step costs more than it
        # computes (and threaded BLAS can stall on a busy machine)
        return (H_i * X[:, None, None, :]).sum(-1) - c_i

    names = ("GD", "clipped GD", "Clip21")
    X = torch.zeros(len(names), d, device=device, dtype=dtype)  # one iterate per method
    g = torch.zeros(W, d, device=device, dtype=dtype)  # Clip21's per-worker estimates
    grad_norms, distances = [], []
    with value_checks(False):
        for t in range(cfg.clip21_steps + 1):
            G = grads(X)
            grad_norms.append(torch.linalg.vector_norm(G.mean(1), dim=-1))
            distances.append(torch.linalg.vector_norm(X - x_star, dim=-1))
            if t == cfg.clip21_steps:
                break
            g = spp_step(g, G[2], cfg.clip21_tau, "l2")  # Clip21: VClip per worker
            direction = torch.stack([G[0].mean(0), clip_l2(G[1], cfg.clip21_tau).mean(0), g.mean(0)])
            X = X - lr * direction
    grad_norm, distance = torch.stack(grad_norms).cpu(), torch.stack(distances).cpu()
    worker_norms = torch.linalg.vector_norm(grads(x_star.unsqueeze(0))[0], dim=-1)
    return {
        "steps": cfg.clip21_steps,
        "tau": cfg.clip21_tau,
        "grad_norm": {name: grad_norm[:, i] for i, name in enumerate(names)},
        "distance": {name: distance[:, i] for i, name in enumerate(names)},
        "worker_grad_norms": worker_norms.cpu(),
        "x_star": x_star.cpu(),
    }


def centered_clipping_study(config: Union[str, BeyondConfig] = "ci", *, device="cpu",
                            dtype=torch.float64) -> dict:
    """Per-sample clipping as SPP steps, on ``n`` points with a fraction of far outliers.

    * DP-SGD's aggregate ``mean_i clip_l2(g_i, tau)`` is ``mean_i spp_step(0, g_i, tau, "l2")``:
      one SPP step per sample from ``m = 0``;
    * re-centring at the current estimate and iterating,
      ``m <- mean_i spp_step(m, g_i, tau, "l2") = m + mean_i clip_l2(g_i - m, tau)`` (centred
      clipping), has the fixed points ``sum_i clip_l2(g_i - m, tau) = 0``: the geometric median's
      optimality condition as soon as no point lies within ``tau`` of ``m``.

    Batched over ``seeds`` independent samples; centred clipping starts at the coordinate-wise
    median. Returns the samples, the DP-SGD aggregate at ``tau`` (from 0), the centred-clipping
    iterates' distance to the geometric median (computed by Weiszfeld to ``tol = 1e-12``) at every
    step, the mean, the coordinate median and the smallest distance from the geometric median to a
    sample (the fixed point is the geometric median when it exceeds ``tau``).
    """
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed + 3)
    S, n, d = cfg.seeds, cfg.cc_samples, cfg.cc_dim
    center = 3.0 * _random.randn((S, 1, d), generator=gen, device=device, dtype=dtype)
    G = center + _random.randn((S, n, d), generator=gen, device=device, dtype=dtype)
    k = int(round(cfg.cc_outliers * n))
    G[:, :k] += 50.0 * _random.randn((S, 1, d), generator=gen, device=device, dtype=dtype)  # a far cluster
    gm = geometric_median(G, tol=1e-12, max_iter=10_000).median
    m = coordinate_median(G)  # a robust start: the averaged step has norm <= tau
    dist = torch.empty(cfg.cc_steps + 1, S, device=device, dtype=dtype)
    dist[0] = torch.linalg.vector_norm(m - gm, dim=-1)
    with value_checks(False):
        for t in range(cfg.cc_steps):
            # the n per-sample SPP steps from the common centre m, averaged
            m = spp_step(m.unsqueeze(-2), G, cfg.cc_tau, "l2").mean(dim=-2)
            dist[t + 1] = torch.linalg.vector_norm(m - gm, dim=-1)
    dp = spp_step(torch.zeros_like(G), G, cfg.cc_tau, "l2").mean(dim=-2)  # from 0
    return {
        "samples": G.cpu(),
        "outliers": k,
        "geometric_median": gm.cpu(),
        "centered_clipping": m.cpu(),
        "distance": dist.cpu(),
        "dp_aggregate": dp.cpu(),
        "mean": G.mean(dim=-2).cpu(),
        "coordinate_median": coordinate_median(G).cpu(),
        "inlier_center": center.squeeze(-2).cpu(),
        "min_distance": torch.linalg.vector_norm(G - gm.unsqueeze(-2), dim=-1).min(-1).values.cpu(),
        "tau": cfg.cc_tau,
    }


def sign_study(config: Union[str, BeyondConfig] = "ci", *, device="cpu",
               dtype=torch.float64) -> List[dict]:
    """Sign methods estimate the median's sign: three skewed 1-D laws whose mean and median have
    opposite signs. For each, the mean and median of ``sign_samples`` draws, the average of
    ``sign(g)`` (what signSGD follows in expectation) and of one CClip step from 0 with a tiny
    ``tau`` (``spp_step(0, g, tau, "l1") / tau``)."""
    cfg = resolve_config(config, CONFIGS)
    device = torch.device(device)
    gen = _random.generator(cfg.seed + 4)
    N = cfg.sign_samples
    u = _random.rand(N, generator=gen, device=device, dtype=dtype)
    laws = {
        # -0.5 with probability 0.8, +10 with probability 0.2: mean +1.6, median -0.5
        "two-point": torch.where(u < 0.8, -0.5, 10.0).to(dtype),
        # a shifted exponential: mean +0.5, median log(2) - 0.5 + ... < 0
        "exponential - 0.8": _random.to_device(torch.empty(N, dtype=dtype).exponential_(generator=gen),
                                               device) - 0.8,
        # a lognormal shifted by its median minus 0.3: median -0.3, mean e^(1/2) - 1.3 > 0
        "lognormal - 1.3": torch.exp(_random.randn(N, generator=gen, device=device, dtype=dtype)) - 1.3,
    }
    tau = 1e-6
    records = []
    for name, g in laws.items():
        step = spp_step(torch.zeros(N, 1, device=device, dtype=dtype), g.unsqueeze(-1), tau, "l1")
        records.append({
            "law": name,
            "mean": g.mean().item(),
            "median": g.median().item(),
            "mean sign": torch.sign(g).mean().item(),
            "mean CClip step / tau": (step.squeeze(-1) / tau).mean().item(),
        })
    return records


def run(config: Union[str, BeyondConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Every study of the chapter at a scale (``"ci"``/``"paper"``) or with a custom config.

    Tables: ``lp``, ``lp_curves`` (:func:`lp_study`), ``batch``, ``batch_curves``
    (:func:`batch_size_study`), ``clip21``, ``centered`` (dicts) and ``sign``.
    """
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=device, dtype=check_dtype(dtype))
    lp, lp_curves = lp_study(cfg, progress=progress, **kw)
    batch, batch_curves = batch_size_study(cfg, progress=progress, **kw)
    return Result(
        cfg, lp=lp, lp_curves=lp_curves, batch=batch, batch_curves=batch_curves,
        clip21=clip21_study(cfg, **kw),
        centered=centered_clipping_study(cfg, **kw),
        sign=sign_study(cfg, **kw),
    )
