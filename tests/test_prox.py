"""Prox operators and clipping: Lemmas A.1/A.2, optimality conditions, Moreau decomposition."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import median_sgd as ms

NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _snap(x: float) -> float:
    # Values below 1e-6 in magnitude become 0: squares of ~1e-160 underflow even in float64 and
    # no formula of the library claims anything about underflow.
    return 0.0 if abs(x) < 1e-6 else x


def elements(width: int = 64):
    return st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=width).map(_snap)


SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
TAUS = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def tensors(draw, n: int = 1, dtype=torch.float64, shape=None):
    """``n`` tensors of one random shape (last dim = vector, leading dims = batch)."""
    if shape is None:
        shape = draw(SHAPES)
    np_dtype = NP_DTYPES[dtype]
    width = 32 if dtype == torch.float32 else 64
    out = [
        torch.from_numpy(draw(hnp.arrays(np_dtype, shape, elements=elements(width))))
        for _ in range(n)
    ]
    return out[0] if n == 1 else tuple(out)


def atol_for(dtype, *xs, tau=0.0, factor=16.0) -> float:
    """Absolute rounding tolerance: a few ulps of the largest magnitude involved."""
    scale = max([float(x.abs().max()) if x.numel() else 0.0 for x in xs] + [float(tau), 1e-30])
    return factor * torch.finfo(dtype).eps * scale


# ---------------------------------------------------------------------------------------------
# Lemmas A.1 and A.2: g + prox(m - g) = m + clip(g - m)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), tau=TAUS)
def test_lemma_a1_l1(dtype, data, tau):
    m, g = data.draw(tensors(2, dtype=dtype))
    lhs = g + ms.prox_l1(m - g, tau)
    rhs = m + ms.clip_l1(g - m, tau)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=atol_for(dtype, m, g, tau=tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), tau=TAUS)
def test_lemma_a2_l2(dtype, data, tau):
    m, g = data.draw(tensors(2, dtype=dtype))
    lhs = g + ms.prox_l2(m - g, tau)
    rhs = m + ms.clip_l2(g - m, tau)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=atol_for(dtype, m, g, tau=tau, factor=32))


# ---------------------------------------------------------------------------------------------
# Optimality conditions of the prox: v - p in tau * dD(p)
# ---------------------------------------------------------------------------------------------


@given(v=tensors(), tau=TAUS)
def test_prox_l1_optimality(v, tau):
    p = ms.prox_l1(v, tau)
    atol = atol_for(torch.float64, v, tau=tau)
    nz = p != 0
    # p_i != 0: the subdifferential of |.| is {sign(p_i)}, so v_i - p_i = tau sign(p_i).
    assert torch.all((v - p - tau * torch.sign(p))[nz].abs() <= atol)
    # p_i == 0: the subdifferential is [-1, 1], so |v_i| <= tau.
    assert torch.all(v[~nz].abs() <= tau + atol)
    # and the value 0 is taken exactly where |v_i| <= tau (soft thresholding has no epsilon).
    assert torch.equal(~nz, v.abs() <= tau)


@given(v=tensors(), tau=TAUS)
def test_prox_l2_optimality(v, tau):
    p = ms.prox_l2(v, tau)
    atol = atol_for(torch.float64, v, tau=tau, factor=32)
    pn = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
    nz = (pn > 0).squeeze(-1)
    # p != 0: v - p = tau p / ||p||.
    resid = v - p - tau * p / torch.where(pn > 0, pn, 1.0)
    assert torch.all(resid[nz].abs() <= atol)
    # p == 0: v - 0 in tau * unit ball, i.e. ||v|| <= tau.
    vn = torch.linalg.vector_norm(v, dim=-1)
    assert torch.all(vn[~nz] <= tau + atol)
    # Conversely a vector longer than tau (by a margin) is not sent to 0.
    assert torch.all(nz[vn > tau * (1 + 1e-12)])


@given(v=tensors(), tau=TAUS)
def test_prox_sq_optimality(v, tau):
    p = ms.prox_sq(v, tau)
    # gradient of tau ||y||^2/2 + ||y - v||^2/2 vanishes: tau p + p - v = 0.
    torch.testing.assert_close(p * (1 + tau), v, rtol=1e-14, atol=1e-300)


def prox_objective(div: str, v: np.ndarray, tau: float, y: np.ndarray) -> float:
    D = {"l1": lambda y: np.abs(y).sum(), "l2": lambda y: np.linalg.norm(y), "sq": lambda y: 0.5 * y @ y}[div]
    return tau * D(y) + 0.5 * np.sum((y - v) ** 2)


PROX = {"l1": ms.prox_l1, "l2": ms.prox_l2, "sq": ms.prox_sq}


@pytest.mark.parametrize("div", ["l1", "l2", "sq"])
@given(v=tensors(shape=(4,)), tau=TAUS, seed=st.integers(0, 2**31 - 1))
def test_prox_beats_perturbations_by_strong_convexity(div, v, tau, seed):
    # The prox objective F(y) = tau D(y) + ||y - v||^2 / 2 is 1-strongly convex, so its minimiser p
    # satisfies F(y) >= F(p) + ||y - p||^2 / 2 for every y. A wrong p fails this at y = true prox.
    p = PROX[div](v, tau).numpy()
    vn = v.numpy()
    rng = np.random.default_rng(seed)
    candidates = [np.zeros_like(vn), vn]
    for scale in (1e-2, 1.0, 1e2):
        candidates += list(p + scale * rng.standard_normal((8, vn.size)))
    candidates += list(p + 0.1 * np.eye(vn.size)) + list(p - 0.1 * np.eye(vn.size))
    fp = prox_objective(div, vn, tau, p)
    for y in candidates:
        fy = prox_objective(div, vn, tau, y)
        slack = 1e-12 * (1.0 + abs(fp) + abs(fy))
        assert fy - fp >= 0.5 * np.sum((y - p) ** 2) - slack


@pytest.mark.parametrize("div", ["l1", "l2", "sq"])
@pytest.mark.parametrize("seed", range(6))
def test_prox_matches_scipy_argmin(div, seed):
    rng = np.random.default_rng(seed)
    d = 1 + seed % 3
    v = rng.standard_normal(d) * 3
    tau = float(rng.uniform(0.1, 3.0))
    f = lambda y: prox_objective(div, v, tau, y)  # noqa: E731
    best = min(
        (
            scipy.optimize.minimize(
                f, x0, method="Nelder-Mead", options={"xatol": 1e-11, "fatol": 1e-14, "maxiter": 20000}
            )
            for x0 in (v, np.zeros(d), v / 2)
        ),
        key=lambda r: r.fun,
    )
    p = PROX[div](torch.from_numpy(v), tau).numpy()
    assert f(p) <= best.fun + 1e-12
    # strong convexity: ||p - y||^2 / 2 <= F(y) - F(p), and Nelder-Mead gets F within ~1e-12.
    np.testing.assert_allclose(p, best.x, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), tau=TAUS)
def test_clip_l2_norm_and_direction(dtype, data, tau):
    v = data.draw(tensors(dtype=dtype))
    c = ms.clip_l2(v, tau)
    vn = torch.linalg.vector_norm(v.double(), dim=-1)
    cn = torch.linalg.vector_norm(c.double(), dim=-1)
    rel = 8 * torch.finfo(dtype).eps * max(1.0, np.sqrt(v.shape[-1]))
    torch.testing.assert_close(cn, torch.minimum(vn, torch.tensor(tau, dtype=torch.float64)), rtol=rel, atol=0)
    # c is a nonnegative multiple (at most 1) of v, computed per vector.
    factor = torch.where(vn > 0, cn / torch.where(vn > 0, vn, 1.0), 1.0)
    assert torch.all(factor <= 1 + rel)
    torch.testing.assert_close(
        c.double(), factor.unsqueeze(-1) * v.double(), rtol=0, atol=atol_for(dtype, v, tau=tau)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), stretch=st.floats(1.0, 10.0))
def test_clip_l2_is_exact_inside_the_ball(dtype, data, stretch):
    v = data.draw(tensors(dtype=dtype))
    # tau >= ||v|| for every row (the largest norm, stretched; stretch = 1 is the boundary).
    tau = float(torch.linalg.vector_norm(v, dim=-1).max()) * stretch
    if tau == 0:
        tau = 1.0
    assert torch.equal(ms.clip_l2(v, tau), v)  # bit for bit: no epsilon anywhere
    assert torch.equal(ms.clip_l1(v, float(v.abs().max()) * stretch or 1.0), v)


def test_clip_l2_exact_at_the_boundary_per_row(dtype):
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0], [0.0, 0.0]], dtype=dtype)
    norms = torch.linalg.vector_norm(v, dim=-1)
    tau = torch.tensor([5.0, 5.0, 5.0, 5.0], dtype=dtype)
    tau[1] = norms[1]  # exactly on the boundary
    out = ms.clip_l2(v, tau)
    assert torch.equal(out[:2], v[:2])
    assert torch.equal(out[3], v[3])
    torch.testing.assert_close(out[2], torch.tensor([3.0, 4.0], dtype=dtype))


def test_zero_stays_zero(dtype, device):
    z = torch.zeros(3, 4, dtype=dtype, device=device)
    for f in (ms.clip_l2, ms.clip_l1, ms.prox_l2, ms.prox_l1, ms.prox_sq):
        out = f(z, 0.5)
        assert torch.isfinite(out).all(), f.__name__
        assert torch.equal(out, z), f.__name__
    # a zero row next to nonzero rows
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=dtype, device=device)
    out = ms.clip_l2(v, 1.0)
    assert torch.equal(out[0], v[0])
    torch.testing.assert_close(out[1], torch.tensor([0.6, 0.8], dtype=dtype, device=device))


@given(v=tensors(), tau=TAUS)
def test_clip_l1_componentwise(v, tau):
    c = ms.clip_l1(v, tau)
    expected = torch.from_numpy(np.clip(v.numpy(), -tau, tau))
    assert torch.equal(c, expected)


# ---------------------------------------------------------------------------------------------
# Moreau decomposition: prox_{tau D}(v) + Proj_{tau B_*}(v) = v
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), tau=TAUS)
def test_moreau_decomposition(dtype, data, tau):
    v = data.draw(tensors(dtype=dtype))
    atol = atol_for(dtype, v, tau=tau, factor=32)
    torch.testing.assert_close(ms.prox_l2(v, tau) + ms.clip_l2(v, tau), v, rtol=0, atol=atol)
    torch.testing.assert_close(ms.prox_l1(v, tau) + ms.clip_l1(v, tau), v, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# Batches, tau per problem, dtype/device, no mutation
# ---------------------------------------------------------------------------------------------

ALL = [ms.prox_l1, ms.prox_l2, ms.prox_sq, ms.clip_l1, ms.clip_l2]


@pytest.mark.parametrize("f", ALL, ids=lambda f: f.__name__)
def test_tau_tensor_per_problem_equals_loop(f, dtype, device, gen):
    v = (torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) * 3).to(dtype=dtype, device=device)
    tau = torch.rand(4, 3, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) * 4 + 0.1
    out = f(v, tau)
    assert out.shape == v.shape
    for i in range(4):
        for j in range(3):
            torch.testing.assert_close(out[i, j], f(v[i, j], float(tau[i, j])), rtol=1e-6, atol=1e-6)
    # a tau broadcasting over the first batch dimension (one value per column of problems)
    out2 = f(v, tau[0])
    for i in range(4):
        torch.testing.assert_close(out2[i], f(v[i], tau[0]))


@pytest.mark.parametrize("f", ALL, ids=lambda f: f.__name__)
def test_batch_equals_one_by_one(f, gen):
    v = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) * 2
    out = f(v, 1.3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i, j], f(v[i, j], 1.3))


@pytest.mark.parametrize("f", ALL, ids=lambda f: f.__name__)
def test_dtype_device_kept_and_input_not_mutated(f, dtype, device, gen):
    v = (torch.randn(3, 4, generator=gen) * 3).to(dtype=dtype, device=device)
    v0 = v.clone()
    tau_t = torch.full((3,), 0.7, dtype=torch.float32, device=device)
    tau_t0 = tau_t.clone()
    for tau in (0.7, 1, tau_t):
        out = f(v, tau)
        assert out.dtype == dtype and out.device == v.device and out.shape == v.shape
    assert torch.equal(v, v0)
    assert torch.equal(tau_t, tau_t0)
    # float64 input with a float32 tau tensor stays float64 and uses tau's value (0.7 in float32)
    if dtype == torch.float64:
        torch.testing.assert_close(f(v, tau_t), f(v, float(tau_t[0])))


# ---------------------------------------------------------------------------------------------
# Hostile magnitudes: norms that overflow the dtype (issue 12, item 3)
# ---------------------------------------------------------------------------------------------

INF = float("inf")


def _direction(d: int, seed: int) -> torch.Tensor:
    """A fixed float64 direction with entries of mixed sign and size in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double()
    return signs * (0.5 + torch.rand(d, generator=g, dtype=torch.float64))


