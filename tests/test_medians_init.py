"""geometric_median(init="median"): the robust start (the weighted coordinate-wise median)."""

from __future__ import annotations

import pytest
import torch

import median_sgd as ms
from median_sgd._masked import masked_coordinate_median
from median_sgd.weiszfeld import weighted_coordinate_median

F64 = torch.float64


def _weighted_median_by_hand(column, weights):
    """The smallest value whose cumulative weight (sorted) reaches half the total; midway to the
    next value with positive weight when it reaches exactly half."""
    pairs = sorted(zip(column.tolist(), weights.tolist()))
    half = sum(w for _, w in pairs) / 2
    cum, lo = 0.0, None
    for value, w in pairs:
        cum += w
        if lo is None and cum >= half:
            lo = value
            if cum > half:
                return lo
        elif lo is not None and w > 0:
            return (lo + value) / 2
    return lo


def test_weighted_coordinate_median_against_the_definition():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 7, 5, generator=gen, dtype=F64)
    w = torch.rand(3, 7, generator=gen, dtype=F64)
    w[0, 2] = 0.0  # a row of weight 0 never counts
    got = weighted_coordinate_median(X, w, uniform=False)
    for p in range(3):
        for j in range(5):
            assert got[p, j].item() == pytest.approx(_weighted_median_by_hand(X[p, :, j], w[p]), abs=0)


@pytest.mark.parametrize("n", [6, 7])
def test_weighted_coordinate_median_with_equal_or_0_1_weights_is_the_library_s_median(n):
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(2, n, 9, generator=gen, dtype=F64)
    ones = torch.ones(2, n, dtype=F64)
    assert torch.equal(weighted_coordinate_median(X, ones, uniform=True), ms.coordinate_median(X))
    assert torch.equal(weighted_coordinate_median(X, 3 * ones, uniform=False), ms.coordinate_median(X))
    ok = torch.rand(2, n, generator=gen) < 0.7
    ok[:, 0] = True
    assert torch.equal(weighted_coordinate_median(X, ok.to(F64), uniform=False),
                       masked_coordinate_median(X, ok))


def _median_start_agrees_with_the_mean_start(G, weights, tol, max_iter, close):
    """Both starts converge, to medians within ``close``; returns the median start's result."""
    a = ms.geometric_median(G, weights, tol=tol, max_iter=max_iter)
    b = ms.geometric_median(G, weights, tol=tol, max_iter=max_iter, init="median")
    assert bool(a.converged.all()) and bool(b.converged.all())
    torch.testing.assert_close(b.median, a.median, rtol=close, atol=close)
    return b


def test_median_start_converges_to_the_same_median():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(4, 15, 6, generator=gen, dtype=F64) * torch.tensor([1.0, 10.0, 0.1, 3.0],
                                                                       dtype=F64)[:, None, None]
    w = torch.rand(4, 15, generator=gen, dtype=F64)
    for weights in (None, w):
        b = _median_start_agrees_with_the_mean_start(G, weights, 1e-12, 2000, close=1e-9)
        # the adaptive mode's bits are those of fixed_iter=True with as many iterations
        steps = int(b.n_iter.max())
        fixed = ms.geometric_median(G, weights, tol=1e-12, max_iter=steps, fixed_iter=True, init="median")
        assert torch.equal(fixed.median, b.median)


def test_median_start_converges_where_the_mean_start_does_not():
    # one row of 1e300 among 32 (float64): from the mean each iteration divides the distance to the
    # inliers only by ~31, so 100 iterations leave it ~1e149 away (the docstring's numbers)
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(32, 10, generator=gen, dtype=F64)
    honest = ms.geometric_median(G[1:], tol=1e-12, max_iter=1000).median
    G[0] = 1e300
    far = ms.geometric_median(G)
    assert not bool(far.converged) and int(far.n_iter) == 100
    assert float(torch.linalg.vector_norm(far.median - honest)) > 1e100
    near = ms.geometric_median(G, init="median")
    assert bool(near.converged) and int(near.n_iter) < 20
    # the outlier's pull on the median is at most its weight's share of a unit vector
    assert float(torch.linalg.vector_norm(near.median - honest)) < 1.0
    # and the aggregator starts there
    torch.testing.assert_close(ms.aggregators.make_aggregator("gmd")(G), near.median, rtol=0, atol=0)
    # float32, 4 rows of 1e30 among 10: from the mean still ~1e12 away after 100 iterations
    G = torch.randn(10, 10, generator=gen)
    honest = ms.geometric_median(G[4:].double(), tol=1e-12, max_iter=1000).median
    G[:4] = 1e30
    far = ms.geometric_median(G).median.double()
    assert 1e11 < float(torch.linalg.vector_norm(far - honest)) < 1e14
    near = ms.geometric_median(G, init="median")
    assert bool(near.converged) and float(torch.linalg.vector_norm(near.median.double() - honest)) < 5.0


