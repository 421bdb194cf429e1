"""The floor suite (issue 15's table in copies of G): its rows and targets, at the quick sizes."""

from __future__ import annotations

import pytest
import torch

from benchmarks import floor, medians


def test_floor_rows_at_quick_sizes():
    rows = floor.run(torch.device("cpu"), quick=True)
    cases = [r["case"] for r in rows]
    assert cases.count("iteration") == cases.count("converged") == len(medians.QUICK_SIZES)
    assert sorted(c for c in cases if c.startswith("bgmd")) == ["bgmd norm"] * 2 + ["bgmd topk"] * 2
    for r in rows:
        assert r["ratio"] > 0 and r["copy_s"] > 0
        if "target" in r:  # lower is better everywhere here, and met says so
            assert r["better"] == "lower" and r["met"] == (r["ratio"] <= r["target"])
    for r in rows:
        if r["case"] == "iteration":
            assert r["ratio"] == pytest.approx(r["iteration_s"] / r["copy_s"])
        elif r["case"] == "converged":
            assert r["ratio"] == pytest.approx(r["solve_s"] / r["copy_s"]) and r["solve_iter"] >= 1
        else:
            assert r["ratio"] == pytest.approx(r["step_s"] / r["copy_s"]) and r["k"] == r["d"] // 10
