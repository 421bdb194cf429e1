"""No host synchronisation, checked on the CPU: torch.compile(fullgraph=True) must trace the hot
paths in one graph. A Python ``bool``/``.item()`` on a tensor (what a GPU host sync is made of)
would break the graph and raise. The adaptive geometric median, which stops on a tensor
condition, is the positive control: it must fail to trace.
"""

import pytest
import torch

import median_sgd as ms

torch._dynamo.config.cache_size_limit = 64
# What fullgraph tracing raises on a data-dependent Python branch (a host sync on a GPU).
GRAPH_BREAK = torch._dynamo.exc.TorchDynamoException


def trace(f):
    torch._dynamo.reset()
    return torch.compile(f, fullgraph=True, backend="eager")


def test_fixed_iter_geometric_median_has_no_host_sync():
    def f(G, w):
        with ms.value_checks(False):
            return ms.geometric_median(G, w, fixed_iter=True, max_iter=6).median

    G = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0))
    w = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) + 0.1
    torch.testing.assert_close(trace(f)(G, w), f(G, w))


def test_adaptive_geometric_median_syncs_positive_control():
    def f(G):
        with ms.value_checks(False):
            return ms.geometric_median(G, max_iter=6).median

    with pytest.raises(GRAPH_BREAK):
        trace(f)(torch.randn(16, 8))


@pytest.mark.parametrize("div", ["sq", "l2", "l1"])
@pytest.mark.parametrize("step", [ms.spp_step, ms.sgd_step], ids=["spp", "sgd"])
def test_estimator_loop_has_no_host_sync(step, div):
    def f(m, G, tau):
        with ms.value_checks(False):
            for g in G:
                m = step(m, g, tau, div)
            return m

    G = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(2))
    m0, tau = torch.zeros(3, 7), torch.full((3,), 0.3)
    torch.testing.assert_close(trace(f)(m0, G, tau), f(m0, G, tau))


def test_value_checks_do_sync_so_they_can_be_switched_off():
    def f(v):
        return ms.clip_l2(v, 1.0)  # value checks on: a finiteness test reads the data

    with pytest.raises(GRAPH_BREAK):
        trace(f)(torch.randn(3, 4))


def test_medians_and_sampler_have_no_host_sync():
    def f(G, alpha):
        with ms.value_checks(False):
            noise = ms.sample_stable(alpha, G.shape, dtype=G.dtype)
            return ms.coordinate_median(G + noise), ms.trimmed_mean(G, 0.2)

    G = torch.randn(9, 4)
    cm, tm = trace(f)(G, torch.full((9, 1), 1.5))
    assert cm.shape == tm.shape == (4,)
