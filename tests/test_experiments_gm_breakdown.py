"""gm_breakdown: Fig. 5 scenes, breakdown curves and Minsker's bound (chapter 9)."""

import dataclasses
import math

import pytest
import torch

import median_sgd as ms
from median_sgd.experiments import SCALES, gm_breakdown, select

TINY = gm_breakdown.GMBreakdownConfig(n=40, seeds=30, fractions=(0.0, 0.2, 0.45))


def test_minsker_constant():
    assert gm_breakdown.minsker_constant(0.0) == 1.0
    assert gm_breakdown.minsker_constant(0.25) == pytest.approx(0.75 / math.sqrt(0.5))
    assert gm_breakdown.minsker_constant(0.49) > 3
    for bad in (-0.1, 0.5, 0.7, True, "0.1"):
        with pytest.raises(ValueError):
            gm_breakdown.minsker_constant(bad)


def test_corrupt_modes_and_no_mutation():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 10, 2, generator=gen, dtype=torch.float64)
    X0 = X.clone()
    Y, bad = gm_breakdown.corrupt(X, 4, "far", far_distance=100.0)
    assert torch.equal(X, X0)
    assert bad.tolist() == [True] * 4 + [False] * 6
    assert torch.allclose(Y[:, :4, 0] - X[:, :4, 0], torch.full((3, 4), 100.0, dtype=X.dtype))
    assert torch.equal(Y[:, 4:], X[:, 4:]) and torch.equal(Y[:, :4, 1], X[:, :4, 1])
    Y, _ = gm_breakdown.corrupt(X, 4, "additive", noise_std=10.0, generator=gen)
    assert Y.dtype == X.dtype and torch.equal(Y[:, 4:], X[:, 4:])
    assert (Y[:, :4] - X[:, :4]).std() > 3
    Y, bad = gm_breakdown.corrupt(X, 0, "additive")
    assert torch.equal(Y, X) and not bad.any()
    with pytest.raises(ValueError, match="unknown mode"):
        gm_breakdown.corrupt(X, 1, "flip")
    for n_bad in (-1, 11, 1.5, True):
        with pytest.raises(ValueError, match="n_bad"):
            gm_breakdown.corrupt(X, n_bad, "far")


def test_minsker_bound_holds_for_adversarial_placements():
    # Random inliers, the corrupted points anywhere (random directions and distances, or all in a
    # far cluster): the geometric median stays within C_psi * r of 0, r the inliers' radius.
    gen = torch.Generator().manual_seed(1)
    n, d = 21, 3
    for n_bad in (0, 3, 7, 9):
        X = torch.randn(100, n, d, generator=gen, dtype=torch.float64)
        scale = 10 ** (4 * torch.rand(100, 1, 1, generator=gen, dtype=torch.float64))
        Y = X.clone()
        Y[:, :n_bad] = scale * torch.randn(100, n_bad, d, generator=gen, dtype=torch.float64)
        Y[:50, :n_bad] = scale[:50] * torch.ones(d, dtype=torch.float64)  # one far cluster
        z = ms.geometric_median(Y, tol=1e-9, max_iter=5000).median
        r = torch.linalg.vector_norm(X[:, n_bad:], dim=-1).amax(-1)
        bound = gm_breakdown.minsker_constant(n_bad / n) * r
        assert bool((torch.linalg.vector_norm(z, dim=-1) <= bound * (1 + 1e-6)).all())


def test_scales_differ_only_in_sizes():
    assert set(gm_breakdown.CONFIGS) == set(SCALES)
    ci, paper = gm_breakdown.CONFIGS["ci"], gm_breakdown.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed and changed <= {"seeds", "fractions", "n"}
    assert paper.seeds > ci.seeds


def test_run_records_and_the_chapters_claims():
    result = gm_breakdown.run(TINY)
    assert [s["fraction"] for s in result.scenes] == [0.0, 0.1, 0.3, 0.45]
    for s in result.scenes:
        assert s["points"].shape == (40, 2) and int(s["is_bad"].sum()) == round(s["fraction"] * 40)
        assert s["converged"]
    for rec in result.curves:
        assert rec["q10"] <= rec["median"] <= rec["q90"]
        if rec["estimator"] == "geometric median":
            assert rec["bound_ratio"] <= 1.0 and rec["converged"] == 1.0
    far_mean = select(result.curves, mode="far", fraction=0.2, estimator="mean")
    assert far_mean == pytest.approx(0.2 * TINY.far_distance, rel=0.05)
    assert select(result.curves, mode="far", fraction=0.45, estimator="geometric median") < 10
    assert select(result.curves, mode="far", fraction=0.45, estimator="geometric median",
                  field="iterations") > select(result.curves, mode="far", fraction=0.0,
                                               estimator="geometric median", field="iterations")


def test_run_is_reproducible_and_rejects_bad_config():
    assert gm_breakdown.run(TINY).curves == gm_breakdown.run(TINY).curves
    with pytest.raises(ValueError, match="unknown scale"):
        gm_breakdown.run("huge")
    with pytest.raises(TypeError):
        gm_breakdown.run(3)


def test_near_extremal_configuration_has_the_closed_form_median():
    # Good points at (0, +-r), the corrupted ones far along e_1: the median sits at (t, 0) where
    # the good unit vectors balance the bad ones, (n - k) t / sqrt(t^2 + r^2) = k, i.e.
    # t = r psi / sqrt(1 - 2 psi): a fraction psi / (1 - psi) of Minsker's bound C_psi r.
    r = 2.0
    for k, half in ((3, 9), (6, 7), (9, 6)):
        good = torch.tensor([[0.0, r], [0.0, -r]], dtype=torch.float64).repeat(half, 1)
        bad = torch.tensor([[1e9, 0.0]], dtype=torch.float64).repeat(k, 1)
        z = ms.geometric_median(torch.cat([bad, good]), tol=1e-12, max_iter=10000).median
        psi = k / (k + 2 * half)
        t = r * psi / math.sqrt(1 - 2 * psi)
        assert torch.allclose(z, torch.tensor([t, 0.0], dtype=torch.float64), atol=1e-6)
        assert t / (gm_breakdown.minsker_constant(psi) * r) == pytest.approx(psi / (1 - psi))
