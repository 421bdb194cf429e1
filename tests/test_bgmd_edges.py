"""Edges of BGmD that the main tests miss (found by mutation testing): the column statistics of
large matrices, computed on the CPU in column chunks (about 2**19 elements each) once ``d``
exceeds a chunk. The block (``select_block``, ``mode="topk"``), the memory (``"mean"``) and the
residual (``last_residual``) must be those of the plain float64 column sums, including the last,
shorter chunk, batched problems and values whose squares overflow."""

from __future__ import annotations

import pytest
import torch

import median_sgd as ms

F64 = torch.float64

# (batch, n, d): 64 x 9000 (chunks of 8192 columns, the last one short), 600 x 3000 (chunks of
# 1024), and a batch of 2 x 32 x 9000 (8192 again).
SHAPES = [((), 64, 9000), ((), 600, 3000), ((2,), 32, 9000)]


def _matrix(batch, n, d, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(*batch, n, d, generator=gen, dtype=F64)
    # column scales spread over every chunk (distinct norms: no ties in the top k)
    G = G * torch.linspace(0.5, 2.0, d, dtype=F64)[torch.randperm(d, generator=gen)]
    return G.to(dtype)


def _column_squares(A):
    return A.to(F64).square().sum(-2)


def _top(sq, k):
    return torch.topk(sq, k, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("batch,n,d", SHAPES)
def test_select_block_topk_on_chunked_column_norms(batch, n, d):
    G = _matrix(batch, n, d)
    k = 700
    idx = ms.select_block(G, k, mode="topk")
    assert torch.equal(idx.sort(dim=-1).values, _top(_column_squares(G), k))
    # the largest columns sit in every chunk, the last (short) one included
    assert int(idx.max()) >= d - 300 and int(idx.min()) < 300


@pytest.mark.parametrize("scale", [2.0**-1000, 1e200])
def test_select_block_topk_chunked_whatever_the_scale(scale):
    G = _matrix((), 64, 9000, seed=1)
    idx = ms.select_block(G * scale, 500, mode="topk")
    assert torch.equal(idx.sort().values, _top(_column_squares(G), 500))


@pytest.mark.parametrize("batch,n,d", SHAPES)
def test_bgmd_mean_memory_and_residual_on_chunked_statistics(batch, n, d):
    G1 = _matrix(batch, n, d, seed=2)
    G2 = _matrix(batch, n, d, seed=3)
    k = 400
    agg = ms.BGmD(k, mode="topk", memory="mean", max_iter=3)
    m = torch.zeros(*batch, d, dtype=F64)
    for G in (G1, G2):
        A = G + m.unsqueeze(-2)
        sq = _column_squares(A)
        block = _top(sq, k)
        u = agg(G)
        assert agg.last_block is not None and agg.last_residual is not None and agg.memory is not None
        assert torch.equal(agg.last_block.sort(dim=-1).values, block)
        outside = torch.ones(*batch, d, dtype=torch.bool).scatter_(-1, block, False)
        assert bool((u[outside] == 0).all())
        kept = torch.gather(sq, -1, block).sum(-1)
        torch.testing.assert_close(agg.last_residual, 1 - kept / sq.sum(-1), rtol=1e-10, atol=1e-12)
        expected = torch.where(outside, A.mean(-2), 0.0)
        torch.testing.assert_close(agg.memory, expected, rtol=1e-10, atol=1e-12)
        m = expected


def test_bgmd_chunked_float32_matches_float64():
    G = _matrix((), 64, 9000, seed=4)
    a64 = ms.BGmD(300, mode="topk", memory="mean", max_iter=3)
    a32 = ms.BGmD(300, mode="topk", memory="mean", max_iter=3)
    for _ in range(2):
        a64(G)
        a32(G.float())
        assert a64.last_block is not None and a32.last_block is not None
        assert torch.equal(a64.last_block.sort().values, a32.last_block.sort().values)
        assert a64.memory is not None and a32.memory is not None
        torch.testing.assert_close(a32.memory.double(), a64.memory, rtol=1e-5, atol=1e-6)


def test_select_block_norm_mode_batched_chunks_match_the_problems_one_at_a_time():
    # 2 x 64 x 6000: the batch is read in chunks of 4096 columns, each problem alone in one piece
    G = _matrix((2,), 64, 6000, seed=5)
    batched = ms.select_block(G, 300, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    single = torch.stack([ms.select_block(G[i], 300, generator=gen) for i in range(2)])
    assert torch.equal(batched.sort(dim=-1).values, single.sort(dim=-1).values)


# Defaults and bounds shared by select_block and BGmD


def test_block_of_every_column():
    G = _matrix((), 8, 12, seed=6)
    assert ms.bgmd.resolve_block_size(12, 12) == 12
    assert ms.bgmd.resolve_block_size(1.0, 12) == 12
    for mode in ("topk", "norm"):
        assert torch.equal(ms.select_block(G, 12, mode=mode).sort().values, torch.arange(12))
    agg = ms.BGmD(12, mode="topk")
    u = agg(G)
    torch.testing.assert_close(u, ms.geometric_median(G).median)
    assert agg.memory is not None and bool((agg.memory == 0).all())  # nothing left outside the block


@pytest.mark.parametrize("mode", ["topk", "norm"])
def test_cpu_blocks_come_in_increasing_order(mode):
    G = _matrix((3,), 16, 500, seed=7)
    idx = ms.select_block(G, 60, mode=mode, generator=torch.Generator().manual_seed(1))
    assert bool((idx[..., 1:] > idx[..., :-1]).all())


@pytest.mark.parametrize("power", [None, 0.5, 1.0, 3.0])
def test_bgmd_draws_its_block_as_select_block_does(power):
    # the same generator seed and the same defaults (mode "norm", power 2): the same block
    G = _matrix((), 16, 300, seed=8)
    kw = {} if power is None else {"power": power}
    agg = ms.BGmD(30, generator=torch.Generator().manual_seed(5), memory=None, **kw)
    agg(G)
    expected = ms.select_block(G, 30, generator=torch.Generator().manual_seed(5), **kw)
    assert agg.last_block is not None
    assert torch.equal(agg.last_block.sort().values, expected.sort().values)
    if power is not None and power != 2.0:
        other = ms.select_block(G, 30, generator=torch.Generator().manual_seed(5))
        assert not torch.equal(other.sort().values, expected.sort().values)  # power matters here


# --------------------------------------------------------------------------------------------
# Found by the second mutation pass (benchmarks/results/mutation/README.md): the CPU's
# prefiltered search of the k largest keys (one long vector, d >= 2**16), the tuple of
# generators, the residual of small statistics and the batched "gm" memory.

LONG = (1 << 16) + 123  # above the prefilter's threshold, not a multiple of its stride


def _top_k_by_sort(norms, k):
    """The k largest entries' indices, in increasing order (an independent reference: a sort)."""
    return torch.sort(torch.argsort(norms, descending=True, stable=True)[:k]).values


@pytest.mark.parametrize("d,k", [(LONG, 1), (LONG, 37), (LONG, 3000), (LONG, LONG // 2 - 1),
                                 (LONG, LONG - 1), (1 << 19, 1), (1 << 19, 5)])
def test_select_block_topk_on_one_long_vector(d, k):
    # (d = 2**19, small k: the sample's expected count of keys above the threshold is ~1/64)
    gen = torch.Generator().manual_seed(k)
    G = torch.randn(1, d, generator=gen, dtype=F64)  # distinct |G_j|: no ties
    block = ms.select_block(G, k, mode="topk")
    assert torch.equal(block, _top_k_by_sort(G[0].abs(), k))


def test_select_block_topk_long_vector_when_the_strided_sample_misleads():
    # The prefilter samples every (d // 2**13)-th key: make exactly those the largest, so that
    # the threshold estimated from the sample keeps fewer than k candidates.
    d, k = LONG, 2000
    stride = d // (1 << 13)
    gen = torch.Generator().manual_seed(1)
    norms = torch.rand(d, generator=gen, dtype=F64)
    norms[::stride] += 10.0
    block = ms.select_block(norms.unsqueeze(0), k, mode="topk")
    assert torch.equal(block, _top_k_by_sort(norms, k))


def test_select_block_topk_long_vector_with_ties_at_the_threshold():
    # 110 columns share the value at the threshold of the 100 largest: any 100 of them (plus the
    # larger ones) is a right block, but exactly k distinct columns must come back.
    d, k = LONG, 100
    gen = torch.Generator().manual_seed(2)
    norms = torch.rand(d, generator=gen, dtype=F64)
    tied = torch.randperm(d, generator=gen)[:110]
    norms[tied] = 2.0
    block = ms.select_block(norms.unsqueeze(0), k, mode="topk")
    assert block.shape == (k,) and block.unique().numel() == k
    assert bool((norms[block] == 2.0).all())


def test_bgmd_with_a_tuple_of_generators_draws_each_problem_alone():
    # one generator per leading problem: each problem's block is the one select_block draws
    # for that problem alone from a generator in the same state
    G = _matrix((3,), 5, 40, seed=4)
    gens = tuple(torch.Generator().manual_seed(10 + i) for i in range(3))
    agg = ms.BGmD(6, generator=gens)
    agg(G)
    for i in range(3):
        alone = ms.select_block(G[i], 6, generator=torch.Generator().manual_seed(10 + i))
        assert torch.equal(agg.last_block[i], alone)
    with pytest.raises(ValueError, match="one generator per leading problem"):
        ms.BGmD(6, generator=gens[:2])(G)


def test_select_block_takes_the_tuple_of_generators_bgmd_takes():
    G = _matrix((3,), 5, 40, seed=4)
    blocks = ms.select_block(G, 6, generator=tuple(torch.Generator().manual_seed(10 + i)
                                                   for i in range(3)))
    for i in range(3):
        alone = ms.select_block(G[i], 6, generator=torch.Generator().manual_seed(10 + i))
        assert torch.equal(blocks[i], alone)
    with pytest.raises(ValueError, match="one generator per leading problem"):
        ms.select_block(G, 6, generator=(torch.Generator(), torch.Generator()))
    with pytest.raises(TypeError, match="torch.Generator"):
        ms.select_block(G, 6, generator=(torch.Generator(), 3, torch.Generator()))


def test_bgmd_residual_of_small_values_is_the_unselected_share():
    # last_residual = 1 - sum_{j in I} ||A_j||^2 / sum_j ||A_j||^2, here with a total below 1
    G = torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.125, 0.0]], dtype=F64)
    agg = ms.BGmD(1, mode="topk")
    agg(G)
    sq = G.square().sum(0)  # 0.25, 0.078125, 0
    assert agg.last_block.tolist() == [0]
    torch.testing.assert_close(agg.last_residual, 1 - sq[0] / sq.sum(), rtol=1e-15, atol=0)


def test_bgmd_gm_memory_of_batched_problems_matches_each_problem_alone():
    G1, G2 = _matrix((2, 3), 7, 12, seed=5), _matrix((2, 3), 7, 12, seed=6)
    agg = ms.BGmD(3, mode="topk", memory="gm", tol=0.0, max_iter=50)
    out = [agg(G1), agg(G2)]
    for i in range(2):
        for j in range(3):
            alone = ms.BGmD(3, mode="topk", memory="gm", tol=0.0, max_iter=50)
            for step, G in enumerate((G1, G2)):
                torch.testing.assert_close(out[step][i, j], alone(G[i, j]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(agg.memory[i, j], alone.memory, rtol=1e-12, atol=1e-12)
            assert bool((alone.memory != 0).any())
