"""Medians across samples: coordinate_median, trimmed_mean, geometric_median (Weiszfeld)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import median_sgd as ms

F64 = torch.float64
# Converge far below the tolerances asserted below. eps is the smoothing floor relative to the data's
# scale: when the median is a data point (1-D, weighted) the smoothed minimiser sits within ~eps*s
# of it, so tight comparisons of objective values take a small eps too.
TIGHT = dict(tol=1e-12, eps=1e-12, max_iter=20000)  # many: Weiszfeld is slow near a data point


def gm(G, weights=None, **kw):
    return ms.geometric_median(G, weights, **kw)


def first_order_residual(G, z, w=None):
    """||sum_i w_i (z - x_i)/||z - x_i|| || / sum_i w_i (the objective's gradient, normalised)."""
    if w is None:
        w = torch.ones(G.shape[:-1], dtype=G.dtype)
    diff = z.unsqueeze(-2) - G
    unit = diff / torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    return torch.linalg.vector_norm((w.unsqueeze(-1) * unit).sum(-2), dim=-1) / w.sum(-1)


def random_problem(seed, n, d, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((), generator=g, dtype=dtype) * 10 + 0.1
    shift = torch.randn(d, generator=g, dtype=dtype) * 5
    return shift + scale * torch.randn(n, d, generator=g, dtype=dtype)


def random_orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed, det may be -1 (a reflection)


# ---------------------------------------------------------------------------------------------
# coordinate_median
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (7, 4), (8, 4), (5, 1), (2, 3, 9, 2), (4, 10, 3)])
def test_coordinate_median_matches_numpy(shape, dtype, device, gen):
    G = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    G[..., 0, :] = G[..., -1, :]  # ties
    out = ms.coordinate_median(G.to(device))
    assert out.shape == shape[:-2] + shape[-1:]
    assert out.dtype == dtype and out.device == device
    expected = torch.from_numpy(np.median(G.numpy(), axis=-2)).to(dtype)
    torch.testing.assert_close(out.cpu(), expected)


def test_coordinate_median_beyond_2_pow_24_elements_many_columns():
    # 3 x (2**23 + 5) float32 = 25.2M elements (~100 MB): torch.quantile refuses inputs this size.
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 2**23 + 5, generator=gen)
    G0 = G.clone()
    out = ms.coordinate_median(G)
    assert out.shape == (2**23 + 5,) and out.dtype == torch.float32
    for sl in (slice(0, 1000), slice(2**22, 2**22 + 1000), slice(-1000, None)):
        assert torch.equal(out[sl], torch.from_numpy(np.median(G[:, sl].numpy(), axis=0)))
    assert torch.equal(G, G0)
    del G, G0, out


def test_coordinate_median_beyond_2_pow_24_rows():
    # one column of 2**24 + 3 samples (odd: the median is one of the samples)
    gen = torch.Generator().manual_seed(1)
    G = torch.rand(2**24 + 3, 1, generator=gen)
    out = ms.coordinate_median(G)
    expected = np.median(G.numpy(), axis=0)
    assert torch.equal(out, torch.from_numpy(expected))
    assert abs(float(out) - 0.5) < 1e-3  # and it is the median of U(0, 1) draws


# ---------------------------------------------------------------------------------------------
# trimmed_mean
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 11, 20, 33])
@pytest.mark.parametrize("trim", [0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49])
def test_trimmed_mean_matches_scipy(n, trim, gen):
    G = torch.randn(2, 3, n, 4, generator=gen, dtype=F64)
    G[..., 0, 0] = 1e9  # an outlier in every problem
    out = ms.trimmed_mean(G, trim)
    expected = scipy.stats.trim_mean(G.numpy(), trim, axis=-2)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_trimmed_mean_trim_zero_is_mean_and_removes_outliers(dtype, device, gen):
    G = torch.randn(3, 10, 5, generator=gen).to(dtype=dtype, device=device)
    torch.testing.assert_close(ms.trimmed_mean(G, 0.0), G.mean(-2))
    torch.testing.assert_close(ms.trimmed_mean(G, 0), G.mean(-2))
    assert ms.trimmed_mean(G, 0.1).dtype == dtype
    G2 = G.clone()
    G2[:, 0, :] = 1e6
    G2[:, 1, :] = -1e6
    # 10% of 10 rows = one from each end: both outliers go
    assert ms.trimmed_mean(G2, 0.1).abs().max() < 10


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, 1.0, float("nan"), float("inf"), "0.1", None, True])
def test_trimmed_mean_bad_trim_raises(trim):
    with pytest.raises((ValueError, TypeError)):
        ms.trimmed_mean(torch.randn(5, 2), trim)


