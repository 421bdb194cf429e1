"""experiments.aggregation_cost: the timing helpers and the cost study's records."""

import dataclasses
import math

import pytest
import torch

from median_sgd.experiments import SCALES, aggregation_cost as ac

TINY = ac.AggregationCostConfig(dims=(256, 1024), ns=(4, 8), n_sweep_dim=256, repeats=2, gm_iters=2,
                                k_n=6, k_dim=500, k_fractions=(0.01, 0.5, 1.0), k_iters=(2, 20))


def test_loglog_slope_recovers_a_power_law():
    xs = [1, 2, 4, 8, 16]
    assert ac.loglog_slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert ac.loglog_slope(xs, [7.0] * 5) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        ac.loglog_slope([1], [1])


def test_time_call_and_threads():
    calls = []
    seconds = ac.time_call(lambda: calls.append(sum(range(20000))), repeats=3)
    assert len(calls) == 4 and seconds > 0 and math.isfinite(seconds)  # warm-up + 3
    with pytest.raises(ValueError):
        ac.time_call(lambda: None, repeats=0)
    before = torch.get_num_threads()
    with ac.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with ac.cpu_threads(0):
            pass


def test_gm_cost_study_records():
    records = ac.gm_cost_study(TINY)
    timed = [r for r in records if "seconds" in r]
    assert {(r["sweep"], r["method"]) for r in timed} == {
        (s, m) for s in ("d", "n") for m in ("mean", "coordinate median", "Weiszfeld iteration")}
    assert all(r["seconds"] > 0 for r in timed)
    iters = [r for r in records if r["sweep"] == "iterations"]
    assert [r["d"] for r in iters] == [256, 1024] and all(r["converged"] for r in iters)
    with pytest.raises(ValueError, match="unknown scale"):
        ac.gm_cost_study("huge")
    with pytest.raises(TypeError):
        ac.gm_cost_study(1)


def test_scales_differ_only_in_sizes():
    assert set(ac.CONFIGS) == set(SCALES)
    ci, paper = ac.CONFIGS["ci"], ac.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed and changed <= {"dims", "ns", "n_sweep_dim", "repeats", "k_dim", "k_fractions"}


def test_bgmd_cost_study_records():
    records = ac.bgmd_cost_study(TINY)
    keys = {(r["method"], r["solver"]) for r in records}
    assert ("mean", "-") in keys
    for solver in ("K=2", "K=20", "default"):
        assert ("GmD", solver) in keys
        for method in ("BGmD", "block selection", "Gm of the block"):
            assert {r["k"] for r in records if r["method"] == method and r["solver"] == solver} == {5, 250, 500}
    assert all(r["seconds"] > 0 for r in records)
    # more Weiszfeld iterations cost more (a generous check: 10x the iterations, > 2x the time)
    gmd = {r["solver"]: r["seconds"] for r in records if r["method"] == "GmD"}
    assert gmd["K=20"] > 2 * gmd["K=2"]
