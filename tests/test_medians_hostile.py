"""Hostile data for the medians and BGmD (issue 12), and a CPU proxy for host synchronisations
(issue 13).

* Property tests: a minority of rows (or of some rows' coordinates) huge (up to the dtype's largest
  finite value), tiny or ordinary but far; every result is finite, the coordinate-wise rules stay
  inside the honest rows' range, and the geometric median within ``C_a`` honest radii of the honest
  geometric median, ``C_a = 2 (1 - a) / (1 - 2 a)`` for a fraction ``a < 1/2`` of bad rows
  (Minsker 2015, Lemma 2.1: the breakdown bound, which any placement of the bad rows attains at
  most). The plain functions still raise on NaN/Inf input (a bug in the caller's code).
* ``no_host_reads``: inside it, every Python-level way of reading a tensor's value on the host
  (``item``, ``bool``, ``int``, ``float``, ``tolist``, ``nonzero``, boolean-mask indexing, ...)
  raises. On a GPU each of these is a synchronisation; the fixed-iteration paths must make none.
  The CPU-only fast paths that do read values (they cost nothing there) are switched to the
  device code path through ``_syncs_are_free``. CUDA's own detector runs in the ``cuda`` tests of
  test_medians.py and test_bgmd.py; this proxy runs everywhere.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import median_sgd as ms
import median_sgd.bgmd as bgmd_module
import median_sgd.weiszfeld as weiszfeld_module
from median_sgd.aggregators import make_aggregator
from median_sgd.optim import SampleMedianSGD

F64 = torch.float64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# ---------------------------------------------------------------------------------------------
# hostile matrices
# ---------------------------------------------------------------------------------------------


@st.composite
def hostile(draw):
    """(G, honest row mask): a minority of bad rows among honest ones, in a given dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(3, 12))
    d = draw(st.integers(1, 6))
    n_bad = draw(st.integers(1, (n - 1) // 2))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["huge", "huge-coordinates", "tiny", "far", "mixed-signs"]))
    g = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    scale = 10.0 ** draw(st.integers(-3, 3))
    honest = torch.randn(n - n_bad, d, generator=g, dtype=F64) * scale + draw(st.integers(-3, 3)) * scale
    u = torch.rand(n_bad, d, generator=g, dtype=F64)
    if kind == "huge":
        bad = big * (0.5 + 0.5 * u[:, :1]).expand(n_bad, d).clone()
    elif kind == "huge-coordinates":
        bad = honest[:n_bad].clone()
        bad[:, 0] = big * (0.5 + 0.5 * u[:, 0])
    elif kind == "tiny":
        bad = torch.finfo(dtype).tiny * u
    elif kind == "far":
        bad = torch.full((n_bad, d), min(1e4 * scale, big / 4), dtype=F64) * (1 + u)
    else:
        bad = big * (2 * u - 1)
    G = torch.cat([bad, honest]).to(dtype)
    perm = torch.randperm(n, generator=g)
    is_honest = torch.arange(n) >= n_bad
    return G[perm], is_honest[perm]


def _honest_range(G, is_honest):
    H = G[is_honest].double()
    return H.min(0).values, H.max(0).values


def _slack(G, is_honest):
    """Rounding allowance of a result in G's dtype: a few ulps of the honest values."""
    H = G[is_honest].double()
    return 4 * torch.finfo(G.dtype).eps * float(H.abs().max()) + torch.finfo(G.dtype).tiny


@given(hostile())
def test_coordinatewise_rules_stay_in_the_honest_range(case):
    G, is_honest = case
    lo, hi = _honest_range(G, is_honest)
    slack = _slack(G, is_honest)
    n, n_bad = G.shape[0], int((~is_honest).sum())
    for out in (ms.coordinate_median(G), ms.trimmed_mean(G, min(0.499, (n_bad + 0.25) / n))):
        assert out.dtype == G.dtype and torch.isfinite(out).all()
        assert torch.all(out.double() >= lo - slack) and torch.all(out.double() <= hi + slack)


@given(hostile(), st.booleans())
def test_geometric_median_within_the_breakdown_bound(case, fixed_iter):
    G, is_honest = case
    a = float((~is_honest).sum()) / G.shape[0]
    res = ms.geometric_median(G, max_iter=3000, fixed_iter=fixed_iter)
    assert res.median.dtype == G.dtype and torch.isfinite(res.median).all()
    H = G[is_honest].double()
    z_honest = ms.geometric_median(H, tol=1e-12, max_iter=5000).median
    radius = float(torch.linalg.vector_norm(H - z_honest, dim=-1).max())
    bound = 2 * (1 - a) / (1 - 2 * a)
    shift = float(torch.linalg.vector_norm(res.median.double() - z_honest))
    # the median is ~tol from the optimum (tol relative to the distances); half precision rounds
    assert shift <= bound * radius * (1 + 1e-3) + math.sqrt(G.shape[1]) * _slack(G, is_honest)


@given(hostile(), st.sampled_from(["mean", "median", "gm", None]), st.sampled_from(["norm", "topk"]))
def test_bgmd_finite_under_hostile_rows(case, rule, mode):
    G, _ = case
    agg = ms.BGmD(max(1, G.shape[1] // 2), mode=mode, memory=rule, generator=torch.Generator().manual_seed(0))
    for step in (G, G.flip(0), G):
        u = agg(step)
        assert u.dtype == G.dtype and torch.isfinite(u).all()
        assert torch.isfinite(agg.last_residual).all()
        assert agg.memory is None or torch.isfinite(agg.memory).all()


@pytest.mark.parametrize("name", ["gmd", "geometric_median", "bgmd", "cmd", "trimmed_mean"])
@pytest.mark.parametrize("far", [1e20, 3e38])
def test_aggregators_by_name_finite_with_a_huge_row(name, far):
    G = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    G[2] = far
    out = make_aggregator(name, **({"trim": 0.2} if name == "trimmed_mean" else {}))(G)
    assert torch.isfinite(out).all()
    if name in ("gmd", "geometric_median", "cmd", "trimmed_mean"):
        assert float(out.abs().max()) < 10  # the honest rows' scale, not the attacker's


def test_sample_median_sgd_geometric_median_finite_with_a_huge_sample():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    opt = SampleMedianSGD([w], lr=0.1, aggregate="geometric_median")
    g = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(2))
    g[0] = 1e20  # one sample's gradient: ||.|| overflowed float32 and the step was NaN
    w.grad_sample = g
    opt.step()
    assert torch.isfinite(w).all()


def test_plain_functions_still_raise_on_nan_and_inf():
    G = torch.randn(6, 3)
    for bad in (float("nan"), float("inf")):
        H = G.clone()
        H[1, 1] = bad
        for f in (ms.geometric_median, ms.coordinate_median, lambda X: ms.trimmed_mean(X, 0.2)):
            with pytest.raises(ValueError, match="NaN or Inf"):
                f(H)


# ---------------------------------------------------------------------------------------------
# no host reads on the fixed-iteration paths (a CPU proxy for CUDA's synchronisations)
# ---------------------------------------------------------------------------------------------


class HostRead(RuntimeError):
    """A tensor's value was read on the host (a device synchronisation on a GPU)."""


@contextlib.contextmanager
def no_host_reads():
    """Inside, reading any tensor's value on the host raises :class:`HostRead`; the CPU fast paths
    that read values (free on the CPU) are replaced by the device code paths. Value checks off."""

    def refuse(name):
        def method(*args, **kwargs):
            raise HostRead(f"{name} reads a tensor's value on the host")

        return method

    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise HostRead("boolean-mask indexing (its result's size depends on the values)")
        return getitem(self, index)

    with pytest.MonkeyPatch.context() as mp, ms.value_checks(False):
        for module in (weiszfeld_module, bgmd_module):
            mp.setattr(module, "_syncs_are_free", lambda device: False)
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
                     "__array__", "nonzero", "argwhere", "unique", "masked_select", "cpu",
                     "__repr__", "__format__"):
            mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("nonzero", "argwhere", "unique", "masked_select", "repeat_interleave"):
            mp.setattr(torch, name, refuse(f"torch.{name}"))
        mp.setattr(torch.Tensor, "__getitem__", checked_getitem)
        yield


def test_the_proxy_catches_host_reads():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: x[x > 0], lambda: int(x[0]),
                 lambda: x.tolist(), lambda: torch.nonzero(x), lambda: float(x.max())):
        with pytest.raises(HostRead):
            with no_host_reads():
                read()
    # positive controls: the adaptive geometric median checks convergence on the host, and the
    # CPU's ordered block selection reads a count (both by design)
    with pytest.raises(HostRead):
        with no_host_reads():
            ms.geometric_median(torch.randn(7, 3), max_iter=5)
    with pytest.raises(HostRead):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "__bool__", _refuse_bool)  # the CPU path itself, unguarded
            bgmd_module._largest(torch.rand(50), 5)


