"""BGmD's lemmas, checked numerically (chapter "Block geometric median descent"; Acharya et al. 2022).

* **Lemma 1 (contraction).** Keeping a block ``I`` of ``k`` columns of ``G`` (n, d) leaves the
  relative residual ``1 - xi = ||G - C_k(G)||_F^2 / ||G||_F^2 = sum_{j not in I} s_j / sum_j s_j``
  (``s_j = ||G[:, j]||^2``), and ``E[1 - xi] <= 1 - k/d`` for a uniformly random block (equality),
  for the top-k block, and for norm-proportional sampling. :func:`contraction_study` estimates
  ``E[1 - xi]`` by Monte Carlo through :func:`median_sgd.select_block` (many blocks in one call,
  through its batch dimension) for matrices whose column norms are uniform, decay like a power
  law, or are concentrated on a few columns; :func:`exact_sampling_residual` is the exact
  expectation of successive sampling without replacement, by enumeration (small ``d``).
* **Lemma 5 (memory as a delayed sequence).** With ``A_t = gamma G_t + 1 m_t^T``, the block
  ``Delta_t = C_k(A_t)`` and BGmD's update ``u_t``, the virtual sequence
  ``x~_{t+1} = x~_t - gamma gbar_t - z_t``, ``z_t = u_t - mean_i Delta_t[i]``, ``x~_0 = x_0``,
  satisfies ``x_t - x~_t = m_t`` when the averages run over *all* rows, as the memory of
  Algorithm 1 does. :func:`memory_identity` runs :class:`median_sgd.BGmD` on stochastic gradients
  of a quadratic with a corrupted fraction of rows and records the identity's error, both with
  all-row averages and with averages over the good rows only (the paper's proof defines them
  so; then the identity fails by the accumulated difference of the two residual means).
* **Figs. 7-8 (relative residual during training).** :func:`residual_study` trains a large
  (the authors' LeNet) and a tiny (412 parameters) CNN with BGmD for several ``beta = k/d`` and
  SGD, recording ``1 - xi`` of every step (:mod:`.bgmd_training`). At the ``paper`` scale the
  data are MNIST and LeNet has its 1,163,978 parameters; at the ``ci`` scale they are
  scikit-learn's 8x8 digits, resized to 16x16 for LeNet (:func:`resize_images`), which then has
  180,938 parameters.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.nn import functional as F

from ..bgmd import BGmD, select_block
from ..data.images import ImageData, load_images
from .._checks import check_real
from . import _random
from . import bgmd_training
from ._common import Result, check_dtype, resolve_config, scales

__all__ = [
    "BGmDTheoryConfig",
    "CONFIGS",
    "PROFILES",
    "SELECTIONS",
    "column_profile",
    "relative_residual",
    "uniform_block",
    "exact_sampling_residual",
    "contraction_study",
    "memory_identity",
    "resize_images",
    "residual_configs",
    "residual_study",
    "run",
    "ATTACKS",
    "ConvergenceConfig",
    "CONVERGENCE_CONFIGS",
    "quadratic",
    "convergence_run",
    "convergence_study",
    "theorem2_bound",
    "lemma3_bound",
    "lemma4_bound",
    "descent_check",
    "robustness_check",
    "PAPER_FIG7_RESIDUAL",
]

PROFILES = ("uniform", "power law", "sparse")
SELECTIONS = ("uniform", "norm", "norm (power 1)", "topk")
# Paper B's Fig. 7 (a), large model, beta = 0.1: the relative residual 1 - xi
# read off the plot at the start and at the end of its 10 epochs (a reading of
# a figure, to two digits; ../shared/papers/inventory.md).
PAPER_FIG7_RESIDUAL = (0.5, 0.35)


@dataclass(frozen=True)
class BGmDTheoryConfig:
    """Sizes of the chapter's checks (``ci`` and ``paper`` differ only in sizes)."""

    seed: int = 0
    # Lemma 1: a (n, d) matrix with a column-norm profile, `draws` random blocks per k.
    n: int = 16
    d: int = 1000
    k_fractions: tuple = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    draws: int = 400
    # Lemma 5: BGmD on noisy gradients of f(x) = |x - c|^2 / 2, a fraction psi of the rows
    # scaled-bit-flipped (g -> -100 g).
    lemma5_n: int = 10
    lemma5_d: int = 200
    lemma5_k: float = 0.1
    lemma5_psi: float = 0.2
    lemma5_steps: int = 60
    lemma5_lr: float = 0.1
    lemma5_noise: float = 1.0
    # Figs. 7-8: training runs (see residual_configs).
    residual_betas: tuple = (0.1, 0.2, 0.4)
    residual_epochs_large: float = 3.0
    residual_epochs_tiny: float = 15.0
    residual_batch_size: int = 8
    residual_data: str = "digits"
    residual_large_side: int = 16  # images resized to this side for LeNet (28: its 1.16M parameters)