# ---------------------------------------------------------------------------------------------
# geometric_median: optimality
# ---------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 40), d=st.integers(1, 6))
def test_gm_first_order_optimality(seed, n, d):
    G = random_problem(seed, n, d)
    res = gm(G, **TIGHT)
    # Near-ties (a data point whose weight almost exactly balances the others' pull) make Weiszfeld
    # arbitrarily slow; converged then says so honestly, and such examples are not used here.
    assume(bool(res.converged))
    z = res.median
    # no data point is within 1e-6 of z for continuous random data with n >= 3, d >= 2; in 1-D with
    # odd n the median is a data point and the gradient is undefined there: check the subgradient.
    dist = torch.linalg.vector_norm(G - z, dim=-1)
    if dist.min() > 1e-6 * dist.max():
        assert first_order_residual(G, z) < 1e-9
    else:
        near = dist <= 1e-6 * dist.max()
        far = ~near
        unit = (z - G[far]) / dist[far].unsqueeze(-1)
        assert torch.linalg.vector_norm(unit.sum(0)) <= near.sum() + 1e-9


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 30), d=st.integers(1, 5))
def test_gm_objective_beats_mean_coordinate_median_and_perturbations(seed, n, d):
    G = random_problem(seed, n, d)
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    for weights in (None, w):
        res = gm(G, weights, **TIGHT)
        assume(bool(res.converged))  # see test_gm_first_order_optimality
        z = res.median
        f = lambda x: float(ms.geometric_median_objective(G, x, weights))  # noqa: E731
        fz = f(z)
        slack = 1e-12 * fz
        assert fz <= f(G.mean(0)) + slack
        assert fz <= f(ms.coordinate_median(G)) + slack
        if weights is not None:
            assert fz <= f((w[:, None] * G).sum(0) / w.sum()) + slack
        spread = float(G.std()) + 1e-3
        g = torch.Generator().manual_seed(seed + 1)
        for scale in (1e-4, 1e-2, 1.0):
            for _ in range(5):
                assert fz <= f(z + scale * spread * torch.randn(d, generator=g, dtype=F64)) + slack


