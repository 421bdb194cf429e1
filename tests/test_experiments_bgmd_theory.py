"""experiments.bgmd_theory: Lemma 1 (contraction), Lemma 5 (memory identity), Figs. 7-8 setups."""

import dataclasses
import math

import pytest
import torch

from median_sgd import select_block
from median_sgd.experiments import SCALES, bgmd_theory as bth

TINY = bth.BGmDTheoryConfig(n=4, d=60, k_fractions=(0.05, 0.5), draws=300, lemma5_d=30, lemma5_steps=15,
                            residual_epochs_large=0.03, residual_epochs_tiny=0.5, residual_betas=(0.1,),
                            residual_batch_size=4)


def test_exact_sampling_residual_small_cases():
    s = torch.tensor([4.0, 1.0, 0.0])
    # k = 1, squared-norm sampling: P(j) = s_j / 5, residual (5 - s_j) / 5
    assert bth.exact_sampling_residual(s, 1) == pytest.approx(4 / 5 * 1 / 5 + 1 / 5 * 4 / 5)
    assert bth.exact_sampling_residual(s, 3) == pytest.approx(0.0)
    # uniform scores: every k-subset equally likely, E = 1 - k/d
    assert bth.exact_sampling_residual(torch.ones(5), 2) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        bth.exact_sampling_residual(torch.ones(12), 2)
    with pytest.raises(ValueError):
        bth.exact_sampling_residual(torch.ones(4), 5)


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_select_block_samples_with_the_law_of_algorithm_2(power):
    # Monte Carlo through select_block against the exact enumeration, and Lemma 1's bound.
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 6, generator=gen, dtype=torch.float64) * torch.tensor([3, 1, 1, .5, .2, .1],
                                                                            dtype=torch.float64)
    sq = (G * G).sum(0)
    for k in (1, 2, 4):
        exact = bth.exact_sampling_residual(sq, k, power)
        idx = select_block(G.expand(40000, 3, 6), k, mode="norm", generator=gen, power=power)
        mc = bth.relative_residual(G, idx)
        assert abs(mc.mean().item() - exact) < 5 * mc.std().item() / math.sqrt(len(mc)) + 1e-12
        assert exact <= 1 - k / 6


def test_relative_residual_and_uniform_block():
    G = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    idx = torch.tensor([[1], [2], [0]])
    assert torch.allclose(bth.relative_residual(G, idx), torch.tensor([11 / 15, 6 / 15, 13 / 15]))
    blocks = bth.uniform_block(10, 3, 500, generator=torch.Generator().manual_seed(0))
    assert blocks.shape == (500, 3)
    assert all(len(set(b.tolist())) == 3 for b in blocks)
    counts = torch.bincount(blocks.flatten(), minlength=10).double()
    assert counts.min() > 0.7 * counts.mean()
    with pytest.raises(ValueError):
        bth.uniform_block(5, 6, 2)


def test_column_profiles():
    assert torch.equal(bth.column_profile("uniform", 4), torch.ones(4, dtype=torch.float64))
    assert bth.column_profile("power law", 4)[3].item() == pytest.approx(0.25)
    sparse = bth.column_profile("sparse", 100)
    assert int((sparse == 1).sum()) == 5
    with pytest.raises(ValueError):
        bth.column_profile("zipf", 4)


def test_contraction_study_respects_lemma_1():
    records = bth.contraction_study(TINY)
    assert {r["selection"] for r in records} == set(bth.SELECTIONS)
    for r in records:
        assert r["q10"] <= r["q90"]
        assert r["mean"] <= r["bound"] + 4 * r["se"] + 1e-12
        if r["selection"] == "topk":  # deterministic, pointwise
            assert r["mean"] <= r["bound"] + 1e-12
    # concentrated column norms: norm sampling keeps far more than k/d of the mass
    sparse = [r for r in records if r["profile"] == "sparse" and r["selection"] == "norm"]
    assert all(r["mean"] < 0.5 * r["bound"] for r in sparse if r["beta"] >= 0.5)


