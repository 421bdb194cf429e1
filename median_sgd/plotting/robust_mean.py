"""Figures of chapter 1 (the median as a robust estimator of the mean)."""

from __future__ import annotations

from typing import Iterable, List, Optional

import matplotlib.pyplot as plt

from ._style import ROW_HEIGHT, estimator_style, names_in, one_axes, draw_band, scatter_scene, select

__all__ = ["plot_outlier_scene", "plot_quantile_curves"]


def plot_outlier_scene(scene: dict, ax: Optional[plt.Axes] = None, *, legend: bool = True) -> plt.Axes:
    """The workshop paper's Fig. 1: a 2-D sample, outliers on an outer arc, and each estimate.

    The legend (``legend=True``) sits outside the axes, to their right, so it hides no point.
    """
    ax = one_axes(ax, 4.0)
    scatter_scene(ax, scene, "is_outlier", (("sample (inliers)", "tab:blue", 0.6),
                                            ("sample (outliers)", "tab:cyan", 0.9)),
                  size=12, star_size=220, estimate_size=90, edge_width=0.8)
    ax.set_aspect("equal")
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return ax


def plot_quantile_curves(
    records: List[dict],
    x: str,
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
    logx: bool = False,
    logy: bool = True,
    legend: bool = True,
) -> plt.Axes:
    """Median over seeds (line) and the 10%-90% band of each estimator against ``x``.

    ``legend=False`` leaves the legend to the caller (e.g. one ``fig.legend`` below the panels).
    """
    ax = one_axes(ax, ROW_HEIGHT)
    for name in names_in(records, "estimator", estimators):
        rows = select(records, x, estimator=name)
        draw_band(ax, [r[x] for r in rows], [r["median"] for r in rows], [r["q10"] for r in rows],
                  [r["q90"] for r in rows], label=name, markersize=4, **estimator_style(name))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if legend:
        ax.legend()
    return ax
