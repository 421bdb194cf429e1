"""The fixed-weight transformer experiment: exact full-batch gradient, replayed estimators, records."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from median_sgd.data.text import corpus_from_lines
from median_sgd.experiments import SCALES
from median_sgd.experiments import transformer_gradients as tg
from median_sgd.plotting import summarize_curves

TINY = tg.TransformerGradientsConfig(
    corpora=("pydoc",), seq_len=6, d_model=8, nhead=2, d_hid=16, nlayers=1,
    batch_sizes=(4, 32), iterations=12, seeds=2, taus=(1e-3, 1e-2, 1e3), headline_tau=1e-2,
)


@pytest.fixture(scope="module")
def small_corpus():
    """The first 150 sentences of the ci corpus (pydoc help text): real English, ~2,000 words."""
    from pydoc_data.topics import topics

    from median_sgd.data.text import normalize_to_ptb_format

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return corpus_from_lines("pydoc", {"train": normalize_to_ptb_format(text)[:150]})


@pytest.fixture(scope="module")
def tiny_result(small_corpus):
    return tg.run(TINY, corpora={"pydoc": small_corpus})


def _small_problem():
    lines = ["the cat sat on the mat", "a dog ran", "the dog sat on a cat", "N cats ran on"] * 3
    corpus = corpus_from_lines("toy", {"train": lines})
    cfg = dataclasses.replace(TINY, seq_len=4)
    return tg.build_problem(corpus, cfg)


def test_scales_differ_only_in_data_and_sizes():
    ci, paper = tg.CONFIGS["ci"], tg.CONFIGS["paper"]
    assert set(tg.CONFIGS) == set(SCALES)
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed <= {"corpora", "seq_len", "d_model", "d_hid", "batch_sizes", "iterations", "seeds",
                       "median_samples"}
    # the methods' parameters are the same at both scales
    assert ci.taus == paper.taus and ci.headline_tau == paper.headline_tau == 0.01
    assert paper.corpora == ("ptb", "wikitext2") and paper.batch_sizes == (64, 256, 1024)
    assert (paper.seq_len, paper.d_model, paper.nhead, paper.d_hid, paper.nlayers) == (35, 200, 2, 200, 2)


def test_each_scale_names_a_corpus_for_fig_3_and_fig_4():
    for scale, cfg in tg.CONFIGS.items():
        figs = tg.FIGURE_CORPORA[scale]
        assert set(figs) == {"Fig. 3", "Fig. 4"} and tuple(figs.values()) == cfg.corpora
    assert tg.FIGURE_CORPORA["ci"]["Fig. 4"] == "docstrings"
    assert tg.FIGURE_CORPORA["paper"]["Fig. 4"] == "wikitext2"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="corpora"):
        tg.TransformerGradientsConfig(corpora=("imdb",))
    with pytest.raises(ValueError, match="batch_sizes"):
        tg.TransformerGradientsConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match="taus"):
        tg.TransformerGradientsConfig(taus=(0.0, 1.0), headline_tau=1.0)
    with pytest.raises(ValueError, match="headline_tau"):
        tg.TransformerGradientsConfig(taus=(1.0,))
    with pytest.raises(ValueError, match="iterations"):
        tg.TransformerGradientsConfig(iterations=0)
    with pytest.raises(ValueError, match="unknown scale"):
        tg.run("huge")
    with pytest.raises(TypeError, match="config"):
        tg.run(3)
    with pytest.raises(ValueError, match="exceed"):
        tg.run(dataclasses.replace(TINY, batch_sizes=(10**6,), iterations=1, seeds=1),
               corpora={"pydoc": corpus_from_lines("pydoc", {"train": ["a b c d e f g h"] * 3})})
    with pytest.raises(ValueError, match="not in config.corpora"):
        tg.run(TINY, corpora={"ptb": corpus_from_lines("ptb", {"train": ["a b"]})})
    with pytest.raises(TypeError, match="TextCorpus"):
        tg.run(TINY, corpora={"pydoc": ["a b"]})


def test_full_batch_gradient_is_the_mean_of_per_segment_gradients():
    model, segments = _small_problem()
    model.double()
    n = segments.shape[0]
    brute = sum(tg.minibatch_gradient(model, segments[i:i + 1]) for i in range(n)) / n
    g_hat = tg.full_batch_gradient(model, segments, chunk=3)
    torch.testing.assert_close(g_hat, brute, rtol=1e-10, atol=1e-12)
    loss, g_once = tg.mean_gradient(model, segments)
    torch.testing.assert_close(g_once, brute, rtol=1e-10, atol=1e-12)
    loss_chunked, _ = tg.mean_gradient(model, segments, chunk=5)
    torch.testing.assert_close(loss_chunked, loss, rtol=1e-12, atol=0)
    assert g_hat.numel() == sum(p.numel() for p in model.parameters())


def test_minibatches_of_a_partition_average_to_the_full_gradient():
    # Unbiasedness behind the experiment: averaging the mini-batch gradients of a partition of
    # the segments into equal batches gives g_hat exactly.
    model, segments = _small_problem()
    model.double()
    n = segments.shape[0] - segments.shape[0] % 3
    segments = segments[:n]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    parts = perm.view(3, -1)
    mean_of_batches = sum(tg.minibatch_gradient(model, segments[p]) for p in parts) / 3
    torch.testing.assert_close(mean_of_batches, tg.full_batch_gradient(model, segments, 4),
                               rtol=1e-10, atol=1e-12)


def test_records_are_complete_and_start_at_relative_error_one(tiny_result):
    r = tiny_result
    assert len(r.curves) == 2 * 3 * 3 * 2  # batch sizes x estimators x taus x seeds
    assert len(r.noise) == 2 * 2
    for rec in r.curves:
        assert len(rec["error"]) == TINY.iterations + 1 and rec["error"][0] == 1.0
        assert all(e >= 0 for e in rec["error"])
    (problem,) = r.problems
    assert problem["corpus"] == "pydoc" and problem["grad_norm"] > 0
    assert problem["tokens"] > 1000 and 200 < problem["vocab_size"] < 2000
    assert abs(problem["loss"] - problem["log_vocab"]) < 0.2  # near-uniform predictions at init
    assert set(r.groups["pydoc"]) == {"embedding", "transformer layers", "decoder"}
    lo, hi = r.groups["pydoc"]["decoder"]
    assert hi == problem["parameters"] and r.kurtosis[("pydoc", 4)].shape == (problem["parameters"],)
    k = r.kurtosis[("pydoc", 32)]
    assert bool((k[torch.isfinite(k)] >= 1 - 1e-4).all())  # E[x^4] >= E[x^2]^2
    assert {(m["batch_size"], m["estimate"]) for m in r.medians} == {
        (b, e) for b in TINY.batch_sizes for e in ("mean", "coordinate median", "geometric median")}
    s = summarize_curves(r.curves, batch_size=4, estimator="CClip", tau=1e-2)
    assert s["seeds"] == 2 and bool((s["min"] <= s["median"]).all() and (s["median"] <= s["max"]).all())


def test_large_tau_clipping_is_the_last_sample(tiny_result):
    # tau = 1e3 never clips: m_{t+1} = g_t, so the error is the noise of the latest mini-batch.
    for rec in tiny_result.noise:
        for name in ("CClip", "VClip"):
            (curve,) = [c for c in tiny_result.curves if c["estimator"] == name and c["tau"] == 1e3
                        and c["batch_size"] == rec["batch_size"] and c["seed"] == rec["seed"]]
            torch.testing.assert_close(torch.tensor(curve["error"][1:]), torch.tensor(rec["noise"]),
                                       rtol=1e-5, atol=1e-6)


def test_estimators_match_an_independent_replay(tiny_result):
    # Replay the mini-batch stream of batch size 32, seed 0, and run the three estimators from
    # their closed forms (eqs. 11, 12, 15) in float64; check the sample mean and coordinate-wise
    # median of the kept gradients with numpy.
    import numpy as np

    cfg, b, seed = TINY, 32, 0
    corpus = tiny_result.corpora["pydoc"]
    model, segments = tg.build_problem(corpus, cfg)
    g_hat = tg.full_batch_gradient(model, segments, 10**6).double()
    gen = torch.Generator().manual_seed(cfg.data_seed + 1000 * seed + b)
    tau = 1e-2
    m = {name: torch.zeros_like(g_hat) for name in tg.ESTIMATORS}
    expected = {name: [1.0] for name in tg.ESTIMATORS}
    kept = []
    for _ in range(cfg.iterations):
        idx = torch.randperm(segments.shape[0], generator=gen)[:b]
        g = tg.minibatch_gradient(model, segments[idx]).double()
        kept.append(g.numpy())
        beta = 1 / (1 + tau)
        m["momentum"] = beta * m["momentum"] + (1 - beta) * g
        d = g - m["CClip"]
        m["CClip"] = m["CClip"] + d.clamp(-tau, tau)
        d = g - m["VClip"]
        m["VClip"] = m["VClip"] + min(1.0, tau / float(d.norm())) * d
        for name in m:
            expected[name].append(float((m[name] - g_hat).norm() / g_hat.norm()))
    for name in tg.ESTIMATORS:
        (curve,) = [c for c in tiny_result.curves if c["estimator"] == name and c["tau"] == tau
                    and c["batch_size"] == b and c["seed"] == seed]
        torch.testing.assert_close(torch.tensor(curve["error"]), torch.tensor(expected[name]),
                                   rtol=2e-4, atol=1e-6)
    kept = np.stack(kept)
    gh = g_hat.numpy()
    oracle = {"mean": kept.mean(0), "coordinate median": np.median(kept, axis=0)}
    for name, est in oracle.items():
        (rec,) = [r for r in tiny_result.medians if r["batch_size"] == b and r["estimate"] == name]
        assert rec["samples"] == cfg.iterations
        assert abs(rec["distance"] - np.linalg.norm(est - gh) / np.linalg.norm(gh)) < 1e-4 * rec["distance"]


def test_run_is_reproducible(tiny_result):
    again = tg.run(dataclasses.replace(TINY, batch_sizes=(4,), seeds=1),
                   corpora={"pydoc": tiny_result.corpora["pydoc"]})
    first = [c for c in tiny_result.curves if c["batch_size"] == 4 and c["seed"] == 0]
    assert [c["error"] for c in again.curves] == [c["error"] for c in first]


@pytest.mark.cuda
def test_cuda_matches_cpu(tiny_result):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = dataclasses.replace(TINY, batch_sizes=(32,), seeds=1)
    gpu = tg.run(cfg, device="cuda", corpora={"pydoc": tiny_result.corpora["pydoc"]})
    cpu = [c for c in tiny_result.curves if c["batch_size"] == 32 and c["seed"] == 0]
    for a, c in zip(gpu.curves, cpu):
        torch.testing.assert_close(torch.tensor(a["error"]), torch.tensor(c["error"]), rtol=1e-3, atol=1e-4)


def test_figures_draw_from_the_records(tiny_result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from median_sgd.plotting import plot_estimation_error, plot_noise_kurtosis, plot_tau_sweep, plot_zipf

    r = tiny_result
    axes = plot_estimation_error(r.curves, corpus="pydoc", tau=1e-2)
    assert [ax.get_title() for ax in axes] == ["batch size 4", "batch size 32"]
    assert len(axes[0].get_lines()) == 3
    axes = plot_tau_sweep(r.curves, corpus="pydoc", iterations=(2, TINY.iterations))
    assert len(axes[1].get_lines()) == 3 * 2
    axes = plot_noise_kurtosis(r.kurtosis, r.groups["pydoc"], corpus="pydoc")
    assert len(axes) == 2
    plot_zipf(torch.bincount(r.corpora["pydoc"]["train"]))
    from median_sgd.plotting import COLUMN_WIDTH

    for axes in (plot_estimation_error(r.curves, corpus="pydoc", tau=1e-2),
                 plot_tau_sweep(r.curves, corpus="pydoc", iterations=(2, TINY.iterations))):
        fig = axes[0].figure  # sized for the column, one legend for the figure
        assert fig.get_size_inches()[0] <= COLUMN_WIDTH + 1e-9 and len(fig.legends) == 1
        assert all(ax.get_legend() is None for ax in axes)
    with pytest.raises(ValueError, match="no curves"):
        plot_estimation_error(r.curves, corpus="ptb", tau=1e-2, batch_sizes=(4,))
    plt.close("all")
