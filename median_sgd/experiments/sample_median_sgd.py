"""SGD along the median gradient across samples (chapter 5, "The median gradient across samples").

The test problem is a strongly convex quadratic ``f(w) = (w - w*)^T H (w - w*) / 2`` with
``H = diag(h)``, ``h`` evenly spaced in ``[h_min, h_max]``, and a noisy oracle whose noise is
heavy-tailed and *state-dependent* (its scale grows with the distance to the solution)::

    g(w) = H (w - w*) + sigma(w) xi,    sigma(w) = sigma0 + sigma1 ||w - w*||,

where ``xi`` has i.i.d. coordinates: symmetric alpha-stable (``noise="stable"``) or a centred
Pareto law (``noise="pareto"``, skewed, mean 0, median below 0). Every step draws ``n`` samples
``g_1..g_n`` at the current point, aggregates them (``"mean"``, ``"coordinate median"`` or
``"geometric median"``, :data:`ESTIMATORS`) and takes ``w <- w - eta_t m``, with
``eta_t = eta0 / (1 + t / t0)`` (``t0 = None``: a constant step). Everything is written in terms
of the error ``e = w - w*``.

Studies (each a function of the config; :func:`run` runs them all):

* :func:`stationary_study`: constant steps, state-independent symmetric alpha-stable noise. For
  mean-SGD started at ``e_0 = 0`` the law of every coordinate of ``e_T`` is alpha-stable with the
  closed-form scale :func:`stationary_scale`, which does not shrink with the step when
  ``alpha <= 1``. The median-SGD spread is measured alongside.
* :func:`tail_study`: decreasing steps, state-dependent noise, a grid of tail indices: the error
  trajectories of the three estimators (mean-SGD blows up once ``alpha <= 1``).
* :func:`sample_size_study`: one heavy tail (``alpha = 1/2``), the coordinate median of a growing
  number of samples ``n``: it takes ``alpha (k + 1) > 2`` (``n = 2k + 1``) for a finite variance.
* :func:`skew_study`: skewed Pareto noise: median-SGD converges to where the *expected sample
  median* of the gradient vanishes, ``e = -sigma0 b_n / h`` with ``b_n`` in closed form
  (:func:`pareto_median_mean`), not to the minimiser of ``f``; mean-SGD converges to ``w*``.
* :func:`gm_passes_study`: the geometric median of a fixed sample by passes of the online SPP step
  ``m <- m + clip_l2(G_i - m, tau)`` over its rows (incremental proximal point) against
  Weiszfeld's iteration, in relative objective gap per pass.

All seeds (and noise levels, step sizes, sample sizes) are leading batch dimensions of one tensor;
nothing inside the loops reads tensor data back to the host. The studies draw their noise from CPU
generators (seeded by the config) and move it to the device, so a run on a GPU sees the samples of
the CPU run and its records agree with the CPU's up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .._checks import value_checks
from ..estimators import sgd_step, spp_step
from ..medians import coordinate_median, geometric_median, geometric_median_objective
from .._checks import check_real
from . import _random
from ._common import Result, check_dtype, check_each, check_fields, progress as progress_bar, resolve_config, scales
from ._common import single_threaded_on_cpu as _single_threaded_on_cpu

__all__ = [
    "ESTIMATORS",
    "NOISES",
    "DIVERGED",
    "GM_METHODS",
    "SampleMedianSGDConfig",
    "CONFIGS",
    "aggregate",
    "curvatures",
    "stationary_scale",
    "pareto_median_mean",
    "median_interval",
    "simulate",
    "stationary_study",
    "tail_study",
    "sample_size_study",
    "skew_study",
    "gm_passes_study",
    "run",
]

ESTIMATORS = ("mean", "coordinate median", "geometric median")
NOISES = ("stable", "pareto")
#: the pooled median's interval in the stationary study spans this many standard errors of the
#: binomial count below the median (a distribution-free confidence interval; see
#: :func:`median_interval`)
POOLED_Z = 4.0
#: errors above this count as diverged: the run is frozen there and recorded at this value
#: (in float32, whose range is smaller, at the square root of its largest value)
DIVERGED = 1e100


def _diverged_cap(dtype: torch.dtype) -> float:
    return min(DIVERGED, float(torch.finfo(dtype).max) ** 0.5)
#: the online estimators of the geometric-median study: name -> (step, tau schedule)
GM_METHODS: Dict[str, Tuple[str, str]] = {
    "SPP, constant tau": ("spp", "constant"),
    "SPP, tau0/sqrt(p)": ("spp", "sqrt"),
    "SPP, tau0/p": ("spp", "inverse"),
    "SGD, tau0/p": ("sgd", "inverse"),
}


@dataclass(frozen=True)
class SampleMedianSGDConfig:
    """Sizes and settings of the chapter's studies (the two scales differ only in sizes)."""

    seed: int = 0
    dim: int = 10
    h_min: float = 1.0  # H = diag(linspace(h_min, h_max, dim))
    h_max: float = 4.0
    n: int = 5  # samples per step
    gm_iters: int = 10  # Weiszfeld iterations of the geometric median in SGD (fixed, sync-free)
    # Stationary spread: constant steps, additive symmetric alpha-stable noise, e_0 = 0.
    stationary_alphas: Tuple[float, ...] = (2.0, 1.5, 1.0, 0.75)
    stationary_etas: Tuple[float, ...] = (0.2, 0.1, 0.05, 0.02)
    stationary_steps: int = 300
    stationary_seeds: int = 80
    # Tail study: state-dependent noise, decreasing steps, e_0 = start * (1, ..., 1).
    alphas: Tuple[float, ...] = (2.0, 1.5, 1.25, 1.0, 0.85, 0.75)
    steps: int = 800
    seeds: int = 40
    sigma0: float = 1.0
    sigma1: float = 1.0
    eta0: float = 0.2
    t0: float = 20.0
    start: float = 3.0
    curve_every: int = 10
    # Sample-size study: one heavy tail, the coordinate median of n samples.
    size_alpha: float = 0.5
    sizes: Tuple[int, ...] = (3, 5, 7, 9, 15)
    # Skew study: centred Pareto noise of tail index skew_tail (additive, sigma1 = 0).
    skew_tail: float = 1.5
    skew_sizes: Tuple[int, ...] = (1, 3, 5, 11, 21)
    skew_steps: int = 1000
    skew_seeds: int = 100
    # Geometric median of a fixed sample: SPP passes against Weiszfeld.
    gm_alpha: float = 1.0
    gm_n: int = 100
    gm_seeds: int = 20
    passes: int = 32
    spp_tau0: float = 0.1  # tau0 relative to the sample's scale (median distance to its median)
    weiszfeld_iters: int = 32

    def __post_init__(self):
        check_fields(self, ("dim", "n", "gm_iters", "stationary_steps", "stationary_seeds", "steps",
                            "seeds", "curve_every", "skew_steps", "skew_seeds", "gm_n", "gm_seeds",
                            "passes", "weiszfeld_iters"), 1, integer=True)
        check_fields(self, ("h_min", "h_max", "sigma0", "eta0", "start", "spp_tau0", "t0"), 0, lo_open=True)
        check_real(self.h_max, "h_max", self.h_min)
        check_real(self.sigma1, "sigma1", 0)
        for name in ("stationary_alphas", "alphas"):
            _check_alphas(getattr(self, name), name)
        _check_alphas((self.size_alpha, self.gm_alpha), "size_alpha/gm_alpha")
        if not self.stationary_etas or not all(0 < e and e * self.h_max < 2 for e in self.stationary_etas):
            raise ValueError(
                f"stationary_etas must be > 0 with eta * h_max < 2 (a stable recursion), got "
                f"{self.stationary_etas}")
        for name in ("sizes", "skew_sizes"):
            sizes = getattr(self, name)
            check_each(sizes, name, 1, integer=True)
            if not all(k % 2 == 1 for k in sizes):
                raise ValueError(f"{name} must be odd sample sizes >= 1, got {sizes}")
        check_real(self.skew_tail, "skew_tail (> 1: a finite mean)", 1, lo_open=True)


