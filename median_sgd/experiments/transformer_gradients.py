"""Estimating the full-batch gradient of a transformer with fixed weights (workshop paper Sec. 4.2, Figs. 3-4).

The chapter "A transformer with fixed weights". A small encoder-transformer language model
(:class:`~median_sgd.models.TransformerLM`) is initialised once and never updated. Its training
corpus is cut into ``N`` segments of ``seq_len + 1`` tokens (:func:`~median_sgd.data.text.segment_ids`);
the loss of a segment is its mean next-word cross-entropy, and the target is the **full-batch
gradient** ``g_hat = (1/N) sum_i grad loss_i(w_0)``, computed exactly in chunks. Each iteration
draws a mini-batch of ``b`` segments uniformly without replacement (independently across
iterations), so the mini-batch gradient ``g_t`` is an unbiased sample of ``g_hat``, and every
estimator takes one SPP step on it from ``m_0 = 0``:

* ``"momentum"``: ``m+ = m + tau/(1+tau) (g - m)`` (eq. 11, ``beta = 1/(1+tau)``);
* ``"CClip"``: ``m+ = m + clip_{tau,1}(g - m)`` (eq. 15, componentwise clipping);
* ``"VClip"``: ``m+ = m + clip_{tau,2}(g - m)`` (eq. 12, vectorwise clipping, Clip21).

The metric is the relative error ``||m_t - g_hat||_2 / ||g_hat||_2``. All estimators and all
``tau`` of ``config.taus`` advance on the same stream of mini-batch gradients (one backward pass
per mini-batch; the estimates of one method for every ``tau`` are one ``(len(taus), d)`` tensor),
and nothing is read back to the host inside the loop. The same stream also gives the noise
``g_t - g_hat``: its relative norm at every step and, per coordinate, its kurtosis
``E[(g - g_hat)_i^4] / E[(g - g_hat)_i^2]^2`` (3 for Gaussian noise; large for heavy tails).

What the paper does not state and we chose (see the chapter): the step rule for momentum (we
use the SPP form, eq. 11, like the clipping methods), ``tau`` (we show every ``tau`` of a grid;
the chapter's headline ``tau = 0.01`` is the value the paper states for its Fig. 2), the start
``m_0 = 0``, the number of iterations and seeds, and dropout (we use none, so a mini-batch has one
gradient). The paper-scale model and corpora follow Kunstner et al. (2023), whose setup the
paper says it reuses: ``d_model = d_hid = 200``, 2 heads, 2 layers, segments of 35 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch.nn.utils import parameters_to_vector

from .._checks import value_checks
from ..data.text import TextCorpus, load_text_corpus, segment_ids
from ..estimators import spp_step
from ..medians import coordinate_median, geometric_median
from ..models.transformer import TransformerLM
from ._common import Result, check_each, check_fields, only_dtype, progress as progress_bar, resolve_config, scales

__all__ = [
    "ESTIMATORS",
    "FIGURE_CORPORA",
    "TransformerGradientsConfig",
    "CONFIGS",
    "build_problem",
    "problem_record",
    "batch_size_study",
    "full_batch_gradient",
    "mean_gradient",
    "minibatch_gradient",
    "run",
]

#: name -> divergence of the SPP step (``spp_step(m, g, tau, div)``): the paper's three methods.
ESTIMATORS: Dict[str, str] = {"momentum": "sq", "CClip": "l1", "VClip": "l2"}

#: the corpora a config can name: the paper's Fig. 3 (PTB) and Fig. 4 (WikiText-2), and their
#: offline stand-ins at the ``ci`` scale (CPython's help topics and the standard library's
#: docstrings, see :mod:`median_sgd.data.text`)
_CORPORA = ("pydoc", "docstrings", "ptb", "wikitext2")
#: the corpus of each of the paper's figures, at each scale
FIGURE_CORPORA: Dict[str, Dict[str, str]] = {
    "ci": {"Fig. 3": "pydoc", "Fig. 4": "docstrings"},
    "paper": {"Fig. 3": "ptb", "Fig. 4": "wikitext2"},
}


@dataclass(frozen=True)
class TransformerGradientsConfig:
    """Sizes of the experiment (``ci`` and ``paper`` differ in corpus, model size and counts)."""

    corpora: Tuple[str, ...] = ("ptb", "wikitext2")
    seq_len: int = 35
    d_model: int = 200
    nhead: int = 2
    d_hid: int = 200
    nlayers: int = 2
    batch_sizes: Tuple[int, ...] = (64, 256, 1024)
    iterations: int = 1000
    seeds: int = 3
    taus: Tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    model_seed: int = 0
    data_seed: int = 0
    #: the tau of the chapter's main figure (the value the paper states for its Fig. 2)
    headline_tau: float = 0.01
    chunk: int = 256  # at most this many segments per forward/backward pass (memory)
    #: the first ``median_samples`` mini-batch gradients of seed 0 are kept (a ``(K, d)`` matrix)
    #: and their coordinate-wise median, geometric median and mean compared with ``g_hat``
    median_samples: int = 64
    #: where ``"ptb"`` and ``"wikitext2"`` are downloaded (``None``: the default cache)
    data_root: Optional[str] = None

    def __post_init__(self):
        check_fields(self, ("seq_len", "d_model", "nhead", "d_hid", "nlayers", "iterations", "seeds",
                            "chunk", "median_samples"), 1, integer=True)
        if not self.corpora or any(c not in _CORPORA for c in self.corpora):
            raise ValueError(f"corpora must be some of {_CORPORA}, got {self.corpora!r}")
        check_each(self.batch_sizes, "batch_sizes", 1, integer=True)
        check_each(self.taus, "taus", 0, lo_open=True)
        if len(set(self.taus)) != len(self.taus):
            raise ValueError(f"taus must be distinct, got {self.taus!r}")
        if self.headline_tau not in self.taus:
            raise ValueError(f"headline_tau {self.headline_tau!r} must be one of taus {self.taus!r}")


CONFIGS: Dict[str, TransformerGradientsConfig] = scales(
    # Offline stand-ins for PTB (Fig. 3) and WikiText-2 (Fig. 4): CPython's help text and the
    # standard library's docstrings (median_sgd.data.text); a 32-wide model, segments of 16
    # tokens, the batch sizes divided by 4 (the help text has ~4,400 segments, so 1024 would be
    # a quarter of it), 300 iterations and one seed.
    ci=TransformerGradientsConfig(
        corpora=("pydoc", "docstrings"),
        seq_len=16,
        d_model=32,
        d_hid=64,
        batch_sizes=(16, 64, 256),
        iterations=300,
        seeds=1,
    ),
    # Kunstner et al.'s PTB/WikiText-2 encoder transformer and the paper's batch sizes; the paper
    # states neither iterations nor seeds (1000 iterations is its Fig. 2's length).
    paper=TransformerGradientsConfig(median_samples=32),
)


def _load_corpus(name: str, cfg: TransformerGradientsConfig) -> TextCorpus:
    return load_text_corpus(name, root=cfg.data_root)


def build_problem(
    corpus: TextCorpus, cfg: TransformerGradientsConfig, *, device="cpu"
) -> Tuple[TransformerLM, torch.Tensor]:
    """The fixed-weight model (seed ``cfg.model_seed``) and the ``(N, seq_len + 1)`` training segments."""
    model = TransformerLM(corpus.vocab_size, cfg.d_model, cfg.nhead, cfg.d_hid, cfg.nlayers,
                          dropout=0.0, max_len=cfg.seq_len, seed=cfg.model_seed).to(device)
    model.train()  # no dropout anyway; train mode keeps autograd on the ordinary path
    segments = segment_ids(corpus["train"], cfg.seq_len).to(device)
    return model, segments


def mean_gradient(
    model: TransformerLM, segments: torch.Tensor, chunk: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient of the mean next-word cross-entropy over ``segments`` ``(n, L+1)``.

    Returns ``(loss, grad)``: the scalar mean loss and the flattened gradient ``(d,)`` (in the
    order of ``model.parameters()``). With ``chunk``, at most ``chunk`` segments go through the
    model at once and the chunks' results are averaged with weights ``size / n`` (accumulated in
    float64, returned in the model's dtype): the same numbers up to rounding, in less memory.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = segments.shape[0]
    if chunk is None or chunk >= n:
        loss = model.loss(segments[:, :-1], segments[:, 1:])
        grad = parameters_to_vector(torch.autograd.grad(loss, params))
        return loss.detach(), grad
    total_loss: torch.Tensor | float = 0.0
    total: Optional[torch.Tensor] = None
    for start in range(0, n, chunk):
        part = segments[start:start + chunk]
        loss = model.loss(part[:, :-1], part[:, 1:])
        g = parameters_to_vector(torch.autograd.grad(loss, params)).double() * (part.shape[0] / n)
        total = g if total is None else total + g
        total_loss = total_loss + loss.detach().double() * (part.shape[0] / n)
    dtype = params[0].dtype
    assert isinstance(total_loss, torch.Tensor) and total is not None  # n >= 1: one chunk ran
    return total_loss.to(dtype), total.to(dtype)


def minibatch_gradient(model: TransformerLM, segments: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """``grad_w`` of the mean next-word cross-entropy of the ``(b, L+1)`` segments, flattened ``(d,)``."""
    return mean_gradient(model, segments, chunk)[1]


def full_batch_gradient(model: TransformerLM, segments: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``g_hat = (1/N) sum_i grad loss_i``: :func:`mean_gradient` over every segment, in chunks."""
    return mean_gradient(model, segments, chunk)[1]