def _refuse_bool(self):
    raise HostRead("bool")


@pytest.mark.parametrize("shape", [(9, 5), (3, 12, 7), (16, 2**12 + 5)], ids=["small", "batched", "column-blocks"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gm_fixed_iter_reads_nothing_on_the_host(shape, weighted):
    g = torch.Generator().manual_seed(3)
    G = torch.randn(shape, generator=g) + 2.0
    G[..., 0, :] = 1e20  # the scaled path too
    w = torch.rand(shape[:-1], generator=g) + 0.1 if weighted else None
    if len(shape) == 2 and shape[1] > 1000:
        # the shape of a problem the adaptive mode hands to the Gram route: fixed_iter never does
        assert shape[0] <= weiszfeld_module._GRAM_MAX_N and shape[0] * shape[1] >= weiszfeld_module._GRAM_MIN_SIZE
    expected = ms.geometric_median(G, w, fixed_iter=True, max_iter=30)
    with no_host_reads():
        res = ms.geometric_median(G, w, fixed_iter=True, max_iter=30)
    assert torch.equal(res.median, expected.median)
    assert torch.equal(res.n_iter, expected.n_iter) and torch.equal(res.converged, expected.converged)


@pytest.mark.parametrize("rule", ["mean", "median", "gm", None])
@pytest.mark.parametrize("mode", ["norm", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bgmd_fixed_iter_reads_nothing_on_the_host(rule, mode, dtype):
    g = torch.Generator().manual_seed(4)
    steps = [torch.randn(8, 300, generator=g).to(dtype) for _ in range(3)]
    steps[1][0] = 6e4  # large values: the scaled statistics and the saturation too
    agg = ms.BGmD(30, mode=mode, memory=rule, fixed_iter=True, max_iter=20,
                  generator=torch.Generator().manual_seed(5))
    ref = ms.BGmD(30, mode=mode, memory=rule, fixed_iter=True, max_iter=20,
                  generator=torch.Generator().manual_seed(5))
    for G in steps:
        with no_host_reads():
            u = agg(G)
        expected = ref(G)  # the CPU path: the same blocks (in another order: other roundings)
        torch.testing.assert_close(u, expected, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)
        assert torch.equal(agg.last_block.sort().values, ref.last_block.sort().values)
