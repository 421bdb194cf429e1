"""Edges of the estimator steps that the main tests miss (found by mutation testing).

* ``sgd_step(m, g, tau, "l2")`` moves by exactly ``tau`` along ``(g - m) / ||g - m||`` at every
  distance, the close pairs ``0 < ||g - m|| <= 1`` included (hypothesis rarely draws them);
  ``spp_step(m, g, tau, "l2")`` lands on ``g`` when ``||g - m|| <= tau``.
* ``lp_norm_grad`` at ``p = inf``: ``sign(v_j) / #J`` on the largest entries ``J``, 0 (not NaN)
  at ``v = 0``, on 1-D, batched (3-D) and tiny (subnormal) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import median_sgd as ms
from median_sgd.estimators import estimator_update, lp_norm_grad

F64 = torch.float64


@pytest.mark.parametrize("dist", [1e-300, 1e-12, 1e-3, 0.25, 0.5, 0.999, 1.0, 1.5, 3.0, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sgd_step_l2_moves_tau_along_the_unit_vector_at_every_distance(dist, dtype):
    if dtype == torch.float32 and dist < 1e-30:
        dist = 1e-30  # float32 holds no 1e-300
    direction = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=F64) / 13.0  # unit norm
    # (at tiny distances m = 0, so that g - m is not rounded away)
    m = torch.tensor([0.5, -2.0, 7.0, 1.0], dtype=F64) * (dist > 1e-6)
    g = m + dist * direction
    m, g = m.to(dtype), g.to(dtype)
    tau = 0.3
    out = ms.sgd_step(m, g, tau, "l2")
    delta = (g - m).to(F64)
    delta = delta / delta.abs().max()  # (a norm of 1e-300 underflows)
    unit = delta / torch.linalg.vector_norm(delta)
    expected = m.to(F64) + tau * unit
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.to(F64), expected, rtol=tol, atol=tol)
    # the step length is tau, whatever the distance (the subgradient is a unit vector)
    assert float(torch.linalg.vector_norm(out.to(F64) - m.to(F64))) == pytest.approx(tau, rel=1e-5)


def test_sgd_step_l2_batched_close_pairs_and_coincident_rows():
    m = torch.zeros(4, 3, dtype=F64)
    g = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.5], [1e-9, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    out = ms.sgd_step(m, g, 0.1, "l2")
    expected = torch.tensor([[0.06, 0.08, 0.0], [0.0, 0.0, 0.1], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("div", ["l2", "l1"])
def test_sgd_step_close_pairs_match_the_lp_steps(div):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(32, 5, generator=gen, dtype=F64)
    g = m + 0.3 * torch.rand(32, 1, generator=gen, dtype=F64) * torch.randn(32, 5, generator=gen, dtype=F64)
    p = 2.0 if div == "l2" else 1.0
    torch.testing.assert_close(ms.sgd_step(m, g, 0.05, div), ms.sgd_step_lp(m, g, 0.05, p))


@pytest.mark.parametrize("dist", [1e-6, 0.1, 0.5, 1.0, 2.0])
def test_spp_step_l2_close_pairs(dist):
    direction = torch.tensor([0.0, 0.6, -0.8], dtype=F64)
    m = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    g = m + dist * direction
    tau = 0.7
    out = ms.spp_step(m, g, tau, "l2")
    expected = g if dist <= tau else m + tau * direction
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ms.spp_step_lp(m, g, tau, 2.0), expected, rtol=1e-12, atol=1e-15)


# lp_norm_grad at p = inf


def test_lp_norm_grad_inf_zero_vector_is_zero_not_nan():
    for shape in [(1,), (5,), (3, 4), (2, 3, 4)]:
        out = lp_norm_grad(torch.zeros(shape, dtype=F64), math.inf)
        assert out.shape == shape
        assert torch.equal(out, torch.zeros(shape, dtype=F64))


def test_lp_norm_grad_inf_one_dimensional_and_ties():
    v = torch.tensor([3.0, -3.0, 1.0, 0.0], dtype=F64)
    torch.testing.assert_close(lp_norm_grad(v, math.inf), torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=F64))
    v = torch.tensor([-2.0, 1.0, 1.5], dtype=F64)
    torch.testing.assert_close(lp_norm_grad(v, math.inf), torch.tensor([-1.0, 0.0, 0.0], dtype=F64))
    torch.testing.assert_close(lp_norm_grad(torch.tensor([-7.0], dtype=F64), math.inf),
                               torch.tensor([-1.0], dtype=F64))


def test_lp_norm_grad_inf_batched_3d_mixes_zero_rows():
    v = torch.tensor([
        [[1.0, -1.0, 1.0], [0.0, 0.0, 0.0]],
        [[0.0, 2.0, -1.0], [-5.0, 5.0, 0.0]],
    ], dtype=F64)
    expected = torch.tensor([
        [[1 / 3, -1 / 3, 1 / 3], [0.0, 0.0, 0.0]],
        [[0.0, 1.0, 0.0], [-0.5, 0.5, 0.0]],
    ], dtype=F64)
    out = lp_norm_grad(v, math.inf)
    torch.testing.assert_close(out, expected)
    # each nonzero row is a subgradient of the max norm: <grad, v> = ||v||_inf, ||grad||_1 = 1
    rows = v.reshape(-1, 3)
    grads = out.reshape(-1, 3)
    for r, gr in zip(rows, grads):
        if r.abs().max() > 0:
            assert float((gr * r).sum()) == pytest.approx(float(r.abs().max()))
            assert float(gr.abs().sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_lp_norm_grad_inf_tiny_and_huge_inputs(dtype):
    tiny = torch.finfo(dtype).tiny
    for scale in [tiny / 8, tiny, 1.0, torch.finfo(dtype).max / 4]:  # subnormal, normal, huge
        v = torch.tensor([1.0, -4.0, 4.0, 2.0], dtype=F64).mul(scale / 4).to(dtype)
        assert torch.equal(lp_norm_grad(v, math.inf), torch.tensor([0.0, -0.5, 0.5, 0.0], dtype=dtype))


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, math.inf])
def test_lp_norm_grad_zero_vector_and_sgd_step_lp_at_m_equal_g(p):
    z = torch.zeros(2, 3, dtype=F64)
    assert torch.equal(lp_norm_grad(z, p), z)
    m = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    assert torch.equal(ms.sgd_step_lp(m, m.clone(), 0.5, p), m)


def test_sgd_step_lp_inf_moves_along_the_largest_coordinates():
    m = torch.zeros(3, dtype=F64)
    g = torch.tensor([0.2, -0.5, 0.5], dtype=F64)
    torch.testing.assert_close(ms.sgd_step_lp(m, g, 0.1, math.inf), torch.tensor([0.0, -0.05, 0.05], dtype=F64))


@pytest.mark.parametrize("p", [1.5, 3.0, 7.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_lp_norm_grad_finite_p_is_scale_free_from_tiny_to_huge(p, dtype):
    # the gradient of a norm is homogeneous of degree 0: the same at every scale, subnormal
    # vectors (whose p-th powers underflow) and huge ones (whose p-th powers overflow) included
    v = torch.tensor([[1.0, -4.0, 3.0, 0.5], [0.0, 0.0, -2.0, 0.0]], dtype=F64)
    reference = lp_norm_grad(v, p)
    # a subgradient: <grad, v> = ||v||_p, ||grad||_q = 1 (q the dual exponent)
    torch.testing.assert_close((reference * v).sum(-1), torch.linalg.vector_norm(v, ord=p, dim=-1))
    q = p / (p - 1.0)
    torch.testing.assert_close(torch.linalg.vector_norm(reference, ord=q, dim=-1), torch.ones(2, dtype=F64))
    tiny, big = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    for scale in [tiny / 16, tiny * 4, 1e-3, 1.0, 1e3, big / 8]:
        out = lp_norm_grad((v * (scale / 4)).to(dtype), p)
        rtol = 1e-5 if dtype == torch.float32 or scale < tiny else 1e-12
        torch.testing.assert_close(out.to(F64), reference, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sgd_step_l2_stands_still_at_g_equal_m(dtype):
    # the subgradient 0 at g = m, not 0/0 = NaN
    m = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    torch.testing.assert_close(ms.sgd_step(m, m.clone(), 0.3, "l2"), m, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["spp", "sgd"])
def test_global_l2_update_of_one_huge_tensor_in_the_multi_tensor_path(method):
    # a one-tensor bucket whose float32 norm overflows: the scaled multi-tensor path
    m = torch.zeros(4)
    g = torch.full((4,), 3e38)
    expected = (ms.spp_step if method == "spp" else ms.sgd_step)(m.clone(), g, 0.5, "l2")
    estimator_update([m], [g], tau=0.5, div="l2", method=method, scope="global", foreach=True)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m, expected)


def test_sgd_step_l2_at_g_equal_m_has_finite_gradient():
    # the subgradient 0 at g = m holds for autograd too: d out / d m = I (no NaN from 0/0)
    m = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    ms.sgd_step(m, m.detach().clone(), 0.3, "l2").sum().backward()
    torch.testing.assert_close(m.grad, torch.ones(3, dtype=F64), rtol=0, atol=0)