def _check_alphas(alphas, name):
    check_each(alphas, f"{name} (tail indices)", 0, 2, lo_open=True)


CONFIGS: Dict[str, SampleMedianSGDConfig] = scales(
    ci=SampleMedianSGDConfig(),
    paper=SampleMedianSGDConfig(
        stationary_steps=1000,
        stationary_seeds=2000,
        steps=10_000,
        seeds=1000,
        curve_every=50,
        alphas=(2.0, 1.75, 1.5, 1.25, 1.0, 0.9, 0.85, 0.8, 0.75),
        sizes=(3, 5, 7, 9, 11, 15, 21),
        skew_steps=10_000,
        skew_seeds=1000,
        skew_sizes=(1, 3, 5, 7, 11, 21, 51),
        gm_n=1000,
        gm_seeds=100,
        passes=256,
    ),
)


# --------------------------------------------------------------------------------------------
# Closed forms


def curvatures(cfg: SampleMedianSGDConfig, *, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """The diagonal ``h`` of ``H``: ``dim`` values evenly spaced in ``[h_min, h_max]``."""
    return torch.linspace(cfg.h_min, cfg.h_max, cfg.dim, device=device, dtype=dtype)


def stationary_scale(alpha, eta, h, *, sigma=1.0, n: int = 1, steps: Optional[int] = None):
    """Scale of the alpha-stable law of ``e_T`` for mean-SGD on ``h e^2 / 2`` from ``e_0 = 0``.

    ``e_{t+1} = (1 - eta h) e_t - eta sigma xbar_t``, ``xbar_t`` the mean of ``n`` standard
    symmetric alpha-stable samples, which is alpha-stable of scale ``n^(1/alpha - 1)``. Unrolled,
    ``e_T = -eta sigma sum_{k<T} (1 - eta h)^k xbar_{T-1-k}``, a sum of independent stable
    variables, hence stable of scale ``eta sigma n^(1/alpha-1) (sum_k |1 - eta h|^(alpha k))^(1/alpha)``:
    ``eta sigma n^(1/alpha-1) ((1 - r^T) / (1 - r))^(1/alpha)`` with ``r = |1 - eta h|^alpha``
    (``steps=None``: ``T = infinity``, the stationary law). Arguments broadcast (numbers or
    tensors); ``0 < eta h < 2`` is required for ``r < 1``.
    """
    alpha, eta, h, sigma = (torch.as_tensor(v, dtype=torch.float64) for v in (alpha, eta, h, sigma))
    r = (1 - eta * h).abs() ** alpha
    if bool((r >= 1).any()):
        raise ValueError("stationary_scale needs 0 < eta h < 2 (|1 - eta h| < 1)")
    total = 1 / (1 - r) if steps is None else (1 - r**steps) / (1 - r)
    return eta * sigma * n ** (1 / alpha - 1) * total ** (1 / alpha)


def pareto_median_mean(tail: float, n: int) -> float:
    """``E[median of n i.i.d. Pareto(1, tail)]`` for odd ``n = 2k + 1`` (closed form).

    ``P = U^(-1/tail)`` with ``U`` uniform, and the median of the ``P_i`` is ``U_(k+1)^(-1/tail)``,
    ``U_(k+1) ~ Beta(k + 1, k + 1)``; ``E[U^(-s)] = B(k + 1 - s, k + 1) / B(k + 1, k + 1)``, so
    ``Gamma(k + 1 - s) Gamma(2k + 2) / (Gamma(2k + 2 - s) Gamma(k + 1))`` with ``s = 1/tail``.
    ``n = 1`` gives the mean ``tail / (tail - 1)``; ``n -> infinity`` the median ``2^(1/tail)``.
    Finite when ``tail (k + 1) > 1``.
    """
    if check_real(n, "n", 1, integer=True) % 2 == 0:
        raise ValueError(f"n must be an odd int >= 1, got {n!r}")
    k, s = (n - 1) // 2, 1.0 / tail
    if not (tail > 0 and k + 1 - s > 0):
        raise ValueError(f"the median of {n} Pareto({tail}) samples has no finite mean")
    return math.exp(math.lgamma(k + 1 - s) + math.lgamma(2 * k + 2)
                    - math.lgamma(2 * k + 2 - s) - math.lgamma(k + 1))


def median_interval(values: torch.Tensor, z: float = POOLED_Z) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)``: order statistics ``v_(i) <= v_(j)`` of the last dimension (``N`` values)
    with ``i = ceil(N/2 - z sqrt(N)/2)`` and ``j = floor(N/2 + z sqrt(N)/2) + 1`` (1-based, clamped
    to ``1..N``).

    For i.i.d. values with median ``m`` (a continuous law), the count ``B`` of values below ``m``
    is Binomial(N, 1/2), and ``v_(i) < m < v_(j)`` exactly when ``i <= B <= j - 1``, i.e. when
    ``B`` is within ``z`` standard errors (``sqrt(N)/2``) of ``N/2``: a confidence interval for
    the median that needs nothing of the law (its coverage is ``P(|B - N/2| <= z sqrt(N)/2)``,
    about ``1 - 6e-5`` for ``z = 4``).
    """
    check_real(z, "z", 0, lo_open=True)
    N = values.shape[-1]
    if N < 1:
        raise ValueError("median_interval needs at least one value")
    half = z * math.sqrt(N) / 2
    i = min(max(math.ceil(N / 2 - half), 1), N)
    j = min(max(math.floor(N / 2 + half) + 1, 1), N)
    ordered = values.sort(dim=-1).values
    return ordered[..., i - 1], ordered[..., j - 1]


# --------------------------------------------------------------------------------------------
# The simulation


def aggregate(G: torch.Tensor, estimator: str, *, gm_iters: int = 10) -> torch.Tensor:
    """``(..., n, d) -> (..., d)``: the mean, coordinate-wise median or geometric median of the rows.

    The geometric median runs ``gm_iters`` Weiszfeld iterations from the mean
    (``fixed_iter=True``: no host synchronisation).
    """
    if estimator == "mean":
        return G.mean(dim=-2)
    if estimator == "coordinate median":
        return coordinate_median(G)
    if estimator == "geometric median":
        return geometric_median(G, max_iter=gm_iters, fixed_iter=True).median
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")


def _noise(kind: str, alpha, size, *, tail: float, gen, device, dtype) -> torch.Tensor:
    """Noise drawn on ``gen``'s device (the CPU for the studies) and returned on ``device``."""
    if kind == "stable":
        return _random.stable(alpha, size, generator=gen, device=device, dtype=dtype)
    # Centred Pareto(1, tail): U^(-1/tail) - tail/(tail - 1), mean 0, median 2^(1/tail) - mean.
    u = _random.rand(size, generator=gen, device=device, dtype=dtype)
    return (1 - u) ** (-1.0 / tail) - tail / (tail - 1)