def test_memory_identity_holds_with_all_rows():
    clean = bth.memory_identity(TINY, psi=0.0)
    assert max(r["all_rows"] for r in clean) < 1e-12
    assert max(r["good_rows"] for r in clean) < 1e-12  # no corrupted rows: the same averages
    attacked = bth.memory_identity(TINY, psi=0.2)
    assert max(r["all_rows"] for r in attacked) < 1e-12
    assert max(r["good_rows"] for r in attacked) > 1e-3  # the proof's averages miss the bad rows
    assert attacked[-1]["distance"] > 10 * attacked[0]["distance"]  # mean memory carries the attack
    with pytest.raises(ValueError):
        bth.memory_identity(TINY, psi=0.6)


def test_resize_images_and_residual_configs():
    from median_sgd.data.images import load_images

    data = load_images("digits")
    big = bth.resize_images(data, 28)
    assert big.x_train.shape[1:] == (1, 28, 28) and len(big.x_train) == len(data.x_train)
    assert float(big.x_train.min()) >= 0 and float(big.x_train.max()) <= 1
    assert torch.equal(big.y_test, data.y_test)
    with pytest.raises(ValueError):
        bth.resize_images(data, 0)
    setups = bth.residual_configs("ci")
    assert set(setups) == {"large", "tiny"}
    assert setups["large"].model == "lenet" and setups["tiny"].model == "tiny_cnn"
    labels = [m.label for m in setups["tiny"].methods]
    assert labels == ["BGmD beta=0.1", "BGmD beta=0.2", "BGmD beta=0.4", "SGD"]


def test_residual_study_tiny():
    records = bth.residual_study(TINY)
    assert {r["setup"] for r in records} == {"large", "tiny"}
    for r in records:
        if r["method"].startswith("BGmD"):
            assert 0 <= r["relative_residual"] <= 1
        else:
            assert r["relative_residual"] is None
    assert {r["d"] for r in records if r["setup"] == "large"} == {180_938}  # LeNet on 16x16 images
    assert {r["d"] for r in records if r["setup"] == "tiny"} == {412}


def test_scales_differ_only_in_sizes():
    assert set(bth.CONFIGS) == set(SCALES)
    ci, paper = bth.CONFIGS["ci"], bth.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed <= {"d", "draws", "lemma5_d", "lemma5_steps", "residual_epochs_large",
                       "residual_epochs_tiny", "residual_batch_size", "residual_data",
                       "residual_large_side"}
    with pytest.raises(ValueError, match="unknown scale"):
        bth.contraction_study("huge")
    with pytest.raises(TypeError):
        bth.memory_identity(3)


def test_uniform_rule_standard_error_is_the_exact_one():
    """For a uniform block the record's ``se`` is the exact standard error (the finite-population
    variance of the column masses): the sample's underestimates it when a few heavy columns decide
    the residual. A Monte Carlo with many draws matches the closed form."""
    cfg = dataclasses.replace(TINY, d=200, k_fractions=(0.05,), draws=300)
    k = 10
    rec = {r["profile"]: r for r in bth.contraction_study(cfg) if r["selection"] == "uniform"}
    # the first profile is "uniform": its G is the study's first draw
    Z = torch.randn(cfg.n, cfg.d, generator=torch.Generator().manual_seed(cfg.seed),
                    dtype=torch.float64)
    s = (Z * Z).sum(0)
    exact = math.sqrt(k * s.var(unbiased=False) * (cfg.d - k) / (cfg.d - 1)) / s.sum().item()
    assert rec["uniform"]["se"] == pytest.approx(exact / math.sqrt(cfg.draws), rel=1e-9)
    # a power-law matrix: Monte Carlo mean and standard deviation against the closed form
    G = Z * bth.column_profile("power law", cfg.d, dtype=torch.float64)
    s = (G * G).sum(0)
    exact = math.sqrt(k * s.var(unbiased=False) * (cfg.d - k) / (cfg.d - 1)) / s.sum().item()
    draws = 40_000
    mc = bth.relative_residual(G, bth.uniform_block(cfg.d, k, draws,
                                                    generator=torch.Generator().manual_seed(1)))
    assert mc.mean().item() == pytest.approx(1 - k / cfg.d, abs=5 * exact / math.sqrt(draws))
    assert mc.std().item() == pytest.approx(exact, rel=0.05)


