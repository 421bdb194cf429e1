"""Chapter 8's experiments (beyond): batching is exact, records are tidy, the claims hold small."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import median_sgd as ms
from median_sgd.experiments import SCALES, beyond as bd

TINY = bd.BeyondConfig(
    seeds=3, lp_ps=(1.0, 1.5, 2.0, math.inf), lp_steps=40, lp_noise=("cauchy", "contaminated"),
    curve_every=10, chunk=16, batch_sizes=(1, 5), batch_steps=40, batch_inv_alphas=(0.5, 1.5),
    clip21_steps=400, cc_steps=1500, sign_samples=20_000,
)


def test_configs_differ_only_in_sizes():
    assert set(bd.CONFIGS) == set(SCALES)
    ci, paper = bd.CONFIGS["ci"], bd.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed <= {"seeds", "lp_ps", "batch_sizes", "batch_inv_alphas"} and changed
    assert set(ci.lp_ps) <= set(paper.lp_ps) and set(ci.batch_sizes) <= set(paper.batch_sizes)
    assert {1.25, 1.5, 1.75} <= set(ci.lp_ps)


def test_draw_noise_is_symmetric_about_zero():
    gen = torch.Generator().manual_seed(0)
    X = bd.draw_noise(list(bd.NOISE_MODELS), (4000, 5, 10), contamination=0.2, generator=gen)
    assert X.shape == (4000, len(bd.NOISE_MODELS), 5, 10) and X.dtype == torch.float64
    below = (X < 0).double().mean(dim=(0, 2, 3))
    assert bool(((below - 0.5).abs() < 0.01).all())
    # whole samples are outliers in the contaminated model: about 20% of the vectors are far
    far = (X[:, list(bd.NOISE_MODELS).index("contaminated")].abs().amax(-1) > 10).double().mean()
    assert abs(far.item() - 0.2) < 0.02
    with pytest.raises(ValueError):
        bd.draw_noise(["laplace"], (3, 2))


def test_lp_taus():
    cfg = bd.CONFIGS["ci"]
    assert bd.lp_taus(cfg, 1.0) == (cfg.lp_tau, cfg.lp_tau)
    assert bd.lp_taus(cfg, 2.0)[1] == pytest.approx(cfg.lp_tau * math.sqrt(cfg.dim))
    assert bd.lp_taus(cfg, math.inf)[1] == pytest.approx(cfg.lp_tau * cfg.dim)
    # matched: the vector with entries +-tau lies on the dual ball's boundary for every p
    v = torch.full((cfg.dim,), cfg.lp_tau, dtype=torch.float64)
    for p in (1.25, 1.5, 3.0):
        tau = bd.lp_taus(cfg, p)[1]
        q = ms.prox.dual_exponent(p)
        assert torch.linalg.vector_norm(v, ord=q).item() == pytest.approx(tau)


def test_lp_study_equals_a_plain_loop():
    final, curves = bd.lp_study(TINY)
    assert len(final) == len(TINY.lp_ps) * 2 * len(TINY.lp_noise)
    assert len(curves) == len(final) * (TINY.lp_steps // TINY.curve_every + 1)
    gen = torch.Generator().manual_seed(TINY.seed)
    S, d = TINY.seeds, TINY.dim
    target = torch.randn(S, d, generator=gen, dtype=torch.float64)
    state = gen.get_state()
    for p in (1.0, 1.5):
        gen.set_state(state)
        noise = torch.cat([bd.draw_noise(TINY.lp_noise, (min(TINY.chunk, TINY.lp_steps - s), S, d),
                                         contamination=TINY.contamination,
                                         outlier_scale=TINY.outlier_scale, generator=gen) + target
                           for s in range(0, TINY.lp_steps, TINY.chunk)])
        for r, tau in enumerate(bd.lp_taus(TINY, p)):
            for j, noise_name in enumerate(TINY.lp_noise):
                errs = []
                for s in range(S):
                    m = torch.zeros(d, dtype=torch.float64)
                    for t in range(TINY.lp_steps):
                        m = ms.spp_step_lp(m, noise[t, j, s], tau, p)
                    errs.append((torch.linalg.vector_norm(m - target[s]) / torch.linalg.vector_norm(target[s])).item())
                rec = [x for x in final if x["p"] == p and x["rule"] == ("fixed", "matched")[r]
                       and x["noise"] == noise_name][0]
                assert rec["min"] == pytest.approx(min(errs), rel=1e-9)
                assert rec["max"] == pytest.approx(max(errs), rel=1e-9)


def test_lp_claim_at_a_small_size():
    cfg = dataclasses.replace(TINY, seeds=6, lp_steps=400, chunk=100, lp_noise=("stable 2/3",),
                              lp_ps=(1.0, 2.0), lp_tau=0.02)
    final, _ = bd.lp_study(cfg)
    err = {(r["p"], r["rule"]): r["median"] for r in final}
    # heavy-tailed independent coordinates: l_1 (CClip) beats l_2 (VClip) at either step rule
    assert err[1.0, "fixed"] < 0.5 * err[2.0, "fixed"]
    assert err[1.0, "matched"] < err[2.0, "matched"]


def test_batch_size_study_records_and_claims():
    cfg = dataclasses.replace(TINY, seeds=8, batch_steps=300, chunk=100, batch_tau=0.02,
                              batch_sizes=(1, 9))
    final, curves = bd.batch_size_study(cfg)
    assert len(final) == 2 * 2 * 3 * 2  # n, aggregators, estimators, alphas
    for r in final:
        assert r["min"] <= r["median"] <= r["max"] and r["samples"] == r["n"] * cfg.batch_steps
    err = {(r["n"], r["aggregator"], r["estimator"], r["inv_alpha"]): r["median"] for r in final}
    # alpha = 2/3: the mean of 9 samples is *more* spread than one sample; the median is less
    assert err[9, "mean", "momentum", 1.5] > err[1, "mean", "momentum", 1.5]
    assert err[9, "coordinate median", "momentum", 1.5] < 0.1 * err[1, "coordinate median", "momentum", 1.5]
    # Gaussian: averaging helps momentum
    assert err[9, "mean", "momentum", 0.5] < 0.6 * err[1, "mean", "momentum", 0.5]
    # n = 1: both aggregators are the sample itself
    for est in ("momentum", "VClip", "CClip"):
        assert err[1, "mean", est, 1.5] == err[1, "coordinate median", est, 1.5]


def test_clip21_converges_where_clipping_stalls():
    res = bd.clip21_study(TINY)
    assert res["worker_grad_norms"].min() > 10 * res["tau"]  # heterogeneous: clipping is active
    assert res["grad_norm"]["GD"][-1] < 1e-10
    assert res["grad_norm"]["Clip21"][-1] < 1e-10
    assert res["grad_norm"]["clipped GD"][-1] > 1e-2
    assert res["distance"]["clipped GD"][-1] > 1e-2 and res["distance"]["Clip21"][-1] < 1e-9


def test_centered_clipping_finds_the_geometric_median():
    res = bd.centered_clipping_study(TINY)
    assert bool((res["min_distance"] > res["tau"]).all())
    assert res["distance"][-1].max() < 1e-6
    G = res["samples"]
    torch.testing.assert_close(res["dp_aggregate"], ms.clip_l2(G, res["tau"]).mean(dim=-2))
    assert bool((torch.linalg.vector_norm(res["dp_aggregate"], dim=-1) <= res["tau"] + 1e-12).all())


def test_sign_study_follows_the_median():
    for r in bd.sign_study(TINY):
        assert r["mean"] > 0 > r["median"] and r["mean sign"] < 0
        assert r["mean CClip step / tau"] == pytest.approx(r["mean sign"])


def test_bad_configs():
    for bad in ({"lp_ps": (0.5,)}, {"lp_noise": ("laplace",)}, {"batch_sizes": (0,)}, {"seeds": 0},
                {"contamination": 0.6}, {"lp_tau": -1.0}, {"batch_inv_alphas": (0.3,)}):
        with pytest.raises(ValueError):
            dataclasses.replace(TINY, **bad)
    with pytest.raises(ValueError, match="unknown scale"):
        bd.run("huge")
    with pytest.raises(TypeError):
        bd.lp_study(1)