@_single_threaded_on_cpu
def simulate(
    *,
    estimator: str,
    batch: Tuple[int, ...],
    n,
    h: torch.Tensor,
    steps: int,
    eta0: float,
    t0: Optional[float],
    sigma0: float,
    sigma1: float,
    start: float,
    noise: str = "stable",
    alpha=2.0,
    tail: float = 1.5,
    gm_iters: int = 10,
    generator: torch.Generator,
    record_every: int = 1,
    average_from: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, torch.Tensor]:
    """Run SGD along the aggregate of ``n`` oracle samples for a batch of independent problems.

    ``batch`` is the shape of the independent runs (for example ``(alphas, seeds)``); ``alpha``
    (``noise="stable"``) is a number or a tensor broadcasting against ``(*batch, n, d)`` (for
    example one tail index per row); ``n`` is one int. The noise is drawn on ``generator``'s
    device (a CPU generator gives the same run on every device) and moved to ``h``'s device.
    Returns, on ``h``'s device:

    * ``"errors"``: ``(records, *batch)``, ``||e_t||`` at ``t = 0, record_every, ..., steps``
      (diverged runs, ``||e|| > DIVERGED`` or not finite, are frozen and recorded as ``DIVERGED``;
      in float32 the cap is ``sqrt(finfo.max)`` instead);
    * ``"final"``: ``(*batch, d)``, the last error vector ``e_T``;
    * ``"average"``: ``(*batch, d)``, the mean of ``e_t`` over ``t = average_from..steps``
      (Polyak-Ruppert tail average; ``None``: the second half);
    * ``"diverged"``: ``(*batch,)`` bool.
    """
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; expected one of {', '.join(NOISES)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    check_real(n, "n", 1, integer=True)
    device, dtype = h.device, h.dtype
    d = h.shape[-1]
    e = torch.full((*batch, d), float(start), device=device, dtype=dtype)
    diverged = torch.zeros(batch, dtype=torch.bool, device=device)
    if isinstance(alpha, torch.Tensor):  # where the noise is drawn
        alpha = alpha.to(device=generator.device, dtype=torch.float64)
    average_from = steps // 2 if average_from is None else average_from
    cap = _diverged_cap(dtype)
    total = torch.zeros_like(e)
    records = [torch.linalg.vector_norm(e, dim=-1)]
    with value_checks(False):  # everything below is validated; the loop must not sync
        for t in progress_bar(range(steps), enabled=progress, desc=f"{estimator}, n={n}"):
            eta = eta0 if t0 is None else eta0 / (1.0 + t / t0)
            scale = sigma0 + sigma1 * torch.linalg.vector_norm(e, dim=-1, keepdim=True)  # (*batch, 1)
            xi = _noise(noise, alpha, (*batch, n, d), tail=tail, gen=generator, device=device,
                        dtype=dtype)
            G = (h * e).unsqueeze(-2) + scale.unsqueeze(-1) * xi  # (*batch, n, d): the n samples
            step = eta * aggregate(G, estimator, gm_iters=gm_iters)
            new = e - step
            norm = torch.linalg.vector_norm(new, dim=-1)
            diverged = diverged | ~(norm <= cap)  # NaN compares False
            e = torch.where(diverged.unsqueeze(-1), e, new)
            if t + 1 >= average_from:
                total = total + e
            if (t + 1) % record_every == 0 or t + 1 == steps:
                records.append(torch.where(diverged, cap, torch.linalg.vector_norm(e, dim=-1)))
    count = steps - max(average_from, 1) + 1
    return {"errors": torch.stack(records), "final": e, "average": total / count,
            "diverged": diverged}


def _quantiles(x: torch.Tensor, dim: int = -1) -> Dict[str, torch.Tensor]:
    q = torch.quantile(x.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64,
                                                device=x.device), dim=dim)
    return {"q10": q[0], "median": q[1], "q90": q[2]}


