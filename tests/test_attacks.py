"""Corruption models of BGmD's Section 7.2: exact corrupted counts, uniform dynamic selection,
the rules' formulas, noise statistics, no mutation, determinism and bad input."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from median_sgd import attacks as A


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("n, psi, expected", [(32, 0.0, 0), (32, 0.1, 3), (32, 0.2, 6),
                                               (32, 0.4, 12), (10, 0.4, 4), (10, 0.3, 3),
                                               (100, 0.29, 29)])
def test_n_corrupted_is_floor(n, psi, expected):
    assert A.n_corrupted(n, psi) == expected
    mask = A.corrupted_mask(n, psi, generator=gen())
    assert mask.dtype == torch.bool and mask.shape == (n,) and int(mask.sum()) == expected


def test_corrupted_mask_is_a_fresh_uniform_subset():
    """Each row is corrupted with frequency floor(psi n)/n, and pairs are exchangeable."""
    draws, n, psi = 20_000, 10, 0.4
    masks = A.corrupted_mask((draws, n), psi, generator=gen(3))
    assert torch.all(masks.sum(-1) == 4)
    freq = masks.double().mean(0)
    sd = math.sqrt(0.4 * 0.6 / draws)
    assert torch.all((freq - 0.4).abs() < 5 * sd)
    # P(i and j both corrupted) = (4/10)(3/9) for a uniform 4-subset
    both = (masks[:, 0] & masks[:, 1]).double().mean()
    assert abs(float(both) - 4 / 30) < 5 * math.sqrt((4 / 30) * (26 / 30) / draws)
    # consecutive calls differ (dynamic corruption): the chi-square test of uniformity passes
    counts = masks.sum(0).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert scipy.stats.chi2.sf(chi2, n - 1) > 1e-4


def test_scaled_bit_flip(device, dtype):
    G = torch.arange(12, dtype=dtype, device=device).view(4, 3)
    mask = torch.tensor([True, False, False, True])
    out = A.scaled_bit_flip(G, mask)
    expected = G.clone()
    expected[[0, 3]] *= -100
    assert torch.equal(out, expected) and out.dtype == dtype and out.device == device
    assert torch.equal(G, torch.arange(12, dtype=dtype, device=device).view(4, 3))


def test_gaussian_gradient_noise_statistics():
    G = torch.ones(5000, 40, dtype=torch.float64)
    mask = torch.zeros(5000, dtype=torch.bool)
    mask[:2500] = True
    out = A.gaussian_gradient_noise(G, mask, generator=gen(1))
    assert torch.equal(out[2500:], G[2500:])
    z = (out[:2500] - 1).reshape(-1)
    assert abs(float(z.mean())) < 0.05
    assert abs(float(z.var()) - 100) < 2.0  # N(0, 100): variance 100


def test_feature_noise_and_impulse():
    x = torch.full((200, 1, 8, 8), 0.5)
    mask = torch.zeros(200, dtype=torch.bool)
    mask[::2] = True
    noisy = A.gaussian_feature_noise(x, mask, generator=gen(2))
    assert torch.equal(noisy[1::2], x[1::2])
    hit = noisy[::2]
    assert hit.min() >= 0 and hit.max() <= 1
    # std 10 noise on [0, 1] pixels, clipped: almost every pixel ends at 0 or 1
    assert float(((hit == 0) | (hit == 1)).double().mean()) > 0.9
    raw = A.gaussian_feature_noise(x, mask, clip=None, generator=gen(2))
    assert abs(float((raw[::2] - 0.5).std()) - 10) < 0.5
    sp = A.salt_and_pepper(x, mask, generator=gen(4))
    assert torch.equal(sp[1::2], x[1::2])
    changed = sp[::2] != 0.5
    assert abs(float(changed.double().mean()) - 0.9) < 0.02  # 90% of the pixels
    vals = sp[::2][changed]
    assert set(vals.unique().tolist()) == {0.0, 1.0}
    assert abs(float((vals == 1).double().mean()) - 0.5) < 0.03


def test_backdoor():
    y = torch.arange(10)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4]] = True
    out = A.backdoor(y, mask)
    assert out.tolist() == [0, 8, 2, 3, 8, 5, 6, 7, 8, 9]
    assert torch.equal(y, torch.arange(10))


def test_attack_objects_corrupt_the_right_count():
    G = torch.randn(32, 7, generator=gen(), dtype=torch.float64)
    out = A.make_attack("bit_flip", 0.4).gradients(G, generator=gen(5))
    flipped = torch.isclose(out, -100 * G).all(-1) & ~torch.isclose(out, G).all(-1)
    assert int(flipped.sum()) == 12
    assert int(torch.isclose(out, G).all(-1).sum()) == 20
    # fresh rows at every call
    out2 = A.make_attack("bit_flip", 0.4).gradients(G, generator=gen(6))
    assert not torch.equal(out, out2)
    # batched gradient matrices (..., n, d): floor(psi n) per problem
    Gb = torch.randn(3, 10, 4, generator=gen(), dtype=torch.float64)
    outb = A.ScaledBitFlip(0.2).gradients(Gb, generator=gen(1))
    assert (~torch.isclose(outb, Gb).all(-1)).sum(-1).tolist() == [2, 2, 2]
    # gradient attacks leave batches alone and vice versa
    x, y = torch.rand(4, 16, 1, 8, 8), torch.randint(0, 8, (4, 16), generator=gen())  # no 8s
    assert A.ScaledBitFlip(0.4).batch(x, y)[0] is x
    assert A.Backdoor(0.4).gradients(G) is G
    _, yb = A.Backdoor(0.25).batch(x, y, generator=gen(2))
    assert int((yb != y).sum()) == 16 and torch.all(yb[yb != y] == 8)  # floor(0.25 * 64) samples
    xs, _ = A.ImpulseNoise(0.25).batch(x, y, generator=gen(2))
    assert int((xs != x).flatten(2).any(-1).sum()) == 16  # floor(0.25 * 64) samples
    assert A.make_attack("none", 0.4).gradients(G) is G


def test_psi_zero_is_the_identity():
    G = torch.randn(8, 3)
    for name in ("bit_flip", "gradient_noise"):
        assert A.make_attack(name, 0.0).gradients(G, generator=gen()) is G
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8)
    for name in ("feature_noise", "impulse", "backdoor"):
        assert A.make_attack(name, 0.0).batch(x, y)[1] is y


def test_determinism_under_a_generator():
    G = torch.randn(16, 5)
    a = A.GradientNoise(0.4).gradients(G, generator=gen(9))
    b = A.GradientNoise(0.4).gradients(G, generator=gen(9))
    assert torch.equal(a, b)


@pytest.mark.cuda  # so that `pytest -m cuda` (scripts/gpu-check) runs it
def test_attacks_on_cuda_with_cpu_or_cuda_generator():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    G = torch.randn(16, 5, device="cuda")
    for g in (gen(0, "cpu"), gen(0, "cuda")):
        out = A.GradientNoise(0.4).gradients(G, generator=g)
        assert out.device.type == "cuda"


def test_bad_input():
    with pytest.raises(ValueError):
        A.corrupted_mask(10, 1.0)
    with pytest.raises(ValueError):
        A.corrupted_mask(10, -0.1)
    with pytest.raises(ValueError):
        A.make_attack("bit_flip", 0.5, scale=0.0)
    with pytest.raises(ValueError, match="unknown attack 'sign_flip'"):
        A.make_attack("sign_flip", 0.2)
    with pytest.raises(TypeError, match="bad options"):
        A.make_attack("bit_flip", 0.2, std=3.0)
    with pytest.raises(ValueError):
        A.make_attack("impulse", 0.2, amount=1.5)
    with pytest.raises(ValueError):
        A.make_attack("backdoor", 0.2, target=-1)
    with pytest.raises(ValueError):
        A.scaled_bit_flip(torch.ones(4, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError):
        A.scaled_bit_flip(torch.ones(4, 3), torch.ones(4))
    with pytest.raises(TypeError):
        A.backdoor(torch.ones(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError):
        A.gaussian_gradient_noise(torch.ones(4, 3), torch.ones(4, dtype=torch.bool), generator=3)
    with pytest.raises(ValueError):
        A.salt_and_pepper(torch.ones(4, 1, 2, 2), torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("clip", [(1.0, 0.0), (0.5, 0.5), (0.0, float("nan")), (float("-inf"), 1.0),
                                  (0.0,), (0.0, 1.0, 2.0), "01", (True, 2.0), 1.0])
def test_feature_noise_clip_must_be_a_finite_increasing_pair(clip):
    with pytest.raises((ValueError, TypeError), match="clip"):
        A.FeatureNoise(0.2, clip=clip)
    with pytest.raises((ValueError, TypeError), match="clip"):
        A.make_attack("feature_noise", 0.2, clip=clip)
    x = torch.rand(4, 1, 2, 2)
    with pytest.raises((ValueError, TypeError), match="clip"):
        A.gaussian_feature_noise(x, torch.ones(4, dtype=torch.bool), clip=clip)


def test_feature_noise_clip_accepts_a_list_and_none():
    x = torch.full((40, 1, 4, 4), 0.5)
    mask = torch.ones(40, dtype=torch.bool)
    out = A.FeatureNoise(0.5, clip=[-1, 2]).batch(x, torch.arange(40), generator=gen(1))[0]
    assert out.min() >= -1 and out.max() <= 2 and out.min() < 0  # the clip range is used
    assert A.gaussian_feature_noise(x, mask, clip=None, generator=gen()).abs().max() > 2


@pytest.mark.parametrize("name", ["bit_flip", "gradient_noise"])
@pytest.mark.parametrize("shape", [(8,), ()])
def test_gradient_attack_on_a_vector_names_the_expected_shape(name, shape):
    G = torch.randn(shape)
    with pytest.raises(ValueError, match=r"\(\.\.\., n, d\)"):
        A.make_attack(name, 0.4).gradients(G, generator=gen())
    with pytest.raises(TypeError, match="G must be a torch.Tensor"):
        A.make_attack(name, 0.4).gradients([[1.0, 2.0]] * 4, generator=gen())


def test_gradient_attacks_on_an_empty_matrix_and_non_gradient_kinds():
    G = torch.empty(0, 3)
    assert A.make_attack("bit_flip", 0.4).gradients(G, generator=gen()) is G  # floor(0.4 * 0) = 0
    v = torch.randn(8)  # attacks that do not touch gradients return them as they are
    assert A.make_attack("backdoor", 0.4).gradients(v) is v
