"""Gradient aggregators ``agg(G) -> u``: one interface from the ``(..., n, d)`` rows to a ``(..., d)`` update.

The robust-training chapters ("Block geometric median descent", "What BGmD's memory remembers",
"Robust training experiments") compare these rules as the server's step of distributed SGD:
``x <- x - agg(gamma G)`` with one row of ``G`` per client (or per sample). Every aggregator is
positively homogeneous (``agg(c G) = c agg(G)`` for ``c > 0``), so scaling by the step size
before or after aggregating is the same, except for BGmD whose memory mixes steps.

* ``mean`` (SGD): ``mean_i G_i``; breakdown point 0.
* ``cmd``: coordinate-wise median (CmD; Yin et al. 2018).
* ``gmd``: geometric median (GmD), smoothed Weiszfeld.
* ``bgmd``: block geometric median with memory (:class:`median_sgd.BGmD`).
* ``trimmed_mean``: coordinate-wise trimmed mean (Yin et al. 2018).
* ``krum`` / ``multi_krum``: Krum (Blanchard et al. 2017): the row whose ``n - f - 2`` nearest
  other rows are closest in squared distance (multi-Krum averages the ``m`` best such rows).

Use :func:`make_aggregator` (``make_aggregator("cmd")``, ``make_aggregator("bgmd", k=0.1)``).
Every aggregator is a callable object with ``reset()`` (a no-op for the stateless ones) and keeps
``G``'s dtype and device; none modifies ``G``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, Optional

import torch

from ._checks import check_sample_matrix
from .bgmd import BGmD
from .medians import GeometricMedianResult, coordinate_median, geometric_median, trimmed_mean

__all__ = [
    "Aggregator",
    "Mean",
    "CoordinateMedian",
    "GeometricMedian",
    "TrimmedMean",
    "Krum",
    "BGmD",
    "krum",
    "krum_scores",
    "make_aggregator",
    "AGGREGATORS",
]


class Aggregator:
    """Base class: ``agg(G)`` maps ``(..., n, d)`` rows to a ``(..., d)`` update; ``reset()``."""

    name = "aggregator"

    def __call__(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state (a no-op for stateless aggregators)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Mean(Aggregator):
    """``mean_i G_i``: plain mini-batch SGD (breakdown point 0)."""

    name = "mean"

    def __call__(self, G):
        check_sample_matrix(G)
        return G.mean(dim=-2)


class CoordinateMedian(Aggregator):
    """``median_i G_ij`` per coordinate (CmD): :func:`median_sgd.coordinate_median`."""

    name = "cmd"

    def __call__(self, G):
        return coordinate_median(G)


class GeometricMedian(Aggregator):
    """``argmin_z sum_i ||z - G_i||`` (GmD): :func:`median_sgd.geometric_median`.

    ``gm_options`` (``eps``, ``tol``, ``max_iter``, ``fixed_iter``) go to the solver; the result
    of the last call is ``agg.last_gm`` (iterations, convergence).
    """

    name = "gmd"

    def __init__(self, **gm_options) -> None:
        unknown = sorted(set(gm_options) - {"eps", "tol", "max_iter", "fixed_iter"})
        if unknown:
            raise TypeError(f"unknown geometric_median option(s) {unknown}")
        self.gm_options = dict(gm_options)
        self.last_gm: Optional[GeometricMedianResult] = None

    def __call__(self, G):
        self.last_gm = geometric_median(G, **self.gm_options)
        return self.last_gm.median

    def reset(self) -> None:
        self.last_gm = None

    def __repr__(self) -> str:
        return f"GeometricMedian({', '.join(f'{k}={v!r}' for k, v in self.gm_options.items())})"


class TrimmedMean(Aggregator):
    """Per coordinate, the mean after dropping ``floor(trim n)`` values at each end."""

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not (0 <= trim < 0.5):
            raise ValueError(f"trim must be a number in [0, 0.5), got {trim!r}")
        self.trim = float(trim)

    def __call__(self, G):
        return trimmed_mean(G, self.trim)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim!r})"


def _check_f(f, n: int) -> int:
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
        raise ValueError(f"f (the number of Byzantine rows) must be an integer >= 0, got {f!r}")
    if n - int(f) - 2 < 1:
        raise ValueError(
            f"Krum needs n - f - 2 >= 1 neighbours (n >= f + 3; Blanchard et al. assume "
            f"n >= 2f + 3), got n = {n}, f = {f}"
        )
    return int(f)


def krum_scores(G: torch.Tensor, f: int) -> torch.Tensor:
    """``score_i = sum of ||G_i - G_j||^2`` over the ``n - f - 2`` rows ``j != i`` closest to ``G_i``.

    Shape ``(..., n)``. Blanchard, El Mhamdi, Guerraoui, Stainer (NeurIPS 2017), eq. of Sec. 4.
    (The self-distance 0 is excluded, unlike the BGmD authors' code.)
    """
    check_sample_matrix(G)
    n = G.shape[-2]
    f = _check_f(f, n)
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    sq = torch.cdist(work, work).square()  # (..., n, n)
    # Exclude i itself: push the diagonal to +inf, then the n - f - 2 smallest of each row.
    eye = torch.eye(n, dtype=torch.bool, device=G.device)
    sq = sq.masked_fill(eye, float("inf"))
    nearest = torch.topk(sq, n - f - 2, dim=-1, largest=False).values
    return nearest.sum(-1).to(G.dtype)


def krum(G: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """Krum (``m = 1``): the row of smallest :func:`krum_scores`; multi-Krum: the mean of the ``m`` best rows."""
    scores = krum_scores(G, f)
    n = G.shape[-2]
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= n:
        raise ValueError(f"m must be an integer in [1, n = {n}], got {m!r}")
    best = torch.topk(scores, int(m), dim=-1, largest=False).indices  # (..., m)
    rows = torch.gather(G, -2, best.unsqueeze(-1).expand(*best.shape, G.shape[-1]))
    return rows.mean(dim=-2)


class Krum(Aggregator):
    """Krum / multi-Krum with ``f`` Byzantine rows assumed (:func:`krum`)."""

    name = "krum"

    def __init__(self, f: int, m: int = 1) -> None:
        if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
            raise ValueError(f"f (the number of Byzantine rows) must be an integer >= 0, got {f!r}")
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        self.f, self.m = int(f), int(m)

    def __call__(self, G):
        return krum(G, self.f, self.m)

    def __repr__(self) -> str:
        return f"Krum(f={self.f}, m={self.m})"


def _bgmd(k=0.1, **options) -> BGmD:
    return BGmD(k, **options)


def _multi_krum(f: int, m: Optional[int] = None) -> Krum:
    # Blanchard et al.'s multi-Krum uses m = n - f rows; n is not known before the first call,
    # so m must be given here.
    if m is None:
        raise ValueError("multi_krum needs m, the number of rows averaged (e.g. n - f)")
    return Krum(f, m)


AGGREGATORS: Dict[str, Callable[..., Aggregator]] = {
    "mean": Mean,
    "sgd": Mean,
    "cmd": CoordinateMedian,
    "coordinate_median": CoordinateMedian,
    "gmd": GeometricMedian,
    "gm": GeometricMedian,
    "geometric_median": GeometricMedian,
    "bgmd": _bgmd,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": _multi_krum,
}


def make_aggregator(name: str, **options):
    """An aggregator by name: ``"mean"``/``"sgd"``, ``"cmd"``, ``"gmd"``, ``"bgmd"``,
    ``"trimmed_mean"``, ``"krum"``, ``"multi_krum"`` (aliases: ``"coordinate_median"``, ``"gm"``,
    ``"geometric_median"``); ``options`` are its constructor's keywords (``bgmd``: ``k`` (default
    0.1, the paper's 10%), ``mode``, ``memory``, ``generator``, Weiszfeld options; ``krum``: ``f``,
    ``m``; ``trimmed_mean``: ``trim``; ``gmd``: Weiszfeld options)."""
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(sorted(AGGREGATORS))}")
    try:
        return AGGREGATORS[key](**options)
    except TypeError as err:
        raise TypeError(f"bad options for aggregator {name!r}: {err}") from None