CONFIGS: Dict[str, BGmDTheoryConfig] = scales(
    ci=BGmDTheoryConfig(),
    paper=BGmDTheoryConfig(
        d=100_000,
        draws=500,
        lemma5_d=10_000,
        lemma5_steps=500,
        residual_epochs_large=10.0,
        residual_epochs_tiny=10.0,
        residual_batch_size=64,
        residual_data="mnist",
        residual_large_side=28,
    ),
)


# ----------------------------------------------------------------------------------- Lemma 1


def column_profile(name: str, d: int, *, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """Column scales ``c_j`` (d,): ``"uniform"`` all 1; ``"power law"`` ``c_j = j^{-1}`` (a Zipf
    decay of the column norms); ``"sparse"`` 1 on the first 5% of the columns, 0.01 elsewhere."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {', '.join(map(repr, PROFILES))}")
    j = torch.arange(1, d + 1, device=device, dtype=dtype)
    if name == "uniform":
        return torch.ones(d, device=device, dtype=dtype)
    if name == "power law":
        return 1.0 / j
    scale = torch.full((d,), 0.01, device=device, dtype=dtype)
    scale[: max(1, d // 20)] = 1.0
    return scale


def relative_residual(G: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``||G - C_k(G)||_F^2 / ||G||_F^2`` for the blocks ``idx`` (..., k) of ``G`` (..., n, d): (...,)."""
    sq = (G * G).sum(-2)  # (..., d) squared column norms
    kept = torch.gather(sq.expand(*idx.shape[:-1], sq.shape[-1]), -1, idx).sum(-1)
    total = sq.sum(-1)
    return (total - kept) / total


def uniform_block(d: int, k: int, draws: int, *, generator=None, device="cpu") -> torch.Tensor:
    """``draws`` uniformly random ``k``-subsets of ``range(d)``: LongTensor (draws, k) on ``device``
    (the keys are drawn on ``generator``'s device)."""
    k = int(check_real(k, "k", 1, d, integer=True))
    keys = _random.rand((draws, d), generator=generator, device=device)
    return keys.topk(k, dim=-1).indices


def exact_sampling_residual(col_sq: torch.Tensor, k: int, power: float = 2.0) -> float:
    """Exact ``E[1 - xi]`` of successive sampling of ``k`` columns without replacement, each draw
    with probability ``∝ s_j^{power/2}`` among the columns left (``col_sq`` = the ``s_j``), by
    enumerating the ``d!/(d-k)!`` ordered draws (zero scores, once only they remain, are drawn
    uniformly). For small ``d`` only (an oracle for tests and the chapter)."""
    s = [float(v) for v in col_sq]
    d = len(s)
    k = int(check_real(k, "k", 1, d, integer=True))
    if d > 10:
        raise ValueError(f"enumeration is for d <= 10, got d = {d}")
    score = [v ** (power / 2) for v in s]
    total = sum(s)
    expected = 0.0
    for order in itertools.permutations(range(d), k):
        p, left, remaining = 1.0, sum(score), d
        for j in order:
            # once only zero scores remain, they are drawn uniformly (as select_block does)
            p *= score[j] / left if left > 0 else 1.0 / remaining
            left -= score[j]
            remaining -= 1
        expected += p * (total - sum(s[j] for j in order)) / total
    return expected


def contraction_study(config: Union[str, BGmDTheoryConfig] = "ci", *, device="cpu",
                      dtype=torch.float64) -> List[dict]:
    """``E[1 - xi]`` against ``k/d`` for every profile and selection rule.

    ``G = Z diag(c)`` with ``Z`` (n, d) standard normal and ``c`` from :func:`column_profile`;
    for each ``k`` the relative residual of ``draws`` blocks (one batched ``select_block`` call). Records: ``profile``, ``selection``, ``k``, ``beta = k/d``,
    ``mean``, ``q10``, ``q90`` (over the draws), ``bound = 1 - k/d``, ``se`` (standard error of
    the mean: for the uniform rule the exact one, whose mean is exactly ``bound``; for the others
    the sample's).
    """
    cfg = resolve_config(config, CONFIGS)
    gen = _random.generator(cfg.seed)  # CPU draws, moved: the same blocks on every device
    records = []
    for _, profile in enumerate(PROFILES):
        Z = _random.randn((cfg.n, cfg.d), generator=gen, device=device, dtype=dtype)
        G = Z * column_profile(profile, cfg.d, device=device, dtype=dtype)
        # select_block sees G only through its column norms: a (1, d) matrix with the same
        # column norms, expanded to (draws, 1, d), draws every block in one cheap call.
        Gs = torch.linalg.vector_norm(G, dim=-2).expand(cfg.draws, 1, cfg.d)
        for beta in cfg.k_fractions:
            k = max(1, int(math.floor(beta * cfg.d + 1e-9)))
            for selection in SELECTIONS:
                if selection == "uniform":
                    idx = uniform_block(cfg.d, k, cfg.draws, generator=gen, device=device)
                elif selection == "topk":
                    idx = select_block(G, k, mode="topk").unsqueeze(0)
                else:
                    power = 1.0 if selection == "norm (power 1)" else 2.0
                    idx = select_block(Gs, k, mode="norm", generator=gen, power=power)
                res = relative_residual(G, idx).cpu()
                q = torch.quantile(res, torch.tensor([0.1, 0.9], dtype=res.dtype))
                if selection == "uniform":
                    # The sample's standard deviation is unreliable when a few heavy columns
                    # decide the residual (the power law: column 1 holds 60% of the mass and
                    # only k/d of the draws hit it); the exact one of drawing k of the d column
                    # masses s_j without replacement is Var(sum) = k var(s) (d - k) / (d - 1).
                    s_col = (G * G).sum(-2).double().cpu()
                    var = k * s_col.var(unbiased=False) * (cfg.d - k) / max(cfg.d - 1, 1)
                    se = (var.sqrt() / s_col.sum() / math.sqrt(len(res))).item()
                else:
                    se = (res.std() / math.sqrt(len(res))).item() if len(res) > 1 else 0.0
                records.append({
                    "profile": profile, "selection": selection, "k": k, "beta": k / cfg.d,
                    "mean": res.mean().item(), "q10": q[0].item(), "q90": q[1].item(),
                    "bound": 1 - k / cfg.d, "se": se,
                })
    return records


# ----------------------------------------------------------------------------------- Lemma 5


def memory_identity(config: Union[str, BGmDTheoryConfig] = "ci", *, psi: Optional[float] = None,
                    memory: Optional[str] = "mean", device="cpu", dtype=torch.float64) -> List[dict]:
    """Lemma 5 along a BGmD run: one record per step ``t`` with

    * ``all_rows``: ``||x_t - x~_t - m_t|| / max_s ||m_s||``, the virtual sequence built with
      averages over all rows (``gbar``, ``Delta``): zero up to rounding;
    * ``good_rows``: the same with averages over the uncorrupted rows only (the paper's proof);
    * ``memory``: ``||m_t||``; ``distance``: ``||x_t - c||`` (the optimum is ``c``).

    The gradients are ``g_i = x - c + noise * N(0, I)``, and a fresh ``psi``-fraction of the rows
    is scaled-bit-flipped (``-100 g``) at every step (``psi`` overrides the config's
    ``lemma5_psi``). ``memory`` is BGmD's memory rule.
    """
    cfg = resolve_config(config, CONFIGS)
    psi = cfg.lemma5_psi if psi is None else psi
    check_real(psi, "psi", 0, 0.5, hi_open=True)
    gen = _random.generator(cfg.seed)  # CPU draws, moved: the same run on every device
    n, d = cfg.lemma5_n, cfg.lemma5_d
    n_bad = int(math.floor(psi * n))
    c = _random.randn(d, generator=gen, device=device, dtype=dtype)
    x = torch.zeros(d, device=device, dtype=dtype)
    x_all, x_good = x.clone(), x.clone()
    agg = BGmD(cfg.lemma5_k, mode="norm", memory=memory, generator=gen, tol=1e-10, max_iter=1000)
    gamma = cfg.lemma5_lr
    rows = []
    for t in range(cfg.lemma5_steps + 1):
        m = agg.memory if agg.memory is not None else torch.zeros_like(x)
        rows.append({"t": t, "err_all": torch.linalg.vector_norm(x - x_all - m).item(),
                     "err_good": torch.linalg.vector_norm(x - x_good - m).item(),
                     "memory": torch.linalg.vector_norm(m).item(),
                     "distance": torch.linalg.vector_norm(x - c).item()})
        if t == cfg.lemma5_steps:
            break
        G = (x - c) + cfg.lemma5_noise * _random.randn((n, d), generator=gen, device=device, dtype=dtype)
        bad = torch.zeros(n, dtype=torch.bool, device=device)
        bad[_random.randperm(n, generator=gen, device=device)[:n_bad]] = True
        G = torch.where(bad.unsqueeze(-1), -100.0 * G, G)
        u = agg(gamma * G)
        A = gamma * G + m  # the augmented rows (Algorithm 1)
        keep = torch.zeros(d, dtype=torch.bool, device=device)
        keep[agg.last_block] = True
        delta = A * keep  # C_k(A)
        for which, xt in (("all", x_all), ("good", x_good)):
            sel = torch.ones_like(bad) if which == "all" else ~bad
            z = u - delta[sel].mean(0)
            xt -= gamma * G[sel].mean(0) + z
        x = x - u
    scale = max(r["memory"] for r in rows) or 1.0
    return [{"t": r["t"], "all_rows": r["err_all"] / scale, "good_rows": r["err_good"] / scale,
             "memory": r["memory"], "distance": r["distance"]} for r in rows]


# --------------------------------------------------------------------------------- Figs. 7-8


def resize_images(data: ImageData, side: int) -> ImageData:
    """``data`` with every image bilinearly resized to ``side x side`` (pixels kept in [0, 1];
    the normalisation statistics recomputed): lets the authors' LeNet (28x28) run on 8x8 digits."""
    check_real(side, "side", 1, integer=True)

    def resize(x):
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)

    x_train, x_test = resize(data.x_train).contiguous(), resize(data.x_test).contiguous()
    dims = (0, 2, 3)
    mean = tuple(float(v) for v in x_train.double().mean(dims))
    std = tuple(float(v) for v in x_train.double().std(dims))
    return ImageData(f"{data.name}{side}", x_train, data.y_train, x_test, data.y_test, mean, std,
                     data.num_classes)