def _record_steps(steps: int, every: int) -> List[int]:
    return sorted(set(range(0, steps + 1, every)) | {steps})


# --------------------------------------------------------------------------------------------
# Studies


@_single_threaded_on_cpu
def stationary_study(cfg: SampleMedianSGDConfig, *, device="cpu", dtype=torch.float64,
                     progress: bool = False) -> List[dict]:
    """Constant steps, additive alpha-stable noise, ``e_0 = 0``: the spread of ``e_T``.

    One record per (alpha, eta, estimator) with

    * ``spread``: the median over seeds of ``|e_T|`` in the flattest coordinate (``h = h_min``);
    * ``spread_low``, ``spread_high``: the distribution-free confidence interval of
      :func:`median_interval` (``z = POOLED_Z``) for the median that ``spread`` estimates (from
      ``stationary_seeds`` values only: much wider than the pooled one below);
    * ``scale`` (mean only): the closed-form :func:`stationary_scale` of that coordinate at ``T``,
      so that ``spread`` should be ``scale`` times the 3/4-quantile of the standard stable law;
    * ``pooled``: the median over seeds *and* coordinates of ``|e_T,j| / s_j``, with ``s_j`` the
      closed-form scale for the mean (so ``pooled`` estimates that 3/4-quantile from
      ``seeds * dim`` values) and ``s_j = sqrt(eta / (h_j (2 - eta h_j)))`` for the median (the
      stationary standard deviation for noise of unit variance: ``pooled`` is then flat in
      ``eta`` when the median's noise has a finite variance);
    * ``pooled_low``, ``pooled_high``: a distribution-free confidence interval for the median that
      ``pooled`` estimates (:func:`median_interval` of the same values, ``z = POOLED_Z``): the
      closed form's 3/4-quantile lies in it unless the count of values below that quantile is
      more than ``POOLED_Z`` standard errors from half of them.
    """
    gen = _random.generator(cfg.seed)
    h = curvatures(cfg, device=device, dtype=dtype)
    alphas = torch.tensor(cfg.stationary_alphas, dtype=torch.float64)  # on the CPU, as the draws
    etas = torch.tensor(cfg.stationary_etas, dtype=dtype, device=device)
    A, E, S, n, d = len(alphas), len(etas), cfg.stationary_seeds, cfg.n, cfg.dim
    alpha_b = alphas.view(A, 1, 1, 1, 1)
    eta_b = etas.view(1, E, 1, 1)
    errs = {est: torch.zeros(A, E, S, d, device=device, dtype=dtype)
            for est in ("mean", "coordinate median")}
    with value_checks(False):
        for _ in progress_bar(range(cfg.stationary_steps), enabled=progress, desc="stationary"):
            xi = _random.stable(alpha_b, (A, E, S, n, d), generator=gen, device=device, dtype=dtype)
            for est, e in errs.items():  # both estimators see the same noise
                errs[est] = (1 - eta_b * h) * e - eta_b * aggregate(xi, est)
    scale = stationary_scale(alphas.view(A, 1, 1), etas.view(1, E, 1).cpu(), h.cpu(), n=n,
                             steps=cfg.stationary_steps)  # (A, E, d)
    eta_h = etas.view(1, E, 1).cpu() * h.cpu()
    gauss = torch.sqrt(etas.view(1, E, 1).cpu() / (h.cpu() * (2 - eta_h)))  # (1, E, d)
    records = []
    for est, e in errs.items():
        e = e.abs().cpu()  # (A, E, S, d)
        spread = e[..., 0].median(dim=-1).values  # (A, E)
        spread_low, spread_high = median_interval(e[..., 0], POOLED_Z)
        ref = scale if est == "mean" else gauss.expand(A, E, d)
        values = (e / ref.unsqueeze(2)).flatten(2)  # (A, E, S * d)
        pooled = values.median(dim=-1).values  # (A, E)
        low, high = median_interval(values, POOLED_Z)
        for a, alpha in enumerate(cfg.stationary_alphas):
            for i, eta in enumerate(cfg.stationary_etas):
                rec = {"alpha": alpha, "eta": eta, "estimator": est, "h": float(h[0]),
                       "spread": spread[a, i].item(), "spread_low": spread_low[a, i].item(),
                       "spread_high": spread_high[a, i].item(), "pooled": pooled[a, i].item(),
                       "pooled_low": low[a, i].item(), "pooled_high": high[a, i].item()}
                if est == "mean":
                    rec["scale"] = scale[a, i, 0].item()
                records.append(rec)
    return records


