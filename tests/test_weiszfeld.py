"""The one Weiszfeld loop (median_sgd.weiszfeld): its backends agree with each other.

``LocalRows`` (the rows of a tensor, what ``geometric_median`` runs) and ``RankRows`` over
``SimulatedRanks`` (one row per simulated rank, what the DDP hook runs) are two ways of reaching
the same rows; started at the same point they must reach the same geometric median.
"""

from __future__ import annotations

import pytest
import torch

import median_sgd as ms
from median_sgd import _ranks as collectives
from median_sgd import weiszfeld as wz
from median_sgd.distributed import SimulatedRanks as ExportedSimulatedRanks

F64 = torch.float64


def _rows(seed, n, d, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    X[: n // 3] += 20.0  # a far minority: a median well away from the mean
    return X


def _local(X, w=None, **kw):
    n = X.shape[-2]
    uniform = w is None
    w = X.new_ones(n) if uniform else w
    w_sum = w.sum(-1)
    start = wz.weighted_mean(X, w, w_sum, uniform)
    rows, n_iter, done, _ = wz.local_weiszfeld(X, w, w_sum, start, uniform=uniform, **kw)
    return rows.median(), n_iter, done


def _simulated(X, good=None, centre=None, **kw):
    world = X.shape[0]
    ranks = SimulatedRanks(world)
    good = torch.ones(world, dtype=torch.bool) if good is None else good
    if centre is None:
        centre = X[good].mean(0)
    out = wz.ranks_weiszfeld(X, good, centre.expand_as(X), ranks, **kw)
    assert torch.equal(out, out[:1].expand_as(out)), "every rank must compute the same median"
    return out[0], ranks


SimulatedRanks = wz.SimulatedRanks
TIGHT = dict(eps=1e-8, tol=1e-12, max_iter=2000, fixed_iter=False)


def test_simulated_ranks_is_the_distributed_name():
    assert ExportedSimulatedRanks is wz.SimulatedRanks


@pytest.mark.parametrize("n,d", [(5, 3), (8, 40), (13, 2), (4, 1)])
def test_local_rows_and_simulated_ranks_reach_the_same_median(n, d):
    X = _rows(n * 100 + d, n, d)
    local, _, done = _local(X, **TIGHT)
    assert bool(done)
    ranked, _ = _simulated(X, **TIGHT)
    scale = float(torch.linalg.vector_norm(X - local, dim=-1).max())
    torch.testing.assert_close(ranked, local, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(local, ms.geometric_median(X, **TIGHT).median, rtol=0, atol=0)


def test_backends_agree_step_by_step_from_the_mean():
    # the same start (the mean), the same floor, weights and step: the same iterates up to
    # rounding, also with coincident points (the smoothing floor matters) and few iterations
    X = _rows(3, 6, 30)
    X[2] = X[3]
    for max_iter in (1, 2, 5):
        kw = dict(eps=1e-8, tol=1e-6, max_iter=max_iter, fixed_iter=True)
        local, n_iter, _ = _local(X, **kw)
        ranked, ranks = _simulated(X, centre=X.mean(0), **kw)
        torch.testing.assert_close(ranked, local, rtol=1e-12, atol=1e-12)
        assert int(n_iter) == max_iter
        # a round: one all-gather of the distances, one all-reduce of the resultant
        assert ranks.counter.collectives == 2 * max_iter


def test_rank_rows_leave_out_the_ranks_that_are_not_good():
    X = _rows(7, 7, 12)
    good = torch.tensor([True, True, False, True, True, False, True])
    bad = X.clone()
    bad[2] = torch.nan
    bad[5] = torch.inf
    ranked, _ = _simulated(bad, good=good, **TIGHT)
    local, _, _ = _local(X[good], **TIGHT)
    scale = float(torch.linalg.vector_norm(X[good] - local, dim=-1).max())
    torch.testing.assert_close(ranked, local, rtol=0, atol=1e-9 * scale)


def test_weights_zero_one_equal_dropping_rows_in_the_local_backend():
    X = _rows(9, 9, 5)
    w = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=F64)
    weighted, _, _ = _local(X, w, **TIGHT)
    kept, _, _ = _local(X[w > 0], **TIGHT)
    torch.testing.assert_close(weighted, kept, rtol=0, atol=1e-9)


def test_fixed_iterations_give_the_adaptive_bits():
    X = _rows(5, 10, 7, torch.float32)
    adaptive, n_iter, done = _local(X, eps=1e-8, tol=1e-5, max_iter=200, fixed_iter=False)
    fixed, n_fixed, done_fixed = _local(X, eps=1e-8, tol=1e-5, max_iter=200, fixed_iter=True)
    assert bool(done) and torch.equal(adaptive, fixed)
    assert torch.equal(n_iter, n_fixed) and torch.equal(done, done_fixed)


def test_distance_floor_uniform_equals_unit_weights():
    g = torch.Generator().manual_seed(2)
    dist = torch.rand(4, 9, generator=g, dtype=F64)
    dist[1, :5] = 0.0  # half of the weight on z: the mean distance takes over
    dist[2] = 0.0  # every point on z: 1
    w = torch.ones_like(dist)
    uniform = wz.distance_floor(dist, w, w.sum(-1), 0.0, 1e-8, uniform=True)
    weighted = wz.distance_floor(dist, w, w.sum(-1), 0.0, 1e-8, uniform=False)
    torch.testing.assert_close(uniform, weighted, rtol=1e-15, atol=0)
    assert uniform.shape == (4, 1)
    assert float(uniform[2, 0]) == 1e-8
    assert float(uniform[1, 0]) == pytest.approx(1e-8 * float(dist[1].mean()))
    # a row of weight 0 (distance 0, as the backends report it) does not count
    w0 = w.clone()
    w0[0, 0] = 0.0
    d0 = dist.clone()
    d0[0, 0] = 0.0
    ref = wz.distance_floor(dist[:1, 1:], w[:1, 1:], w[:1, 1:].sum(-1), 0.0, 1e-8, uniform=True)
    torch.testing.assert_close(wz.distance_floor(d0[:1], w0[:1], w0[:1].sum(-1), 0.0, 1e-8, uniform=False),
                               ref, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# The collectives: what each backend returns and the elements it counts as sent


class _IdenticalRanksDist:
    """``torch.distributed`` seen from rank ``rank`` of ``world`` ranks that all hold the same
    tensors: each collective's result computed by hand (an all-reduce multiplies by ``world``,
    an all-gather repeats, an all-to-all returns this rank's chunk from every rank)."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def get_world_size(self, group=None):
        return self.world

    def get_rank(self, group=None):
        return self.rank

    def all_reduce(self, t, group=None):
        t.mul_(self.world)

    def all_gather_into_tensor(self, out, t, group=None):
        out.copy_(t.reshape(-1).repeat(self.world))

    def all_to_all_single(self, out, t, group=None):
        c = t.numel() // self.world
        out.copy_(t[self.rank * c : (self.rank + 1) * c].repeat(self.world))


W, C = 4, 3


def _elements(ranks, method, t):
    before = ranks.counter.elements, ranks.counter.collectives
    out = getattr(ranks, method)(t)
    assert ranks.counter.collectives == before[1] + 1
    return out, ranks.counter.elements - before[0]


def test_simulated_ranks_collectives_and_their_element_counts():
    # ring all-reduce: 2 (W - 1) / W of the row per rank; all-gather: the W - 1 other entries;
    # all-to-all: the W - 1 chunks that leave the rank
    ranks = SimulatedRanks(W)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(W, W * C, generator=g, dtype=F64)
    out, sent = _elements(ranks, "all_reduce", rows)
    torch.testing.assert_close(out, rows.sum(0).expand(W, -1), rtol=1e-15, atol=0)
    assert sent == pytest.approx(2 * (W - 1) / W * W * C)
    numbers = rows[:, 0]
    out, sent = _elements(ranks, "gather_numbers", numbers)
    assert torch.equal(out, numbers.expand(W, W)) and sent == W - 1
    shards = rows[:, :C]
    out, sent = _elements(ranks, "gather_shards", shards)
    assert torch.equal(out, shards.reshape(-1).expand(W, -1)) and sent == (W - 1) * C
    out, sent = _elements(ranks, "all_to_all", rows)
    assert out.shape == (W, W, C) and sent == pytest.approx((W - 1) * C)
    for r in range(W):
        for s in range(W):  # rank r receives chunk r of rank s's row
            assert torch.equal(out[r, s], rows[s, r * C : (r + 1) * C])
    square = torch.arange(W * W, dtype=F64).reshape(W, W)
    assert torch.equal(ranks.mine(square), square.diagonal())
    x = rows[0]
    spread = ranks.spread(x)
    assert spread.shape == (W, W * C) and torch.equal(spread, x.expand(W, -1))
    assert torch.equal(ranks.shared(spread), x)
    assert torch.equal(ranks.shared(rows), rows[0])


@pytest.mark.parametrize("rank", [0, 2])
def test_process_group_ranks_return_and_count_like_the_simulation(monkeypatch, rank):
    # every rank holds the same tensors, so rank `rank` of a process group must return row
    # `rank` of the simulation and count the same elements
    monkeypatch.setattr(collectives, "dist", _IdenticalRanksDist(W, rank))
    pg = wz.ProcessGroupRanks(None, wz.CollectiveCounter())
    sim = SimulatedRanks(W)
    g = torch.Generator().manual_seed(1)
    t = torch.randn(W * C, generator=g, dtype=F64)
    for method, local in (("all_reduce", t), ("gather_numbers", t[0]), ("gather_shards", t[:C]),
                          ("all_to_all", t)):
        out, sent = _elements(pg, method, local.clone())
        expected, sim_sent = _elements(sim, method, local.expand(W, *local.shape).clone())
        assert sent == pytest.approx(sim_sent), method
        torch.testing.assert_close(out, expected[rank], rtol=1e-15, atol=0)
    assert sim.counter.elements == pytest.approx(
        2 * (W - 1) / W * W * C + (W - 1) + (W - 1) * C + (W - 1) * C)
    assert pg.world == W and pg.rank == rank
    assert torch.equal(pg.mine(torch.arange(W)), torch.tensor(rank))
    assert pg.shared(t) is t and pg.spread(t) is t


def test_rank_rows_over_a_process_group_run_on_unbatched_rows(monkeypatch):
    # a process group's rank holds one (k,) row, not a (world, k) matrix: the whole Weiszfeld
    # loop must run on it and give the simulation's row (identical ranks: their common row)
    monkeypatch.setattr(collectives, "dist", _IdenticalRanksDist(W, 1))
    pg = wz.ProcessGroupRanks(None, wz.CollectiveCounter())
    g = torch.Generator().manual_seed(2)
    y, centre = torch.randn(7, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    kw = dict(eps=1e-8, tol=1e-12, max_iter=5, fixed_iter=False)
    mine = wz.ranks_weiszfeld(y, torch.tensor(True), centre, pg, **kw)
    sim = wz.ranks_weiszfeld(y.expand(W, -1), torch.ones(W, dtype=torch.bool), centre.expand(W, -1),
                             SimulatedRanks(W), **kw)
    assert mine.shape == (7,)
    torch.testing.assert_close(mine, sim[1], rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(mine, y, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Found by the second mutation pass (benchmarks/results/mutation/README.md)


def _weiszfeld_steps_by_hand(X, w, steps):
    """``z0`` the weighted mean, then ``z <- sum_i b_i X_i / sum_i b_i``, ``b_i = w_i / ||X_i - z||``
    (no floor: the data below are far from every iterate)."""
    z = (w[:, None] * X).sum(0) / w.sum()
    for _ in range(steps):
        b = w / torch.linalg.vector_norm(X - z, dim=-1)
        z = (b[:, None] * X).sum(0) / b.sum()
    return z


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_fixed_iterations_are_weiszfeld_steps_from_the_weighted_mean(steps, weighted):
    X = _rows(7, 9, 5)
    g = torch.Generator().manual_seed(8)
    w = torch.rand(9, generator=g, dtype=F64) + 0.5 if weighted else torch.ones(9, dtype=F64)
    out = ms.geometric_median(X, w if weighted else None, max_iter=steps, fixed_iter=True, tol=0.0)
    assert int(out.n_iter) == steps
    torch.testing.assert_close(out.median, _weiszfeld_steps_by_hand(X, w, steps), rtol=1e-13, atol=1e-13)


def test_gram_route_never_counts_more_than_max_iter():
    # few rows of many coordinates (n d >= 2**16): the Gram pre-iteration first; problems that
    # spent more of max_iter there have less left for the exact iteration, none exceeds it
    g = torch.Generator().manual_seed(9)
    X = torch.randn(3, 8, 10_000, generator=g, dtype=F64)
    X[0] *= 1e-3
    X[0, 0] += 1.0  # a far point: the problems need different numbers of iterations
    X[2, :4] += 5.0  # two clusters of half the weight: slow
    out = ms.geometric_median(X, tol=0.0, max_iter=40)  # (Gram stages of 19, 14 and 39 steps)
    # tol = 0: no problem converges, each uses exactly max_iter iterations
    assert out.n_iter.tolist() == [40, 40, 40] and not bool(out.converged.any())


def test_gram_route_with_two_batch_dimensions_matches_each_problem_alone():
    # (2, 3) problems of 8 rows in R^8192: the Gram route (n <= 64, n d >= 2**16) for each
    g = torch.Generator().manual_seed(10)
    X = torch.randn(2, 3, 8, 8192, generator=g, dtype=F64)
    X[..., :3, :] += 2.0
    X[1] += 50.0 * torch.randn(8192, generator=g, dtype=F64)  # a common component (centred K)
    out = ms.geometric_median(X)
    assert out.median.shape == (2, 3, 8192)
    for i in range(2):
        for j in range(3):
            alone = ms.geometric_median(X[i, j])
            torch.testing.assert_close(out.median[i, j], alone.median, rtol=1e-9, atol=1e-9)


def _passes_over_X(monkeypatch, X):
    """``geometric_median(X)`` and how many exact passes over ``X`` it made."""
    calls = []
    exact = wz._weiszfeld_pass

    def counted(*args, **kwargs):
        calls.append(1)
        return exact(*args, **kwargs)

    monkeypatch.setattr(wz, "_weiszfeld_pass", counted)
    out = ms.geometric_median(X)
    return out, len(calls)


def test_gram_route_within_its_noise_takes_a_step_more_and_one_exact_step_confirms(monkeypatch):
    # float32, 16 rows, a quarter shifted by 10 (the benchmarks' matrix): the Gram iteration
    # first passes its test within its noise (K's rounding) right at the tolerance (1.59e-5
    # against tol * n = 1.6e-5); the exact test there failed by 0.01% (1.63e-5) and cost a second
    # exact step. One Gram step more (no pass over X): the first exact step confirms.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 100_000, generator=g)
    X[:4] += 10.0
    out, passes = _passes_over_X(monkeypatch, X)
    assert bool(out.converged)
    assert passes == 2  # the first iterate's distances, then the step that confirms
    # the answer is that of the plain iteration to the tolerance's precision
    plain = ms.geometric_median(X.double(), tol=1e-10, max_iter=500).median
    assert float(torch.linalg.vector_norm(out.median.double() - plain)) < 1e-3 * float(
        torch.linalg.vector_norm(X.double() - plain, dim=-1).min())


def test_gram_route_in_float64_stops_where_the_exact_iteration_would(monkeypatch):
    # noise negligible: the Gram iteration stops at the exact iteration's step (chapter "How
    # fast is a median?" shows the two answers agree to 1e-14)
    X = _rows(11, 16, 8192)
    out, passes = _passes_over_X(monkeypatch, X)
    plain = ms.geometric_median(X, fixed_iter=True, max_iter=int(out.n_iter))
    assert bool(out.converged) and passes == 2
    torch.testing.assert_close(out.median, plain.median, rtol=0, atol=1e-12)