def residual_configs(config: Union[str, BGmDTheoryConfig] = "ci") -> Dict[str, bgmd_training.BGmDTrainingConfig]:
    """The two clean training setups of Figs. 7 (``"large"``: LeNet) and 8 (``"tiny"``: 412
    parameters): 10 clients, BGmD with ``k = beta d`` (norm sampling, mean memory) for each
    ``beta``, and SGD."""
    cfg = resolve_config(config, CONFIGS)
    methods = tuple(bgmd_training.method("bgmd", f"BGmD beta={b:g}", k=float(b))
                    for b in cfg.residual_betas) + (bgmd_training.method("mean", "SGD"),)
    base: Dict[str, Any] = dict(dataset=cfg.residual_data, clients=10, batch_size=cfg.residual_batch_size,
                methods=methods, attacks=(), psis=(0.0,), seeds=(cfg.seed,), momentum=0.9)
    return {
        "large": bgmd_training.BGmDTrainingConfig(model="lenet", epochs=cfg.residual_epochs_large,
                                                  lr=0.01, eval_every=3, **base),
        "tiny": bgmd_training.BGmDTrainingConfig(model="tiny_cnn", epochs=cfg.residual_epochs_tiny,
                                                 lr=0.05, eval_every=10, **base),
    }


def residual_study(config: Union[str, BGmDTheoryConfig] = "ci", *, device="cpu",
                   progress: bool = False) -> List[dict]:
    """The training records of :func:`residual_configs` (field ``setup``: ``"large"``/``"tiny"``)."""
    cfg = resolve_config(config, CONFIGS)
    data = load_images(cfg.residual_data)
    records = []
    for setup, tcfg in residual_configs(cfg).items():
        d = data
        if setup == "large" and data.image_shape[-1] != cfg.residual_large_side:
            d = resize_images(data, cfg.residual_large_side)
        for r in bgmd_training.train_grid(tcfg, device=device, data=d, progress=progress):
            records.append({**r, "setup": setup})
    return records


