"""Edges of ``geometric_median`` that the main tests miss (found by mutation testing).

* Large problems: above 2**18 elements the iteration reads ``G`` in column blocks; with batch
  dimensions, with weights and with gradients (autograd through it) the answer must be that of
  the same problems solved one at a time (each small enough to be read whole).
* Weighted problems: integer weights are the same problem as the rows repeated, smoothing floor
  included (its weighted-median quantile must match the unweighted median of the repeated
  distances), also when a data point is the median; scaling the weights changes nothing.
"""

from __future__ import annotations

import pytest
import torch

import median_sgd as ms

F64 = torch.float64


def _problems(batch, n, d, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(*batch, n, d, generator=gen, dtype=F64)
    G[..., : n // 5, :] += 6.0  # a cluster of outliers: the median is not the mean
    G = G + 3.0 * torch.randn(*batch, 1, d, generator=gen, dtype=F64)  # a common component
    return G.to(dtype)


def _one_at_a_time(G, weights=None, **options):
    flat = G.reshape(-1, *G.shape[-2:])
    wflat = None if weights is None else weights.expand(*G.shape[:-1]).reshape(-1, G.shape[-2])
    outs = [ms.geometric_median(flat[i], None if wflat is None else wflat[i], **options) for i in range(flat.shape[0])]
    return (torch.stack([o.median for o in outs]).reshape(*G.shape[:-2], G.shape[-1]),
            torch.stack([o.n_iter for o in outs]).reshape(G.shape[:-2]))


# n > 64 keeps the Gram route out; each problem (80 x 2048 = 163840 elements) is read whole,
# the batch (4 x 80 x 2048 = 655360) in blocks of 819 columns.
BATCH, N, D = (2, 2), 80, 2048


@pytest.mark.parametrize("fixed_iter", [False, True])
def test_column_blocks_with_batch_dimensions_match_the_problems_one_at_a_time(fixed_iter):
    G = _problems(BATCH, N, D)
    options = dict(tol=1e-10, max_iter=60, fixed_iter=fixed_iter)
    res = ms.geometric_median(G, **options)
    median, n_iter = _one_at_a_time(G, **options)
    torch.testing.assert_close(res.median, median, rtol=1e-9, atol=1e-9)
    if not fixed_iter:
        assert (res.n_iter - n_iter).abs().max() <= 1  # the same iteration, up to rounding
        assert bool(res.converged.all())
    # a median of the rows, not their mean
    assert (res.median - G.mean(-2)).norm(dim=-1).min() > 0.1


def test_column_blocks_with_weights_match_the_problems_one_at_a_time():
    G = _problems(BATCH, N, D, seed=1)
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(*BATCH, N, generator=gen, dtype=F64) + 0.1
    res = ms.geometric_median(G, w, tol=1e-10)
    median, _ = _one_at_a_time(G, w, tol=1e-10)
    torch.testing.assert_close(res.median, median, rtol=1e-9, atol=1e-9)
    # weights broadcast over the batch: (n,) for every problem
    res1 = ms.geometric_median(G, w[0, 0], tol=1e-10)
    median1, _ = _one_at_a_time(G, w[0, 0], tol=1e-10)
    torch.testing.assert_close(res1.median, median1, rtol=1e-9, atol=1e-9)


def test_column_blocks_gradients_match_the_problems_one_at_a_time():
    G0 = _problems(BATCH, N, D, seed=3)
    gen = torch.Generator().manual_seed(4)
    probe = torch.randn(*BATCH, D, generator=gen, dtype=F64)
    w0 = torch.rand(*BATCH, N, generator=gen, dtype=F64) + 0.5

    G = G0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    (ms.geometric_median(G, w, tol=1e-10).median * probe).sum().backward()

    G1 = G0.clone().requires_grad_(True)
    w1 = w0.clone().requires_grad_(True)
    median, _ = _one_at_a_time(G1, w1, tol=1e-10)
    (median * probe).sum().backward()
    assert G.grad is not None and w.grad is not None and G1.grad is not None and w1.grad is not None
    torch.testing.assert_close(G.grad, G1.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(w.grad, w1.grad, rtol=1e-7, atol=1e-10)
    assert float(G.grad.abs().sum()) > 0 and float(w.grad.abs().sum()) > 0


@pytest.mark.parametrize("shape", [(BATCH, N, D), ((), 40, 6), ((3,), 9, 4)])
def test_gradients_are_the_one_step_formula(shape):
    # z = sum_i b_i G_i / S, b_i = w_i / r_i, S = sum_i b_i, with r_i = ||G_i - z|| held constant:
    # dz/dG_i = b_i / S (times the identity), dz/dw_i = (G_i - z) / (r_i S).
    batch, n, d = shape
    G0 = _problems(batch, n, d, seed=9)
    gen = torch.Generator().manual_seed(10)
    probe = torch.randn(*batch, d, generator=gen, dtype=F64)
    w0 = torch.rand(*batch, n, generator=gen, dtype=F64) + 0.5
    G = G0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    z = ms.geometric_median(G, w, tol=1e-12, max_iter=500).median
    (z * probe).sum().backward()
    assert G.grad is not None and w.grad is not None
    z = z.detach()
    r = (G0 - z.unsqueeze(-2)).norm(dim=-1)
    b = w0 / r
    S = b.sum(-1, keepdim=True)
    torch.testing.assert_close(G.grad, (b / S).unsqueeze(-1) * probe.unsqueeze(-2), rtol=1e-8, atol=1e-12)
    expected_w = ((G0 - z.unsqueeze(-2)) * probe.unsqueeze(-2)).sum(-1) / (r * S)
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-6, atol=1e-10)


def test_column_blocks_without_batch_match_a_plain_weiszfeld():
    # 2-D, 300 x 1024 = 307200 elements: blocks of 873 columns (two blocks, the last one short)
    G = _problems((), 300, 1024, seed=5)
    res = ms.geometric_median(G, tol=1e-12, max_iter=500)
    z = G.mean(0)
    for _ in range(2000):
        r = (G - z).norm(dim=-1).clamp_min(1e-12)
        z_new = (G / r[:, None]).sum(0) / (1.0 / r).sum()
        if float((z_new - z).norm()) < 1e-14:
            break
        z = z_new
    torch.testing.assert_close(res.median, z, rtol=1e-8, atol=1e-8)
    assert bool(res.converged)


def test_column_blocks_float32_batch_matches_float64():
    G = _problems(BATCH, N, D, seed=6)
    res32 = ms.geometric_median(G.float(), tol=1e-6)
    res64 = ms.geometric_median(G, tol=1e-10)
    torch.testing.assert_close(res32.median.double(), res64.median, rtol=1e-4, atol=1e-4)


# Weighted problems and the smoothing floor


def _repeat(G, counts):
    return torch.repeat_interleave(G, torch.tensor(counts), dim=-2)


@pytest.mark.parametrize("eps", [0.3, 1e-3, 1e-8])
@pytest.mark.parametrize("counts", [[3, 1, 1, 2, 1], [1, 1, 1, 1, 2, 2], [2, 1, 1, 1, 1, 2]])
def test_integer_weights_are_the_rows_repeated_smoothing_floor_included(eps, counts):
    gen = torch.Generator().manual_seed(len(counts))
    G = torch.randn(len(counts), 3, generator=gen, dtype=F64)
    w = torch.tensor(counts, dtype=F64)
    # fixed_iter: the same number of steps on both, so a large eps (a large floor) is compared too
    weighted = ms.geometric_median(G, w, eps=eps, max_iter=40, fixed_iter=True).median
    repeated = ms.geometric_median(_repeat(G, counts), eps=eps, max_iter=40, fixed_iter=True).median
    torch.testing.assert_close(weighted, repeated, rtol=1e-10, atol=1e-12)
    # scaling the weights (not by a power of two) changes nothing either
    scaled = ms.geometric_median(G, w * 3.7, eps=eps, max_iter=40, fixed_iter=True).median
    torch.testing.assert_close(scaled, weighted, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("counts", [[5, 1, 1, 1], [4, 1, 1, 1, 1], [1, 1, 6, 1, 1, 1]])
def test_a_heavy_data_point_is_the_weighted_median(counts):
    # a point holding at least half of the weight is the geometric median
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(len(counts), 4, generator=gen, dtype=F64) * 5.0
    w = torch.tensor(counts, dtype=F64)
    heavy = int(torch.argmax(w))
    # (within the smoothing floor, eps = 1e-8 times the mean distance, of the point)
    res = ms.geometric_median(G, w)
    torch.testing.assert_close(res.median, G[heavy], rtol=0, atol=1e-6)
    assert bool(res.converged)
    rep = ms.geometric_median(_repeat(G, counts))
    torch.testing.assert_close(rep.median, G[heavy], rtol=0, atol=1e-6)
    # the same with the floor's fallback exercised on a large eps, step for step as repeated rows
    for eps in (0.5, 1e-2):
        a = ms.geometric_median(G, w, eps=eps, max_iter=30, fixed_iter=True).median
        b = ms.geometric_median(_repeat(G, counts), eps=eps, max_iter=30, fixed_iter=True).median
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_weighted_batch_with_a_data_point_median_in_some_problems():
    gen = torch.Generator().manual_seed(8)
    G = torch.randn(3, 5, 2, generator=gen, dtype=F64)
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [6.0, 1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 3.0, 1.0]], dtype=F64)
    res = ms.geometric_median(G, w, eps=0.05, max_iter=50, fixed_iter=True).median
    for i in range(3):
        counts = [int(c) for c in w[i]]
        ref = ms.geometric_median(_repeat(G[i], counts), eps=0.05, max_iter=50, fixed_iter=True).median
        torch.testing.assert_close(res[i], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ms.geometric_median(G[1], w[1]).median, G[1, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("column", [0, 500, -1])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_column_blocks_scale_with_the_largest_value_in_one_column(column, batch):
    # The iteration scales G by a power of two from max |G| (read block by block): a maximum
    # near overflow in a single column, first, middle or last, must still give a finite answer,
    # that of the same data scaled down exactly (power-of-two scaling is exact).
    n, d = (300, 1024) if batch == () else (80, 2048)
    G = _problems(batch, n, d, seed=11)
    G[..., column] = -G[..., column].abs() * 1e306  # negative: the largest |G| is -min G
    down = 2.0**-1000
    res = ms.geometric_median(G, tol=1e-10).median
    ref = ms.geometric_median(G * down, tol=1e-10).median / down
    assert bool(torch.isfinite(res).all())
    torch.testing.assert_close(res, ref, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------------
# Found by the second mutation pass (benchmarks/results/mutation/README.md)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_mean_of_identical_rows_is_exact_near_the_smallest_normal(n, dtype):
    # The mean sums the rows scaled by p = 2**-ceil(log2 n) (no overflow) and unscales exactly:
    # a value with a full mantissa, 2**ceil(log2 n) above the smallest normal number, stays
    # normal once scaled, so the mean of n copies of it (a power of two: no rounding in the
    # sum) is the value itself, bit for bit. A smaller p would push it below the normal range.
    info = torch.finfo(dtype)
    v = (1 + info.eps) * info.tiny * 2.0 ** ((n - 1).bit_length())
    G = torch.full((n, 3), v, dtype=dtype)
    assert torch.equal(ms.trimmed_mean(G, 0.0), torch.full((3,), v, dtype=dtype))


def test_geometric_median_defaults_are_the_registrys():
    # the aggregator registry documents geometric_median's own iteration defaults
    # (make_aggregator("gmd") passes only init): on weighted problems whose median is a data point, where the smoothing
    # floor decides the last digits, the defaults and the registry's values agree bit for bit
    from median_sgd.aggregators import REGISTRY
    defaults = REGISTRY["geometric_median"].defaults("aggregator")
    assert defaults.pop("init") == "median"  # the aggregators' robust start (the function's: mean)
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(6, 7, 3, generator=gen, dtype=F64)  # 6 problems of 7 points in R^3
    w = torch.rand(6, 7, generator=gen, dtype=F64)
    w[:, 0] = 1.2 * w[:, 1:].sum(-1)  # more than half of the weight: G_0 is the median
    plain = ms.geometric_median(G, w)
    assert torch.equal(plain.median, ms.geometric_median(G, w, **defaults).median)
    assert torch.equal(plain.n_iter, ms.geometric_median(G, w, **defaults).n_iter)
    # (and the floor matters here: twice the default eps changes the answer)
    other = ms.geometric_median(G, w, **dict(defaults, eps=2 * defaults["eps"]))
    assert not torch.equal(plain.median, other.median)


def test_geometric_median_max_iter_must_be_an_integer():
    G = torch.randn(5, 3, dtype=F64)
    assert int(ms.geometric_median(G, max_iter=3, tol=0.0).n_iter) == 3
    with pytest.raises(ValueError, match="max_iter"):
        ms.geometric_median(G, max_iter=2.5)


def test_zero_dimensional_weights_are_rejected():
    G = torch.randn(5, 3, dtype=F64)
    w = torch.tensor(1.0, dtype=F64)
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median(G, w)
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median_objective(G, torch.zeros(3, dtype=F64), w)


@pytest.mark.parametrize("fn", [ms.coordinate_median, lambda G: ms.trimmed_mean(G, 0.1),
                                ms.geometric_median])
def test_batched_empty_vectors_are_rejected(fn):
    # (batch, n, d) with d = 0 (the batch and n nonzero): no vector to aggregate
    with pytest.raises(ValueError, match="empty vectors"):
        fn(torch.zeros(3, 4, 0, dtype=F64))