def test_median_start_keeps_the_one_step_gradient():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(9, 4, generator=gen, dtype=F64, requires_grad=True)
    a = torch.autograd.grad(ms.geometric_median(G, tol=1e-12, max_iter=500).median.sum(), G)[0]
    b = torch.autograd.grad(ms.geometric_median(G, tol=1e-12, max_iter=500, init="median").median.sum(), G)[0]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_init_must_be_mean_or_median():
    with pytest.raises(ValueError, match="init"):
        ms.geometric_median(torch.zeros(3, 2), init="medoid")


def test_weighted_coordinate_median_of_two_huge_middle_values_does_not_overflow():
    big = torch.finfo(F64).max
    X = torch.tensor([[0.8 * big, -0.9 * big], [0.9 * big, -0.8 * big]], dtype=F64)  # n = 2
    want = torch.tensor([0.85 * big, -0.85 * big], dtype=F64)
    for w, uniform in ((torch.ones(2, dtype=F64), True), (torch.tensor([1.0, 1.0], dtype=F64), False)):
        torch.testing.assert_close(weighted_coordinate_median(X, w, uniform), want, rtol=1e-15, atol=0)


def test_weighted_coordinate_median_with_weights_summing_to_0_indexes_no_row_beyond_n():
    # invalid for geometric_median (checked unless value checks are off), but the start must not
    # gather outside the matrix: every cumulative weight is then "at most half"
    X = torch.arange(12.0, dtype=F64).reshape(4, 3)
    got = weighted_coordinate_median(X, torch.zeros(4, dtype=F64), uniform=False)
    torch.testing.assert_close(got, (X[0] + X[3]) / 2)


def test_median_start_is_closer_after_ten_iterations_under_heavy_tails():
    # SampleMedianSGD's budget (10 fixed iterations) on 32 alpha-stable samples (alpha = 0.5) in
    # R^10: the error to the converged median in the worst 1% of 1000 problems, from each start
    # (seed 4: 0.52 from the mean, 0.028 from the median; 13x to 21x over seeds 4-8)
    gen = torch.Generator().manual_seed(4)
    X = ms.sample_stable(0.5, (1000, 32, 10), generator=gen, dtype=F64)
    best = ms.geometric_median(X, tol=1e-10, max_iter=5000).median
    worst = {}
    for init in ("mean", "median"):
        z = ms.geometric_median(X, max_iter=10, fixed_iter=True, init=init).median
        worst[init] = float(torch.linalg.vector_norm(z - best, dim=-1).quantile(0.99))
    assert worst["median"] * 4 < worst["mean"]


def test_median_start_of_batched_problems_with_shared_weights_is_each_problem_s():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(3, 2, 9, 4, generator=gen, dtype=F64)
    w = torch.rand(9, generator=gen, dtype=F64)  # one weight vector for all six problems
    batched = ms.geometric_median(G, w, init="median", tol=1e-12, max_iter=1000).median
    for i in range(3):
        for j in range(2):
            alone = ms.geometric_median(G[i, j], w, init="median", tol=1e-12, max_iter=1000).median
            torch.testing.assert_close(batched[i, j], alone, rtol=0, atol=1e-14)
    for dtype in (torch.float16, torch.bfloat16):  # iterated in float32, returned in the dtype
        half = ms.geometric_median(G.to(dtype), w.to(dtype), init="median").median
        assert half.dtype == dtype and bool(torch.isfinite(half).all())


# n <= 64 rows and n d >= 2**16: the adaptive mode's Gram route, where the robust start is the
# medoid found from the Gram matrix (no sort), and the exact iteration is centred on it