def run(config: Union[str, BGmDTheoryConfig] = "ci", *, device="cpu", dtype=torch.float64,
        progress: bool = False) -> Result:
    """Lemma 1, Lemma 5 and Figs. 7-8 at a scale or with a custom config.

    Tables: ``contraction`` (:func:`contraction_study`), ``memory`` (:func:`memory_identity`
    at the config's ``lemma5_psi``) and ``residual`` (:func:`residual_study`, which trains).
    Theorems 1-2 and Lemmas 3, 4, 6 have their own config (:data:`CONVERGENCE_CONFIGS`).
    """
    cfg = resolve_config(config, CONFIGS)
    kw: Dict[str, Any] = dict(device=device, dtype=check_dtype(dtype))
    return Result(
        cfg,
        contraction=contraction_study(cfg, **kw),
        memory=memory_identity(cfg, **kw),
        residual=residual_study(cfg, device=device, progress=progress),
    )


# ------------------------------------------------------------ Theorems 1-2, Lemmas 3, 4 and 6


@dataclass(frozen=True)
class ConvergenceConfig:
    """BGmD on the strongly convex quadratic ``f(x) = sum_j h_j (x_j - c_j)^2 / 2`` (``h_j``
    evenly spaced in ``[mu, L]``), ``n`` rows per step, ``seeds`` independent runs of every
    setting, all the settings of one block size batched in one :class:`~median_sgd.BGmD` call,
    step size ``gamma = 1 / (4 L)`` (Theorem 2's), ``x_0 = 0``."""

    seed: int = 0
    seeds: int = 6
    n: int = 10
    d: int = 40
    mu: float = 0.25
    L: float = 1.0
    steps: int = 300
    # the sweeps: noise level s (good rows: grad f(x) + s N(0, I)), block fraction, corruption
    noise: float = 1.0
    beta: float = 0.1
    noise_levels: tuple = (0.25, 0.5, 1.0, 2.0)
    betas: tuple = (0.1, 0.2, 0.5, 1.0)
    psis: tuple = (0.1, 0.2, 0.3, 0.4)
    flip_psi: float = 0.2
    # Lemma 6: Monte Carlo over the next step from states along a clean run
    descent_states: tuple = (0, 5, 20, 100)
    descent_draws: int = 400


