"""experiments.sample_median_sgd: closed forms against independent oracles, the batched
simulation against a plain loop, the chapter's claims at a tiny size, configs and bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import median_sgd as ms
from median_sgd.experiments import SCALES, select
from median_sgd.experiments import sample_median_sgd as sm

TINY = sm.SampleMedianSGDConfig(
    dim=4,
    stationary_alphas=(2.0, 1.0),
    stationary_etas=(0.2, 0.05),
    stationary_steps=150,
    stationary_seeds=60,
    alphas=(2.0, 1.0),
    steps=300,
    seeds=12,
    curve_every=50,
    sizes=(3, 9),
    skew_sizes=(1, 5),
    skew_steps=400,
    skew_seeds=40,
    gm_n=30,
    gm_seeds=4,
    passes=6,
    weiszfeld_iters=6,
)


# ------------------------------------------------------------------------------------ closed forms


def test_stationary_scale_matches_the_stable_sum_and_a_brute_force_series():
    # alpha = 2: xi ~ N(0, 2), so the stationary variance of e = (1 - eta h) e - eta xi is
    # 2 eta^2 / (1 - (1 - eta h)^2), and a Gaussian stable law of scale c has variance 2 c^2.
    eta, h = 0.1, 3.0
    c = sm.stationary_scale(2.0, eta, h).item()
    assert 2 * c**2 == pytest.approx(2 * eta**2 / (1 - (1 - eta * h) ** 2), rel=1e-12)
    # alpha = 1 (Cauchy): scales add, sum_k eta (1 - eta h)^k = 1/h whatever eta.
    for eta in (0.3, 0.01):
        assert sm.stationary_scale(1.0, eta, 2.0).item() == pytest.approx(0.5, rel=1e-12)
    # Finite T and n samples: the series summed term by term.
    alpha, eta, h, n, T = 0.75, 0.05, 1.5, 5, 37
    series = sum(abs(1 - eta * h) ** (alpha * k) for k in range(T))
    want = eta * n ** (1 / alpha - 1) * series ** (1 / alpha)
    assert sm.stationary_scale(alpha, eta, h, n=n, steps=T).item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="eta h"):
        sm.stationary_scale(1.0, 1.0, 2.5)


def test_pareto_median_mean_against_scipy_order_statistics():
    from scipy import integrate, stats

    tail = 1.5
    assert sm.pareto_median_mean(tail, 1) == pytest.approx(tail / (tail - 1), rel=1e-12)
    for n in (3, 5, 11):
        k = (n - 1) // 2
        # E[U^(-1/tail)] for U ~ Beta(k+1, k+1), by numerical integration.
        beta = stats.beta(k + 1, k + 1)
        want, _ = integrate.quad(lambda u: u ** (-1 / tail) * beta.pdf(u), 0, 1)
        assert sm.pareto_median_mean(tail, n) == pytest.approx(want, rel=1e-7)
    # Tends to the population median 2^(1/tail).
    assert sm.pareto_median_mean(tail, 2001) == pytest.approx(2 ** (1 / tail), rel=1e-3)
    with pytest.raises(ValueError, match="odd"):
        sm.pareto_median_mean(tail, 4)
    with pytest.raises(ValueError, match="no finite mean"):
        sm.pareto_median_mean(0.5, 1)


# ------------------------------------------------------------------------------------ simulation


def test_aggregate_matches_the_library_and_rejects_unknown_names():
    G = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sm.aggregate(G, "mean"), G.mean(-2))
    torch.testing.assert_close(sm.aggregate(G, "coordinate median"), G.median(dim=-2).values)
    # gm_iters fixed Weiszfeld iterations (no early stop, no host sync) ...
    fixed = ms.geometric_median(G, max_iter=7, tol=0.0, fixed_iter=True).median
    torch.testing.assert_close(sm.aggregate(G, "geometric median", gm_iters=7), fixed, rtol=0, atol=0)
    # ... and enough of them minimise the objective as well as the adaptive solver does
    f = lambda m: ms.geometric_median_objective(G, m)
    gm = ms.geometric_median(G, tol=1e-12, max_iter=5000).median
    assert bool((f(sm.aggregate(G, "geometric median", gm_iters=500)) <= f(gm) * (1 + 1e-9)).all())
    with pytest.raises(ValueError, match="unknown estimator"):
        sm.aggregate(G, "median")


@pytest.mark.parametrize("estimator", sm.ESTIMATORS)
def test_batched_simulation_equals_a_plain_loop(estimator):
    """The batched run of (alpha, seed) problems equals a per-problem loop with the same draws."""
    h = torch.linspace(1.0, 4.0, 3, dtype=torch.float64)
    alphas = torch.tensor([2.0, 0.8], dtype=torch.float64).view(-1, 1, 1, 1)
    kw = dict(estimator=estimator, n=5, h=h, steps=25, eta0=0.2, t0=5.0, sigma0=1.0, sigma1=0.5,
              start=2.0, gm_iters=5)
    out = sm.simulate(batch=(2, 3), alpha=alphas, generator=torch.Generator().manual_seed(3), **kw)
    # The same noise, drawn once for the whole batch, then replayed problem by problem.
    gen = torch.Generator().manual_seed(3)
    noise = [ms.sample_stable(alphas, (2, 3, 5, 3), generator=gen, dtype=torch.float64) for _ in range(25)]
    for a in range(2):
        for s in range(3):
            e = torch.full((3,), 2.0, dtype=torch.float64)
            for t in range(25):
                eta = 0.2 / (1 + t / 5.0)
                G = h * e + (1.0 + 0.5 * torch.linalg.vector_norm(e)) * noise[t][a, s]
                e = e - eta * sm.aggregate(G, estimator, gm_iters=5)
            torch.testing.assert_close(out["final"][a, s], e, rtol=1e-12, atol=1e-12)
    assert out["errors"].shape == (26, 2, 3)
    torch.testing.assert_close(out["errors"][-1], torch.linalg.vector_norm(out["final"], dim=-1))


def test_simulation_freezes_diverged_runs_and_is_deterministic():
    h = torch.ones(2, dtype=torch.float64)
    kw = dict(estimator="mean", batch=(4,), n=1, h=h, steps=300, eta0=1.0, t0=None, sigma0=1.0,
              sigma1=5.0, start=1.0, alpha=0.6)
    a = sm.simulate(generator=torch.Generator().manual_seed(0), **kw)
    b = sm.simulate(generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a["errors"], b["errors"])
    assert bool(a["diverged"].any())
    assert torch.isfinite(a["final"]).all()
    assert bool((a["errors"][-1][a["diverged"]] == sm.DIVERGED).all())


def test_simulation_keeps_dtype_and_rejects_bad_arguments():
    h = torch.ones(2, dtype=torch.float32)
    out = sm.simulate(estimator="coordinate median", batch=(2,), n=3, h=h, steps=3, eta0=0.1, t0=1.0,
                      sigma0=1.0, sigma1=0.0, start=1.0, generator=torch.Generator().manual_seed(0))
    assert out["final"].dtype == torch.float32 and out["average"].dtype == torch.float32
    base = dict(estimator="mean", batch=(2,), n=3, h=h, steps=3, eta0=0.1, t0=1.0, sigma0=1.0,
                sigma1=0.0, start=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown noise"):
        sm.simulate(**{**base, "noise": "gauss"})
    with pytest.raises(ValueError, match="unknown estimator"):
        sm.simulate(**{**base, "estimator": "trimmed"})
    with pytest.raises(ValueError, match="n must be"):
        sm.simulate(**{**base, "n": 0})


# ------------------------------------------------------------------------------------ studies


@pytest.fixture(scope="module")
def tiny_result():
    return sm.run(TINY)


def test_run_records_are_tidy(tiny_result):
    r = tiny_result
    assert {x["estimator"] for x in r.final} == set(sm.ESTIMATORS)
    assert len(r.final) == len(TINY.alphas) * len(sm.ESTIMATORS)
    for rec in r.final + r.curves + r.sample_size:
        assert rec["q10"] <= rec["median"] <= rec["q90"]
    assert {x["step"] for x in r.curves} == set(range(0, TINY.steps + 1, TINY.curve_every))
    assert {x["method"] for x in r.gm_passes} == {"Weiszfeld", *sm.GM_METHODS}
    assert len(r.stationary) == len(TINY.stationary_alphas) * len(TINY.stationary_etas) * 2


def test_the_chapters_claims_hold_at_a_tiny_size(tiny_result):
    r = tiny_result
    final = {(x["alpha"], x["estimator"]): x for x in r.final}
    # Cauchy, state-dependent noise: mean-SGD blows up, the medians converge.
    assert final[1.0, "mean"]["median"] > 100
    assert final[1.0, "coordinate median"]["median"] < 0.5
    assert final[2.0, "mean"]["median"] < 0.5
    # Stationary law of mean-SGD: the pooled |e_T| / scale is the stable 3/4-quantile (1 for Cauchy).
    cauchy = [x for x in r.stationary if x["estimator"] == "mean" and x["alpha"] == 1.0]
    assert all(abs(x["pooled"] - 1.0) < 0.25 for x in cauchy)
    # ... and 1 lies in the distribution-free interval around the pooled median
    assert all(x["pooled_low"] < 1.0 < x["pooled_high"] for x in cauchy)
    assert all(x["pooled_low"] <= x["pooled"] <= x["pooled_high"] for x in r.stationary)
    # the interval for the one-coordinate spread is the binomial rank interval of its values
    assert all(x["spread_low"] <= x["spread"] <= x["spread_high"] for x in r.stationary)
    # alpha = 1/2: n = 3 (no finite mean) blows up, n = 9 (finite variance) converges.
    size = {x["n"]: x for x in r.sample_size}
    assert size[3]["median"] > 1e3 and size[9]["median"] < 0.5
    # Skewed noise: the median settles at -b_n, the mean near 0.
    med5 = [x for x in r.skew if x["n"] == 5 and x["estimator"] == "coordinate median"][0]
    assert med5["z"] == pytest.approx(med5["predicted"], abs=0.05)
    assert abs(select(r.skew, "z", n=5, estimator="mean")) < 0.3
    # Geometric median: Weiszfeld and decreasing-step SPP both improve on the mean.
    start = select(r.gm_passes, method="Weiszfeld", passes=0)
    assert select(r.gm_passes, method="Weiszfeld", passes=6) < 1e-6 * start
    assert select(r.gm_passes, method="SPP, tau0/p", passes=6) < 0.1 * start


def test_run_is_reproducible(tiny_result):
    again = sm.run(TINY)
    assert again.final == tiny_result.final and again.skew == tiny_result.skew
    assert again.gm_passes == tiny_result.gm_passes and again.stationary == tiny_result.stationary


def test_scales_differ_only_in_sizes():
    assert set(sm.CONFIGS) == set(SCALES)
    ci, paper = sm.CONFIGS["ci"], sm.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed <= {"stationary_steps", "stationary_seeds", "steps", "seeds", "curve_every",
                       "alphas", "sizes", "skew_steps", "skew_seeds", "skew_sizes", "gm_n",
                       "gm_seeds", "passes"}
    assert paper.seeds > ci.seeds and paper.steps > ci.steps
    assert set(ci.alphas) <= set(paper.alphas) and set(ci.sizes) <= set(paper.sizes)


def test_bad_configs_and_scales_are_rejected():
    with pytest.raises(ValueError, match="unknown scale"):
        sm.run("huge")
    with pytest.raises(TypeError, match="config"):
        sm.run(3)
    bad = [dict(dim=0), dict(n=1.5), dict(sigma0=0.0), dict(sigma1=-1.0), dict(alphas=(2.5,)),
           dict(stationary_etas=(0.6,)), dict(sizes=(4,)), dict(skew_tail=1.0), dict(h_max=0.5),
           dict(t0=float("inf")), dict(steps=True)]
    for kw in bad:
        with pytest.raises(ValueError):
            sm.SampleMedianSGDConfig(**kw)
    with pytest.raises(TypeError, match="dtype"):
        sm.run(TINY, dtype=torch.int64)


def test_curvatures_follow_the_config():
    cfg = dataclasses.replace(TINY, dim=5, h_min=2.0, h_max=6.0)
    np.testing.assert_allclose(sm.curvatures(cfg).numpy(), [2, 3, 4, 5, 6])
    assert math.isclose(float(sm.curvatures(cfg, dtype=torch.float32)[-1]), 6.0)


def test_cpu_runs_are_single_threaded_and_restore_the_thread_count():
    before = torch.get_num_threads()
    seen = []
    h = torch.ones(2, dtype=torch.float64)
    real = sm.aggregate
    try:
        sm.aggregate = lambda G, est, gm_iters=10: (seen.append(torch.get_num_threads()), real(G, est))[1]
        sm.simulate(estimator="mean", batch=(2,), n=3, h=h, steps=2, eta0=0.1, t0=1.0, sigma0=1.0,
                    sigma1=0.0, start=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        sm.aggregate = real
    assert seen == [1, 1]
    assert torch.get_num_threads() == before


def test_median_interval_is_the_binomial_rank_interval():
    # N = 100, z = 4: ranks ceil(50 - 20) = 30 and floor(50 + 20) + 1 = 71 (1-based)
    values = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double() + 1
    low, high = sm.median_interval(values, 4.0)
    assert (low.item(), high.item()) == (30.0, 71.0)
    # batched over leading dimensions, clamped to the sample for a large z
    low, high = sm.median_interval(values.expand(3, 100), 50.0)
    assert torch.equal(low, torch.ones(3, dtype=torch.float64)) and torch.equal(high, 100 * torch.ones(3, dtype=torch.float64))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="z"):
            sm.median_interval(values, bad)


def test_median_interval_covers_the_median_as_the_binomial_law_says():
    """Coverage P(|B - N/2| <= z sqrt(N)/2), B ~ Bin(N, 1/2): about 0.95 for z = 2, ~1 for z = 4."""
    gen = torch.Generator().manual_seed(1)
    x = ms.sample_stable(0.75, (4000, 201), generator=gen, dtype=torch.float64)  # median 0
    for z, (lo, hi) in ((2.0, (0.93, 0.97)), (4.0, (0.999, 1.0))):
        low, high = sm.median_interval(x, z)
        covered = ((low < 0) & (0 < high)).double().mean().item()
        assert lo <= covered <= hi, (z, covered)
