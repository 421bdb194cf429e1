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
from typing import Dict, List, Optional, Union

import torch
from torch.nn import functional as F

from ..bgmd import BGmD, select_block
from ..data.images import ImageData, load_images
from . import SCALES, _random
from . import bgmd_training

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
]

PROFILES = ("uniform", "power law", "sparse")
SELECTIONS = ("uniform", "norm", "norm (power 1)", "topk")


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


CONFIGS: Dict[str, BGmDTheoryConfig] = {
    "ci": BGmDTheoryConfig(),
    "paper": BGmDTheoryConfig(
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
}
assert set(CONFIGS) == set(SCALES)


def _config(config) -> BGmDTheoryConfig:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown scale {config!r}; expected one of {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    if not isinstance(config, BGmDTheoryConfig):
        raise TypeError(f"config must be a scale name or a BGmDTheoryConfig, got {type(config).__name__}")
    return config


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
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ValueError(f"need 1 <= k <= d = {d}, got {k!r}")
    keys = _random.rand((draws, d), generator=generator, device=device)
    return keys.topk(k, dim=-1).indices


def exact_sampling_residual(col_sq: torch.Tensor, k: int, power: float = 2.0) -> float:
    """Exact ``E[1 - xi]`` of successive sampling of ``k`` columns without replacement, each draw
    with probability ``∝ s_j^{power/2}`` among the columns left (``col_sq`` = the ``s_j``), by
    enumerating the ``d!/(d-k)!`` ordered draws (zero scores, once only they remain, are drawn
    uniformly). For small ``d`` only (an oracle for tests and the chapter)."""
    s = [float(v) for v in col_sq]
    d = len(s)
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ValueError(f"need 1 <= k <= d = {d}, got {k!r}")
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
    cfg = _config(config)
    gen = _random.generator(cfg.seed)  # CPU draws, moved: the same blocks on every device
    records = []
    for p, profile in enumerate(PROFILES):
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
    cfg = _config(config)
    psi = cfg.lemma5_psi if psi is None else psi
    if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not 0 <= psi < 0.5:
        raise ValueError(f"psi must be a number in [0, 0.5), got {psi!r}")
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
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ValueError(f"side must be a positive int, got {side!r}")

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
    cfg = _config(config)
    methods = tuple(bgmd_training.method("bgmd", f"BGmD beta={b:g}", k=float(b))
                    for b in cfg.residual_betas) + (bgmd_training.method("mean", "SGD"),)
    base = dict(dataset=cfg.residual_data, clients=10, batch_size=cfg.residual_batch_size,
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
    cfg = _config(config)
    data = load_images(cfg.residual_data)
    records = []
    for setup, tcfg in residual_configs(cfg).items():
        d = data
        if setup == "large" and data.image_shape[-1] != cfg.residual_large_side:
            d = resize_images(data, cfg.residual_large_side)
        for r in bgmd_training.run(tcfg, device=device, data=d, progress=progress):
            records.append({**r, "setup": setup})
    return records