CONVERGENCE_CONFIGS: Dict[str, ConvergenceConfig] = scales(
    ci=ConvergenceConfig(),
    paper=ConvergenceConfig(seeds=32, d=200, steps=1000, descent_draws=4000),
)
ATTACKS = ("none", "bit flip", "additive")


def quadratic(cfg: ConvergenceConfig, *, device="cpu", dtype=torch.float64):
    """``(h, c)``: the curvatures ``linspace(mu, L, d)`` and the optimum ``c`` (drawn from the
    config's seed; ``x* = c``, ``f* = 0``)."""
    gen = _random.generator(cfg.seed)
    c = _random.randn(cfg.d, generator=gen, device=device, dtype=dtype)
    h = torch.linspace(cfg.mu, cfg.L, cfg.d, device=device, dtype=dtype)
    return h, c


def _rows(x, h, c, n, noise, n_bad, flip, add, gen):
    """Stochastic gradients (P, n, d) at ``x`` (P, d) and the mask of the corrupted rows (P, n):
    problem ``p`` has ``n_bad[p]`` corrupted rows (a fresh random set per step), scaled-bit-
    flipped (``-100 g``) where ``flip[p]``, given extra noise ``N(0, 10^2 I)`` where ``add[p]``
    (the paper's gradient attacks); ``noise[p]`` is the good rows' noise level."""
    P, d = x.shape
    grad = h * (x - c)
    G = grad.unsqueeze(-2) + noise[:, None, None] * _random.randn((P, n, d), generator=gen,
                                                                  device=x.device, dtype=x.dtype)
    rank = _random.rand((P, n), generator=gen, device=x.device, dtype=x.dtype).argsort(-1).argsort(-1)
    bad = rank < n_bad[:, None]
    G = torch.where((bad & flip[:, None]).unsqueeze(-1), -100.0 * G, G)
    extra = 10.0 * _random.randn((P, n, d), generator=gen, device=x.device, dtype=x.dtype)
    G = torch.where((bad & add[:, None]).unsqueeze(-1), G + extra, G)
    return G, bad