# ---------------------------------------------------------------------------------------------
# geometric_median: equivariance
# ---------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 25), d=st.integers(1, 5))
def test_gm_equivariance(seed, n, d):
    G = random_problem(seed, n, d)
    z = gm(G, **TIGHT).median
    spread = float(torch.linalg.vector_norm(G - z, dim=-1).max())
    atol = 1e-7 * spread
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(d, generator=g, dtype=F64) * 100
    torch.testing.assert_close(gm(G + t, **TIGHT).median, z + t, rtol=0, atol=atol + 1e-12 * float(t.abs().max()))
    Q = random_orthogonal(d, seed)
    torch.testing.assert_close(gm(G @ Q.T, **TIGHT).median, z @ Q.T, rtol=0, atol=atol)
    for c in (1e-3, 7.5, -2.0, 1e4):
        torch.testing.assert_close(gm(c * G, **TIGHT).median, c * z, rtol=0, atol=abs(c) * atol)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(gm(G[perm], **TIGHT).median, z, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# geometric_median: weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_gm_integer_weights_equal_repeated_rows(seed):
    G = random_problem(seed, 9, 3)
    counts = torch.tensor([1, 3, 1, 2, 5, 1, 1, 4, 2])
    res_w = gm(G, counts.to(F64), **TIGHT)
    res_r = gm(G.repeat_interleave(counts, dim=0), **TIGHT)
    assert bool(res_w.converged) and bool(res_r.converged)
    torch.testing.assert_close(res_w.median, res_r.median, rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_gm_zero_weight_equals_dropping_the_row(seed):
    G = random_problem(seed, 10, 3)
    G[3] = 1e8  # the dropped row is far away: a nonzero influence would show
    w = torch.rand(10, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5
    w[3] = 0.0
    keep = torch.arange(10) != 3
    torch.testing.assert_close(gm(G, w, **TIGHT).median, gm(G[keep], w[keep], **TIGHT).median, rtol=0, atol=1e-8)


def test_gm_weights_broadcast_over_batch(gen):
    G = torch.randn(4, 3, 7, 2, generator=gen, dtype=F64)
    w = torch.rand(7, generator=gen, dtype=F64) + 0.1
    res = gm(G, w, **TIGHT)
    res_full = gm(G, w.expand(4, 3, 7), **TIGHT)
    torch.testing.assert_close(res.median, res_full.median, rtol=0, atol=1e-12)
    w3 = torch.rand(3, 7, generator=gen, dtype=F64) + 0.1  # broadcast over the first batch dim
    res3 = gm(G, w3, **TIGHT)
    for i in range(4):
        for j in range(3):
            torch.testing.assert_close(gm(G[i, j], w3[j], **TIGHT).median, res3.median[i, j], rtol=0, atol=1e-9)
    # weights scale-free: multiplying all weights by a constant changes nothing
    torch.testing.assert_close(gm(G, 1000 * w3, **TIGHT).median, res3.median, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# geometric_median: breakdown point 1/2
# ---------------------------------------------------------------------------------------------


def _corrupted(n_clean, n_bad, d, far, noisy, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n_clean, d, generator=g, dtype=F64)
    bad = torch.full((n_bad, d), far, dtype=F64)
    if noisy:
        bad = bad + torch.randn(n_bad, d, generator=g, dtype=F64) * 10
    return clean, torch.cat([clean, bad])


@pytest.mark.parametrize("noisy", [False, True], ids=["identical", "noisy"])
@pytest.mark.parametrize("n_clean,n_bad,d", [(11, 10, 5), (11, 9, 2)], ids=["21rows-10bad", "2d-45pct"])
def test_gm_breakdown(noisy, n_clean, n_bad, d):
    clean, G = _corrupted(n_clean, n_bad, d, 1e6, noisy)
    # Just under half the points far away: Weiszfeld's contraction is then ~n_bad/n_clean per
    # iteration (10/11), hence the generous max_iter; converged must be reported.
    res = gm(G, max_iter=1000)
    assert bool(res.converged)
    z_clean = gm(clean, **TIGHT).median
    radius = float(torch.linalg.vector_norm(clean - z_clean, dim=-1).max())
    # The outliers pull the median toward them by a bounded amount: with the resultant of the
    # n_bad outlier directions balanced by the n_clean clean ones, z sits at most a few clean radii
    # from the clean cloud (the mean moves ~ n_bad / n * 1e6 ~ 5e5).
    shift = float(torch.linalg.vector_norm(res.median - z_clean))
    assert shift < 3 * radius, (shift, radius)
    assert float(torch.linalg.vector_norm(G.mean(0) - clean.mean(0))) > 4e5
    # bounded influence: moving the outliers from 1e6 to 1e3 hardly moves the median
    _, G3 = _corrupted(n_clean, n_bad, d, 1e3, noisy)
    z3 = gm(G3, max_iter=1000).median
    assert float(torch.linalg.vector_norm(z3 - res.median)) < 0.05 * radius
    # and it is the minimiser of the corrupted problem: compare with a run with a tiny smoothing
    # floor. (The default floor eps*s is relative to s, the mean distance from the start, which the
    # outliers inflate to ~5e5 here: the default result may sit up to ~eps*s = 5e-3 from a median
    # lying on a data point, as in the 2-D case. See test_gm_breakdown_outliers_arbitrarily_far.)
    ref = gm(G, tol=1e-12, eps=1e-14, max_iter=5000)
    assert bool(ref.converged)
    assert float(torch.linalg.vector_norm(res.median - ref.median)) < 0.01 * radius
    dist = torch.linalg.vector_norm(G - ref.median, dim=-1)
    near = dist < 1e-6 * radius  # the floor here is eps * s ~ 1e-14 * 5e5 = 5e-9
    unit = (ref.median - G[~near]) / dist[~near].unsqueeze(-1)
    # first-order optimality with the data points at the median absorbing up to their weight
    assert float(torch.linalg.vector_norm(unit.sum(0))) <= int(near.sum()) + 1e-6 * G.shape[0]


@pytest.mark.parametrize("far", [1e9, 1e12])
def test_gm_breakdown_outliers_arbitrarily_far(far):
    clean, G = _corrupted(11, 10, 5, far, noisy=False)
    _, G6 = _corrupted(11, 10, 5, 1e6, noisy=False)
    z6 = gm(G6, max_iter=1000).median
    res = gm(G, max_iter=1000)
    radius = float(torch.linalg.vector_norm(clean - gm(clean, **TIGHT).median, dim=-1).max())
    assert bool(res.converged)
    assert float(torch.linalg.vector_norm(res.median - z6)) < 0.05 * radius


# ---------------------------------------------------------------------------------------------
# geometric_median: degenerate configurations (median on a data point)
# ---------------------------------------------------------------------------------------------


def _assert_finite_converged(res):
    assert torch.isfinite(res.median).all()
    assert bool(res.converged.all())


def test_gm_all_points_coincide(dtype):
    G = torch.full((6, 3), 2.5, dtype=dtype)
    res = gm(G)
    _assert_finite_converged(res)
    assert torch.equal(res.median, G[0])
    res = gm(torch.zeros(4, 2, dtype=dtype))
    _assert_finite_converged(res)
    assert torch.equal(res.median, torch.zeros(2, dtype=dtype))


def test_gm_1d_is_the_median_a_data_point():
    res = gm(torch.tensor([[0.0], [1.0], [5.0]], dtype=F64))
    _assert_finite_converged(res)
    torch.testing.assert_close(res.median, torch.tensor([1.0], dtype=F64), rtol=0, atol=1e-7)


def test_gm_starts_on_a_data_point_and_moves_to_another():
    # mean = 0 is a data point, the median (1-D, n = 5) is 1
    G = torch.tensor([[-4.0], [0.0], [1.0], [1.5], [1.5]], dtype=F64)
    assert float(G.mean()) == 0.0
    res = gm(G)
    _assert_finite_converged(res)
    torch.testing.assert_close(res.median, torch.tensor([1.0], dtype=F64), rtol=0, atol=1e-7)


def test_gm_starts_on_a_data_point_that_is_not_the_median():
    # 2-D: the start (the mean, 0) is a data point, but three points pull to the right
    G = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 0.1], [3.0, -0.1], [-9.0, 0.0]], dtype=F64)
    assert torch.equal(G.mean(0), G[0])
    res = gm(G, **TIGHT)
    _assert_finite_converged(res)
    z = res.median
    assert float(z[0]) > 1.0  # it left the data point
    assert first_order_residual(G, z) < 1e-9
    for dz in ([0.01, 0], [-0.01, 0], [0, 0.01], [0, -0.01]):
        zz = z + torch.tensor(dz, dtype=F64)
        assert ms.geometric_median_objective(G, z) < ms.geometric_median_objective(G, zz)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gm_star_centre_is_the_median(symmetric):
    # the centre c plus five arms at equal angles: the unit vectors from c sum to 0, so c is the
    # median; with unequal arm lengths the mean (the start) is not c.
    angles = torch.arange(5, dtype=F64) * 2 * math.pi / 5
    lengths = torch.ones(5, dtype=F64) * 2 if symmetric else torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    c = torch.tensor([0.3, -0.2], dtype=F64)
    G = torch.cat([c[None], c + lengths[:, None] * torch.stack([angles.cos(), angles.sin()], -1)])
    assert symmetric or float(torch.linalg.vector_norm(G.mean(0) - c)) > 0.1
    res = gm(G)
    _assert_finite_converged(res)
    torch.testing.assert_close(res.median, c, rtol=0, atol=1e-6)


def test_gm_plus_shaped_star_with_centre_start():
    G = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)
    res = gm(G)
    _assert_finite_converged(res)
    assert torch.equal(res.median, torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------------------------------------
# geometric_median: batches, iterations, convergence flags, dtypes
# ---------------------------------------------------------------------------------------------


def test_gm_batch_equals_one_by_one(gen):
    G = torch.randn(4, 3, 11, 5, generator=gen, dtype=F64) * torch.rand(4, 3, 1, 1, generator=gen, dtype=F64) * 10
    G[1, 2] = 0.7  # a degenerate problem in the batch
    res = gm(G)
    assert res.median.shape == (4, 3, 5)
    assert res.n_iter.shape == (4, 3) and res.converged.shape == (4, 3)
    assert res.converged.dtype == torch.bool
    for i in range(4):
        for j in range(3):
            one = gm(G[i, j])
            torch.testing.assert_close(res.median[i, j], one.median, rtol=1e-12, atol=1e-12)
            assert int(res.n_iter[i, j]) == int(one.n_iter)
            assert bool(res.converged[i, j]) == bool(one.converged)


def _weiszfeld_reference(G: np.ndarray, k: int) -> np.ndarray:
    """Plain Weiszfeld (no smoothing: no iterate is near a data point here), from the mean."""
    z = G.mean(0)
    for _ in range(k):
        b = 1.0 / np.linalg.norm(G - z, axis=1)
        z = (b[:, None] * G).sum(0) / b.sum()
    return z


@pytest.mark.parametrize("k", [1, 2, 5, 17])
@pytest.mark.parametrize("fixed_iter", [False, True])
def test_gm_runs_exactly_max_iter_iterations(k, fixed_iter):
    G = _corrupted(11, 10, 3, 50.0, noisy=True)[1]  # slow: 10/11 contraction, never done in 17
    res = gm(G, max_iter=k, tol=0.0, fixed_iter=fixed_iter)
    np.testing.assert_allclose(res.median.numpy(), _weiszfeld_reference(G.numpy(), k), rtol=1e-12, atol=1e-12)
    assert int(res.n_iter) == k
    assert not bool(res.converged)


def test_gm_fixed_iter_agrees_with_adaptive(gen):
    G = torch.randn(5, 9, 3, generator=gen, dtype=F64)
    G[0] = 1.0  # converges at once
    G[1, :4] += 1e3  # slow
    adaptive = gm(G, max_iter=300)
    fixed = gm(G, max_iter=300, fixed_iter=True)
    assert bool(adaptive.converged.all())
    assert torch.equal(fixed.median, adaptive.median)  # frozen problems take zero steps
    assert torch.equal(fixed.n_iter, adaptive.n_iter)
    assert torch.equal(fixed.converged, adaptive.converged)
    assert int(adaptive.n_iter[0]) < int(adaptive.n_iter[1])


def test_gm_converged_flag_per_problem():
    # problem 0: symmetric around a data point (converged at the first iteration);
    # problem 1: 10 of 21 points far away (contraction 10/11 per iteration): not within 5.
    g = torch.Generator().manual_seed(3)
    half = torch.randn(10, 2, generator=g, dtype=F64)
    easy = torch.cat([torch.zeros(1, 2, dtype=F64), half, -half])
    hard = _corrupted(11, 10, 2, 1e6, noisy=True)[1]
    res = gm(torch.stack([easy, hard]), max_iter=5)
    assert res.converged.tolist() == [True, False]
    assert res.n_iter.tolist() == [1, 5]
    torch.testing.assert_close(res.median[0], torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    res_f = gm(torch.stack([easy, hard]), max_iter=5, fixed_iter=True)
    assert res_f.converged.tolist() == [True, False]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_gm_half_precision_keeps_dtype(half, gen):
    G = torch.randn(2, 20, 3, generator=gen)
    res = gm(G.to(half))
    assert res.median.dtype == half
    assert res.median.shape == (2, 3)
    assert torch.isfinite(res.median.float()).all()
    # iterated in float32 internally: agrees with the float32 median of the rounded data
    ref = gm(G.to(half).float()).median
    torch.testing.assert_close(res.median.float(), ref, rtol=0, atol=float(torch.finfo(half).eps) * 4)


def test_gm_dtype_device_kept_and_input_not_mutated(dtype, device, gen):
    G = torch.randn(3, 8, 4, generator=gen).to(dtype=dtype, device=device)
    w = (torch.rand(8, generator=gen) + 0.1).to(dtype=dtype, device=device)
    G0, w0 = G.clone(), w.clone()
    res = gm(G, w)
    assert res.median.dtype == dtype and res.median.device == device
    assert res.n_iter.device == device and res.converged.device == device
    assert torch.equal(G, G0) and torch.equal(w, w0)


# ---------------------------------------------------------------------------------------------
# geometric_median: gradients (one-step gradient through the last Weiszfeld step)
# ---------------------------------------------------------------------------------------------


def test_gm_gradient_flows_and_respects_equivariance(gen):
    G = (torch.randn(12, 3, generator=gen, dtype=F64) * 2 + 1).requires_grad_(True)
    f = lambda X: ms.geometric_median(X, tol=1e-13, max_iter=5000).median  # noqa: E731
    z = f(G)
    z.sum().backward()
    assert G.grad is not None and G.grad.shape == G.shape
    assert torch.isfinite(G.grad).all()
    J = torch.autograd.functional.jacobian(f, G.detach())  # (d, n, d)
    # translation equivariance z(G + 1 t^T) = z(G) + t: sum_i dz/dG_i = identity
    torch.testing.assert_close(J.sum(1), torch.eye(3, dtype=F64), rtol=0, atol=1e-9)
    # scale equivariance z(s G) = s z(G): d/ds at s = 1 is z
    torch.testing.assert_close(torch.einsum("jik,ik->j", J, G.detach()), z.detach(), rtol=0, atol=1e-6)
    # rotation equivariance: along G A^T (A skew), the derivative is z A^T; checked also by
    # finite differences of the (converged) forward map.
    A = torch.tensor([[0.0, 1.0, -2.0], [-1.0, 0.0, 0.5], [2.0, -0.5, 0.0]], dtype=F64)
    dG = G.detach() @ A.T
    h = 1e-6
    fd = (f(G.detach() + h * dG) - f(G.detach() - h * dG)) / (2 * h)
    torch.testing.assert_close(fd, z.detach() @ A.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.einsum("jik,ik->j", J, dG), fd, rtol=0, atol=1e-5)


def test_gm_gradient_symmetric_configuration():
    # points c +- v_j: the median is the mean c by symmetry; moving every point by t moves it by t
    g = torch.Generator().manual_seed(5)
    V = torch.randn(6, 3, generator=g, dtype=F64)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    G = torch.cat([c + V, c - V]).requires_grad_(True)
    z = ms.geometric_median(G, tol=1e-13, max_iter=5000).median
    torch.testing.assert_close(z.detach(), c, rtol=0, atol=1e-9)
    for j in range(3):
        (grad,) = torch.autograd.grad(z[j], G, retain_graph=True)
        assert torch.isfinite(grad).all()
        expected = torch.zeros(3, dtype=F64)
        expected[j] = 1.0
        torch.testing.assert_close(grad.sum(0), expected, rtol=0, atol=1e-9)
        # the pairs are mirror images: each row of a pair gets the same weight
        torch.testing.assert_close(grad[:6], grad[6:], rtol=0, atol=1e-9)


def test_gm_gradient_wrt_weights_is_scale_invariant(gen):
    G = torch.randn(9, 2, generator=gen, dtype=F64)
    w = (torch.rand(9, generator=gen, dtype=F64) + 0.2).requires_grad_(True)
    z = ms.geometric_median(G, w, tol=1e-13, max_iter=5000).median
    (gw,) = torch.autograd.grad(z.sum(), w)
    assert gw.shape == (9,) and torch.isfinite(gw).all()
    assert gw.abs().max() > 1e-6  # the weights do matter
    # z(c w) = z(w) for c > 0, so sum_i w_i dz/dw_i = 0
    torch.testing.assert_close((w.detach() * gw).sum(), torch.zeros((), dtype=F64), rtol=0, atol=1e-8)


def test_gm_no_graph_without_requires_grad(gen):
    G = torch.randn(9, 2, generator=gen)
    assert not ms.geometric_median(G).median.requires_grad
    with torch.no_grad():
        assert not ms.geometric_median(G.requires_grad_(True)).median.requires_grad


# ---------------------------------------------------------------------------------------------
# geometric_median_objective
# ---------------------------------------------------------------------------------------------


def test_gm_objective_helper(gen):
    G = torch.randn(2, 3, 7, 4, generator=gen, dtype=F64)
    z = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    w = torch.rand(2, 3, 7, generator=gen, dtype=F64)
    Gn, zn, wn = G.numpy(), z.numpy(), w.numpy()
    dist = np.linalg.norm(Gn - zn[..., None, :], axis=-1)
    out = ms.geometric_median_objective(G, z)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.numpy(), dist.sum(-1), rtol=1e-13)
    np.testing.assert_allclose(ms.geometric_median_objective(G, z, w).numpy(), (wn * dist).sum(-1), rtol=1e-13)
    # the median minimises it
    zm = gm(G, w, **TIGHT).median
    assert torch.all(ms.geometric_median_objective(G, zm, w) <= ms.geometric_median_objective(G, z, w))
    with pytest.raises(ValueError):
        ms.geometric_median_objective(G, torch.zeros(2, 3, 5, dtype=F64))


# ---------------------------------------------------------------------------------------------
# geometric_median: the fast paths (column blocks, Gram iteration, cheap finiteness test) give the
# answer of the plain iteration
# ---------------------------------------------------------------------------------------------

import median_sgd.weiszfeld as weiszfeld_module  # noqa: E402


def _gm_pair(G, weights=None, **kw):
    """(default, plain) results: the default takes the Gram path where it applies, plain never."""
    fast = gm(G, weights, **kw)
    saved = weiszfeld_module._GRAM_MAX_N
    weiszfeld_module._GRAM_MAX_N = 0
    try:
        plain = gm(G, weights, **kw)
    finally:
        weiszfeld_module._GRAM_MAX_N = saved
    return fast, plain


def _spread(G):
    return float(torch.linalg.vector_norm(G - G.mean(-2, keepdim=True), dim=-1).max())


def _uses_gram(G):
    n, d = G.shape[-2:]
    return n <= weiszfeld_module._GRAM_MAX_N and n * d >= weiszfeld_module._GRAM_MIN_SIZE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ["clean", "outliers", "weighted", "batched", "offset"])
