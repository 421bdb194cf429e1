"""select_block and BGmD (Acharya et al. 2022, Algorithms 1-2) against independent oracles:
exact inclusion probabilities of successive sampling by enumeration, brute-force top-k, the
paper's memory recursion written out with the library's medians, and the error-feedback identity.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import median_sgd as ms
from median_sgd.bgmd import resolve_block_size


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def sample_matrix(n=7, d=12, seed=0, dtype=torch.float64, device="cpu"):
    g = gen(seed)
    scale = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))
    G = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return G.to(dtype=dtype, device=device)


def inclusion_probabilities(scores, k):
    """P(j in I) for successive sampling without replacement, each draw proportional to scores."""
    d = len(scores)
    probs = [0.0] * d
    for seq in itertools.permutations(range(d), k):
        p, left = 1.0, sum(scores)
        for j in seq:
            p *= scores[j] / left
            left -= scores[j]
        for j in seq:
            probs[j] += p
    return torch.tensor(probs, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# select_block
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["norm", "topk"])
def test_select_block_shape_distinct_device(device, dtype, mode):
    G = sample_matrix(9, 40, dtype=dtype, device=device)
    idx = ms.select_block(G, 7, mode=mode, generator=gen(1, device.type))
    assert idx.shape == (7,) and idx.dtype == torch.int64 and idx.device == G.device
    assert len(set(idx.tolist())) == 7
    assert 0 <= int(idx.min()) and int(idx.max()) < 40


def test_select_block_batched_independent_problems():
    G = sample_matrix(5, 30).expand(4, 5, 30)
    idx = ms.select_block(G, 6, generator=gen(3))
    assert idx.shape == (4, 6)
    for row in idx:
        assert len(set(row.tolist())) == 6
    # independent draws per problem: not all four blocks coincide
    assert len({tuple(sorted(r.tolist())) for r in idx}) > 1


def test_fractional_k():
    assert resolve_block_size(0.1, 1000) == 100
    assert resolve_block_size(0.1, 5) == 1  # at least one column
    assert resolve_block_size(1.0, 17) == 17
    assert resolve_block_size(0.3, 10) == 3  # not 2 from 0.3 * 10 = 2.9999...
    idx = ms.select_block(sample_matrix(4, 50), 0.1, generator=gen())
    assert idx.shape == (5,)


def test_topk_matches_brute_force():
    G = sample_matrix(6, 25)
    norms = [math.sqrt(sum(float(G[i, j]) ** 2 for i in range(6))) for j in range(25)]
    expected = sorted(range(25), key=lambda j: -norms[j])[:8]
    idx = ms.select_block(G, 8, mode="topk")
    assert sorted(idx.tolist()) == sorted(expected)


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_norm_sampling_inclusion_frequencies_match_theory(power):
    """Successive sampling proportional to ||G[:, j]||^power: frequencies vs exact probabilities."""
    G = torch.tensor([[3.0, 1.0, 0.5, 2.0, 0.2], [1.0, -1.0, 0.5, 0.0, 0.1]], dtype=torch.float64)
    k, draws = 2, 40_000
    scores = (torch.linalg.vector_norm(G, dim=0) ** power).tolist()
    exact = inclusion_probabilities(scores, k)
    idx = ms.select_block(G.expand(draws, 2, 5), k, generator=gen(7), power=power)
    freq = torch.zeros(5, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64)) / draws
    sd = torch.sqrt(exact * (1 - exact) / draws)
    assert torch.all((freq - exact).abs() <= 5 * sd + 1e-12), (freq, exact)
    # not proportional to the scores themselves (that would be sampling with replacement)
    naive = k * torch.tensor(scores, dtype=torch.float64) / sum(scores)
    assert (freq - naive).abs().max() > 0.05


def test_lemma1_contraction_norm_sampling_keeps_at_least_k_over_d():
    """E ||C_k(G) - G||_F^2 <= (1 - k/d) ||G||_F^2 (Lemma 1), with the exact expectation."""
    for seed in range(5):
        G = sample_matrix(3, 6, seed=seed)
        sq = (G**2).sum(0)
        for k in (1, 2, 3):
            p = inclusion_probabilities(sq.tolist(), k)
            expected_residual = float(((1 - p) * sq).sum())
            assert expected_residual <= (1 - k / 6) * float(sq.sum()) + 1e-12


def test_zero_columns_are_drawn_last():
    G = torch.zeros(3, 10, dtype=torch.float64)
    G[:, [2, 5, 7]] = torch.tensor([1e-8, 3.0, 1e4], dtype=torch.float64)
    for seed in range(20):
        idx = ms.select_block(G, 3, generator=gen(seed))
        assert sorted(idx.tolist()) == [2, 5, 7]
    idx = ms.select_block(G, 5, generator=gen(0))  # then the zero columns fill up the block
    assert {2, 5, 7} <= set(idx.tolist()) and len(set(idx.tolist())) == 5


def test_select_block_is_deterministic_under_a_generator():
    G = sample_matrix(5, 200)
    a = ms.select_block(G, 20, generator=gen(11))
    b = ms.select_block(G, 20, generator=gen(11))
    c = ms.select_block(G, 20, generator=gen(12))
    assert torch.equal(a, b)
    assert set(a.tolist()) != set(c.tolist())


def test_select_block_does_not_mutate():
    G = sample_matrix()
    before = G.clone()
    ms.select_block(G, 3, generator=gen())
    assert torch.equal(G, before)


@pytest.mark.parametrize(
    "k, kwargs, error",
    [
        (0, {}, ValueError),
        (13, {}, ValueError),
        (1.5, {}, ValueError),
        (0.0, {}, ValueError),
        (True, {}, TypeError),
        ("3", {}, TypeError),
        (3, {"mode": "random"}, ValueError),
        (3, {"generator": 0}, TypeError),
        (3, {"power": 0.0}, ValueError),
        (3, {"power": float("nan")}, ValueError),
    ],
)
def test_select_block_bad_input(k, kwargs, error):
    with pytest.raises(error):
        ms.select_block(sample_matrix(), k, **kwargs)


def test_select_block_bad_matrix():
    with pytest.raises(ValueError):
        ms.select_block(torch.ones(5), 1)
    with pytest.raises(TypeError):
        ms.select_block(torch.ones(3, 4, dtype=torch.int64), 1)
    G = sample_matrix()
    G[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ms.select_block(G, 2)


# --------------------------------------------------------------------------------------------
# BGmD
# --------------------------------------------------------------------------------------------

GM = {"tol": 1e-12, "max_iter": 5000}


def brute_force_step(G, m, idx, rule):
    """Algorithm 1 written out: augment, keep the block, aggregate it, store the residual."""
    A = G + m
    n, d = A.shape
    update = torch.zeros(d, dtype=G.dtype)
    update[idx] = ms.geometric_median(A[:, idx], **GM).median
    residual = A.clone()
    residual[:, idx] = 0.0
    if rule == "mean":
        new = residual.mean(0)
    elif rule == "median":
        new = ms.coordinate_median(residual)
    elif rule == "gm":
        new = ms.geometric_median(residual, **GM).median
    else:
        new = torch.zeros(d, dtype=G.dtype)
    new[idx] = 0.0
    return update, new


@pytest.mark.parametrize("rule", ["mean", "median", "gm", None])
@pytest.mark.parametrize("mode", ["norm", "topk"])
def test_bgmd_matches_algorithm_1(rule, mode):
    agg = ms.BGmD(4, mode=mode, memory=rule, generator=gen(5), **GM)
    m = torch.zeros(12, dtype=torch.float64)
    for t in range(6):
        G = sample_matrix(7, 12, seed=100 + t)
        u = agg(G)
        idx = agg.last_block
        assert idx.shape == (4,)
        expected_u, m = brute_force_step(G, m, idx, rule)
        torch.testing.assert_close(u, expected_u, rtol=1e-9, atol=1e-9)
        mask = torch.ones(12, dtype=torch.bool)
        mask[idx] = False
        assert torch.all(u[mask] == 0), "the update must be zero outside the block"
        if rule is None:
            assert agg.memory is None
        else:
            torch.testing.assert_close(agg.memory, m, rtol=1e-9, atol=1e-9)
            assert torch.all(agg.memory[idx] == 0)


def test_selection_uses_the_augmented_matrix():
    """A column the memory made large is chosen: the scores are those of G + 1 m^T."""
    agg = ms.BGmD(1, mode="topk", memory="mean")
    G = torch.zeros(4, 3, dtype=torch.float64)
    G[:, 0] = 1.0
    G[:, 2] = 0.6
    agg(G)  # selects column 0; the memory keeps column 2's mean 0.6 (and column 1's 0)
    torch.testing.assert_close(agg.memory, torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64))
    G2 = torch.zeros(4, 3, dtype=torch.float64)
    G2[:, 0] = 1.0
    G2[:, 2] = 0.5  # alone smaller than column 0, but 0.5 + 0.6 > 1
    u = agg(G2)
    assert agg.last_block.tolist() == [2]
    torch.testing.assert_close(u, torch.tensor([0.0, 0.0, 1.1], dtype=torch.float64))


def test_relative_residual_is_lemma1_ratio():
    agg = ms.BGmD(5, memory="mean", generator=gen(2))
    for t in range(3):
        G = sample_matrix(6, 20, seed=t)
        A = G + (0 if agg.memory is None else agg.memory)
        agg(G)
        kept = torch.zeros_like(A)
        kept[:, agg.last_block] = A[:, agg.last_block]
        expected = ((A - kept) ** 2).sum() / (A**2).sum()
        torch.testing.assert_close(agg.last_residual, expected)
        assert 0 <= float(agg.last_residual) <= 1


def test_memory_is_a_translation_of_the_rows():
    """A step from memory m on G equals a fresh step on G + 1 m^T (same block draws)."""
    first = ms.BGmD(3, memory="mean", generator=gen(9), **GM)
    first(sample_matrix(5, 10, seed=1))
    m = first.memory.clone()
    G = sample_matrix(5, 10, seed=2)
    first.generator = gen(4)
    u1 = first(G)
    fresh = ms.BGmD(3, memory="mean", generator=gen(4), **GM)
    u2 = fresh(G + m)
    assert torch.equal(first.last_block, fresh.last_block)
    torch.testing.assert_close(u1, u2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first.memory, fresh.memory, rtol=1e-10, atol=1e-12)


def test_error_feedback_identity_mean_memory():
    """With the mean rule, sum_t u_t + m_T = sum_t [Gm(G_t[:, I_t]) on I_t, mean(G_t) off I_t]:
    the memory passes through the geometric median unchanged (translation equivariance)."""
    agg = ms.BGmD(3, memory="mean", generator=gen(8), **GM)
    total_u = torch.zeros(10, dtype=torch.float64)
    total_a = torch.zeros(10, dtype=torch.float64)
    for t in range(15):
        G = sample_matrix(5, 10, seed=50 + t)
        total_u += agg(G)
        idx = agg.last_block
        a = G.mean(0)
        a[idx] = ms.geometric_median(G[:, idx], **GM).median
        total_a += a
    torch.testing.assert_close(total_u + agg.memory, total_a, rtol=1e-8, atol=1e-8)


def test_k_equal_d_is_the_geometric_median():
    agg = ms.BGmD(1.0, memory="mean", **GM)
    for t in range(3):
        G = sample_matrix(6, 8, seed=t)
        torch.testing.assert_close(agg(G), ms.geometric_median(G, **GM).median)
        assert torch.all(agg.memory == 0)


def test_batched_problems_have_their_own_memory():
    Gs = [sample_matrix(5, 9, seed=s) for s in range(3)]
    batched = ms.BGmD(2, mode="topk", memory="median")
    singles = [ms.BGmD(2, mode="topk", memory="median") for _ in Gs]
    for t in range(3):
        step = [G * (1 + t) for G in Gs]
        u = batched(torch.stack(step))
        assert u.shape == (3, 9) and batched.memory.shape == (3, 9)
        for i, agg in enumerate(singles):
            torch.testing.assert_close(u[i], agg(step[i]))
            torch.testing.assert_close(batched.memory[i], agg.memory)


def test_bgmd_keeps_dtype_and_device(device, dtype):
    agg = ms.BGmD(0.25, memory="mean", generator=gen(0, device.type))
    for t in range(2):
        u = agg(sample_matrix(6, 16, seed=t, dtype=dtype, device=device))
        assert u.shape == (16,) and u.dtype == dtype and u.device == device
        assert agg.memory.dtype == dtype and agg.memory.device == device
        assert agg.last_block.device == device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bgmd_half_precision(dtype):
    G = sample_matrix(5, 20)
    agg = ms.BGmD(10, mode="topk", memory="median")
    u = agg(G.to(dtype))
    assert u.dtype == dtype and torch.isfinite(u).all()
    ref = ms.BGmD(10, mode="topk", memory="median")(G)
    torch.testing.assert_close(u.double(), ref, rtol=0.05, atol=0.05)


def test_bgmd_does_not_mutate_and_reset_clears():
    G = sample_matrix()
    before = G.clone()
    agg = ms.BGmD(3, mode="topk")
    agg(G)
    agg(G)
    assert torch.equal(G, before)
    assert agg.memory is not None
    agg.reset()
    assert agg.memory is None and agg.last_block is None
    torch.testing.assert_close(
        agg(G), ms.BGmD(3, mode="topk")(G), msg="after reset(), a call is a first call")


def test_bgmd_is_deterministic_under_a_generator():
    outs = []
    for _ in range(2):
        agg = ms.BGmD(4, generator=gen(21))
        outs.append(torch.stack([agg(sample_matrix(5, 30, seed=t)) for t in range(4)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_bgmd_fixed_iter_passes_through():
    agg = ms.BGmD(3, fixed_iter=True, max_iter=7)
    agg(sample_matrix())
    assert int(agg.last_gm.n_iter.max()) <= 7
    agg2 = ms.BGmD(3, fixed_iter=True, max_iter=7, tol=0.0)
    agg2(sample_matrix())
    assert int(agg2.last_gm.n_iter) == 7


def test_bgmd_bad_input():
    with pytest.raises(ValueError):
        ms.BGmD(0)
    with pytest.raises(ValueError):
        ms.BGmD(1.5)
    with pytest.raises(TypeError):
        ms.BGmD(True)
    with pytest.raises(ValueError, match="memory"):
        ms.BGmD(2, memory="ema")
    with pytest.raises(ValueError, match="mode"):
        ms.BGmD(2, mode="random")
    with pytest.raises(TypeError, match="geometric_median option"):
        ms.BGmD(2, iterations=3)
    with pytest.raises(TypeError):
        ms.BGmD(2, generator=1)
    agg = ms.BGmD(20)
    with pytest.raises(ValueError, match="k must satisfy"):
        agg(sample_matrix(5, 12))
    agg = ms.BGmD(2)
    G = sample_matrix()
    G[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        agg(G)
    with ms.value_checks(False):  # value checks off: no check, no error
        agg(G)
    agg.reset()
    agg(sample_matrix(5, 12))
    with pytest.raises(ValueError, match="reset"):
        agg(sample_matrix(5, 13))
    with pytest.raises(ValueError, match="reset"):
        agg(sample_matrix(5, 12, dtype=torch.float32))
    agg(sample_matrix(9, 12))  # another number of rows is fine
    with pytest.raises(TypeError):
        agg(torch.ones(3, 12, dtype=torch.int32))


@pytest.mark.cuda  # so that `pytest -m cuda` (scripts/gpu-check) runs it
def test_generator_on_another_device_works():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    G = sample_matrix(device="cuda")
    idx = ms.select_block(G, 3, generator=gen(0, "cpu"))
    assert idx.device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Issue 12 items 2 and 5: huge values, half precision (these failed before the fix)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["norm", "topk"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_select_block_half_precision_matches_float64(mode, power):
    # Squared column norms were summed in G's dtype: in float16 every column of norm above 256
    # was inf and the choice arbitrary. Columns of norms 300 to 60,000 (all representable).
    g = gen(21)
    G = torch.randn(6, 40, generator=g, dtype=torch.float64) * torch.logspace(2, 4.3, 40, dtype=torch.float64)
    for half in (torch.float16, torch.bfloat16):
        H = G.to(half)
        ref = ms.select_block(H.double(), 8, mode=mode, generator=gen(3), power=power)
        idx = ms.select_block(H, 8, mode=mode, generator=gen(3), power=power)
        assert torch.equal(idx.sort().values, ref.sort().values)


def test_select_block_huge_float32_columns_keep_their_order():
    G = sample_matrix(5, 30, dtype=torch.float32) * 1e19  # squares overflow float32
    ref = ms.select_block(G.double(), 6, mode="topk")
    assert torch.equal(ms.select_block(G, 6, mode="topk").sort().values, ref.sort().values)


@pytest.mark.parametrize("rule", ["mean", "median", "gm", None])
@pytest.mark.parametrize("mode", ["norm", "topk"])
@pytest.mark.parametrize("far", [1e20, 3e38])
def test_bgmd_one_huge_row_of_six_gives_finite_updates(rule, mode, far):
    # BGmD's block median was NaN (issue 12 item 2); the memory and the diagnostics must stay finite.
    g = gen(22)
    agg = ms.BGmD(3, mode=mode, memory=rule, generator=gen(4), max_iter=200)
    for _ in range(3):
        honest = torch.randn(5, 8, generator=g)
        G = torch.cat([torch.full((1, 8), far), honest])
        u = agg(G)
        assert torch.isfinite(u).all() and torch.isfinite(agg.last_residual).all()
        assert agg.memory is None or torch.isfinite(agg.memory).all()
        if rule is None:  # no memory: the block's update is the median of the honest rows, nearly
            idx = agg.last_block
            z = ms.geometric_median(honest[:, idx].double(), tol=1e-12, max_iter=5000).median
            radius = float(torch.linalg.vector_norm(honest[:, idx].double() - z, dim=-1).max())
            assert float(torch.linalg.vector_norm(u[idx].double() - z)) <= radius


def test_bgmd_half_precision_memory_near_the_largest_value():
    G = torch.full((5, 6), 60000.0, dtype=torch.float16)
    G[0] = -60000.0
    agg = ms.BGmD(3, mode="topk", memory="mean")
    for _ in range(3):
        u = agg(G)  # G + memory exceeds float16's range: saturates instead of inf/NaN
        assert u.dtype == torch.float16 and torch.isfinite(u).all() and torch.isfinite(agg.memory).all()


# --------------------------------------------------------------------------------------------
# CUDA: no host synchronisation with fixed_iter=True, and the CPU's results (issue 13)
# --------------------------------------------------------------------------------------------
# The first GPU run failed the old version of this test for every memory rule: it moved G to the
# GPU (``G.cuda()``, a synchronising copy from pageable memory) inside the sync-checked block.
# Reading BGmD's code path found no synchronisation of its own; the CPU proxy in
# tests/test_medians_hostile.py checks the same path for host reads on every run.


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["mean", "median", "gm", None])
@pytest.mark.parametrize("mode", ["topk", "norm"])
def test_bgmd_cuda_no_host_sync_and_matches_cpu(rule, mode, no_host_sync):
    G = sample_matrix(8, 300)
    steps = [G, G * 2, -G]
    on_gpu = [x.cuda() for x in steps]  # before the check: a copy from pageable memory syncs
    cpu = ms.BGmD(30, mode=mode, memory=rule, fixed_iter=True, max_iter=50, generator=gen(1))
    gpu = ms.BGmD(30, mode=mode, memory=rule, fixed_iter=True, max_iter=50, generator=gen(1))
    cuda_gen = gen(2, "cuda")
    sampler = ms.BGmD(30, mode=mode, memory=rule, fixed_iter=True, max_iter=5, generator=cuda_gen)
    gpu(on_gpu[0])  # warm-up: kernels, libraries, pinned memory
    sampler(on_gpu[0])
    with no_host_sync():
        us = [gpu(x) for x in on_gpu[1:]]
        for x in on_gpu:
            sampler(x)
    cpu(G)
    for x, u in zip(steps[1:], us):
        # the same CPU generator: the same blocks; the same arithmetic up to rounding
        torch.testing.assert_close(u.cpu(), cpu(x), rtol=1e-7, atol=1e-9)
    assert gpu.memory is None or torch.isfinite(gpu.memory).all()