def convergence_run(config: Union[str, ConvergenceConfig] = "ci", settings: Optional[List[dict]] = None, *,
                    beta: Optional[float] = None, method: str = "bgmd", device="cpu",
                    dtype=torch.float64) -> List[dict]:
    """``seeds`` runs of every setting (a dict with ``noise``, ``psi``, ``attack``; default: one
    clean setting at the config's noise) of ``method`` (``"bgmd"``: BGmD with norm sampling and
    the paper's mean memory, ``k = beta d``; ``"sgd"``: the mean of the rows), all in one batch.

    Returns one record per setting with per-seed tensors (``seeds``,):

    * ``final``: ``||x^_T - x*||^2`` for Theorem 2's weighted average ``x^_T`` (weights
      ``(1 - mu / (8 L))^{-(t+1)}``), and ``last``: ``||x_T - x*||^2``;
    * ``memory_sq``: the mean over steps of ``||m_t||^2``; ``sigma_sq``: the largest over steps of
      the good rows' mean ``||g_i||^2`` (Assumption 1's second moment, along the run);
      ``xi``: the smallest relative kept mass ``||C_k(A)||^2 / ||A||^2`` of a step;
    * ``z_sq``: the mean over steps of ``||z_t||^2``, ``z_t = u_t - mean_{i in G} Delta_t[i]``
      (Lemma 4's perturbation), and ``lr_ratio``: the largest over steps of ``||z_t||^2`` over
      the right-hand side of Lopuhaa-Rousseeuw's bound (eq. (22) of the paper, epsilon = 0),
      ``8 |G| / (|G| - |B|)^2 sum_{i in G} ||Delta_t[i] - mean_G Delta_t||^2`` (NaN for a run
      whose memory outgrew its rows' differences: a diverged run).
    """
    cfg = resolve_config(config, CONVERGENCE_CONFIGS)
    beta = cfg.beta if beta is None else float(beta)
    if method not in ("bgmd", "sgd"):
        raise ValueError(f"method must be 'bgmd' or 'sgd', got {method!r}")
    settings = [{"noise": cfg.noise, "psi": 0.0, "attack": "none"}] if settings is None else list(settings)
    for st in settings:
        if st.get("attack", "none") not in ATTACKS:
            raise ValueError(f"unknown attack {st.get('attack')!r}; expected one of {ATTACKS}")
        check_real(st.get("psi", 0.0), "psi", 0, 0.5, hi_open=True)
    h, c = quadratic(cfg, device=device, dtype=dtype)
    gen = _random.generator(cfg.seed + 1)
    S, n, d = cfg.seeds, cfg.n, cfg.d
    P = S * len(settings)

    def per_problem(values, kind):
        return torch.tensor(values, device=device, dtype=kind).repeat_interleave(S)

    noise = per_problem([st.get("noise", cfg.noise) for st in settings], dtype)
    n_bad = per_problem([int(math.floor(st.get("psi", 0.0) * n + 1e-9)) for st in settings], torch.long)
    flip = per_problem([st.get("attack") == "bit flip" for st in settings], torch.bool)
    add = per_problem([st.get("attack") == "additive" for st in settings], torch.bool)
    n_g = (n - n_bad).to(dtype)
    gamma = 1.0 / (4 * cfg.L)
    x = torch.zeros(P, d, device=device, dtype=dtype)
    agg = BGmD(beta, mode="norm", memory="mean", generator=gen, tol=1e-10, max_iter=2000)
    r = 1 - cfg.mu / (8 * cfg.L)
    wsum = torch.zeros(P, d, device=device, dtype=dtype)
    W = 0.0
    zeros = torch.zeros(P, device=device, dtype=dtype)
    mem_sq, z_sq, sigma_sq, lr_ratio = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    xi = torch.ones(P, device=device, dtype=dtype)
    for t in range(cfg.steps):
        w = r ** (cfg.steps - t - 1)  # (1 - mu/8L)^{-(t+1)}, rescaled: only ratios matter
        wsum += w * x
        W += w
        G, bad = _rows(x, h, c, n, noise, n_bad, flip, add, gen)
        good = (~bad).to(dtype).unsqueeze(-1)
        sigma_sq = torch.maximum(sigma_sq, ((G * G).sum(-1, keepdim=True) * good).sum((-2, -1)) / n_g)
        if method == "sgd":
            x = x - gamma * G.mean(-2)
            continue
        m = agg.memory if agg.memory is not None else torch.zeros_like(x)
        mem_sq += (m * m).sum(-1)
        A = gamma * G + m.unsqueeze(-2)
        u = agg(gamma * G)
        block = agg.last_block
        assert block is not None  # set by every call
        keep = torch.zeros(P, d, dtype=dtype, device=device).scatter_(-1, block, 1.0)
        delta = A * keep.unsqueeze(-2)
        dbar = (delta * good).sum(-2) / n_g[:, None]
        z = u - dbar
        z_sq += (z * z).sum(-1)
        # the rows' differences, from the gradients (the memory cancels; exact even when it is
        # huge), and the ratio only where they are resolved against the memory
        diff = gamma * (G - (G * good).sum(-2, keepdim=True) / n_g[:, None, None]) * keep.unsqueeze(-2)
        spread = ((diff * diff).sum(-1, keepdim=True) * good).sum((-2, -1))
        rhs = 8 * n_g / (2 * n_g - n) ** 2 * spread
        resolved = (m * m).sum(-1) < 1e20 * spread
        ratio = torch.where(resolved, (z * z).sum(-1) / rhs, torch.full_like(rhs, math.nan))
        lr_ratio = torch.maximum(lr_ratio, ratio)  # NaN sticks
        xi = torch.minimum(xi, (delta * delta).sum((-2, -1)) / (A * A).sum((-2, -1)))
        x = x - u
    x_hat = wsum / W
    out = []
    for i, st in enumerate(settings):
        sl = slice(i * S, (i + 1) * S)
        rec = {"method": method, "beta": beta if method == "bgmd" else None,
               "noise": st.get("noise", cfg.noise), "psi": st.get("psi", 0.0),
               "attack": st.get("attack", "none"), "gamma": gamma, "n": n, "d": d, "mu": cfg.mu,
               "L": cfg.L, "steps": cfg.steps,
               "final": ((x_hat[sl] - c) ** 2).sum(-1).cpu(), "last": ((x[sl] - c) ** 2).sum(-1).cpu(),
               "sigma_sq": sigma_sq[sl].cpu()}
        if method == "bgmd":
            rec.update(memory_sq=(mem_sq[sl] / cfg.steps).cpu(), xi=xi[sl].cpu(),
                       z_sq=(z_sq[sl] / cfg.steps).cpu(), lr_ratio=lr_ratio[sl].cpu())
        out.append(rec)
    return out


