"""The power-of-two scale that keeps norms and sums from overflowing (``_numerics.pow2_scale``),
at the top of float64's range: found by mutation testing (the NaN guard of the aggregator's BGmD
memory, ``aggregators.py`` line 463, was reached only because the scale was 0 there).

``int(math.log2(finfo.max)) + 1`` is 128 for float32 but 1025 for float64 (log2 of float64's
largest value rounds to 1024.0), so the clip of the exponent let the scale reach 2**-1023, whose
bits are those of 0.0: every float64 value from 2**1022 (4.5e307) on was scaled to 0, and the
BGmD column statistics, ``geometric_median_objective`` and ``scaled_l2_norm`` (the DDP hook's
distances) gave 0 or NaN. Each is checked here against its formula.
"""

from __future__ import annotations

import math

import pytest
import torch

import median_sgd as ms
from median_sgd._numerics import pow2_scale, scaled_l2_norm
from median_sgd.aggregators import make_aggregator

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pow2_scale_is_a_normal_power_of_two_up_to_the_largest_value(dtype):
    info = torch.finfo(dtype)
    top = math.frexp(info.max)[1]  # 128, 1024
    amax = torch.tensor([2.0 ** (top - 24), 2.0 ** (top - 3), 2.0 ** (top - 2), 2.0 ** (top - 1), info.max],
                        dtype=dtype)
    s = pow2_scale(amax)
    assert bool((s >= info.tiny).all())  # normal, not 0
    assert bool((torch.frexp(s).mantissa == 0.5).all())  # a power of two
    scaled = amax * s
    assert bool(((scaled >= 0.5) & (scaled < 4.0)).all())  # within the clip's 2 binades of 1


def test_scaled_l2_norm_near_the_largest_float64():
    v = torch.tensor([8e307, -6e307, 0.0], dtype=F64)
    torch.testing.assert_close(scaled_l2_norm(v), torch.tensor(1e308, dtype=F64), rtol=1e-15, atol=0)


def test_geometric_median_objective_near_the_largest_float64():
    G = torch.tensor([[1e308, 0.0], [0.0, 0.0], [0.0, -5e307]], dtype=F64)
    z = torch.zeros(2, dtype=F64)
    torch.testing.assert_close(ms.geometric_median_objective(G, z), torch.tensor(1.5e308, dtype=F64),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("make", [lambda: ms.BGmD(2, mode="topk"),
                                  lambda: make_aggregator("bgmd", k=2, mode="topk")])
def test_bgmd_block_and_memory_near_the_largest_float64(make):
    # identical rows: the block is the two columns of largest norm, the update those values,
    # the mean memory the other columns' values
    big = torch.finfo(F64).max
    G = torch.tensor([[big, -big / 2, 1.0, 2.0, 3.0]] * 4, dtype=F64)
    agg = make()
    u = agg(G)
    assert agg.last_block.tolist() == [0, 1]
    torch.testing.assert_close(u, torch.tensor([big, -big / 2, 0.0, 0.0, 0.0], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(agg.memory, torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0], dtype=F64), rtol=1e-15, atol=0)
