"""The Fig. 2 experiment (stable_noise): batching is exact, records are tidy, the claims hold small."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import median_sgd as ms
from median_sgd.experiments import SCALES, select, stable_noise as sn

TINY = sn.StableNoiseConfig(dim=4, steps=60, seeds=3, tau=0.05, inv_alphas=(0.5, 1.0, 1.5),
                            chunk=25, curve_every=20)


def test_configs_are_the_paper_size():
    assert set(sn.CONFIGS) == set(SCALES)
    for cfg in sn.CONFIGS.values():
        # workshop paper, Section 4.1: d = 10, tau = 0.01, 1000 iterations, 50 seeds
        assert (cfg.dim, cfg.tau, cfg.steps, cfg.seeds) == (10, 0.01, 1000, 50)
        assert min(cfg.inv_alphas) == 0.5 and max(cfg.inv_alphas) == 1.5
        assert set(sn.PAPER_ESTIMATORS) <= set(cfg.estimators)
    ci, paper = sn.CONFIGS["ci"], sn.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed == {"inv_alphas"} and set(ci.inv_alphas) <= set(paper.inv_alphas)


def test_simulate_equals_a_plain_loop_per_alpha_seed_and_estimator():
    """The batched run is the same computation as one scalar loop per (alpha, seed, estimator)."""
    cfg = dataclasses.replace(TINY, steps=30, chunk=12)  # a partial last chunk
    errors, target = sn.simulate(cfg)
    A, S, E = len(cfg.inv_alphas), cfg.seeds, len(cfg.estimators)
    assert errors.shape == (cfg.steps + 1, E, A, S) and target.shape == (S, cfg.dim)
    assert bool((errors[0] == 1).all())
    # redraw the same random numbers in the same order
    gen = torch.Generator().manual_seed(cfg.seed)
    target2 = torch.randn(S, cfg.dim, generator=gen, dtype=torch.float64)
    assert torch.equal(target, target2)
    alpha = (1.0 / torch.tensor(cfg.inv_alphas, dtype=torch.float64)).view(1, A, 1, 1)
    noise = torch.cat([
        ms.sample_stable(alpha, (min(cfg.chunk, cfg.steps - s), A, S, cfg.dim), loc=target,
                         generator=gen, dtype=torch.float64)
        for s in range(0, cfg.steps, cfg.chunk)
    ])
    for e, name in enumerate(cfg.estimators):
        method, div = sn.ESTIMATORS[name]
        step = ms.spp_step if method == "spp" else ms.sgd_step
        for a in range(A):
            for s in range(S):
                m = torch.zeros(cfg.dim, dtype=torch.float64)
                for t in range(cfg.steps):
                    m = step(m, noise[t, a, s], cfg.tau, div)
                    want = torch.linalg.vector_norm(m - target[s]) / torch.linalg.vector_norm(target[s])
                    torch.testing.assert_close(errors[t + 1, e, a, s], want, rtol=1e-12, atol=0)


def test_simulate_is_deterministic_and_keeps_dtype():
    a, _ = sn.simulate(TINY)
    b, _ = sn.simulate(TINY)
    assert torch.equal(a, b)
    c, target = sn.simulate(TINY, dtype=torch.float32)
    assert c.dtype == torch.float32 and target.dtype == torch.float32
    assert torch.isfinite(c).all()
    with pytest.raises(TypeError):
        sn.simulate(TINY, dtype=torch.int64)


def test_run_records_and_the_papers_claims_at_a_small_size():
    cfg = dataclasses.replace(TINY, steps=300, seeds=8, tau=0.02, dim=6, chunk=100, curve_every=50)
    res = sn.run(cfg)
    A, E = len(cfg.inv_alphas), len(cfg.estimators)
    assert len(res.final) == A * E
    assert len(res.curves) == A * E * (cfg.steps // cfg.curve_every + 1)
    for r in res.final + res.curves:
        assert r["min"] <= r["median"] <= r["max"] and r["min"] <= r["mean"] <= r["max"]
        assert r["alpha"] == pytest.approx(1 / r["inv_alpha"])
    torch.testing.assert_close(
        torch.tensor(select(res.final, "median", inv_alpha=1.5, estimator="CClip"), dtype=torch.float64),
        res.errors[-1, cfg.estimators.index("CClip"), 2].quantile(0.5), rtol=1e-15, atol=0)
    assert select(res.curves, inv_alpha=1.0, estimator="VClip", step=0) == 1.0
    # Heavy tails (alpha = 2/3): momentum is far off, both clippings are not.
    for clip in ("CClip", "VClip"):
        assert select(res.final, inv_alpha=1.5, estimator="momentum") > 3 * select(
            res.final, inv_alpha=1.5, estimator=clip)
    # Gaussian noise: momentum is as good as clipping.
    assert select(res.final, inv_alpha=0.5, estimator="momentum") < 1.5 * select(
        res.final, inv_alpha=0.5, estimator="CClip")


def test_bad_configs_and_scales():
    with pytest.raises(ValueError, match="unknown scale"):
        sn.run("huge")
    with pytest.raises(TypeError):
        sn.simulate(3)
    for bad in ({"tau": 0.0}, {"steps": 0}, {"inv_alphas": (0.4,)}, {"inv_alphas": ()},
                {"estimators": ("median",)}, {"scale": -1.0}, {"chunk": 0}):
        with pytest.raises(ValueError):
            dataclasses.replace(TINY, **bad)
    assert sn.alpha_index(TINY, (1.5, 0.5)) == [2, 0]
    with pytest.raises(ValueError):
        sn.alpha_index(TINY, (0.7,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_simulate_on_cuda_stays_on_device():
    errors, target = sn.simulate(TINY, device="cuda")
    assert errors.device.type == "cuda" and target.device.type == "cuda"
    assert torch.isfinite(errors).all()
