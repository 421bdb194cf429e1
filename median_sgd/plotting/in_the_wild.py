"""Figures of chapter 6 (gradient estimation in the wild; ``experiments.in_the_wild``)."""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from ._style import ROW_HEIGHT, estimator_style, figure_legend, names_in, panel_row, select

__all__ = ["training_style", "plot_training_curves", "plot_sweep"]

# SGD and practitioners' clipping are not estimators of a median across iterations: grey and
# brown, dashed; the online estimators keep the book's colours (momentum red, VClip green, ...).
_EXTRA = {
    "SGD": {"color": "black", "marker": "o", "linestyle": "--"},
    "clipped SGD": {"color": "tab:brown", "marker": "v", "linestyle": "--"},
}
_LABELS = {
    "test_accuracy": "test accuracy",
    "test_loss": "test loss",
    "train_loss": "training loss (full, clean)",
    "cosine": r"$\cos(m_t, \nabla L(w_t))$",
}


def training_style(method: str) -> dict:
    """Colour, marker and line style of a training method, the same in every figure."""
    if method in _EXTRA:
        return dict(_EXTRA[method])
    return {**estimator_style(method), "linestyle": "-"}


def plot_training_curves(
    curves: List[dict],
    metric: str = "test_accuracy",
    *,
    settings: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
    band: bool = True,
    ylim: Optional[Sequence[float]] = None,
    logy: bool = False,
) -> Sequence[plt.Axes]:
    """One panel per setting: ``metric`` against the step, the mean over seeds per method (line)
    and the min-max band over seeds; non-finite values (diverged runs) are left out. Without
    ``axes`` the panels share one row of the book's column; one legend below them."""
    settings = names_in(curves, "setting", settings)
    methods = names_in(curves, "method", methods)
    axes = panel_row(axes, len(settings), "settings", ROW_HEIGHT + 0.3, sharey=True)
    for ax, setting in zip(axes, settings):
        for method in methods:
            rows = [r for r in curves if r["setting"] == setting and r["method"] == method]
            if not rows:
                raise ValueError(f"no curves for {method!r} in setting {setting!r}")
            steps = sorted({r["step"] for r in rows})
            values = np.array([[r[metric] for r in rows if r["step"] == t] for t in steps], dtype=float)
            values = np.where(np.isfinite(values), values, np.nan)
            with warnings.catch_warnings():  # a step where every seed diverged: NaN, not drawn
                warnings.simplefilter("ignore", category=RuntimeWarning)
                mean, lo, hi = (np.nanmean(values, 1), np.nanmin(values, 1), np.nanmax(values, 1))
            style = training_style(method)
            ax.plot(steps, mean, color=style["color"], linestyle=style["linestyle"], label=method)
            if band:
                ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.12, linewidth=0)
        ax.set_title(setting)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_LABELS.get(metric, metric))
    figure_legend(axes, frameon=False)
    return axes


def plot_sweep(
    records: List[dict],
    *,
    metric: str = "accuracy_mean",
    settings: Optional[Sequence[str]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
    relative_to: Optional[dict] = None,
) -> Sequence[plt.Axes]:
    """One panel per setting: the final ``metric`` against the swept value (log scale), one line
    per (parameter, method). With ``relative_to`` (``{parameter: default value}``) the x-axis is
    the value divided by its default, so sweeps of different parameters share an axis. Without
    ``axes`` the panels share one row of the book's column; one legend below them."""
    settings = names_in(records, "setting", settings)
    axes = panel_row(axes, len(settings), "settings", ROW_HEIGHT + 0.3, sharey=True)
    lines = list(dict.fromkeys((r["parameter"], r["method"]) for r in records))
    for ax, setting in zip(axes, settings):
        for parameter, method in lines:
            rows = select(records, "value", setting=setting, method=method, parameter=parameter)
            if not rows:
                continue
            scale = 1.0 if relative_to is None else relative_to[parameter]
            style = training_style(method)
            ax.plot([r["value"] / scale for r in rows],
                    [r[metric] if math.isfinite(r[metric]) else np.nan for r in rows],
                    color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                    markersize=5, label=f"{method} ({parameter})")
        ax.set_xscale("log")
        xs = sorted({round(r["value"] / (1.0 if relative_to is None else relative_to[r["parameter"]]), 9)
                     for r in records})
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.3g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(setting)
        ax.set_xlabel("value / default" if relative_to is not None else "value")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("final test accuracy" if metric == "accuracy_mean" else metric)
    figure_legend(axes, ncol=2, frameon=False)  # some lines are not in every panel
    return axes
