"""GPU tests: the same results on CUDA as on the CPU, dtype/device kept, no host synchronisation.

Skipped when ``torch.cuda.is_available()`` is False. (The tests of the other files also run on
CUDA through the ``device`` fixture when it is present.) Devices are compared by ``.type``:
``torch.device("cuda") != torch.device("cuda:0")``, and tensors report ``cuda:0``.
``scripts/gpu-check`` runs these (``pytest -m cuda tests``) on a machine with a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as ss
import torch

import median_sgd as ms

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float64]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
PROX = [ms.prox_l1, ms.prox_l2, ms.prox_sq, ms.clip_l1, ms.clip_l2]


def cpu_gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def test_device_fixture_is_the_device_tensors_report(device):
    # Every `t.device == device` in the suite relies on this: a tensor made with device="cuda"
    # reports cuda:<current>, and torch.device("cuda") would compare unequal to it.
    for t in (torch.zeros(2, device=device.type), torch.zeros(2).to(device.type)):
        assert t.device == device and (t + 1).device == device


# ---------------------------------------------------------------------------------------------
# same results as on the CPU, dtype and device kept
# ---------------------------------------------------------------------------------------------


@dtypes
@pytest.mark.parametrize("f", PROX, ids=lambda f: f.__name__)
def test_prox_same_on_cuda(f, dtype):
    v = torch.randn(6, 5, 4, generator=cpu_gen(), dtype=dtype) * 3
    tau = torch.rand(6, 5, generator=cpu_gen(1), dtype=dtype) + 0.1
    for t_cpu, t_gpu in ((0.7, 0.7), (tau, tau.to(CUDA))):
        out = f(v.to(CUDA), t_gpu)
        assert out.device.type == "cuda" and out.dtype == dtype
        torch.testing.assert_close(out.cpu(), f(v, t_cpu), **tol(dtype))


@dtypes
def test_clip_l2_exact_on_cuda(dtype):
    v = torch.randn(100, 7, generator=cpu_gen(), dtype=dtype).to(CUDA)
    tau = torch.linalg.vector_norm(v, dim=-1).max().item() * 1.5
    assert torch.equal(ms.clip_l2(v, tau), v)
    z = torch.zeros(3, 7, dtype=dtype, device=CUDA)
    assert torch.equal(ms.clip_l2(z, 0.1), z)


@dtypes
@pytest.mark.parametrize("step", [ms.spp_step, ms.sgd_step], ids=["spp", "sgd"])
@pytest.mark.parametrize("div", ["sq", "l2", "l1"])
def test_estimators_same_on_cuda(step, div, dtype):
    m = torch.randn(5, generator=cpu_gen(), dtype=dtype)
    g = torch.randn(8, 5, generator=cpu_gen(1), dtype=dtype) * 4
    tau = torch.rand(8, generator=cpu_gen(2), dtype=dtype) + 0.05
    mc, gc, tc = m.to(CUDA), g.to(CUDA), tau.to(CUDA)
    for t_cpu, t_gpu in ((0.3, 0.3), (tau, tc)):
        out = step(mc, gc, t_gpu, div)
        assert out.device.type == "cuda" and out.dtype == dtype and out.shape == (8, 5)
        torch.testing.assert_close(out.cpu(), step(m, g, t_cpu, div), **tol(dtype))
    assert torch.equal(mc.cpu(), m) and torch.equal(gc.cpu(), g)  # not mutated


@dtypes
@pytest.mark.parametrize("n", [7, 8])
def test_coordinate_median_and_trimmed_mean_same_on_cuda(dtype, n):
    G = torch.randn(3, n, 6, generator=cpu_gen(), dtype=dtype)
    out = ms.coordinate_median(G.to(CUDA))
    assert out.device.type == "cuda" and out.dtype == dtype
    assert torch.equal(out.cpu(), ms.coordinate_median(G))  # order statistics: exact
    for trim in (0.0, 0.1, 0.25):
        tm = ms.trimmed_mean(G.to(CUDA), trim)
        assert tm.device.type == "cuda" and tm.dtype == dtype
        torch.testing.assert_close(tm.cpu(), ms.trimmed_mean(G, trim), **tol(dtype))


def test_coordinate_median_large_on_cuda():
    G = torch.randn(3, 2**23 + 5, generator=cpu_gen())
    out = ms.coordinate_median(G.to(CUDA))
    sl = slice(-1000, None)
    assert torch.equal(out[sl].cpu(), torch.from_numpy(np.median(G[:, sl].numpy(), axis=0)))


@dtypes
def test_geometric_median_same_on_cuda(dtype):
    G = torch.randn(4, 3, 15, 6, generator=cpu_gen(), dtype=dtype) * 2
    G[0, 0] = 1.5  # coincident points
    w = torch.rand(3, 15, generator=cpu_gen(1), dtype=dtype) + 0.1
    # tight stopping, so that stopping one iteration apart (rounding differs) cannot matter
    opts = dict(tol=1e-5, max_iter=500) if dtype == torch.float32 else dict(tol=1e-12, max_iter=2000)
    res_c = ms.geometric_median(G, w, **opts)
    res_g = ms.geometric_median(G.to(CUDA), w.to(CUDA), **opts)
    for t in (res_g.median, res_g.n_iter, res_g.converged):
        assert t.device.type == "cuda"
    assert res_g.median.dtype == dtype and res_g.median.shape == (4, 3, 6)
    assert res_g.n_iter.shape == (4, 3) and res_g.converged.shape == (4, 3)
    assert bool(res_g.converged.all()) and bool(res_c.converged.all())
    atol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(res_g.median.cpu(), res_c.median, rtol=0, atol=atol)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_geometric_median_half_on_cuda(half):
    G = torch.randn(2, 20, 3, generator=cpu_gen()).to(half)
    res = ms.geometric_median(G.to(CUDA))
    assert res.median.dtype == half and res.median.device.type == "cuda"
    torch.testing.assert_close(res.median.cpu().float(), ms.geometric_median(G).median.float(), rtol=0, atol=0.05)


def test_geometric_median_gradient_on_cuda():
    G = torch.randn(12, 3, generator=cpu_gen(), dtype=torch.float64).to(CUDA).requires_grad_(True)
    z = ms.geometric_median(G, tol=1e-12, max_iter=1000).median
    z.sum().backward()
    assert G.grad.device.type == "cuda" and torch.isfinite(G.grad).all()
    torch.testing.assert_close(G.grad.sum(0).cpu(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# no host synchronisation
# ---------------------------------------------------------------------------------------------


def test_sync_debug_mode_detects_a_sync(no_host_sync):
    # the detector works (so the tests below that pass under it mean something)
    x = torch.ones(3, device=CUDA)
    with pytest.raises(RuntimeError):
        with no_host_sync():
            x.sum().item()


@pytest.mark.parametrize("weighted", [False, True])
def test_geometric_median_fixed_iter_makes_no_host_sync(weighted, no_host_sync):
    G = torch.randn(8, 50, 16, generator=cpu_gen()).to(CUDA)
    w = (torch.rand(8, 50, generator=cpu_gen(1)) + 0.1).to(CUDA) if weighted else None
    ms.geometric_median(G, w, fixed_iter=True, max_iter=3)  # warm-up (library/kernel loading)
    with no_host_sync():
        res = ms.geometric_median(G, w, fixed_iter=True, max_iter=40)
    adaptive = ms.geometric_median(G, w, max_iter=40)
    assert torch.equal(res.median, adaptive.median)
    assert torch.equal(res.n_iter, adaptive.n_iter)
    assert torch.equal(res.converged, adaptive.converged)
    # the adaptive mode checks for convergence on the host once per iteration: it does sync
    with pytest.raises(RuntimeError):
        with no_host_sync():
            ms.geometric_median(G, w, max_iter=40)


@pytest.mark.parametrize("div", ["sq", "l2", "l1"])
def test_estimator_loop_makes_no_host_sync(div, no_host_sync):
    m = torch.zeros(4, 10, device=CUDA)
    gs = torch.randn(20, 4, 10, generator=cpu_gen()).to(CUDA)
    tau = torch.full((4,), 0.1, device=CUDA)
    ms.spp_step(m, gs[0], 0.1, div)  # warm-up
    with no_host_sync():
        for t in range(20):
            m = ms.spp_step(m, gs[t], tau, div)
            m = ms.sgd_step(m, gs[t], 0.1, div)
            ms.clip_l2(m, 1.0), ms.prox_l1(m, tau)
    assert torch.isfinite(m).all()


# ---------------------------------------------------------------------------------------------
# devices must match; sample_stable on CUDA
# ---------------------------------------------------------------------------------------------


def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="device"):
        ms.spp_step(torch.zeros(3), torch.zeros(3, device=CUDA), 0.1, "l2")
    with pytest.raises(ValueError, match="device"):
        ms.geometric_median(torch.zeros(5, 2, device=CUDA), torch.ones(5))


def test_sample_stable_on_cuda():
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = ms.sample_stable(1.5, 200_000, generator=g, dtype=torch.float64)
    assert x.device.type == "cuda" and x.dtype == torch.float64
    y = ss.levy_stable.rvs(1.5, 0.0, size=200_000, random_state=0)
    assert ss.ks_2samp(x.cpu().numpy(), y).pvalue > 1e-3
    g2 = torch.Generator(device=CUDA).manual_seed(0)
    assert torch.equal(x, ms.sample_stable(1.5, 200_000, generator=g2, dtype=torch.float64))
    assert ms.sample_stable(1.5, 10, device="cuda").device.type == "cuda"
    alpha = torch.tensor([[1.0], [2.0]], device=CUDA)
    assert ms.sample_stable(alpha, (2, 10), device=CUDA).shape == (2, 10)
    with pytest.raises(ValueError):
        ms.sample_stable(1.5, 10, generator=torch.Generator(), device=CUDA)