# ------------------------------------------------------------ Theorems 1-2, Lemmas 3, 4 and 6

_TINY = bth.ConvergenceConfig(seeds=2, d=10, steps=40, beta=0.2, noise_levels=(0.5, 1.0),
                                      betas=(0.2, 1.0), psis=(0.2,), descent_states=(0, 3),
                                      descent_draws=50)


def test_convergence_run_records_and_identities():
    clean, flipped = bth.convergence_run(
        _TINY, [{"noise": 1.0, "psi": 0.0, "attack": "none"},
                {"noise": 1.0, "psi": 0.2, "attack": "bit flip"}], beta=0.2)
    assert clean["final"].shape == (2,) and clean["attack"] == "none"
    # eq. (22) is deterministic: it holds at every step of a run that did not diverge
    assert float(clean["lr_ratio"].max()) <= 1
    assert float(clean["memory_sq"].min()) > 0 and float(clean["xi"].max()) <= 1
    # GmD (beta = 1) keeps no memory
    (gmd,) = bth.convergence_run(_TINY, beta=1.0)
    assert float(gmd["memory_sq"].max()) == 0 and float(gmd["xi"].min()) == 1
    (sgd,) = bth.convergence_run(_TINY, method="sgd")
    assert "memory_sq" not in sgd and float(sgd["final"].max()) < 10
    with pytest.raises(ValueError):
        bth.convergence_run(_TINY, [{"attack": "nope"}])
    with pytest.raises(ValueError):
        bth.convergence_run(_TINY, method="krum")


def test_convergence_study_sweeps():
    runs = bth.convergence_study(_TINY)
    assert {r["sweep"] for r in runs} == {"noise", "beta", "psi", "flip"}
    assert sorted(r["noise"] for r in runs if r["sweep"] == "noise") == [0.5, 1.0]
    assert sorted(r["beta"] for r in runs if r["sweep"] == "beta") == [0.2, 1.0]
    psi = [(r["method"], r["beta"], r["psi"]) for r in runs if r["sweep"] == "psi"]
    assert ("sgd", None, 0.2) in psi and ("bgmd", 1.0, 0.0) in psi


def test_bounds_as_printed():
    # eq. (11) with xi = 1/2: 4 (3/4) gamma^2 sigma^2 / (1/4) = 12 gamma^2 sigma^2
    assert bth.lemma3_bound(sigma_sq=1.0, xi=0.5, gamma=1.0) == pytest.approx(12.0)
    assert bth.lemma3_bound(sigma_sq=1.0, xi=0.5, gamma=1.0, paper=False) == pytest.approx(8.0)
    # eq. (12) with xi = 1, alpha = 0: 96 gamma^2 sigma^2 + 2 eps^2 / |G|^2
    assert bth.lemma4_bound(sigma_sq=2.0, xi=1.0, alpha=0.0, gamma=0.5, eps=1.0,
                                    n_good=2) == pytest.approx(96 * 0.25 * 2 + 0.5)
    # eq. (17) with xi = 1, alpha = 0, R0 = 0, eps = 0: (16 L gamma + 3072) sigma^2 / mu^2
    assert bth.theorem2_bound(sigma_sq=1.0, xi=1.0, alpha=0.0, mu=0.5, L=1.0,
                                      gamma=0.25) == pytest.approx((4 + 3072) / 0.25)


def test_descent_and_robustness_checks():
    for r in bth.descent_check(_TINY):
        assert r["lhs"] <= r["rhs"] and r["se"] > 0
    with pytest.raises(ValueError):
        bth.descent_check(_TINY, rho=0.5)
    rob = bth.robustness_check(20, n_good=6, n_bad=3, d=3)
    assert [r["adversary"] for r in rob] == ["far", "spread", "near"]
    assert all(0 < r["ratio"] <= 1 and 0 < r["minsker_ratio"] <= 1 for r in rob)