def theorem2_bound(*, sigma_sq: float, xi: float, alpha: float, mu: float, L: float,
                   gamma: float, R0: float = 0.0, T: int = 0, eps: float = 0.0, n_good: int = 1) -> float:
    """The right-hand side of Theorem 2, eq. (17) of the paper, term by term as printed."""
    q = 1 - xi ** 2
    return (16 * R0 / (mu ** 2 * gamma) * (1 - mu * gamma / 2) ** T
            + 16 * L * gamma * sigma_sq / mu ** 2
            + 80 * gamma ** 2 * sigma_sq * L ** 2 * q / (mu ** 2 * xi ** 2)
            + 3072 * sigma_sq / (mu ** 2 * (1 - alpha) ** 2) * (1 + 4 * q / xi ** 2)
            + 64 * eps ** 2 / (mu ** 2 * gamma ** 2 * n_good ** 2 * (1 - alpha) ** 2))


def lemma3_bound(*, sigma_sq: float, xi: float, gamma: float, paper: bool = True) -> float:
    """Lemma 3: ``4 (1 - xi^2) gamma^2 sigma^2 / xi^2`` as the paper prints it (``paper=True``),
    or ``4 (1 - xi) gamma^2 sigma^2 / xi^2``, what the error-feedback recursion gives."""
    q = 1 - xi ** 2 if paper else 1 - xi
    return 4 * q * gamma ** 2 * sigma_sq / xi ** 2


def lemma4_bound(*, sigma_sq: float, xi: float, alpha: float, gamma: float, eps: float = 0.0,
                 n_good: int = 1) -> float:
    """Lemma 4: ``96 gamma^2 sigma^2 / (1 - alpha)^2 (1 + 4 (1 - xi^2) / xi^2)
    + 2 eps^2 / (|G|^2 (1 - alpha)^2)``."""
    q = 1 - xi ** 2
    return (96 * gamma ** 2 * sigma_sq / (1 - alpha) ** 2 * (1 + 4 * q / xi ** 2)
            + 2 * eps ** 2 / (n_good ** 2 * (1 - alpha) ** 2))


def convergence_study(config: Union[str, ConvergenceConfig] = "ci", *, device="cpu",
                      dtype=torch.float64) -> List[dict]:
    """The chapter's runs (:func:`convergence_run`), field ``sweep``: ``"noise"`` (clean, BGmD at
    ``beta``, every noise level), ``"beta"`` (clean, every block fraction, GmD being
    ``beta = 1``), ``"psi"`` (additive corruption at every ``psis`` for BGmD at ``beta``, GmD and
    SGD) and ``"flip"`` (scaled bit flips at ``flip_psi``, the same three)."""
    cfg = resolve_config(config, CONVERGENCE_CONFIGS)
    clean = {"noise": cfg.noise, "psi": 0.0, "attack": "none"}
    attacked = [{"noise": cfg.noise, "psi": p, "attack": "additive"} for p in cfg.psis]
    flipped = {"noise": cfg.noise, "psi": cfg.flip_psi, "attack": "bit flip"}
    noisy = [{"noise": s, "psi": 0.0, "attack": "none"} for s in cfg.noise_levels if s != cfg.noise]
    out = []
    for method, beta in [("bgmd", b) for b in cfg.betas] + [("sgd", None)]:
        settings = [clean]
        if beta in (cfg.beta, 1.0, None):
            settings += attacked + [flipped]
        if beta == cfg.beta:
            settings += noisy
        for rec in convergence_run(cfg, settings, beta=beta, method=method, device=device, dtype=dtype):
            sweeps = []
            if rec["attack"] == "none" and beta == cfg.beta:
                sweeps.append("noise")
            if rec["attack"] == "none" and rec["noise"] == cfg.noise and method == "bgmd":
                sweeps.append("beta")
            if rec["noise"] == cfg.noise and rec["attack"] in ("none", "additive") and beta in (cfg.beta, 1.0, None):
                sweeps.append("psi")
            if rec["attack"] == "bit flip":
                sweeps.append("flip")
            for sweep in sweeps:
                out.append({"sweep": sweep, **rec})
    return out


def _clean(P, cfg, like) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    noise = torch.full((P,), cfg.noise, device=like.device, dtype=like.dtype)
    none = torch.zeros(P, dtype=torch.bool, device=like.device)
    return noise, torch.zeros(P, dtype=torch.long, device=like.device), none, none