def _groups(model: TransformerLM) -> Dict[str, Tuple[int, int]]:
    """Coordinate ranges of the flattened gradient: embedding, transformer layers, decoder."""
    ranges: Dict[str, List[int]] = {}
    offset = 0
    for name, p in model.named_parameters():
        group = "embedding" if name.startswith("embedding") else (
            "decoder" if name.startswith("decoder") else "transformer layers")
        lo_hi = ranges.setdefault(group, [offset, offset])
        if lo_hi[1] != offset:
            raise RuntimeError("parameter groups are not contiguous")  # pragma: no cover
        offset += p.numel()
        lo_hi[1] = offset
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def problem_record(corpus_name: str, corpus: TextCorpus, cfg: TransformerGradientsConfig,
                   segments: torch.Tensor, loss0: torch.Tensor, g_hat: torch.Tensor) -> dict:
    """The ``problems`` record of one corpus: its sizes, the loss and ``||g_hat||`` at ``w_0``."""
    return {
        "corpus": corpus_name,
        "tokens": int(corpus["train"].numel()),
        "vocab_size": corpus.vocab_size,
        "segments": segments.shape[0],
        "seq_len": cfg.seq_len,
        "parameters": g_hat.numel(),
        "loss": float(loss0),
        "log_vocab": math.log(corpus.vocab_size),
        "grad_norm": float(torch.linalg.vector_norm(g_hat)),
    }