@_single_threaded_on_cpu
def tail_study(cfg: SampleMedianSGDConfig, *, device="cpu", dtype=torch.float64,
               progress: bool = False) -> Tuple[List[dict], List[dict]]:
    """State-dependent alpha-stable noise, decreasing steps: ``(final, curves)`` records.

    ``final``: per (alpha, estimator) the 10/50/90% quantiles over seeds of ``||e_T||`` and the
    fraction of diverged runs. ``curves``: the same quantiles every ``curve_every`` steps.
    Every estimator sees its own noise stream (the same seed for each).
    """
    h = curvatures(cfg, device=device, dtype=dtype)
    alphas = torch.tensor(cfg.alphas, dtype=torch.float64).view(-1, 1, 1, 1)
    final, curves = [], []
    steps = _record_steps(cfg.steps, cfg.curve_every)
    for est in ESTIMATORS:
        gen = _random.generator(cfg.seed + 1)
        out = simulate(estimator=est, batch=(len(cfg.alphas), cfg.seeds), n=cfg.n, h=h,
                       steps=cfg.steps, eta0=cfg.eta0, t0=cfg.t0, sigma0=cfg.sigma0,
                       sigma1=cfg.sigma1, start=cfg.start, alpha=alphas, gm_iters=cfg.gm_iters,
                       generator=gen, record_every=cfg.curve_every, progress=progress)
        errors = out["errors"].cpu()  # (len(steps), A, S)
        q = _quantiles(errors)
        div = out["diverged"].double().mean(-1).cpu()
        for a, alpha in enumerate(cfg.alphas):
            base = {"alpha": alpha, "estimator": est}
            final.append({**base, **{k: v[-1, a].item() for k, v in q.items()},
                          "diverged": div[a].item()})
            for i, t in enumerate(steps):
                curves.append({**base, "step": t, **{k: v[i, a].item() for k, v in q.items()}})
    return final, curves


