"""The l_p prox and its estimator steps: prox_lp, clip_lp, spp_step_lp, sgd_step_lp, lp_norm_grad.

Oracles: an independent bisection (scipy.optimize.brentq, nested) for the projection onto the l_q
ball, scipy.optimize.minimize on the prox objective, the closed forms for p = 1, 2, inf, and the
optimality conditions of the prox and of the projection.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize

import median_sgd as ms
from median_sgd.estimators import lp_norm_grad
from median_sgd.prox import LP_MAX_FINITE, dual_exponent

P_GRID = [1.01, 1.1, 1.25, 1.5, 1.75, 2.5, 4.0, 10.0, LP_MAX_FINITE]
INF = math.inf


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def lq_norm(x, q):
    return torch.linalg.vector_norm(x, ord=q, dim=-1)


def project_oracle(v: np.ndarray, tau: float, q: float) -> np.ndarray:
    """Projection of one vector onto {||x||_q <= tau} by nested bisection (brentq), independent code."""
    a = np.abs(v) / tau
    if np.sum(a**q) ** (1 / q) <= 1:
        return v.copy()

    def y_of(mu):
        # y + mu y^(q-1) = a_i, increasing in y on [0, a_i]
        return np.array([0.0 if ai == 0 else brentq(lambda y: y + mu * y ** (q - 1) - ai, 0.0, ai,
                                                    xtol=1e-300, rtol=1e-15, maxiter=500)
                         for ai in a])

    p = q / (q - 1)
    hi = np.sum(a**p) ** (1 / p)  # here sum y^q <= 1
    mu = brentq(lambda mu: np.sum(y_of(mu) ** q) - 1.0, 0.0, hi, xtol=1e-300, rtol=1e-15, maxiter=500)
    return np.sign(v) * tau * y_of(mu)


def hard_cases(q: float, d: int = 6):
    """Random, barely outside, far outside, sparse, one huge coordinate, heavy-tailed, d = 1."""
    g = gen(3)
    rows = [torch.randn(d, generator=g, dtype=torch.float64) * s for s in (0.3, 1.0, 5.0, 1e4)]
    u = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    rows.append(u / lq_norm(u, q) * (1 + 1e-6))  # just outside the unit ball
    rows.append(u / lq_norm(u, q) * (1 + 1e-1))
    sparse = torch.zeros(d, dtype=torch.float64)
    sparse[1], sparse[4] = 3.0, -0.5
    rows.append(sparse)
    spike = torch.rand(d, generator=g, dtype=torch.float64)
    spike[2] = -1e8
    rows.append(spike)
    rows.append(ms.sample_stable(0.7, (d,), generator=g, dtype=torch.float64) * 10)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# clip_lp: the projection onto the dual ball
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.1, 1.25, 1.5, 1.75, 3.0, 10.0])
def test_clip_lp_matches_nested_bisection_oracle(p):
    q = dual_exponent(p)
    V = hard_cases(q)
    ours = ms.clip_lp(V, 1.0, p)
    for v, x in zip(V, ours):
        ref = torch.from_numpy(project_oracle(v.numpy(), 1.0, q))
        scale = float(ref.abs().max()) or 1.0
        assert float((x - ref).abs().max()) <= 1e-11 * scale, (p, v, x, ref)


@pytest.mark.parametrize("p", [1.01, 20.0])
def test_clip_lp_extreme_p_matches_oracle(p):
    q = dual_exponent(p)
    V = torch.randn(6, 5, generator=gen(18), dtype=torch.float64) * torch.tensor([[0.5], [1.0], [2.0], [3.0], [4.0], [5.0]], dtype=torch.float64)
    for v, x in zip(V, ms.clip_lp(V, 1.0, p)):
        ref = torch.from_numpy(project_oracle(v.numpy(), 1.0, q))
        assert float((x - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), (p, v)


@pytest.mark.parametrize("p", [1.01, 1.25, 1.5, 4.0, LP_MAX_FINITE])
def test_fixed_iteration_path_equals_early_exit(p, monkeypatch):
    """Off the CPU (and under torch.compile) the solver runs its full iteration count without
    reading data back; on the CPU it stops once converged. Both give the same answer."""
    q = dual_exponent(p)
    V = hard_cases(q)
    early = ms.clip_lp(V, 0.8, p)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    full = ms.clip_lp(V, 0.8, p)
    scale = full.abs().amax(-1, keepdim=True)
    assert bool(((full - early).abs() <= 1e-13 * scale).all())


@pytest.mark.parametrize("p", P_GRID)
def test_clip_lp_is_the_projection(p):
    """On the ball's boundary when outside, identity inside, and <v - x, y - x> <= 0 for y in the ball."""
    q = dual_exponent(p)
    V = torch.cat([hard_cases(q), 0.05 * torch.randn(20, 6, generator=gen(1), dtype=torch.float64)])
    tau = 0.7
    X = ms.clip_lp(V, tau, p)
    outside = lq_norm(V, q) > tau
    torch.testing.assert_close(lq_norm(X[outside], q), torch.full((int(outside.sum()),), tau,
                               dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(X[~outside], V[~outside]) and (~outside).any()
    # variational inequality against random points of the ball
    Y = torch.randn(200, 6, generator=gen(2), dtype=torch.float64)
    Y = Y / lq_norm(Y, q).unsqueeze(-1) * tau * torch.rand(200, 1, generator=gen(4), dtype=torch.float64)
    inner = ((V - X).unsqueeze(1) * (Y.unsqueeze(0) - X.unsqueeze(1))).sum(-1)
    scale = V.abs().amax(-1, keepdim=True) * tau
    assert bool((inner <= 1e-10 * scale).all())


def test_clip_lp_closed_forms_p_1_2_inf():
    V = torch.randn(50, 7, generator=gen(5), dtype=torch.float64) * 3
    for tau in (0.2, 1.0, 30.0):
        assert torch.equal(ms.clip_lp(V, tau, 1), ms.clip_l1(V, tau))
        assert torch.equal(ms.clip_lp(V, tau, 2), ms.clip_l2(V, tau))
        # p = inf: the l_1 ball, against a bisection on the soft threshold
        X = ms.clip_lp(V, tau, INF)
        for v, x in zip(V.numpy(), X.numpy()):
            if np.abs(v).sum() <= tau:
                np.testing.assert_array_equal(x, v)
                continue
            theta = brentq(lambda t: np.maximum(np.abs(v) - t, 0).sum() - tau, 0, np.abs(v).max(),
                           xtol=1e-15)
            np.testing.assert_allclose(x, np.sign(v) * np.maximum(np.abs(v) - theta, 0), atol=1e-12)


@pytest.mark.parametrize("p", [1.5, 3.0, INF])
def test_clip_lp_equivariance_batch_and_tau_tensor(p):
    V = torch.randn(4, 3, 8, generator=gen(6), dtype=torch.float64) * 2
    tau = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    X = ms.clip_lp(V, tau, p)
    for i in range(4):
        for j in range(3):
            torch.testing.assert_close(X[i, j], ms.clip_lp(V[i, j], float(tau[j]), p), rtol=1e-13, atol=1e-15)
    perm = torch.randperm(8, generator=gen(7))
    torch.testing.assert_close(ms.clip_lp(V[..., perm], tau, p), X[..., perm], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ms.clip_lp(-V, tau, p), -X, rtol=0, atol=0)
    # scaling: clip(c v, c tau) = c clip(v, tau)
    torch.testing.assert_close(ms.clip_lp(8 * V, 8 * tau, p), 8 * X, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# prox_lp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", P_GRID + [1.0, 2.0, INF])
def test_prox_lp_moreau_and_optimality(p):
    q = dual_exponent(p)
    V = hard_cases(q)
    tau = 0.9
    P = ms.prox_lp(V, tau, p)
    torch.testing.assert_close(P + ms.clip_lp(V, tau, p), V, rtol=2**-51, atol=1e-300)  # rounding only
    for v, x in zip(V, P):
        if float(lq_norm(v, q)) <= tau:
            assert bool((x == 0).all())  # the prox of a norm is 0 exactly inside the dual ball
        elif math.isfinite(p) and p >= 1.1:
            # v - x = tau grad||x||_p (x != 0 here); the subgradient is unique for 1 < p < inf.
            # (Not for p -> 1: there x_i ~ |v_i|^(1/(p-1)) underflows next to v_i, and
            # grad_i = (|x_i|/||x||_p)^(p-1) stays of order 1, so the check is ill-conditioned.)
            torch.testing.assert_close(v - x, tau * lp_norm_grad(x, p), rtol=1e-9,
                                       atol=1e-9 * float(v.abs().max()))


@pytest.mark.parametrize("p", [1.25, 1.5, 1.75, 3.0])
def test_prox_lp_minimises_its_objective_scipy(p):
    g = gen(8)
    tau = 0.6
    for _ in range(5):
        v = torch.randn(4, generator=g, dtype=torch.float64) * 2
        x = ms.prox_lp(v, tau, p)

        def obj(y):
            return tau * np.sum(np.abs(y) ** p) ** (1 / p) + 0.5 * np.sum((y - v.numpy()) ** 2)

        res = minimize(obj, np.zeros(4) + 0.1, method="Nelder-Mead",
                       options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 40000})
        assert obj(x.numpy()) <= res.fun + 1e-12
        np.testing.assert_allclose(x.numpy(), res.x, atol=1e-5)


def test_prox_lp_matches_prox_l1_l2():
    V = torch.randn(30, 5, generator=gen(9), dtype=torch.float64) * 2
    for tau in (0.1, 1.0, 10.0):
        torch.testing.assert_close(ms.prox_lp(V, tau, 1), ms.prox_l1(V, tau), rtol=0, atol=1e-15)
        torch.testing.assert_close(ms.prox_lp(V, tau, 2), ms.prox_l2(V, tau), rtol=0, atol=1e-14)


def test_prox_lp_is_continuous_in_p():
    """p -> 1 and p -> 2 approach the closed forms (the Newton path agrees with them at the ends)."""
    V = torch.randn(20, 6, generator=gen(10), dtype=torch.float64)
    gaps = [float((ms.prox_lp(V, 0.5, p) - ms.prox_l1(V, 0.5)).abs().max()) for p in (1.05, 1.02, 1.01)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.03
    assert float((ms.prox_lp(V, 0.5, 1.999) - ms.prox_l2(V, 0.5)).abs().max()) < 1e-3


@pytest.mark.parametrize("p", [1.5, 4.0, INF])
def test_float32_dtype_kept_and_accurate(p):
    V = torch.randn(100, 10, generator=gen(11)) * 3
    X32 = ms.clip_lp(V, 0.5, p)
    X64 = ms.clip_lp(V.double(), 0.5, p)
    assert X32.dtype == torch.float32 and ms.prox_lp(V, 0.5, p).dtype == torch.float32
    torch.testing.assert_close(X32.double(), X64, rtol=1e-5, atol=1e-6)
    half = ms.clip_lp(V.to(torch.bfloat16), 0.5, p)
    assert half.dtype == torch.bfloat16


def test_zero_and_one_dimensional_inputs():
    z = torch.zeros(3, 5, dtype=torch.float64)
    for p in (1.5, 3.0, INF):
        assert torch.equal(ms.clip_lp(z, 1.0, p), z) and torch.equal(ms.prox_lp(z, 1.0, p), z)
        v = torch.tensor([[-3.0], [0.2]], dtype=torch.float64)
        # in one dimension every norm is |.|: prox is soft thresholding
        torch.testing.assert_close(ms.prox_lp(v, 0.5, p), ms.prox_l1(v, 0.5), rtol=1e-13, atol=1e-15)


def test_no_mutation_and_bad_input():
    v = torch.randn(4, 3, dtype=torch.float64)
    before = v.clone()
    ms.prox_lp(v, 0.3, 1.5)
    ms.clip_lp(v, 0.3, INF)
    assert torch.equal(v, before)
    for p, err in [(0.5, ValueError), (float("nan"), ValueError), (LP_MAX_FINITE + 1, ValueError),
                   (1.001, ValueError),
                   (True, TypeError), ("2", TypeError), (None, TypeError)]:
        with pytest.raises(err):
            ms.prox_lp(v, 0.3, p)
        with pytest.raises(err):
            ms.spp_step_lp(v, v, 0.3, p)
    with pytest.raises(ValueError):
        ms.clip_lp(v, -1.0, 1.5)
    with pytest.raises(ValueError):
        ms.clip_lp(torch.tensor([1.0, float("inf")]), 1.0, 1.5)
    with pytest.raises(TypeError):
        ms.clip_lp(torch.tensor([1, 2]), 1.0, 1.5)
    assert dual_exponent(1) == INF and dual_exponent(INF) == 1.0 and dual_exponent(1.5) == 3.0


# ---------------------------------------------------------------------------------------------
# Estimator steps
# ---------------------------------------------------------------------------------------------


def test_spp_step_lp_is_spp_for_l1_l2_exactly():
    g = gen(12)
    m, x = torch.randn(6, 5, generator=g, dtype=torch.float64), 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    for tau in (0.05, 1.0, 50.0):
        assert torch.equal(ms.spp_step_lp(m, x, tau, 1), ms.spp_step(m, x, tau, "l1"))
        assert torch.equal(ms.spp_step_lp(m, x, tau, 2), ms.spp_step(m, x, tau, "l2"))
        torch.testing.assert_close(ms.sgd_step_lp(m, x, tau, 1), ms.sgd_step(m, x, tau, "l1"), rtol=0, atol=0)
        torch.testing.assert_close(ms.sgd_step_lp(m, x, tau, 2), ms.sgd_step(m, x, tau, "l2"),
                                   rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("p", [1.25, 1.5, 3.0, INF])
def test_spp_step_lp_is_the_proximal_point(p):
    """m+ = argmin_y ||y - g||_p + ||y - m||^2/(2 tau), via g + prox(m - g) and scipy."""
    g = gen(13)
    m, x = torch.randn(3, generator=g, dtype=torch.float64), 2 * torch.randn(3, generator=g, dtype=torch.float64)
    tau = 0.4
    out = ms.spp_step_lp(m, x, tau, p)
    torch.testing.assert_close(out, x + ms.prox_lp(m - x, tau, p), rtol=1e-14, atol=1e-14)
    norm = (lambda y: np.abs(y).max()) if p == INF else (lambda y: np.sum(np.abs(y) ** p) ** (1 / p))

    def obj(y):
        return norm(y - x.numpy()) + np.sum((y - m.numpy()) ** 2) / (2 * tau)

    res = minimize(obj, m.numpy(), method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-14,
                                                                   "maxiter": 40000})
    assert obj(out.numpy()) <= res.fun + 1e-10


@pytest.mark.parametrize("p", [1.3, 2.0, 3.0, 7.0])
def test_lp_norm_grad_is_the_gradient(p):
    v = torch.randn(5, 4, generator=gen(14), dtype=torch.float64).requires_grad_(True)
    torch.linalg.vector_norm(v, ord=p, dim=-1).sum().backward()
    torch.testing.assert_close(lp_norm_grad(v.detach(), p), v.grad, rtol=1e-12, atol=1e-14)
    # no overflow for huge entries, 0 at 0
    big = torch.tensor([1e200, -1e200, 3.0], dtype=torch.float64)
    assert bool(torch.isfinite(lp_norm_grad(big, p)).all())
    assert torch.equal(lp_norm_grad(torch.zeros(3, dtype=torch.float64), p), torch.zeros(3, dtype=torch.float64))


def test_lp_norm_grad_inf_splits_ties():
    v = torch.tensor([[3.0, -3.0, 1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(lp_norm_grad(v, INF), torch.tensor([[0.5, -0.5, 0.0], [0.0, 1.0, 0.0]],
                                                                  dtype=torch.float64))


def test_sgd_step_lp_moves_tau_in_dual_norm():
    """||grad||_q = 1 for the p-norm's gradient: the SGD step moves exactly tau in the dual norm."""
    g = gen(15)
    m, x = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    for p in (1.25, 1.5, 3.0):
        step = ms.sgd_step_lp(m, x, 0.3, p) - m
        torch.testing.assert_close(lq_norm(step, dual_exponent(p)), torch.full((8,), 0.3, dtype=torch.float64))


def test_clip_lp_traces_without_host_sync():
    def f(v):
        with ms.value_checks(False):
            return ms.clip_lp(v, 0.5, 1.5)

    torch._dynamo.reset()
    traced = torch.compile(f, fullgraph=True, backend="eager")
    v = torch.randn(3, 5, generator=gen(16))
    torch.testing.assert_close(traced(v), f(v))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("p", [1.5, 3.0, INF])
def test_cuda_matches_cpu(p):
    V = torch.randn(64, 10, generator=gen(17), dtype=torch.float64) * 3
    out = ms.clip_lp(V.cuda(), 0.4, p)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ms.clip_lp(V, 0.4, p), rtol=1e-12, atol=1e-14)