def descent_check(config: Union[str, ConvergenceConfig] = "ci", *, rho: float = 0.25,
                  device="cpu", dtype=torch.float64) -> List[dict]:
    """Lemma 6 by Monte Carlo, on a clean BGmD run (so that ``x~_t = x_t - m_t``, Lemma 5).

    At each step ``t`` of ``descent_states`` the state ``(x_t, m_t)`` is copied ``descent_draws``
    times and one more BGmD step is drawn for every copy (fresh noise and block). Records:
    ``lhs`` = the mean of ``f(x~_{t+1})`` and its standard error ``se``, ``rhs`` = the lemma's
    right-hand side with the means of ``||g_t||^2`` and ``||z_t||^2`` over the copies
    (``g_t``: the rows' average, ``z_t = u_t - mean_i Delta_t[i]``)."""
    cfg = resolve_config(config, CONVERGENCE_CONFIGS)
    check_real(rho, "rho", 0, 0.5, lo_open=True, hi_open=True)
    h, c = quadratic(cfg, device=device, dtype=dtype)
    gen = _random.generator(cfg.seed + 2)
    gamma, L, R = 1.0 / (4 * cfg.L), cfg.L, cfg.descent_draws

    def f(v):
        return 0.5 * (h * (v - c) ** 2).sum(-1)

    x = torch.zeros(1, cfg.d, device=device, dtype=dtype)
    agg = BGmD(cfg.beta, mode="norm", memory="mean", generator=gen, tol=1e-10, max_iter=2000)
    records = []
    for t in range(max(cfg.descent_states) + 1):
        m = agg.memory if agg.memory is not None else torch.zeros_like(x)
        if t in cfg.descent_states:
            probe = BGmD(cfg.beta, mode="norm", memory="mean", generator=gen, tol=1e-10, max_iter=2000)
            probe.memory = m.expand(R, cfg.d).clone()
            xs = x.expand(R, cfg.d)
            G, _ = _rows(xs, h, c, cfg.n, *_clean(R, cfg, xs), gen)
            u = probe(gamma * G)
            A = gamma * G + m.unsqueeze(-2)
            block = probe.last_block
            assert block is not None  # set by every call
            keep = torch.zeros(R, cfg.d, dtype=dtype, device=device).scatter_(-1, block, 1.0)
            z = u - (A * keep.unsqueeze(-2)).mean(-2)
            g = G.mean(-2)
            x_tilde = x - m
            nxt = f(x_tilde - gamma * g - z)
            grad = h * (x - c)
            rhs = (f(x_tilde) - (0.5 - rho) * gamma / 2 * (grad * grad).sum(-1)
                   + 1.5 * gamma * L ** 2 * ((x_tilde - x) ** 2).sum(-1)
                   + L * gamma ** 2 * (g * g).sum(-1).mean()
                   + (L + 1 / (2 * rho * gamma) + 1 / (2 * gamma)) * (z * z).sum(-1).mean())
            records.append({"t": t, "lhs": nxt.mean().item(), "se": (nxt.std() / math.sqrt(R)).item(),
                            "rhs": rhs.item(), "f_tilde": f(x_tilde).item()})
        G, _ = _rows(x, h, c, cfg.n, *_clean(1, cfg, x), gen)
        x = x - agg(gamma * G)
    return records


def robustness_check(trials: int = 200, *, n_good: int = 12, n_bad: int = 7, d: int = 5,
                     seed: int = 0, dtype=torch.float64) -> List[dict]:
    """Lopuhaa-Rousseeuw's bound (eq. (22) of the paper, epsilon = 0), deterministic: for good
    points ``y_i`` (``i in G``) and any others, the geometric median ``z`` of all satisfies
    ``||z - ybar_G||^2 <= 8 |G| / (|G| - |B|)^2 sum_{i in G} ||y_i - ybar_G||^2``. One record
    per adversary (``"far"``: all bad points at one far point; ``"spread"``: far and scattered;
    ``"near"``: a cluster just outside the good points, where the bound is closest): the
    largest ratio of the two sides over ``trials`` draws, and the largest ratio to Minsker's
    bound ``C_psi r`` (``r`` the largest good distance from ``ybar_G``)."""
    from ..medians import geometric_median
    from .gm_breakdown import minsker_constant

    gen = _random.generator(seed)
    Y = _random.randn((trials, n_good, d), generator=gen, dtype=dtype)
    ybar = Y.mean(-2)
    u = _random.randn((trials, 1, d), generator=gen, dtype=dtype)
    u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    r = torch.linalg.vector_norm(Y - ybar.unsqueeze(-2), dim=-1).amax(-1)
    spread = ((Y - ybar.unsqueeze(-2)) ** 2).sum((-2, -1))
    lr = 8 * n_good / (n_good - n_bad) ** 2 * spread
    psi = n_bad / (n_good + n_bad)
    out = []
    for name in ("far", "spread", "near"):
        if name == "far":
            B = ybar.unsqueeze(-2) + 1e6 * u.expand(trials, n_bad, d)
        elif name == "spread":
            B = 1e6 * _random.randn((trials, n_bad, d), generator=gen, dtype=dtype)
        else:
            B = ybar.unsqueeze(-2) + 1.5 * r[:, None, None] * u.expand(trials, n_bad, d)
        z = geometric_median(torch.cat([Y, B], -2), tol=1e-12, max_iter=20_000).median
        err = ((z - ybar) ** 2).sum(-1)
        out.append({"adversary": name, "psi": psi, "ratio": (err / lr).max().item(),
                    "minsker_ratio": (err.sqrt() / (minsker_constant(psi) * r)).max().item()})
    return out