@_single_threaded_on_cpu
def sample_size_study(cfg: SampleMedianSGDConfig, *, device="cpu", dtype=torch.float64,
                      progress: bool = False) -> List[dict]:
    """Coordinate-median SGD under the tail ``size_alpha`` for each sample size ``n`` in ``sizes``.

    Records per ``n``: quantiles over seeds of ``||e_T||``, the diverged fraction, and ``k + 1``
    times alpha (``n = 2k + 1``), which must exceed 2 for the median's variance to be finite.
    """
    h = curvatures(cfg, device=device, dtype=dtype)
    records = []
    for n in cfg.sizes:
        gen = _random.generator(cfg.seed + 2)
        out = simulate(estimator="coordinate median", batch=(cfg.seeds,), n=n, h=h,
                       steps=cfg.steps, eta0=cfg.eta0, t0=cfg.t0, sigma0=cfg.sigma0,
                       sigma1=cfg.sigma1, start=cfg.start, alpha=cfg.size_alpha,
                       generator=gen, record_every=cfg.steps, progress=progress)
        q = _quantiles(out["errors"][-1].cpu())
        records.append({"n": n, "alpha": cfg.size_alpha, "tail_exponent": cfg.size_alpha * (n + 1) / 2,
                        **{k: v.item() for k, v in q.items()},
                        "diverged": out["diverged"].double().mean().item()})
    return records


