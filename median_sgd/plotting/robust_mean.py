"""Figures of chapter 1 (the median as a robust estimator of the mean)."""

from __future__ import annotations

from typing import Iterable, List, Optional

import matplotlib.pyplot as plt

from ._style import COLUMN_WIDTH, ROW_HEIGHT, estimator_style

__all__ = ["plot_outlier_scene", "plot_quantile_curves"]


def plot_outlier_scene(scene: dict, ax: Optional[plt.Axes] = None, *, legend: bool = True) -> plt.Axes:
    """The workshop paper's Fig. 1: a 2-D sample, outliers on an outer arc, and each estimate.

    The legend (``legend=True``) sits outside the axes, to their right, so it hides no point.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(COLUMN_WIDTH, 4.0), layout="constrained")
    pts, out = scene["points"].numpy(), scene["is_outlier"].numpy()
    ax.scatter(pts[~out, 0], pts[~out, 1], s=12, color="tab:blue", alpha=0.6, label="sample (inliers)")
    ax.scatter(pts[out, 0], pts[out, 1], s=12, color="tab:cyan", alpha=0.9, label="sample (outliers)")
    ax.scatter(*scene["true_mean"].numpy(), s=220, marker="*", color="black", zorder=5,
               label="population mean")
    for name, est in scene["estimates"].items():
        style = estimator_style(name)
        ax.scatter(*est.numpy(), s=90, zorder=6, edgecolor="white", linewidth=0.8,
                   label=f"sample {name}", **style)
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
    if ax is None:
        _, ax = plt.subplots(figsize=(COLUMN_WIDTH, ROW_HEIGHT), layout="constrained")
    names = list(dict.fromkeys(r["estimator"] for r in records)) if estimators is None else list(estimators)
    for name in names:
        rows = sorted((r for r in records if r["estimator"] == name), key=lambda r: r[x])
        xs = [r[x] for r in rows]
        style = estimator_style(name)
        ax.plot(xs, [r["median"] for r in rows], label=name, color=style["color"],
                marker=style["marker"], markersize=4)
        ax.fill_between(xs, [r["q10"] for r in rows], [r["q90"] for r in rows],
                        color=style["color"], alpha=0.15, linewidth=0)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if legend:
        ax.legend()
    return ax
