"""Rules over the rows of a ``(..., n, d)`` matrix that count: ``ok`` (..., n) masks the others.

The aggregators (:mod:`median_sgd.aggregators`) drop the rows that are not finite, and the DDP
hook (:mod:`median_sgd.distributed`) the ranks whose bucket is not: both run these rules. Shapes
never depend on the mask (no boolean indexing, no host synchronisation). On finite data the mean,
the medians and the geometric median's weights give what the plain functions compute (bit for
bit: the training chapters' outputs depend on it); the trimmed mean sums the same values in
another order.
"""

from __future__ import annotations

import torch

from ._numerics import known_all, midpoint


def finite_rows(G: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` bool: the rows of ``G`` whose entries are all finite (their largest and
    smallest entries are: NaN and inf propagate through both). Two reductions, no temporary of
    ``G``'s size (``|G|`` was one: on a CPU, fresh pages cost 5-10 times the reductions)."""
    return torch.isfinite(G.amax(-1)) & torch.isfinite(G.amin(-1))


def zero_dropped(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``G`` with the rows outside ``ok`` set to 0 (finite placeholders that get weight 0): a new
    tensor, or ``G`` itself where every row is ok and the host can tell at no cost (the CPU; no
    copy of ``G``). Callers only read it."""
    return G if known_all(ok) else torch.where(ok.unsqueeze(-1), G, 0)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_rows_over(terms: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``sum_i terms_i / count`` over dim -2, in the accumulation dtype; 0 where ``count`` is 0.

    ``terms`` (..., n, d) holds 0 in the rows that do not count, ``count`` (..., 1) the number of
    rows that do. Half precision is summed in float32. The plain ``sum / count`` (what ``mean``
    computes, bit for bit) overflows only when the terms are huge; there the sum is redone from
    ``terms / count``, each term at most ``max / count``, whose sum cannot overflow.
    """
    acc = acc_dtype(terms.dtype)
    safe = count.clamp_min(1)
    fast = terms.sum(-2, dtype=acc) / safe
    if known_all(torch.isfinite(fast)):  # no overflow: no G-sized temporary for the redo
        return torch.where(count > 0, fast, 0)
    scaled = (terms.to(acc) / safe.unsqueeze(-1)).sum(-2)
    out = torch.where(torch.isfinite(fast), fast, scaled)
    return torch.where(count > 0, out, 0)


def masked_mean(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``mean_{i: ok_i} G_i`` (..., d) in ``G``'s dtype; 0 where no row is ok."""
    count = ok.sum(-1, keepdim=True)
    return sum_rows_over(zero_dropped(G, ok), count).to(G.dtype)


def sorted_with_dropped_last(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Every column of ``G`` sorted, the rows outside ``ok`` moved to the end (as +inf)."""
    return (G if known_all(ok) else torch.where(ok.unsqueeze(-1), G, torch.inf)).sort(dim=-2).values


def masked_coordinate_median(G: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``median_{i: ok_i} G_ij`` per coordinate (..., d); the mean of the two middle values for an
    even count (as :func:`median_sgd.coordinate_median`); 0 where no row is ok.

    The middle of two values is ``(a + b) / 2``, or ``a / 2 + b / 2`` where ``a + b`` overflows.
    """
    n, d = G.shape[-2], G.shape[-1]
    m = ok.sum(-1, keepdim=True)  # (..., 1) rows that count
    s = sorted_with_dropped_last(G, ok)
    lower = torch.div(m - 1, 2, rounding_mode="floor").clamp_min(0)
    upper = torch.div(m, 2, rounding_mode="floor").clamp_max(n - 1)
    shape = (*G.shape[:-2], 1, d)
    a = s.gather(-2, lower.unsqueeze(-1).expand(shape)).squeeze(-2)
    b = s.gather(-2, upper.unsqueeze(-1).expand(shape)).squeeze(-2)
    return torch.where(m > 0, midpoint(a, b), 0)


def masked_trimmed_mean(G: torch.Tensor, ok: torch.Tensor, t: int) -> torch.Tensor:
    """Per coordinate, the mean of the ok values after dropping ``min(t, (m - 1) // 2)`` of them
    at each end (``m`` ok rows, ``t = floor(trim n)`` for all ``n`` rows); 0 where no row is ok.

    Dropped rows do not lower the number trimmed: the rule still tolerates ``t`` bad values that
    look finite, however many others were dropped, as long as one value is left (down to the
    median when fewer than ``2 t + 1`` rows remain).
    """
    n = G.shape[-2]
    m = ok.sum(-1, keepdim=True)  # (..., 1)
    if t == 0:
        return masked_mean(G, ok)
    trimmed = torch.minimum(torch.div(m - 1, 2, rounding_mode="floor").clamp_min(0),
                            torch.full_like(m, t))
    s = sorted_with_dropped_last(G, ok)
    pos = torch.arange(n, device=G.device)
    keep = (pos >= trimmed) & (pos < m - trimmed)  # (..., n): positions t .. m - t - 1
    terms = torch.where(keep.unsqueeze(-1), s, 0)
    return sum_rows_over(terms, m - 2 * trimmed).to(G.dtype)


def gm_weights(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weights for :func:`geometric_median`: 1 on the ok rows, 0 elsewhere; all 1 where no row is
    ok (the rows are then zeroed placeholders, whose median is 0)."""
    w = ok.to(dtype)
    return torch.where(ok.any(-1, keepdim=True), w, torch.ones_like(w))
