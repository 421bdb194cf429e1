"""Edges of the aggregators that the main tests miss (found by mutation testing): batched problems
(..., n, d) with non-finite rows in some of them must give, problem by problem, what each problem
gives alone: the aggregate and ``last_dropped`` (the count of dropped rows, per problem)."""

from __future__ import annotations

import pytest
import torch

from median_sgd.aggregators import make_aggregator

F64 = torch.float64

STATELESS = [("mean", {}), ("cmd", {}), ("gmd", {}), ("trimmed_mean", {"trim": 0.2}),
             ("krum", {"f": 2}), ("multi_krum", {"f": 2, "m": 3})]


def _batch_with_bad_rows():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 2, 12, 5, generator=gen, dtype=F64)
    G[0, 1, 3] = float("nan")
    G[0, 1, 7, 2] = float("inf")
    G[2, 0, 0] = -float("inf")
    G[1, 1, 5:8, 0] = float("nan")
    return G


@pytest.mark.parametrize("name,options", STATELESS)
def test_batched_problems_with_dropped_rows_match_each_problem_alone(name, options):
    G = _batch_with_bad_rows()
    agg = make_aggregator(name, **options)
    out = agg(G)
    dropped = agg.last_dropped
    assert out.shape == (3, 2, 5)
    assert dropped is not None and dropped.shape == (3, 2)
    assert dropped.tolist() == [[0, 2], [0, 3], [1, 0]]
    for i in range(3):
        for j in range(2):
            single = make_aggregator(name, **options)
            torch.testing.assert_close(out[i, j], single(G[i, j]), rtol=1e-10, atol=1e-12)
            assert int(single.last_dropped) == dropped[i, j]
    assert bool(torch.isfinite(out).all())