@_single_threaded_on_cpu
def skew_study(cfg: SampleMedianSGDConfig, *, device="cpu", dtype=torch.float64,
               progress: bool = False) -> List[dict]:
    """Skewed (centred Pareto) additive noise: where mean-SGD and median-SGD settle.

    For each ``n`` in ``skew_sizes`` and estimator (mean, coordinate median), the tail-averaged
    iterate of each seed is normalised per coordinate, ``z_j = h_j e_j / sigma0``, and averaged
    over coordinates: the records hold the mean and standard error over seeds of that ``z``, and
    ``predicted``: ``0`` for the mean, ``-b_n`` for the median, with
    ``b_n = E[median of n noise samples] = pareto_median_mean(tail, n) - tail / (tail - 1)``.
    """
    h = curvatures(cfg, device=device, dtype=dtype)
    mean_p = cfg.skew_tail / (cfg.skew_tail - 1)
    records = []
    for n in cfg.skew_sizes:
        for est in ("mean", "coordinate median"):
            gen = _random.generator(cfg.seed + 3)
            out = simulate(estimator=est, batch=(cfg.skew_seeds,), n=n, h=h, steps=cfg.skew_steps,
                           eta0=cfg.eta0, t0=cfg.t0, sigma0=cfg.sigma0, sigma1=0.0,
                           start=cfg.start, noise="pareto", tail=cfg.skew_tail, generator=gen,
                           record_every=cfg.skew_steps, progress=progress)
            z = (h * out["average"] / cfg.sigma0).mean(-1).cpu()  # (seeds,)
            bias = pareto_median_mean(cfg.skew_tail, n) - mean_p if est != "mean" else 0.0
            records.append({"n": n, "estimator": est, "z": z.mean().item(),
                            "stderr": (z.std() / math.sqrt(len(z))).item(),
                            "predicted": -bias})
    return records