def test_medoid_start_on_the_gram_route_converges_to_the_same_median():
    gen = torch.Generator().manual_seed(6)
    G = torch.randn(2, 32, 4096, generator=gen, dtype=F64) + 5.0  # a common component too
    w = torch.rand(2, 32, generator=gen, dtype=F64)
    for weights in (None, w):
        _median_start_agrees_with_the_mean_start(G, weights, 1e-10, 500, close=1e-7)


@pytest.mark.parametrize("dtype,huge,bad", [(F64, 1e300, 1), (F64, 1e300, 4), (torch.float32, 1e30, 4)])
def test_medoid_start_on_the_gram_route_is_robust_to_huge_rows(dtype, huge, bad):
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(32, 4096, generator=gen, dtype=F64)
    honest = ms.geometric_median(G[bad:], tol=1e-12, max_iter=1000).median
    spread = float(torch.linalg.vector_norm(G[bad:] - honest, dim=-1).max())
    G = G.to(dtype)
    G[:bad] = huge
    for solve in (lambda: ms.geometric_median(G, init="median"),
                  lambda: ms.aggregators.make_aggregator("gmd")(G)):
        out = solve()
        z = out if isinstance(out, torch.Tensor) else out.median
        if not isinstance(out, torch.Tensor):
            assert bool(out.converged) and int(out.n_iter) < 30
        # the outliers' bounded pull (< half the weight), not their size
        assert float(torch.linalg.vector_norm(z.double() - honest)) < spread
    if dtype == F64:  # from the mean, 100 iterations leave the attack's trace (float32's 1e30
        far = ms.geometric_median(G)  # with 4 of 32 rows converges from there in 40)
        assert float(torch.linalg.vector_norm(far.median.double() - honest)) > 1e3 * spread


def test_medoid_is_never_a_row_of_weight_0():
    # the far rows weigh 0 and lie together: by distances alone they would look central
    gen = torch.Generator().manual_seed(8)
    G = torch.randn(40, 2048, generator=gen, dtype=F64)
    G[:25] = 1e6 + torch.randn(25, 2048, generator=gen, dtype=F64) * 1e-3
    w = torch.ones(40, dtype=F64)
    w[:25] = 0.0
    got = ms.geometric_median(G, w, init="median", tol=1e-10, max_iter=500)
    want = ms.geometric_median(G[25:], tol=1e-10, max_iter=500)
    assert bool(got.converged)
    torch.testing.assert_close(got.median, want.median, rtol=1e-7, atol=1e-7)


def test_medoid_is_the_row_with_the_smallest_weighted_sum_of_distances():
    # the Gram pre-iteration's robust start, before any step (max_iter=0): the brute-force medoid
    from median_sgd.weiszfeld import LocalRows, weighted_mean
    gen = torch.Generator().manual_seed(9)
    # rows spread along a line with skewed positions: the medoid is not simply the row nearest
    # the mean (which other formulas of "distance" would also find)
    # (scaled so that many distances are below 1)
    a = torch.empty(3, 12, 1, dtype=F64).exponential_(generator=gen) ** 2
    X = 0.05 * (a * torch.randn(50, generator=gen, dtype=F64)
                + 0.1 * torch.randn(3, 12, 50, generator=gen, dtype=F64))
    w = torch.rand(3, 12, generator=gen, dtype=F64)
    w[:, 0] = 0.0  # row 0 at the others' geometric median: the best point, but of weight 0
    X[:, 0] = ms.geometric_median(X[:, 1:], w[:, 1:], tol=1e-12, max_iter=1000).median
    dist = torch.cdist(X, X)
    scores = (dist * w.unsqueeze(-2)).sum(-1)
    scores[:, 0] = torch.inf  # a row of weight 0 is never the start
    rows = LocalRows(X, w, w.sum(-1), weighted_mean(X, w, w.sum(-1), False), uniform=False)
    rows.gram_start(1e-8, 1e-6, 0, medoid=True)
    c = rows.beta
    assert torch.equal(c.argmax(-1), scores.argmin(-1))
    assert torch.equal(c, torch.nn.functional.one_hot(scores.argmin(-1), 12).to(c.dtype))