def test_gm_gram_path_agrees_with_plain_iteration(case, dtype):
    g = torch.Generator().manual_seed(11)
    shape = (3, 8, 2**13) if case == "batched" else (8, 2**13)
    G = torch.randn(shape, generator=g, dtype=F64)
    if case in ("outliers", "batched"):
        G[..., :3, :] += 5.0  # 3 of 8 rows far away: slow convergence (3/5 contraction)
    if case == "offset":
        G += 30.0  # far from the origin relative to the spread: distances must not cancel
    G = G.to(dtype)
    w = torch.rand(8, generator=g, dtype=F64).to(dtype) + 0.2 if case == "weighted" else None
    assert _uses_gram(G)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    fast, plain = _gm_pair(G, w, tol=tol, max_iter=300)
    assert bool(fast.converged.all()) and bool(plain.converged.all())
    assert (fast.n_iter - plain.n_iter).abs().max() <= 1
    atol = (1e-4 if dtype == torch.float32 else 1e-8) * _spread(G)
    torch.testing.assert_close(fast.median, plain.median, rtol=0, atol=atol)
    # and it is the minimiser: the objective is no worse than the plain iteration's
    f_fast = ms.geometric_median_objective(G.double(), fast.median.double(), None if w is None else w.double())
    f_plain = ms.geometric_median_objective(G.double(), plain.median.double(), None if w is None else w.double())
    assert torch.all(f_fast <= f_plain * (1 + (1e-9 if dtype == torch.float32 else 1e-14)))


