"""The tracking experiment (chapter 3): configs, tidy records, and the chapter's claims at a tiny size."""

from __future__ import annotations

import dataclasses
import math

import pytest
import scipy.stats as ss
import torch

import median_sgd as ms
from median_sgd.experiments import SCALES, select, tracking

TINY = tracking.TrackingConfig(
    seeds=8,
    chunk=300,
    fixed_steps=1500,
    fixed_tau=0.05,
    reference_samples=20_000,
    curve_points=10,
    drift_dim=4,
    drift_steps=600,
    drift_speed=0.02,
    drift_taus=(0.005, 0.05, 0.5),
)


@pytest.fixture(scope="module")
def result():
    return tracking.run(TINY)


def test_scales_differ_only_in_sizes():
    assert set(tracking.CONFIGS) == set(SCALES)
    ci, paper = tracking.CONFIGS["ci"], tracking.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed and changed <= {"seeds", "fixed_steps", "reference_samples", "curve_points",
                                   "drift_steps", "drift_taus"}
    assert paper.seeds > ci.seeds and paper.fixed_steps > ci.fixed_steps
    assert len(paper.drift_taus) > len(ci.drift_taus)


def test_estimators_are_the_library_steps():
    m = torch.tensor([0.0, 0.0], dtype=torch.float64)
    g = torch.tensor([3.0, -0.1], dtype=torch.float64)
    expected = {
        "momentum (SGD)": m + 0.5 * (g - m),
        "momentum": m + (0.5 / 1.5) * (g - m),
        "adaptive momentum": m + 0.5 * g / torch.linalg.vector_norm(g),
        "VClip": m + 0.5 * g / torch.linalg.vector_norm(g),
        "signed increment": m + 0.5 * torch.sign(g),
        "CClip": torch.tensor([0.5, -0.1], dtype=torch.float64),
    }
    steps = {"sgd": ms.sgd_step, "spp": ms.spp_step}
    for name, (method, div) in tracking.ESTIMATORS.items():
        torch.testing.assert_close(steps[method](m, g, 0.5, div), expected[name])
    assert {tracking.target_of(e) for e in tracking.ESTIMATORS} == {"mean", "geometric median",
                                                                     "coordinate median"}
    with pytest.raises(ValueError, match="unknown estimator"):
        tracking.target_of("Adam")


