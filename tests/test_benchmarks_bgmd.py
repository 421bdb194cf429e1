"""The cost model of the bgmd suite's map ("When does BGmD pay?") and its rows."""

from __future__ import annotations

import pytest
import torch

import median_sgd as ms
from benchmarks import bgmd
from median_sgd import weiszfeld as weiszfeld_module

PARTS = {"read_s": 1.0, "pass_s": 2.0, "gemm_s": 3.0, "step_s": 0.01, "call_s": 0.1,
         "bgmd_call_s": 0.2, "stats_s": 2.5, "select_s": 0.5, "gather_s": 0.3}


def test_gram_rule_is_the_library_s():
    assert (bgmd.GRAM_MAX_N, bgmd.GRAM_MIN_SIZE) == (weiszfeld_module._GRAM_MAX_N,
                                                    weiszfeld_module._GRAM_MIN_SIZE)
    assert bgmd.uses_gram(64, 2**10) and not bgmd.uses_gram(65, 2**20) and not bgmd.uses_gram(8, 100)


def test_gm_model_counts_reads_passes_and_steps():
    kw = {k: PARTS[k] for k in ("read_s", "pass_s", "gemm_s", "step_s", "call_s")}
    # plain (n > 64): the call, mean and max |G|, the start's distances and 10 iterations
    assert bgmd.gm_model(128, 10**4, 10, **kw) == pytest.approx(0.1 + 2 + 11 * 2)
    # Gram: the call, two reads, the product, two passes and 9 iterations on n numbers
    assert bgmd.gm_model(32, 10**4, 10, **kw) == pytest.approx(0.1 + 2 + 3 + 4 + 9 * 0.01)


def test_cost_model_block_is_a_k_over_d_share_of_the_matrix():
    out = bgmd.cost_model(128, 10**4, 10**3, 10, 5, PARTS)
    assert out["gm_model_s"] == pytest.approx(0.1 + 2 + 11 * 2)
    block = 0.1 + 2 * 0.1 + 6 * (0.01 + 0.1 * (2 - 0.01))
    assert out["block_gm_model_s"] == pytest.approx(block)
    assert out["bgmd_model_s"] == pytest.approx(0.2 + 2.5 + 0.5 + 0.3 + block)
    assert out["predicted_ratio"] == pytest.approx(out["gm_model_s"] / out["bgmd_model_s"])
    # n = 32, k = 3000: the block takes the Gram route too (32 * 3000 >= 2**16)
    small = bgmd.cost_model(32, 10**4, 3000, 10, 10, PARTS)
    assert small["block_gm_model_s"] == pytest.approx(0.1 + 0.6 + 0.9 + 2 * (0.01 + 0.3 * 1.99) + 0.09)


def test_map_rows_quick():
    # one small matrix: every row has its measured and predicted ratio, iteration counts, route
    with ms.value_checks(False):
        rows = bgmd.map_rows(torch.device("cpu"), quick=True, ns=(8,), dims=(2000,))
    assert {r["case"] for r in rows} == {"map", "map topk"}
    assert len(rows) == 2 * 3  # 2 scenarios x (2 norm fractions + top-k)
    for r in rows:
        assert r["ratio"] == pytest.approx(r["gm_s"] / r["bgmd_s"])
        assert r["predicted_ratio"] > 0 and r["gm_iter"] >= 1 and r["bgmd_iter"] >= 1
        assert r["gram"] == bgmd.uses_gram(r["n"], r["d"])
        assert r["k"] == int(r["k_frac"] * r["d"])
