"""Online estimators: spp_step / sgd_step special cases (eqs. 7, 9, 11-16 and Appendix B)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import median_sgd as ms

DIVS = ["sq", "l2", "l1"]
STEPS = {"spp": ms.spp_step, "sgd": ms.sgd_step}


def _snap(x: float) -> float:
    # |x| < 1e-6 -> 0, so that no squared norm underflows (nothing is claimed about underflow).
    return 0.0 if abs(x) < 1e-6 else x


ELEMENTS = st.floats(-1e2, 1e2, allow_nan=False, allow_infinity=False).map(_snap)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
TAUS = st.floats(1e-2, 1e2)
SGD_TAUS = st.floats(1e-2, 1.0)  # the momentum reading of sgd "sq" needs beta = 1 - tau in [0, 1)


@st.composite
def pair(draw, shape=None):
    """(m, g) float64 tensors of one shape; g sometimes shares coordinates with m (kinks)."""
    if shape is None:
        shape = draw(SHAPES)
    m = draw(hnp.arrays(np.float64, shape, elements=ELEMENTS))
    g = draw(hnp.arrays(np.float64, shape, elements=ELEMENTS))
    mask = draw(hnp.arrays(np.bool_, shape))
    g = np.where(mask, m, g)  # g_i == m_i on some coordinates
    return torch.from_numpy(m), torch.from_numpy(g)


def atol(*xs, tau=0.0, factor=32.0) -> float:
    scale = max([float(x.abs().max()) for x in xs] + [float(tau), 1.0])
    return factor * 2.0**-52 * scale


def norm(x):
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Special cases
# ---------------------------------------------------------------------------------------------


@given(mg=pair(), tau=TAUS)
def test_spp_sq_is_momentum_beta_1_over_1_plus_tau(mg, tau):
    m, g = mg
    beta = 1.0 / (1.0 + tau)
    torch.testing.assert_close(ms.spp_step(m, g, tau, "sq"), beta * m + (1 - beta) * g, rtol=0, atol=atol(m, g))


@given(mg=pair(), tau=SGD_TAUS)
def test_sgd_sq_is_momentum_beta_1_minus_tau(mg, tau):
    m, g = mg
    beta = 1.0 - tau
    torch.testing.assert_close(ms.sgd_step(m, g, tau, "sq"), beta * m + (1 - beta) * g, rtol=0, atol=atol(m, g))


@given(mg=pair(), tau=st.floats(1.0, 50.0))
def test_sgd_sq_extrapolates_for_tau_above_one(mg, tau):
    # eq. (7): beta = 1 - tau can be negative; nothing is clamped.
    m, g = mg
    torch.testing.assert_close(
        ms.sgd_step(m, g, tau, "sq"), (1 - tau) * m + tau * g, rtol=0, atol=atol(m, g, tau=tau) * tau
    )


@given(mg=pair(), tau=TAUS)
def test_spp_l2_is_clip21_and_eq13(mg, tau):
    m, g = mg
    out = ms.spp_step(m, g, tau, "l2")
    torch.testing.assert_close(out, m + ms.clip_l2(g - m, tau), rtol=0, atol=atol(m, g, tau=tau))
    # eq. (13), computed independently in numpy
    mn, gn = m.numpy(), g.numpy()
    c = tau / np.maximum(tau, np.linalg.norm(gn - mn, axis=-1, keepdims=True))
    eq13 = (1 - c) * mn + c * gn
    np.testing.assert_allclose(out.numpy(), eq13, rtol=0, atol=atol(m, g, tau=tau))


@given(mg=pair(), tau=TAUS)
def test_spp_l1_is_componentwise_clipping(mg, tau):
    m, g = mg
    out = ms.spp_step(m, g, tau, "l1")
    torch.testing.assert_close(out, m + ms.clip_l1(g - m, tau), rtol=0, atol=0)
    expected = m.numpy() + np.clip(g.numpy() - m.numpy(), -tau, tau)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=atol(m, g))
    # each coordinate moves by at most tau (up to the rounding of m + step)
    assert torch.all((out - m).abs() <= tau + atol(m, g))


@pytest.mark.parametrize("div", DIVS)
@given(mg=pair(), tau=TAUS)
def test_spp_implicit_form_eq9(div, mg, tau):
    # m+ = m - tau u with u in dD(m+ - g): the SPP step is an *implicit* subgradient step.
    m, g = mg
    mp = ms.spp_step(m, g, tau, div)
    u = (m - mp) / tau
    r = mp - g
    scale = max(float(m.abs().max()), float(g.abs().max()), 1.0)
    r_tol = 1e-9 * scale  # |r| below this is rounding of "m+ = g"
    u_tol = 1e-6  # |u| error ~ 1e-16 * scale / tau_min = 1e-12; generous margin
    if div == "sq":
        torch.testing.assert_close(u, r, rtol=0, atol=atol(m, g) / tau + 1e-12)
    elif div == "l1":
        kink = r.abs() <= r_tol
        assert torch.all((u - torch.sign(r))[~kink].abs() <= u_tol)
        assert torch.all(u[kink].abs() <= 1 + u_tol)
    else:
        rn = norm(r)
        kink = (rn <= r_tol).squeeze(-1)
        unit = r / torch.where(rn > 0, rn, 1.0)
        assert torch.all((u - unit)[~kink].abs() <= u_tol)
        assert torch.all(norm(u).squeeze(-1)[kink] <= 1 + u_tol)


@given(mg=pair(), tau=TAUS)
def test_sgd_l1_is_signed_increment(mg, tau):
    m, g = mg
    out = ms.sgd_step(m, g, tau, "l1")
    expected = m.numpy() + tau * np.sign(g.numpy() - m.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=0)
    # coordinates with g_i == m_i do not move (the subgradient 0 is chosen at the kink)
    same = g == m
    assert torch.equal(out[same], m[same])


@given(mg=pair(), tau=TAUS)
def test_sgd_l2_is_adaptive_momentum(mg, tau):
    m, g = mg
    out = ms.sgd_step(m, g, tau, "l2")
    mn, gn = m.numpy(), g.numpy()
    dist = np.linalg.norm(mn - gn, axis=-1, keepdims=True)
    moving = dist[..., 0] > 0
    c = tau / np.where(dist > 0, dist, 1.0)
    expected = np.where(dist > 0, (1 - c) * mn + c * gn, mn)  # Appendix B, and m if g == m
    tol = 64 * 2.0**-52 * max(abs(mn).max(), abs(gn).max(), 1.0) * (1 + c.max())
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=tol)
    # the step has length exactly tau whenever g != m
    step = np.linalg.norm(out.numpy() - mn, axis=-1)
    np.testing.assert_allclose(step[moving], tau, rtol=1e-9)
    still = ~torch.as_tensor(np.asarray(moving, dtype=bool))
    assert torch.equal(out[still], m[still])


def test_sgd_l2_g_equals_m_returns_m(dtype, device):
    m = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=dtype, device=device)
    g = m.clone()
    g[2] = torch.tensor([1.0, 1.0, 4.0])
    out = ms.sgd_step(m, g, 0.5, "l2")
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], m[:2])
    torch.testing.assert_close(out[2], torch.tensor([1.0, 1.0, 1.5], dtype=dtype, device=device))


# ---------------------------------------------------------------------------------------------
# Broadcasting, tau per problem, batches, dtype/device, no mutation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["spp", "sgd"])
@pytest.mark.parametrize("div", DIVS)
def test_broadcast_m_vector_against_g_batch(step, div, gen):
    f = STEPS[step]
    m = torch.randn(5, generator=gen, dtype=torch.float64)
    g = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3
    out = f(m, g, 0.4, div)
    assert out.shape == (7, 5)
    for s in range(7):
        torch.testing.assert_close(out[s], f(m, g[s], 0.4, div), rtol=1e-15, atol=1e-15)
    # and the other way round (one g against many m)
    out2 = f(g, m, 0.4, div)
    for s in range(7):
        torch.testing.assert_close(out2[s], f(g[s], m, 0.4, div), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("step", ["spp", "sgd"])
@pytest.mark.parametrize("div", DIVS)
def test_tau_tensor_per_problem_equals_loop(step, div, dtype, device, gen):
    f = STEPS[step]
    m = (torch.randn(3, 4, 6, generator=gen) * 2).to(dtype=dtype, device=device)
    g = (torch.randn(3, 4, 6, generator=gen) * 2).to(dtype=dtype, device=device)
    tau = (torch.rand(3, 4, generator=gen) * 2 + 0.05).to(dtype=dtype, device=device)
    out = f(m, g, tau, div)
    assert out.shape == (3, 4, 6)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(out[i, j], f(m[i, j], g[i, j], float(tau[i, j]), div))
    # tau of shape (4,) broadcasts over the leading batch dimension
    out2 = f(m, g, tau[1], div)
    for i in range(3):
        torch.testing.assert_close(out2[i], f(m[i], g[i], tau[1], div))


@pytest.mark.parametrize("step", ["spp", "sgd"])
@pytest.mark.parametrize("div", DIVS)
def test_batch_equals_one_by_one(step, div, gen):
    f = STEPS[step]
    m = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) * 5
    g[0, 1] = m[0, 1]  # a problem with g == m
    out = f(m, g, 0.3, div)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], f(m[i, j], g[i, j], 0.3, div), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("step", ["spp", "sgd"])
@pytest.mark.parametrize("div", DIVS)
def test_dtype_device_kept_inputs_not_mutated(step, div, dtype, device, gen):
    f = STEPS[step]
    m = torch.randn(4, 3, generator=gen).to(dtype=dtype, device=device)
    g = (torch.randn(4, 3, generator=gen) * 4).to(dtype=dtype, device=device)
    tau32 = torch.full((4,), 0.25, dtype=torch.float32, device=device)
    m0, g0, t0 = m.clone(), g.clone(), tau32.clone()
    for tau in (0.25, tau32):
        out = f(m, g, tau, div)
        assert out.dtype == dtype
        assert out.device == m.device
        assert out.shape == (4, 3)
    assert torch.equal(m, m0) and torch.equal(g, g0) and torch.equal(tau32, t0)
    # 0.25 is exact in float32, so a float32 tau tensor gives the float-tau result (no downcast).
    assert torch.equal(f(m, g, tau32, div), f(m, g, 0.25, div))


def test_float64_with_float32_tau_stays_float64(gen):
    m = torch.zeros(2, 3, dtype=torch.float64)
    g = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    tau32 = torch.tensor([0.1, 0.3], dtype=torch.float32)
    out = ms.spp_step(m, g, tau32, "sq")
    assert out.dtype == torch.float64
    # computed in float64 from the float32 values of tau (not rounded through float32)
    t = tau32.double().unsqueeze(-1)
    torch.testing.assert_close(out, t / (1 + t) * g, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# The online estimators estimate: the D-median of i.i.d. Cauchy samples
# ---------------------------------------------------------------------------------------------


def test_online_median_estimators_find_cauchy_centre_momentum_does_not():
    gen = torch.Generator().manual_seed(1234)
    c = torch.tensor([3.0, -2.0, 0.5, 10.0, -7.0], dtype=torch.float64)
    S, d, T, tau = 8, 5, 8000, 0.02  # 8 independent runs (a batch), T samples each
    U = torch.rand(T, S, d, generator=gen, dtype=torch.float64)
    samples = c + torch.tan(math.pi * (U - 0.5))  # standard Cauchy located at c (median c)
    m = {div: torch.zeros(d, dtype=torch.float64) for div in DIVS}  # (d,) broadcasts to (S, d)
    for t in range(T):
        for div in DIVS:
            m[div] = ms.spp_step(m[div], samples[t], tau, div)
    err = {div: (m[div] - c).abs() for div in DIVS}
    # l1 (coordinate median) and l2 (geometric median = c by symmetry) move at most tau per step,
    # so reaching c (|c| <= 10) takes ~500 steps; afterwards they fluctuate around c with a
    # standard deviation of order sqrt(tau / (4 f(0))) = sqrt(0.02 * pi / 4) ~ 0.13 per coordinate
    # (f(0) = 1/pi is the Cauchy density at its centre). 0.6 is over 4 such deviations, with 40
    # coordinates.
    assert err["l1"].max() < 0.6, err["l1"]
    assert err["l2"].max() < 0.6, err["l2"]
    # "sq" is an exponential moving average, and a weighted average of Cauchy samples with weights
    # summing to ~1 is again standard Cauchy: it does not concentrate. P(|Cauchy| < 2) = 0.70, so
    # all 40 coordinates within 2 has probability ~1e-6; the seed is fixed anyway.
    assert err["sq"].max() > 2.0, err["sq"]
    assert err["sq"].median() > 3 * err["l1"].median()


# ---------------------------------------------------------------------------------------------
# Hostile magnitudes (issue 12, item 3 and the smaller errors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_l2_steps_tau_along_a_tiny_difference(dtype):
    """g - m != 0 but ||g - m||^2 underflows: the step is still tau (g - m) / ||g - m||."""
    m = torch.zeros(2, 4, dtype=dtype)
    g = torch.tensor([[1.0, -1.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]], dtype=dtype) * torch.finfo(dtype).tiny
    out = ms.sgd_step(m, g, 0.5, "l2")
    expected = torch.tensor([[0.5 / 2**0.5, -0.5 / 2**0.5, 0, 0], [0.3, 0.4, 0, 0]], dtype=dtype)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("div", ["sq", "l2", "l1"])
def test_sgd_step_with_tau_beyond_the_dtype_range_is_a_clear_error(div):
    m, g = torch.zeros(3), torch.ones(3)
    for tau in (1e39, torch.tensor(1e39, dtype=torch.float64)):
        with pytest.raises(ValueError, match="tau"):
            ms.sgd_step(m, g, tau, div)
    ms.sgd_step(m.double(), g.double(), 1e39, div)  # fine in float64