def batch_size_study(corpus_name: str, model: TransformerLM, segments: torch.Tensor,
                     g_hat: torch.Tensor, batch_size: int, cfg: TransformerGradientsConfig, *,
                     progress: bool = False) -> Dict[str, Any]:
    """Every seed, estimator and ``tau`` at one batch size: ``{"curves", "noise", "medians", "kurtosis"}``.

    Seed ``s`` draws its mini-batches on the CPU from ``torch.Generator().manual_seed(data_seed +
    1000 s + batch_size)`` (the same indices on every device); ``kurtosis`` is the ``(d,)``
    per-coordinate kurtosis of the noise ``g_t - g_hat`` over all iterations and seeds (CPU,
    float32; NaN where the noise is always 0). See :func:`run` for the records' fields.
    """
    device = g_hat.device
    names = tuple(ESTIMATORS)
    k, d, n_segments = len(cfg.taus), g_hat.numel(), segments.shape[0]
    g_norm = torch.linalg.vector_norm(g_hat)
    taus = torch.tensor(cfg.taus, dtype=g_hat.dtype, device=device)
    curves: List[dict] = []
    noise_records: List[dict] = []
    medians: List[dict] = []
    s2 = torch.zeros(d, dtype=torch.float64, device=device)
    s4 = torch.zeros(d, dtype=torch.float64, device=device)
    bar = progress_bar(enabled=progress, total=cfg.seeds * cfg.iterations,
                       desc=f"{corpus_name} b={batch_size}", unit="it")
    for seed in range(cfg.seeds):
        gen = torch.Generator().manual_seed(cfg.data_seed + 1000 * seed + batch_size)
        # All mini-batches of this seed drawn up front (on the CPU, so every device sees
        # the same ones) and moved once: no host-device copy inside the loop.
        batches = torch.stack([torch.randperm(n_segments, generator=gen)[:batch_size]
                               for _ in range(cfg.iterations)]).to(device)
        m = {name: torch.zeros(k, d, dtype=g_hat.dtype, device=device) for name in names}
        errors = torch.empty(cfg.iterations + 1, len(names), k, dtype=torch.float64, device=device)
        errors[0] = 1.0  # m_0 = 0
        noise = torch.empty(cfg.iterations, dtype=torch.float64, device=device)
        keep = min(cfg.median_samples, cfg.iterations) if seed == 0 else 0
        kept = torch.empty(keep, d, dtype=g_hat.dtype, device=device) if keep else None
        with value_checks(False):  # inputs are finite by construction; no host syncs
            for t in range(cfg.iterations):
                g = minibatch_gradient(model, segments[batches[t]], cfg.chunk)
                if kept is not None and t < keep:
                    kept[t] = g
                delta = (g - g_hat).double()
                noise[t] = torch.linalg.vector_norm(delta) / g_norm
                sq = delta * delta
                s2 += sq
                s4 += sq * sq
                for j, name in enumerate(names):
                    m[name] = spp_step(m[name], g, taus, ESTIMATORS[name])
                    errors[t + 1, j] = torch.linalg.vector_norm(m[name] - g_hat, dim=-1) / g_norm
                bar.update(1)
        errors, noise = errors.cpu(), noise.cpu()
        if not bool(torch.isfinite(errors).all()):
            raise FloatingPointError("non-finite estimate; the gradients overflowed")
        for j, name in enumerate(names):
            for i, tau in enumerate(cfg.taus):
                curves.append({
                    "corpus": corpus_name, "batch_size": batch_size, "estimator": name,
                    "tau": tau, "seed": seed, "error": errors[:, j, i].tolist(),
                })
        noise_records.append({"corpus": corpus_name, "batch_size": batch_size, "seed": seed,
                              "noise": noise.tolist()})
        if kept is not None:
            estimates = {
                "mean": kept.mean(dim=0),
                "coordinate median": coordinate_median(kept),
                "geometric median": geometric_median(kept, max_iter=1000, tol=1e-8).median,
            }
            for est_name, est in estimates.items():
                medians.append({
                    "corpus": corpus_name, "batch_size": batch_size, "samples": keep,
                    "estimate": est_name,
                    "distance": float(torch.linalg.vector_norm(est - g_hat) / g_norm),
                })
            del kept
    bar.close()
    n = cfg.seeds * cfg.iterations
    m2, m4 = s2 / n, s4 / n
    kurtosis = torch.where(m2 > 0, m4 / torch.where(m2 > 0, m2 * m2, 1.0), torch.nan)
    return {"curves": curves, "noise": noise_records, "medians": medians,
            "kurtosis": kurtosis.float().cpu()}


