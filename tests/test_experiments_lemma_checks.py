"""Generic numerical argmins (ellipsoid method) against closed forms, scipy and the library."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch

import median_sgd as ms
from median_sgd.experiments.lemma_checks import (
    divergence,
    ellipsoid_argmin,
    numerical_prox,
    numerical_spp_step,
)

PROX = {"l1": ms.prox_l1, "l2": ms.prox_l2, "sq": ms.prox_sq}


def test_divergence_values():
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(divergence("sq")(x), torch.tensor([12.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(divergence("l2")(x), torch.tensor([5.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(divergence("l1")(x), torch.tensor([7.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown div"):
        divergence("linf")


def test_quadratic_batch_closed_form(gen):
    # f(x) = (x - a)^T Q (x - a) / 2 with Q positive definite: the minimiser is a.
    B, d = 6, 3
    A = torch.randn(B, d, d, generator=gen, dtype=torch.float64)
    Q = A @ A.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=torch.float64)
    a = torch.randn(B, d, generator=gen, dtype=torch.float64)
    f = lambda x: 0.5 * ((x - a)[..., None, :] @ Q @ (x - a)[..., :, None])[..., 0, 0]  # noqa: E731
    x = ellipsoid_argmin(f, torch.zeros(B, d, dtype=torch.float64), 10.0)
    # f(best) - f* ~ rounding, so ||x - a|| ~ sqrt(eps / lambda_min(Q))
    assert float((x - a).abs().max()) < 1e-5


def test_one_dimensional_weighted_median():
    # argmin |x - 1| + 0.4 |x + 2| + 0.4 |x - 5| is the weighted median, 1 (d = 1: bisection).
    f = lambda x: (x - 1).abs()[..., 0] + 0.4 * (x + 2).abs()[..., 0] + 0.4 * (x - 5).abs()[..., 0]  # noqa: E731
    x = ellipsoid_argmin(f, torch.tensor([0.0], dtype=torch.float64), 20.0)
    assert abs(float(x) - 1.0) < 1e-12  # a sharp minimum: bisection pins it to rounding


def test_l1_regression_against_scipy_linprog(gen):
    # min_x ||A x - b||_1 as a linear programme (scipy) and by the ellipsoid method.
    n, d = 9, 3
    A = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    An, bn = A.numpy(), b.numpy()
    # variables (x, s): minimise sum s subject to -s <= A x - b <= s
    c = np.concatenate([np.zeros(d), np.ones(n)])
    A_ub = np.block([[An, -np.eye(n)], [-An, -np.eye(n)]])
    b_ub = np.concatenate([bn, -bn])
    lp = so.linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=[(None, None)] * d + [(0, None)] * n, method="highs")
    assert lp.status == 0
    f = lambda x: (x @ A.T - b).abs().sum(dim=-1)  # noqa: E731
    x = ellipsoid_argmin(f, torch.zeros(d, dtype=torch.float64), 50.0)
    assert float(f(x)) == pytest.approx(lp.fun, abs=1e-9)
    # the LP's vertex solution is unique for generic data
    np.testing.assert_allclose(x.numpy(), lp.x[:d], atol=1e-6)


def test_geometric_median_objective_against_weiszfeld(gen):
    # sum_i w_i ||x - p_i||: the ellipsoid method and the library's Weiszfeld agree.
    P = torch.randn(4, 15, 3, generator=gen, dtype=torch.float64) * 2
    w = torch.rand(4, 15, generator=gen, dtype=torch.float64) + 0.1
    f = lambda x: (w * torch.linalg.vector_norm(x[..., None, :] - P, dim=-1)).sum(dim=-1)  # noqa: E731
    x = ellipsoid_argmin(f, P.mean(dim=-2), 20.0)
    gm = ms.geometric_median(P, w, tol=1e-13, max_iter=10_000)
    assert bool(gm.converged.all())
    assert float((x - gm.median).abs().max()) < 1e-5


@pytest.mark.parametrize("div", ["l1", "l2", "sq"])
@pytest.mark.parametrize("d", [1, 3])
def test_numerical_prox_matches_closed_form(div, d, gen):
    v = 3 * torch.randn(40, d, generator=gen, dtype=torch.float64)
    tau = 0.05 + 3 * torch.rand(40, generator=gen, dtype=torch.float64)  # thresholds active and not
    y = numerical_prox(divergence(div), v, tau)
    assert float((y - PROX[div](v, tau)).abs().max()) < 1e-6


@pytest.mark.parametrize("div", ["l1", "l2", "sq"])
def test_numerical_spp_step_matches_library(div, gen):
    m = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    g = 4 * torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = numerical_spp_step(divergence(div), m, g, 0.8)
    assert float((y - ms.spp_step(m, g, 0.8, div)).abs().max()) < 1e-6


def test_prox_of_zero_function_is_identity_and_zero_vector_stays(gen):
    v = torch.zeros(2, 3, dtype=torch.float64)
    torch.testing.assert_close(numerical_prox(divergence("l2"), v, 1.0), v)


def test_dtype_device_kept_and_inputs_not_mutated(dtype, device, gen):
    v = (3 * torch.randn(5, 3, generator=gen)).to(dtype=dtype, device=device)
    before = v.clone()
    y = numerical_prox(divergence("l1"), v, 0.7)
    assert y.dtype == dtype and y.device == v.device and not y.requires_grad
    torch.testing.assert_close(v, before, rtol=0, atol=0)
    tol = 1e-6 if dtype == torch.float64 else 3e-3
    assert float((y - ms.prox_l1(v, 0.7)).abs().max()) < tol


def test_deterministic(gen):
    v = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    a = numerical_prox(divergence("l2"), v, 0.3, iters=100)
    b = numerical_prox(divergence("l2"), v, 0.3, iters=100)
    assert torch.equal(a, b)


def test_bad_input():
    v = torch.ones(2, 3, dtype=torch.float64)
    f = divergence("l1")
    with pytest.raises(ValueError, match="tau"):
        numerical_prox(f, v, 0.0)
    with pytest.raises(ValueError, match="radius"):
        ellipsoid_argmin(f, v, -1.0)
    with pytest.raises(ValueError, match="iters"):
        ellipsoid_argmin(f, v, 1.0, iters=-3)
    with pytest.raises(ValueError, match="NaN"):
        numerical_prox(f, torch.tensor([float("nan"), 0.0]), 1.0)
    with pytest.raises(TypeError):
        numerical_prox(f, torch.ones(3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="must map"):
        numerical_prox(lambda y: y.abs(), v, 1.0)  # returns (..., d), not (...)
    with pytest.raises(TypeError, match="dtype"):
        numerical_spp_step(f, v, v.float(), 1.0)