@_single_threaded_on_cpu
def gm_passes_study(cfg: SampleMedianSGDConfig, *, device="cpu", dtype=torch.float64,
                    progress: bool = False) -> List[dict]:
    """Geometric median of a fixed alpha-stable sample: online passes against Weiszfeld.

    ``G`` is ``(gm_seeds, gm_n, dim)``. Reference: ``geometric_median`` run to ``tol=1e-12``.
    Weiszfeld: ``geometric_median(G, max_iter=k, tol=0, fixed_iter=True)`` for
    ``k = 1..weiszfeld_iters`` (one iteration reads the sample once, like a pass). Online: every
    pass visits the rows in a fresh random order per seed and applies
    ``spp_step(m, G_i, tau_p, "l2")`` (or ``sgd_step``), ``m_0`` the sample mean, with
    ``tau_p = tau0``, ``tau0 / sqrt(p)`` or ``tau0 / p`` at pass ``p``; ``tau0`` is ``spp_tau0``
    times the sample's scale (median distance of the rows to their coordinate-wise median).
    Records: ``method``, ``passes`` and quantiles over seeds of the relative gap
    ``(f(m) - f*) / f*``, ``f(m) = sum_i ||m - G_i||``.
    """
    gen = _random.generator(cfg.seed + 4)
    S, n = cfg.gm_seeds, cfg.gm_n
    G = _random.stable(cfg.gm_alpha, (S, n, cfg.dim), generator=gen, device=device, dtype=dtype)
    ref = geometric_median(G, tol=1e-12, max_iter=10_000)
    f_star = geometric_median_objective(G, ref.median)

    def gap(m):
        return ((geometric_median_objective(G, m) - f_star) / f_star).clamp_min(0.0)

    records = []

    def add(method, p, m):
        q = _quantiles(gap(m).cpu())
        records.append({"method": method, "passes": p, **{k: v.item() for k, v in q.items()}})

    start = G.mean(dim=-2)
    add("Weiszfeld", 0, start)
    for k in range(1, cfg.weiszfeld_iters + 1):
        add("Weiszfeld", k, geometric_median(G, max_iter=k, tol=0.0, fixed_iter=True).median)
    scale = torch.linalg.vector_norm(G - coordinate_median(G).unsqueeze(-2), dim=-1).median(-1).values
    tau0 = cfg.spp_tau0 * scale  # (S,): one radius per problem
    rows = torch.arange(S, device=device).unsqueeze(-1)
    for method, (kind, schedule) in GM_METHODS.items():
        step = spp_step if kind == "spp" else sgd_step
        order_gen = _random.generator(cfg.seed + 5)  # the same orders for every method
        m = start
        add(method, 0, m)
        with value_checks(False):
            for p in progress_bar(range(1, cfg.passes + 1), enabled=progress, desc=method):
                factor = {"constant": 1.0, "sqrt": p ** -0.5, "inverse": 1.0 / p}[schedule]
                tau = tau0 * factor
                order = torch.argsort(_random.rand((S, n), generator=order_gen, device=device), dim=-1)
                shuffled = G[rows, order]
                for i in range(n):
                    m = step(m, shuffled[:, i], tau, "l2")
                add(method, p, m)
    return records


@_single_threaded_on_cpu
def run(config: Union[str, SampleMedianSGDConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Every study of the chapter at a scale (``"ci"``/``"paper"``) or with a custom config.

    Tables: ``stationary``, ``final``, ``curves`` (the tail study), ``sample_size``, ``skew``,
    ``gm_passes`` (see the study functions for their fields).
    """
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=torch.device(device), dtype=check_dtype(dtype), progress=progress)
    final, curves = tail_study(cfg, **kw)
    return Result(
        cfg,
        stationary=stationary_study(cfg, **kw),
        final=final,
        curves=curves,
        sample_size=sample_size_study(cfg, **kw),
        skew=skew_study(cfg, **kw),
        gm_passes=gm_passes_study(cfg, **kw),
    )