# (dtype, entry magnitude, d): ||v|| overflows the sum of squares of the dtype's arithmetic
# (float16 data: the float16 result); the last float32/float64 rows have a norm above the
# largest finite value itself.
OVERFLOW_CASES = [
    (torch.float16, 1e3, 10_000),
    (torch.float16, 4e4, 300),
    (torch.bfloat16, 1e37, 1000),
    (torch.float32, 1e20, 100),
    (torch.float32, 1e37, 1000),
    (torch.float32, 2e38, 1000),
    (torch.float64, 1e200, 100),
    (torch.float64, 1e307, 1000),
]


def _case_id(case):
    dtype, scale, d = case
    return f"{str(dtype).replace('torch.', '')}-{scale:g}x{d}"


@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=_case_id)
def test_clip_l2_with_an_overflowing_norm_has_norm_tau(case):
    dtype, scale, d = case
    v = (scale * _direction(d, 0)).to(dtype)
    unit = v.double() / scale
    unit = unit / torch.linalg.vector_norm(unit)  # v / ||v||, in float64 without overflow
    c = ms.clip_l2(v, 1.0)
    assert c.dtype == dtype and bool(torch.isfinite(c).all())
    # c = v / ||v|| (tau = 1): entries below 2^-14 are subnormal in float16, compare absolutely
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(c.double(), unit, rtol=tol, atol=tol / d**0.5)
    # the same through the estimators: m = 0, g = v
    m = torch.zeros_like(v)
    torch.testing.assert_close(ms.spp_step(m, v, 1.0, "l2").double(), unit, rtol=tol,
                               atol=tol / d**0.5)
    torch.testing.assert_close(ms.sgd_step(m, v, 1.0, "l2").double(), unit, rtol=tol,
                               atol=tol / d**0.5)


