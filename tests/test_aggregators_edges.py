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


# --------------------------------------------------------------------------------------------
# Found by the second mutation pass (benchmarks/results/mutation/README.md)


def test_hook_seed_option_must_be_an_integer():
    # the hook seeds one torch.Generator per device with it: 2.5 is a caller's error, not 2
    from median_sgd.aggregators import resolve_rule
    assert resolve_rule("bgmd", "hook", seed=3)[1]["seed"] == 3
    with pytest.raises(ValueError, match="seed"):
        resolve_rule("bgmd", "hook", seed=2.5)


def test_geometric_median_repr_lists_its_options():
    assert repr(make_aggregator("gmd")) == "GeometricMedian(init='median')"
    assert (repr(make_aggregator("gmd", eps=1e-6, max_iter=7))
            == "GeometricMedian(init='median', eps=1e-06, max_iter=7)")
    assert repr(make_aggregator("gmd", init="mean")) == "GeometricMedian(init='mean')"


def _krum_by_hand(G, f, m=1):
    """Blanchard et al.'s rule, written out: score_i = sum of the n - f - 2 smallest
    ||G_i - G_j||^2 over j != i; the mean of the m rows of smallest score."""
    n = G.shape[0]
    scores = []
    for i in range(n):
        sq = sorted(float(((G[i] - G[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(sq[: n - f - 2]))
    best = sorted(range(n), key=lambda i: scores[i])[:m]
    return torch.tensor(scores, dtype=G.dtype), G[best].mean(0)


def test_krum_never_counts_a_dropped_row_as_a_neighbour():
    # A NaN row is zeroed before the distances; were it a neighbour, the finite row next to the
    # origin would score ~0 and win. Krum of the finite rows alone picks the cluster at (10, 0).
    finite = torch.tensor([[0.1, 0.0], [10.0, 0.0], [10.0, 1.0], [11.0, 0.0], [10.0, -1.0]], dtype=F64)
    G = torch.cat([finite, torch.full((2, 2), float("nan"), dtype=F64)])
    _, expected = _krum_by_hand(finite, f=1)
    torch.testing.assert_close(expected, torch.tensor([10.0, 0.0], dtype=F64))
    agg = make_aggregator("krum", f=1)
    torch.testing.assert_close(agg(G), expected)
    assert int(agg.last_dropped) == 2


def test_krum_scores_and_multi_krum_of_batched_problems_match_the_formula():
    from median_sgd.aggregators import krum, krum_scores
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(4, 7, 3, generator=gen, dtype=F64)  # (problems, n, d), n != d != problems
    scores = krum_scores(G, 2)
    assert scores.shape == (4, 7)
    out = krum(G, 2, m=3)
    assert out.shape == (4, 3)
    for i in range(4):
        by_hand_scores, by_hand = _krum_by_hand(G[i], f=2, m=3)
        torch.testing.assert_close(scores[i], by_hand_scores)
        torch.testing.assert_close(out[i], by_hand)


def test_bgmd_aggregator_counts_dropped_rows_per_problem():
    G = _batch_with_bad_rows()
    agg = make_aggregator("bgmd", k=2, mode="topk")
    out = agg(G)
    assert agg.last_dropped is not None and agg.last_dropped.tolist() == [[0, 2], [0, 3], [1, 0]]
    for i in range(3):
        for j in range(2):
            single = make_aggregator("bgmd", k=2, mode="topk")
            torch.testing.assert_close(out[i, j], single(G[i, j]), rtol=1e-10, atol=1e-12)


def _column_median(A):
    return A.median(dim=0).values  # n odd: the middle value, no convention to choose


def test_bgmd_aggregator_median_memory_is_the_median_of_the_memory_augmented_rows():
    # memory="median": m_J = median_i (G_i + m)_J, m_I = 0; check two steps by hand (n odd)
    gen = torch.Generator().manual_seed(5)
    G1, G2 = torch.randn(2, 7, 6, generator=gen, dtype=F64)
    G2[:, :3] *= 4.0  # the second block differs from the first
    agg = make_aggregator("bgmd", k=2, mode="topk", memory="median")
    m = torch.zeros(6, dtype=F64)
    for G in (G1, G2):
        agg(G)
        A = G + m
        block = torch.topk(A.square().sum(0), 2).indices
        m = _column_median(A)
        m[block] = 0.0
        torch.testing.assert_close(agg.memory, m)
    assert bool((m != 0).any())


def test_bgmd_aggregator_gm_memory_ignores_dropped_rows():
    # memory="gm" over the finite rows only: the same memory as BGmD on those rows alone
    gen = torch.Generator().manual_seed(6)
    finite = torch.randn(6, 5, generator=gen, dtype=F64) + 3.0
    G = torch.cat([finite[:2], torch.full((1, 5), float("nan"), dtype=F64), finite[2:]])
    agg = make_aggregator("bgmd", k=2, mode="topk", memory="gm", tol=0.0, max_iter=200)
    alone = make_aggregator("bgmd", k=2, mode="topk", memory="gm", tol=0.0, max_iter=200)
    torch.testing.assert_close(agg(G), alone(finite))
    torch.testing.assert_close(agg.memory, alone.memory)


@pytest.mark.parametrize("memory", ["mean", "median", "gm"])
def test_bgmd_aggregator_step_with_every_row_dropped_is_no_step(memory):
    # no finite row (an AMP overflow in every worker, say): the update is 0 and the memory stays
    # what it was, under every rule, so the next step is the one that would have followed
    # without that call (the median rule used to zero the block's memory, mean and gm all of it)
    gen = torch.Generator().manual_seed(7)
    G1, G3 = torch.randn(2, 5, 6, generator=gen, dtype=F64)
    agg = make_aggregator("bgmd", k=2, mode="topk", memory=memory)
    without = make_aggregator("bgmd", k=2, mode="topk", memory=memory)
    agg(G1), without(G1)
    before = agg.memory.clone()
    assert bool((before != 0).any())
    out = agg(torch.full((5, 6), float("nan"), dtype=F64))
    torch.testing.assert_close(out, torch.zeros(6, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(agg.memory, before, rtol=0, atol=0)
    assert agg.last_dropped.item() == 5
    torch.testing.assert_close(agg(G3), without(G3), rtol=0, atol=0)
    torch.testing.assert_close(agg.memory, without.memory, rtol=0, atol=0)


@pytest.mark.parametrize("memory", ["mean", "median"])
def test_bgmd_aggregator_no_step_is_per_problem(memory):
    # batched: the problem whose rows are all dropped keeps its memory and gets 0; the other
    # takes its step as it would alone
    gen = torch.Generator().manual_seed(9)
    G1, G2 = torch.randn(2, 2, 5, 6, generator=gen, dtype=F64)
    G2[0] = float("inf")
    agg = make_aggregator("bgmd", k=2, mode="topk", memory=memory)
    alone = make_aggregator("bgmd", k=2, mode="topk", memory=memory)
    agg(G1)
    alone(G1[1])
    before = agg.memory.clone()
    out = agg(G2)
    torch.testing.assert_close(out[0], torch.zeros(6, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(agg.memory[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], alone(G2[1]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(agg.memory[1], alone.memory, rtol=1e-12, atol=1e-12)
