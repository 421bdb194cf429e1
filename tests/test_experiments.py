"""The experiment modules: configs, tidy records, and the chapter's claims at a tiny size."""

import dataclasses

import pytest
import torch

from median_sgd.experiments import SCALES, robust_mean, select

TINY = robust_mean.RobustMeanConfig(
    scene_inliers=40,
    seeds=60,
    sample_sizes=(5, 51),
    tail_n=21,
    tail_alphas=(2.0, 0.7),
    breakdown_n=40,
    breakdown_seeds=8,
    breakdown_fractions=(0.0, 0.1, 0.45),
)


def test_scales_differ_only_in_sizes():
    assert set(robust_mean.CONFIGS) == set(SCALES)
    ci, paper = robust_mean.CONFIGS["ci"], robust_mean.CONFIGS["paper"]
    assert type(ci) is type(paper)
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed, "the paper scale must be larger"
    # Only sizes (counts and grids) change, never the method's parameters.
    assert changed <= {"seeds", "sample_sizes", "tail_n", "breakdown_n", "breakdown_seeds",
                       "breakdown_fractions"}
    assert paper.seeds > ci.seeds and max(paper.sample_sizes) > max(ci.sample_sizes)


def test_run_returns_tidy_records_and_the_chapters_claims_hold():
    result = robust_mean.run(TINY)
    names = set(robust_mean.estimators(TINY.trim))
    assert {r["estimator"] for r in result.sample_size} == names
    for rec in result.sample_size + result.tails + result.breakdown:
        assert rec["q10"] <= rec["median"] <= rec["q90"]
    # Cauchy: the mean does not improve with n, the coordinate median does.
    assert select(result.sample_size, n=51, estimator="mean") > 0.5 * select(
        result.sample_size, n=5, estimator="mean")
    assert select(result.sample_size, n=51, estimator="coordinate median") < 0.5 * select(
        result.sample_size, n=5, estimator="coordinate median")
    # Breakdown: the mean follows 10% of outliers at distance 1000, the medians do not.
    assert select(result.breakdown, fraction=0.1, estimator="mean") > 50
    assert select(result.breakdown, fraction=0.45, estimator="geometric median") < 20
    assert select(result.breakdown, fraction=0.45, estimator="coordinate median") < 5
    scene = result.scene
    err = {k: float(torch.linalg.vector_norm(v)) for k, v in scene["estimates"].items()}
    assert err["mean"] > 2 * err["geometric median"]


def test_run_is_reproducible():
    a, b = robust_mean.run(TINY), robust_mean.run(TINY)
    assert a.sample_size == b.sample_size and a.breakdown == b.breakdown


def test_run_rejects_unknown_scale_and_bad_config():
    with pytest.raises(ValueError, match="unknown scale"):
        robust_mean.run("huge")
    with pytest.raises(TypeError):
        robust_mean.run(42)


def test_select():
    records = [{"n": 1, "estimator": "mean", "median": 2.0}, {"n": 2, "estimator": "mean", "median": 3.0}]
    assert select(records, n=2, estimator="mean") == 3.0
    assert select(records, field="n", median=2.0) == 1
    with pytest.raises(ValueError, match="exactly one"):
        select(records, estimator="mean")
    with pytest.raises(ValueError, match="exactly one"):
        select(records, n=3)