@pytest.mark.parametrize(
    "case", [c for c in OVERFLOW_CASES if 2 * c[1] * c[2] ** 0.5 < float(torch.finfo(c[0]).max)
             or c[0] == torch.float16], ids=_case_id)
def test_prox_and_clip_l2_with_an_overflowing_norm_and_a_comparable_tau(case):
    """tau = 0.3 ||v||: clip is 0.3 v, prox is 0.7 v (before: v unchanged, or 0)."""
    dtype, scale, d = case
    v = (scale * _direction(d, 1)).to(dtype)
    exact = v.double()
    norm = float(torch.linalg.vector_norm(exact / scale) * scale)
    tau = 0.3 * norm
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(ms.clip_l2(v, tau).double(), 0.3 * exact, rtol=tol, atol=0)
    torch.testing.assert_close(ms.prox_l2(v, tau).double(), 0.7 * exact, rtol=tol, atol=0)
    if dtype == torch.float16:
        return  # a tau tensor is cast to float16, where 0.3 ||v|| > 65504 is inf (documented)
    # a batch: one overflowing row next to an ordinary one, tau per row
    batch = torch.stack([v, torch.full_like(v, 1e-2)])
    taus = torch.tensor([tau, 1e-3], dtype=torch.float64)
    out = ms.clip_l2(batch, taus)
    torch.testing.assert_close(out[0].double(), 0.3 * exact, rtol=tol, atol=0)
    torch.testing.assert_close(out[1], ms.clip_l2(batch[1], 1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_l2_tiny_and_huge_vectors_are_unchanged_inside_the_ball(dtype):
    tiny = torch.full((50,), torch.finfo(dtype).tiny * 4, dtype=dtype)
    assert torch.equal(ms.clip_l2(tiny, 1.0), tiny)
    assert torch.equal(ms.prox_l2(tiny, 1.0), torch.zeros_like(tiny))
    big = torch.full((4,), torch.finfo(dtype).max / 4, dtype=dtype)  # ||big|| = max / 2
    assert torch.equal(ms.clip_l2(big, float(torch.finfo(dtype).max)), big)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_clip_lp_inf_with_huge_entries(dtype):
    """The l_1-ball projection keeps tau against entries far above it (and sums that overflow)."""
    d = 100
    for scale in (1e3 if dtype == torch.float16 else 1e20, float(torch.finfo(dtype).max) / 2):
        v = torch.full((d,), scale, dtype=dtype)  # all tied: the projection is tau / d each
        out = ms.clip_lp(v, 1.0, INF)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), torch.full((d,), 1.0 / d, dtype=torch.float64),
                                   rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=0)
        # one large entry and ties below it
        w = v.clone()
        w[0] = scale * 1.5 if scale * 1.5 < float(torch.finfo(dtype).max) else scale
        out = ms.clip_lp(w, 2.0, INF)
        assert bool(torch.isfinite(out).all())
        assert float(out.double().abs().sum()) == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("f", [ms.clip_l1, ms.clip_l2, ms.prox_l1, ms.prox_l2, ms.prox_sq],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tau_beyond_the_dtype_range(f, dtype):
    """tau = 1e39 rounds to inf in float32: clipping is the identity, the prox is 0."""
    v = torch.tensor([[3.0, -4.0], [0.0, 1e4]], dtype=dtype)
    expected = v if f in (ms.clip_l1, ms.clip_l2) else torch.zeros_like(v)
    for tau in (1e39, torch.tensor([1e39, 1e39], dtype=torch.float64)):
        assert torch.equal(f(v, tau), expected)
    assert torch.equal(ms.spp_step(torch.zeros_like(v), v, 1e39, "l1"), v)
    assert torch.equal(ms.spp_step(torch.zeros_like(v), v, 1e39, "l2"), v)