def run(
    config: Union[str, TransformerGradientsConfig] = "ci",
    *,
    device="cpu",
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    corpora: Optional[Mapping[str, TextCorpus]] = None,
) -> Result:
    """Every corpus, batch size, seed, estimator and ``tau`` of ``config`` (see the module doc).

    Per corpus: the fixed-weight problem (:func:`build_problem`, :func:`mean_gradient`), then
    :func:`batch_size_study` per batch size. ``corpora`` maps names of ``config.corpora`` to
    :class:`~median_sgd.data.text.TextCorpus` objects to use instead of loading them (your own
    text, or a small one for a quick test). ``dtype``: the model's (``None``: float32, the only
    one it is built in; accepted for the common signature).

    Tables:

    * ``curves``: one record per corpus, batch size, estimator, ``tau`` and seed, with
      ``"error"`` the relative errors ``||m_t - g_hat|| / ||g_hat||`` for ``t = 0..iterations``;
    * ``noise``: one record per corpus, batch size and seed, with ``"noise"`` the relative noise
      norms ``||g_t - g_hat|| / ||g_hat||`` for ``t = 1..iterations``;
    * ``problems``: one record per corpus (:func:`problem_record`);
    * ``kurtosis[(corpus, batch_size)]``: the ``(d,)`` per-coordinate kurtosis of the noise over
      all iterations and seeds (NaN where the noise is always 0), and ``groups[corpus]`` the
      coordinate ranges of the embedding, the transformer layers and the decoder;
    * ``medians``: one record per corpus, batch size and ``estimate`` (``"mean"``,
      ``"coordinate median"``, ``"geometric median"`` of the first ``median_samples`` mini-batch
      gradients of seed 0), with ``"distance"`` its relative distance ``||est - g_hat|| / ||g_hat||``:
      what CClip and VClip converge to when ``tau`` is small, against what momentum converges to;
    * ``corpora[name]``: the :class:`~median_sgd.data.text.TextCorpus` used.
    """
    cfg = resolve_config(config, CONFIGS)
    only_dtype(dtype)
    given = dict(corpora or {})
    unknown = set(given) - set(cfg.corpora)
    if unknown:
        raise ValueError(f"corpora given for names not in config.corpora: {sorted(unknown)}")
    device = torch.device(device)
    records: Dict[str, List[dict]] = {"curves": [], "noise": [], "problems": [], "medians": []}
    kurtosis: Dict[Tuple[str, int], torch.Tensor] = {}
    groups: Dict[str, Dict[str, Tuple[int, int]]] = {}
    used: Dict[str, TextCorpus] = {}
    for corpus_name in cfg.corpora:
        corpus = given[corpus_name] if corpus_name in given else _load_corpus(corpus_name, cfg)
        if not isinstance(corpus, TextCorpus):
            raise TypeError(f"corpora[{corpus_name!r}] must be a TextCorpus, got {type(corpus).__name__}")
        used[corpus_name] = corpus
        model, segments = build_problem(corpus, cfg, device=device)
        too_big = [b for b in cfg.batch_sizes if b > segments.shape[0]]
        if too_big:
            raise ValueError(f"batch sizes {too_big} exceed the {segments.shape[0]} segments of {corpus_name}")
        loss0, g_hat = mean_gradient(model, segments, cfg.chunk)
        groups[corpus_name] = _groups(model)
        records["problems"].append(problem_record(corpus_name, corpus, cfg, segments, loss0, g_hat))
        for batch_size in cfg.batch_sizes:
            study = batch_size_study(corpus_name, model, segments, g_hat, batch_size, cfg, progress=progress)
            kurtosis[(corpus_name, batch_size)] = study.pop("kurtosis")
            for name, rows in study.items():
                records[name] += rows
    return Result(cfg, **records, kurtosis=kurtosis, groups=groups, corpora=used)
