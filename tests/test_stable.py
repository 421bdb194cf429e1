"""sample_stable against scipy.stats.levy_stable, cauchy and norm.

All samples come from seeded generators, so these statistical tests are deterministic; the
thresholds (p > 1e-3, 5-sigma bands) leave room for the seeds to change.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as ss
import torch

import median_sgd as ms

N = 200_000
ALPHAS = [0.5, 0.8, 1.2, 1.5, 1.9]
POINTS = np.array([-20.0, -5.0, -2.0, -1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0])


def draw(alpha, size=N, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return ms.sample_stable(alpha, size, generator=g, dtype=torch.float64, **kw)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_scipy_levy_stable_two_sample_ks(alpha):
    x = draw(alpha).numpy()
    y = ss.levy_stable.rvs(alpha, 0.0, size=N, random_state=0)
    assert ss.ks_2samp(x, y).pvalue > 1e-3


@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_scipy_levy_stable_cdf_pointwise(alpha):
    # independent of how scipy samples: the empirical cdf against levy_stable.cdf at fixed points,
    # within 5 binomial standard deviations (plus 1e-4 for the cdf's numerical integration).
    x = draw(alpha, seed=1).numpy()
    F = ss.levy_stable.cdf(POINTS, alpha, 0.0)
    emp = (x[:, None] <= POINTS).mean(0)
    band = 5 * np.sqrt(F * (1 - F) / N) + 1e-4
    assert np.all(np.abs(emp - F) <= band), np.abs(emp - F) / band


def test_alpha_1_is_standard_cauchy():
    x = draw(1.0, seed=2).numpy()
    assert ss.kstest(x, "cauchy").pvalue > 1e-3
    # and it is not the alpha = 1.2 law (the test has power)
    assert ss.kstest(draw(1.2, seed=2).numpy(), "cauchy").pvalue < 1e-6


def test_alpha_2_is_gaussian_with_variance_2():
    x = draw(2.0, seed=3).numpy()
    assert ss.kstest(x, "norm", args=(0.0, np.sqrt(2.0))).pvalue > 1e-3
    assert ss.kstest(x, "norm", args=(0.0, 1.0)).pvalue < 1e-6  # variance 2, not 1
    assert abs(x.var() - 2.0) < 0.05


def test_loc_and_scale():
    base = draw(1.5, seed=4)
    shifted = draw(1.5, seed=4, loc=3.0, scale=2.0)
    torch.testing.assert_close(shifted, 3.0 + 2.0 * base, rtol=1e-15, atol=1e-15)
    # alpha = 1: Cauchy with that location and scale; alpha = 2: variance 2 scale^2
    x = draw(1.0, seed=5, loc=-1.0, scale=2.0).numpy()
    assert ss.kstest(x, "cauchy", args=(-1.0, 2.0)).pvalue > 1e-3
    x = draw(2.0, seed=6, loc=0.5, scale=3.0).numpy()
    assert ss.kstest(x, "norm", args=(0.5, 3.0 * np.sqrt(2.0))).pvalue > 1e-3
    y = ss.levy_stable.rvs(0.8, 0.0, loc=10.0, scale=0.1, size=N, random_state=1)
    assert ss.ks_2samp(draw(0.8, seed=7, loc=10.0, scale=0.1).numpy(), y).pvalue > 1e-3


def test_vector_alpha_gives_per_row_laws():
    alphas = [0.7, 1.0, 2.0]
    alpha = torch.tensor(alphas, dtype=torch.float64).reshape(3, 1)
    scale = torch.tensor([1.0, 2.0, 0.5]).reshape(3, 1)
    x = draw(alpha, size=(3, N), seed=8, scale=scale).numpy()
    assert x.shape == (3, N)
    y = ss.levy_stable.rvs(0.7, 0.0, size=N, random_state=2)
    assert ss.ks_2samp(x[0], y).pvalue > 1e-3
    assert ss.kstest(x[1], "cauchy", args=(0.0, 2.0)).pvalue > 1e-3
    assert ss.kstest(x[2], "norm", args=(0.0, 0.5 * np.sqrt(2.0))).pvalue > 1e-3
    # rows are different laws: row 1 (Cauchy) is not row 2's Gaussian
    assert ss.ks_2samp(x[1], x[2]).pvalue < 1e-6
    # per-column alpha of shape (N,) against size (2, N) also broadcasts
    x2 = ms.sample_stable(torch.full((N,), 1.0), (2, N), generator=torch.Generator().manual_seed(0))
    assert x2.shape == (2, N)


def test_reproducible_with_seeded_generator():
    a = draw(1.3, size=(4, 100), seed=11)
    b = draw(1.3, size=(4, 100), seed=11)
    c = draw(1.3, size=(4, 100), seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != c).float().mean() > 0.99
    # the global generator is used without one
    torch.manual_seed(5)
    d = ms.sample_stable(1.3, 50)
    torch.manual_seed(5)
    assert torch.equal(d, ms.sample_stable(1.3, 50))


def test_dtype_and_device_defaults():
    x = ms.sample_stable(1.5, (2, 3))
    assert x.shape == (2, 3) and x.dtype == torch.get_default_dtype() and x.device.type == "cpu"
    assert ms.sample_stable(1.5, 7).shape == (7,)
    assert ms.sample_stable(1.5, 0).shape == (0,)
    assert ms.sample_stable(1.5, 4, dtype=torch.float64).dtype == torch.float64
    assert ms.sample_stable(1.5, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert ms.sample_stable(1.5, 4).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(0)
    assert ms.sample_stable(1.5, 4, generator=g).device.type == "cpu"
    # float32 output is the float64 draw rounded
    x64 = draw(1.5, size=100, seed=3)
    x32 = ms.sample_stable(1.5, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert torch.equal(x32, x64.float())


def test_symmetric_and_finite():
    for alpha in ALPHAS + [1.0, 2.0]:
        x = draw(alpha, seed=13)
        assert torch.isfinite(x).all()
        # P(X > 0) = 1/2 for a symmetric law: within 5 standard deviations (5 * 0.5 / sqrt(N))
        assert abs(float((x > 0).double().mean()) - 0.5) < 5 * 0.5 / np.sqrt(N)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 2.0001, 3.0, float("nan"), float("inf")])
def test_alpha_outside_range_raises(alpha):
    with pytest.raises(ValueError):
        ms.sample_stable(alpha, 10)


def test_alpha_tensor_with_a_bad_entry_raises():
    with pytest.raises(ValueError, match="alpha"):
        ms.sample_stable(torch.tensor([[1.0], [2.5]]), (2, 10))
    with pytest.raises(ValueError, match="alpha"):
        ms.sample_stable(torch.tensor([[1.0], [0.0]]), (2, 10))
    with pytest.raises(ValueError):  # does not broadcast to size
        ms.sample_stable(torch.tensor([1.0, 1.5, 1.9]), (2, 10))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), torch.tensor([1.0, -1.0])])
def test_bad_scale_raises(scale):
    with pytest.raises(ValueError):
        ms.sample_stable(1.5, 2 if isinstance(scale, torch.Tensor) else 5, scale=scale)


def test_other_bad_arguments():
    with pytest.raises(ValueError):
        ms.sample_stable(1.5, 5, loc=float("inf"))
    with pytest.raises(ValueError):
        ms.sample_stable(1.5, (3, -1))
    with pytest.raises(TypeError):
        ms.sample_stable(1.5, 5, dtype=torch.int64)
    with pytest.raises(TypeError):
        ms.sample_stable(1.5, "five")
    with pytest.raises(TypeError):
        ms.sample_stable("1.5", 5)
    with pytest.raises(ValueError):  # a CPU generator cannot draw CUDA samples
        ms.sample_stable(1.5, 5, generator=torch.Generator(), device="cuda")


@pytest.mark.parametrize("generator", ["x", 0, np.random.default_rng(0)])
def test_generator_that_is_not_a_torch_generator_is_a_type_error(generator):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ms.sample_stable(1.5, 5, generator=generator)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ms.sample_stable(1.5, 5, generator=generator, device="cpu")


def _cms_reference(alpha, size, gen, loc=0.0, scale=1.0):
    """The Chambers-Mallows-Stuck formula term by term (exponential_, two powers), in float64."""
    u = torch.rand(size, generator=gen, dtype=torch.float64)
    v = np.pi * (u - 0.5)
    w = torch.empty(size, dtype=torch.float64).exponential_(generator=gen)
    a = torch.as_tensor(alpha, dtype=torch.float64)
    x = torch.sin(a * v) / torch.cos(v) ** (1.0 / a) * (torch.cos((1.0 - a) * v) / w) ** ((1.0 - a) / a)
    return loc + scale * x


@pytest.mark.parametrize(
    "alpha", [0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 1.9, 2.0, "rows"], ids=lambda a: f"alpha={a}"
)
def test_same_draws_as_the_formula_term_by_term(alpha):
    # The fast evaluation (uniforms for the exponential, special cases alpha = 1 and 2, one exp of
    # a sum of logs) gives the formula's samples up to rounding, and leaves the generator where
    # the formula leaves it.
    size = (5, 20_000)
    if alpha == "rows":
        alpha = torch.tensor([0.5, 1.0, 1.5, 1.9, 2.0], dtype=torch.float64).reshape(5, 1)
    for loc, scale in [(0.0, 1.0), (-2.0, 3.0)]:
        g1, g2 = torch.Generator().manual_seed(21), torch.Generator().manual_seed(21)
        x = ms.sample_stable(alpha, size, generator=g1, dtype=torch.float64, loc=loc, scale=scale)
        ref = _cms_reference(alpha, size, g2, loc=loc, scale=scale)
        assert torch.isfinite(x).all() and torch.isfinite(ref).all()
        # relative to the value, plus the absolute rounding of loc + scale * x
        err = (x - ref).abs() / (ref.abs() + abs(loc) + 1e-300)
        assert float(err.max()) < 1e-13, float(err.max())
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