def test_gm_gram_path_median_on_a_data_point():
    # 5 of 9 rows coincide: the median is that point; the Gram distances to it cancel, so the
    # exact iteration must take over and land on it.
    g = torch.Generator().manual_seed(12)
    d = 2**13
    p = torch.randn(d, generator=g, dtype=F64)
    G = torch.cat([p.expand(5, d), torch.randn(4, d, generator=g, dtype=F64) * 3])
    assert _uses_gram(G)
    res = gm(G)
    assert bool(res.converged)
    assert float(torch.linalg.vector_norm(res.median - p)) <= 1e-6 * _spread(G)
    res32 = gm(G.float())
    assert bool(res32.converged)
    assert float(torch.linalg.vector_norm(res32.median.double() - p)) <= 1e-4 * _spread(G)


@pytest.mark.parametrize("far", [1e6, 1e12])
def test_gm_gram_path_far_outliers(far):
    g = torch.Generator().manual_seed(13)
    d = 2**13
    clean = torch.randn(9, d, generator=g, dtype=F64)
    G = torch.cat([clean, torch.full((7, d), far, dtype=F64)])
    assert _uses_gram(G)
    fast, plain = _gm_pair(G, max_iter=1000)
    assert bool(fast.converged) and bool(plain.converged)
    radius = float(torch.linalg.vector_norm(clean - clean.mean(0), dim=-1).max())
    # Both stop where the stopping rule (tol = 1e-6) holds, possibly at different points of that
    # (flat, 7 of 16 rows far away) neighbourhood of the optimum: equally close to it.
    ref = gm(G, tol=1e-12, max_iter=5000).median
    err_fast = float(torch.linalg.vector_norm(fast.median - ref))
    err_plain = float(torch.linalg.vector_norm(plain.median - ref))
    assert err_fast <= 1.5 * err_plain + 1e-9 * radius and err_fast < 1e-5 * radius
    assert float(torch.linalg.vector_norm(fast.median - clean.mean(0))) < 3 * radius


