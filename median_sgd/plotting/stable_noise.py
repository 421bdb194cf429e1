"""Figures of chapter 4 (estimating a gradient under alpha-stable noise; the workshop paper's Fig. 2)."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cm, colors

from ._style import (
    draw_band,
    estimator_style,
    label_axes,
    names_in,
    one_axes,
    panel_row,
    select,
)

__all__ = ["plot_final_error", "plot_convergence"]

_LEGENDS = ("below", "inside", None)


def plot_final_error(
    records: List[dict],
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
    center: str = "median",
    logy: bool = True,
    legend: Optional[str] = "below",
) -> plt.Axes:
    """Fig. 2 (left): final relative error against 1/alpha, a line per estimator (``center`` over
    seeds) and the min-max band over seeds.

    Without ``ax`` the figure spans the book's column (constrained layout). ``legend="below"``
    puts one legend under the axes, outside the data (``loc="outside lower center"``: give the
    figure ``layout="constrained"``); ``"inside"`` lets matplotlib place it in the axes; ``None``
    draws none.
    """
    if legend not in _LEGENDS:
        raise ValueError(f"legend must be one of {_LEGENDS}, got {legend!r}")
    ax = one_axes(ax, 3.3)
    for name in names_in(records, "estimator", estimators):
        rows = select(records, "inv_alpha", estimator=name)
        if not rows:
            raise ValueError(f"no records for estimator {name!r}")
        draw_band(ax, [r["inv_alpha"] for r in rows], [r[center] for r in rows],
                  [r["min"] for r in rows], [r["max"] for r in rows], label=name, markersize=4,
                  **estimator_style(name))
    label_axes(ax, r"$1/\alpha$ (heavier tails to the right)",
               r"final $\|m_T - \hat g\|_2 / \|\hat g\|_2$", yscale="log" if logy else None)
    if legend == "below":
        handles, labels = ax.get_legend_handles_labels()
        ax.figure.legend(handles, labels, loc="outside lower center", ncol=len(labels),
                         frameon=False)
    elif legend == "inside":
        ax.legend()
    return ax


def plot_convergence(
    curves: List[dict],
    *,
    estimators: Sequence[str],
    inv_alphas: Optional[Sequence[float]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
    center: str = "median",
    cmap: str = "viridis",
    logy: bool = True,
) -> Sequence[plt.Axes]:
    """Fig. 2 (right): relative error against the iteration, one panel per estimator, one line per
    noise level coloured by 1/alpha (``center`` over seeds), with a shared colour bar.

    Without ``axes`` the panels share one row of the book's column (constrained layout)."""
    if inv_alphas is None:
        inv_alphas = sorted({r["inv_alpha"] for r in curves})
    axes = panel_row(axes, len(estimators), "estimators", sharey=True)
    norm = colors.Normalize(vmin=min(inv_alphas), vmax=max(inv_alphas))
    colormap = plt.get_cmap(cmap)
    for ax, name in zip(axes, estimators):
        for inv_alpha in inv_alphas:
            rows = select(curves, "step", estimator=name, inv_alpha=inv_alpha)
            if not rows:
                raise ValueError(f"no curve for estimator {name!r} at 1/alpha = {inv_alpha}")
            ax.plot([r["step"] for r in rows], [r[center] for r in rows],
                    color=colormap(norm(inv_alpha)), linewidth=1.2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(name, color=estimator_style(name)["color"])
        ax.set_xlabel("iteration $t$")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(r"$\|m_t - \hat g\|_2 / \|\hat g\|_2$")
    bar = plt.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), ax=list(axes), pad=0.01)
    bar.set_label(r"$1/\alpha$")
    bar.set_ticks(np.linspace(min(inv_alphas), max(inv_alphas), 5))
    return axes