def test_lomax_sampler_against_scipy():
    x = tracking.sample_lomax(1.5, (200_000,), generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    assert x.dtype == torch.float64 and bool((x >= 0).all())
    ks = ss.kstest(x.numpy(), ss.lomax(1.5).cdf)
    assert ks.pvalue > 1e-3
    assert float(x.median()) == pytest.approx(2 ** (1 / 1.5) - 1, abs=0.01)
    with pytest.raises(ValueError, match="tail_index"):
        tracking.sample_lomax(0.0, (3,))


def test_fixed_study_records_and_targets(result):
    fixed = result.fixed
    t = fixed["targets"]
    # the three centres of the skewed distribution are distinct
    assert float(torch.linalg.vector_norm(t["mean"] - t["geometric median"])) > 1.0
    assert float(torch.linalg.vector_norm(t["geometric median"] - t["coordinate median"])) > 0.1
    names = set(TINY.estimators)
    assert {r["estimator"] for r in fixed["final"]} == names
    assert {r["step"] for r in fixed["curves"]} >= {0, TINY.fixed_steps}
    for rec in fixed["curves"] + fixed["final"]:
        assert rec["q10"] <= rec["median"] <= rec["q90"]
    assert fixed["trace"]["CClip"].shape == (TINY.fixed_steps + 1, 2)
    assert torch.equal(fixed["trace"]["CClip"][0], torch.zeros(2, dtype=torch.float64))


def test_each_estimator_settles_at_its_own_median(result):
    # The chapter's claim: the tail average lies much closer to the D-median of the estimator's
    # divergence than to the two other centres.
    for name in TINY.estimators:
        own = tracking.target_of(name)
        d_own = select(result.fixed["final"], "distance", estimator=name, target=own)
        others = [select(result.fixed["final"], "distance", estimator=name, target=c)
                  for c in tracking.TARGETS.values() if c != own]
        assert d_own < 0.25 * min(others), (name, d_own, others)


def test_fixed_trace_is_the_estimator_run_by_hand():
    # The first seed's path equals a plain loop over the library step (no batching artefacts).
    cfg = dataclasses.replace(TINY, fixed_steps=40, chunk=15, reference_samples=100, seeds=3)
    fixed = tracking.fixed_study(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    mixing = torch.tensor(cfg.mixing, dtype=torch.float64)
    location = torch.randn(2, generator=gen, dtype=torch.float64)
    tracking.sample_lomax(cfg.tail_index, (cfg.reference_samples, 2), generator=gen, dtype=torch.float64)
    m = torch.zeros(cfg.seeds, 2, dtype=torch.float64)
    for start in range(0, cfg.fixed_steps, cfg.chunk):
        k = min(cfg.chunk, cfg.fixed_steps - start)
        g = location + tracking.sample_lomax(cfg.tail_index, (k, cfg.seeds, 2), generator=gen,
                                             dtype=torch.float64) @ mixing.T
        for i in range(k):
            m = ms.spp_step(m, g[i], cfg.fixed_tau, "l1")
            torch.testing.assert_close(fixed["trace"]["CClip"][start + i + 1], m[0], rtol=0, atol=1e-12)


def test_drift_study_lag_and_speed_limit(result):
    recs = result.drift["records"]
    v, T, d = TINY.drift_speed, TINY.drift_steps, TINY.drift_dim
    assert {(r["estimator"], r["tau"]) for r in recs} == {
        (e, t) for e in TINY.estimators for t in TINY.drift_taus}
    # momentum: the steady lag is v (1 - a)/a with a = tau (SGD) or tau/(1 + tau) (SPP)
    tau = 0.05
    assert select(recs, "lag", estimator="momentum (SGD)", tau=tau) == pytest.approx(v * (1 - tau) / tau, rel=0.2)
    assert select(recs, "lag", estimator="momentum", tau=tau) == pytest.approx(v / tau, rel=0.2)
    # a clipped estimator moves at most tau per step (per coordinate for l1): below the target's
    # speed it falls behind for good, by at least v (T - 1) - tau T (times sqrt(d) for l1)
    slow = 0.005
    for name in ("VClip", "adaptive momentum"):
        assert select(recs, "final_lag", estimator=name, tau=slow) >= v * (T - 1) - slow * T
    for name in ("CClip", "signed increment"):
        assert select(recs, "final_lag", estimator=name, tau=slow) >= v * (T - 1) - slow * math.sqrt(d) * T
    # ... and a larger tau follows it
    assert select(recs, "final_lag", estimator="VClip", tau=0.5) < 1.0
    for rec in recs:
        assert rec["q10"] <= rec["median"] <= rec["q90"]
    assert result.drift["trace"]["VClip"].shape == (T, len(TINY.drift_taus))
    assert result.drift["target_trace"].shape == (T,)


def test_run_is_reproducible(result):
    again = tracking.run(TINY)
    assert again.fixed["final"] == result.fixed["final"]
    assert again.drift["records"] == result.drift["records"]


def test_float32_runs_and_keeps_dtype():
    cfg = dataclasses.replace(TINY, fixed_steps=50, drift_steps=50, reference_samples=500, seeds=2)
    out = tracking.run(cfg, dtype=torch.float32)
    assert out.fixed["trace"]["VClip"].dtype == torch.float32
    assert out.drift["trace"]["VClip"].dtype == torch.float32


def test_bad_config_and_arguments():
    with pytest.raises(ValueError, match="unknown scale"):
        tracking.run("huge")
    with pytest.raises(TypeError):
        tracking.run(42)
    with pytest.raises(TypeError, match="dtype"):
        tracking.run(TINY, dtype=torch.int64)
    for bad in (dict(seeds=0), dict(fixed_tau=-1.0), dict(tail_index=1.0), dict(drift_alpha=0.9),
                dict(drift_taus=()), dict(drift_taus=(0.1, 2.0)), dict(mixing=((1.0, 2.0),)),
                dict(estimators=("Adam",)), dict(drift_speed=float("nan"))):
        with pytest.raises(ValueError):
            dataclasses.replace(TINY, **bad)