def test_gm_gram_path_respects_max_iter_and_reports_non_convergence():
    G = torch.randn(8, 2**13, generator=torch.Generator().manual_seed(14), dtype=F64)
    G[:3] += 5.0
    for k in (1, 2, 3, 7):
        fast, plain = _gm_pair(G, tol=0.0, max_iter=k)
        assert int(fast.n_iter) == int(plain.n_iter) == k
        assert not bool(fast.converged) and not bool(plain.converged)
        torch.testing.assert_close(fast.median, plain.median, rtol=0, atol=1e-9 * _spread(G))
        fixed = gm(G, tol=0.0, max_iter=k, fixed_iter=True)
        torch.testing.assert_close(fast.median, fixed.median, rtol=0, atol=1e-9 * _spread(G))


@pytest.mark.parametrize("seed", range(3))
def test_gm_gram_path_forced_on_small_problems(seed, monkeypatch):
    # The Gram iteration on problems of any size (forced): the same answer as the plain one, also
    # with a data point at the median (1-D, odd n) and with weights.
    monkeypatch.setattr(weiszfeld_module, "_GRAM_MIN_SIZE", 1)
    for n, d in [(5, 1), (7, 3), (12, 5), (30, 2)]:
        G = random_problem(seed, n, d)
        w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
        for weights in (None, w):
            fast, plain = _gm_pair(G, weights, **TIGHT)
            assert bool(fast.converged) == bool(plain.converged)
            scale = _spread(G)
            torch.testing.assert_close(fast.median, plain.median, rtol=0, atol=1e-7 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gm_column_blocks_match_one_block(dtype, monkeypatch):
    # Distances summed over column blocks, weighted sum as a matrix-vector product: the same
    # iterates as the one-block formula up to rounding, and the numpy reference.
    G = _corrupted(11, 10, 37, 50.0, noisy=True)[1]
    one = gm(G.to(dtype), max_iter=17, tol=0.0, fixed_iter=True)
    monkeypatch.setattr(weiszfeld_module, "_BLOCK_ELEMENTS", 64)  # 3 columns per block
    assert weiszfeld_module.block_columns(G) < G.shape[-1]
    blocks = gm(G.to(dtype), max_iter=17, tol=0.0, fixed_iter=True)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(blocks.median.double().numpy(), one.median.double().numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(blocks.median.double().numpy(), _weiszfeld_reference(G.numpy(), 17), rtol=rtol, atol=rtol)
    adaptive = gm(G.to(dtype), max_iter=1000)
    assert bool(adaptive.converged)
    w = torch.rand(21, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype) + 0.1
    res = gm(G.to(dtype), w, max_iter=1000)
    monkeypatch.setattr(weiszfeld_module, "_BLOCK_ELEMENTS", 1 << 30)
    ref = gm(G.to(dtype), w, max_iter=1000)
    torch.testing.assert_close(res.median, ref.median, rtol=0, atol=(1e-3 if dtype == torch.float32 else 1e-9))


def test_fast_finiteness_test_on_large_matrices():
    G = torch.randn(4, 2**16, generator=torch.Generator().manual_seed(15))
    for bad in (float("nan"), float("inf"), -float("inf")):
        H = G.clone()
        H[2, 12345] = bad
        for f in (ms.geometric_median, ms.coordinate_median, lambda X: ms.trimmed_mean(X, 0.25)):
            with pytest.raises(ValueError, match="NaN or Inf"):
                f(H)
    # a NaN in a row of weight 0 is still bad input (the weighted mean would not show it)
    H = G.clone()
    H[1, 7] = float("nan")
    w = torch.ones(4)
    w[1] = 0.0
    with pytest.raises(ValueError, match="NaN or Inf"):
        ms.geometric_median(H, w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ms.geometric_median(H[:, :16], w)  # small: no Gram path either
    # finite values whose sum overflows are accepted (the exact test decides)
    H = torch.full((3, 4), 3e38)
    assert torch.isinf(H.sum())
    assert torch.equal(ms.coordinate_median(H), torch.full((4,), 3e38))


# ---------------------------------------------------------------------------------------------
# Issue 12: huge finite values, overflow, translation (each of these failed before the fix)
# ---------------------------------------------------------------------------------------------


def _honest_radius_and_median(honest):
    z = gm(honest.double(), **TIGHT).median
    return float(torch.linalg.vector_norm(honest.double() - z, dim=-1).max()), z


@pytest.mark.parametrize(
    "dtype,d,far",
    [(torch.float32, 4, 1e20), (torch.float32, 100_000, 5e17), (torch.float32, 3, 3e38),
     (torch.float64, 4, 1e300), (torch.float16, 4, 6e4), (torch.bfloat16, 4, 3e38)],
    ids=["f32-d4-1e20", "f32-d1e5-5e17", "f32-max", "f64-1e300", "f16-max", "bf16-max"],
)
@pytest.mark.parametrize("fixed_iter", [False, True])
def test_gm_one_huge_finite_row_of_six_stays_with_the_inliers(dtype, d, far, fixed_iter):
    # The smoothing floor scaled with ||z|| (and the distances with the squares of the entries):
    # both overflowed, and the answer was NaN. Now any finite input gives a finite answer and one
    # outlier of six moves the median less than the inliers' spread.
    g = torch.Generator().manual_seed(7)
    honest = torch.randn(5, d, generator=g, dtype=F64).to(dtype)
    G = torch.cat([torch.full((1, d), far, dtype=dtype), honest])
    # From the mean (~far / 6), Weiszfeld closes in on the inliers by a factor ~5 per iteration
    # here: log(far / spread) / log 5 iterations (~30 for 1e20, ~430 for 1e300).
    res = gm(G, max_iter=100 if far < 1e100 else 1000, fixed_iter=fixed_iter)
    assert res.median.dtype == dtype and torch.isfinite(res.median).all()
    radius, z_honest = _honest_radius_and_median(honest)
    assert float(torch.linalg.vector_norm(res.median.double() - z_honest)) <= radius
    if dtype in (torch.float32, torch.float64):
        assert bool(res.converged)


def test_gm_huge_rows_with_weights_and_batches():
    G = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(8))
    G[:, 0] = 3e38
    G[1, 1] = -3e38  # two of six in one problem: still fewer than half
    w = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    for weights in (None, w, w * 1e38):
        res = gm(G, weights, max_iter=200)
        assert torch.isfinite(res.median).all() and bool(res.converged.all())
        for b in range(3):
            honest = G[b, 2:] if b == 1 else G[b, 1:]
            radius, z_honest = _honest_radius_and_median(honest)
            assert float(torch.linalg.vector_norm(res.median[b].double() - z_honest)) <= 2 * radius


def test_gm_tiny_values_converge_like_unit_ones():
    # squares of 1e-30 underflow float32: the scaled iteration does not see it
    G = torch.randn(9, 4, generator=torch.Generator().manual_seed(9))
    for c in (1e-30, 1e-40):  # 1e-40 is subnormal in float32
        res = gm(G * c)
        assert bool(res.converged) and torch.isfinite(res.median).all()
        ref = gm((G * c).double() / c, **TIGHT).median * c
        torch.testing.assert_close(res.median.double(), ref, rtol=0, atol=1e-4 * c * float(G.abs().max()))


def _translated(center, spread, n=64, d=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = center + spread * torch.randn(n, d, generator=g, dtype=F64)
    G[: n // 4] += 5 * spread  # a quarter shifted: the median is not the mean
    return G.float()


@pytest.mark.parametrize("center,spread", [(1e4, 1e-3), (1e3, 1e-2)])
@pytest.mark.parametrize("fixed_iter", [False, True], ids=["adaptive-gram", "fixed-plain"])
def test_gm_translation_far_from_the_origin(center, spread, fixed_iter):
    # Issue 12 item 6 (at 64 x 65,536 the objective was 22% above the optimum after one iteration
    # reporting converged, or max_iter unconverged; at d = 2048, 6%). The optimum rounded to
    # float32 is as good as float32 can do: the result must match it.
    G = _translated(center, spread)
    assert _uses_gram(G) or fixed_iter
    G64 = G.double()
    z_opt = gm(G64 - center, tol=1e-12, max_iter=2000).median + center
    f = lambda z: float(ms.geometric_median_objective(G64, z.double()))  # noqa: E731
    f_opt = f(z_opt)
    rounded_excess = f(z_opt.float()) / f_opt - 1
    res = gm(G, fixed_iter=fixed_iter, max_iter=100)
    assert bool(res.converged) and int(res.n_iter) < 50
    assert f(res.median) / f_opt - 1 <= rounded_excess + 2e-3
    # translation equivariance in float32: the same iterations as the centred problem
    centred = gm(G64 - center, fixed_iter=fixed_iter, max_iter=100)
    assert abs(int(res.n_iter) - int(centred.n_iter)) <= 1


def test_coordinate_median_no_overflow_in_half_precision():
    G = torch.tensor([[40000.0, -60000.0, 65504.0], [40000.0, 60000.0, 65504.0]], dtype=torch.float16)
    assert torch.equal(ms.coordinate_median(G), torch.tensor([40000.0, 0.0, 65504.0], dtype=torch.float16))
    G32 = torch.tensor([[3e38], [3e38], [-1.0], [3.2e38]])
    assert torch.equal(ms.coordinate_median(G32), torch.tensor([3e38]))
    # ordinary values: the bits of (a + b) / 2
    H = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    s = H.sort(0).values
    assert torch.equal(ms.coordinate_median(H), (s[3] + s[4]) / 2)


@pytest.mark.parametrize("trim", [0.0, 0.25])
def test_trimmed_mean_no_overflow(trim):
    for dtype, big in ((torch.float32, 1e38), (torch.bfloat16, 3e38), (torch.float64, 1e308), (torch.float16, 6e4)):
        G = torch.full((8, 3), big, dtype=dtype)
        out = ms.trimmed_mean(G, trim)
        assert out.dtype == dtype
        torch.testing.assert_close(out, G[0], rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6, atol=0)
    # and bit for bit the plain mean where that does not overflow (powers of two scale exactly)
    H = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(ms.trimmed_mean(H, trim), torch.from_numpy(scipy.stats.trim_mean(H.numpy(), trim, axis=-2)), rtol=1e-15, atol=1e-15)


def test_trimmed_mean_and_gm_accept_numpy_reals_reject_bools():
    G = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(ms.trimmed_mean(G, np.float32(0.2)), ms.trimmed_mean(G, 0.2))
    assert torch.equal(ms.trimmed_mean(G, np.float64(0.2)), ms.trimmed_mean(G, 0.2))
    with pytest.raises(ValueError, match="trim"):
        ms.trimmed_mean(G, np.bool_(False))
    assert torch.equal(gm(G, eps=np.float32(1e-8), tol=np.float64(1e-6), max_iter=np.int64(50)).median,
                       gm(G, eps=float(np.float32(1e-8)), tol=1e-6, max_iter=50).median)


@pytest.mark.parametrize("fixed_iter", ["yes", 1, 0, None, np.bool_(True)])
def test_gm_fixed_iter_must_be_a_bool(fixed_iter):
    with pytest.raises(TypeError, match="fixed_iter"):
        gm(torch.randn(5, 2), fixed_iter=fixed_iter)


def test_gm_objective_checks_weights_and_keeps_dtype():
    G = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(4))
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median_objective(G, z, torch.tensor([1.0, -0.5, 1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median_objective(G, z, torch.ones(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ms.geometric_median_objective(G, z, torch.tensor([1.0, float("nan"), 1, 1, 1, 1]))
    w64 = torch.rand(6, dtype=F64)
    for out in (ms.geometric_median_objective(G, z, w64), ms.geometric_median_objective(G, z.double()),
                ms.geometric_median_objective(G, z)):
        assert out.dtype == torch.float32 and out.shape == (4,)
    ref = (w64 * torch.linalg.vector_norm(G.double() - z.double()[:, None], dim=-1)).sum(-1)
    torch.testing.assert_close(ms.geometric_median_objective(G, z, w64), ref.float())
    # huge finite values: a finite objective where it is representable
    H = torch.full((3, 4), 1e20)
    out = ms.geometric_median_objective(H, torch.zeros(4))
    torch.testing.assert_close(out, torch.tensor(6e20), rtol=1e-6, atol=0)
    assert ms.geometric_median_objective(H.half().float().clamp(max=6e4).half(), torch.zeros(4, dtype=torch.float16)).dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# CUDA: the fixed-iteration paths make no host synchronisation and match the CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8, 50, 16), (24, 4096)], ids=["one-block", "column-blocks-gram-sized"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gm_fixed_iter_cuda_no_host_sync_matches_cpu(shape, weighted, no_host_sync):
    g = torch.Generator().manual_seed(10)
    G = torch.randn(shape, generator=g) + 3.0
    G[..., 0, :] = 1e20  # a huge row: the scaled path too
    w = torch.rand(shape[:-1], generator=g) + 0.1 if weighted else None
    Gc, wc = G.cuda(), None if w is None else w.cuda()
    assert _uses_gram(G) or len(shape) == 3  # fixed_iter never takes the Gram route
    ms.geometric_median(Gc, wc, fixed_iter=True, max_iter=2)  # warm-up (kernels, libraries)
    with no_host_sync():
        res = ms.geometric_median(Gc, wc, fixed_iter=True, max_iter=40)
    cpu = ms.geometric_median(G, w, fixed_iter=True, max_iter=40)
    assert torch.isfinite(res.median).all()
    torch.testing.assert_close(res.median.cpu(), cpu.median, rtol=1e-5, atol=1e-5)
    assert bool(res.converged.all()) and bool(cpu.converged.all())
