"""Figures of the chapter "Scaling out" (robust DDP communication hooks through a Byzantine rank)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import COLUMN_WIDTH, ROW_HEIGHT, estimator_style, names_in, select

__all__ = ["run_style", "plot_byzantine_training", "plot_communication"]

_BGMD = "tab:blue"  # BGmD's colour in part II


def run_style(label: str) -> dict:
    """Line style of a training run of :mod:`median_sgd.experiments.scaling_out` by its label."""
    if label == "mean, no attack":
        return {"color": "black", "linestyle": "--", "marker": None}
    if label.startswith("BGmD"):
        mean_memory = "mean memory" in label
        return {"color": "lightskyblue" if mean_memory else _BGMD,
                "linestyle": ":" if mean_memory else "-", "marker": "o"}
    style = estimator_style(label)
    # dashed, so that it stays visible where it coincides with the coordinate-wise median
    dashed = label.startswith("trimmed mean")
    return {"color": style["color"], "linestyle": (0, (4, 2)) if dashed else "-",
            "marker": style["marker"]}


def plot_byzantine_training(curves: List[dict], axes: Optional[Sequence[plt.Axes]] = None,
                            title: Optional[str] = None):
    """Test loss (log scale) and test accuracy against the step, one line per run.

    Without ``axes``: a figure the width of the book's column, the two panels side by side and
    one legend below them (it hides no curve); ``title`` above the panels.
    """
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(COLUMN_WIDTH, ROW_HEIGHT + 0.9),
                               layout="constrained")
    fig = axes[0].figure
    runs = names_in(curves, "run")
    if not runs:
        raise ValueError("no curves to plot")
    for label in runs:
        rows = select(curves, "step", run=label)
        steps = [r["step"] for r in rows]
        style = run_style(label)
        kw = dict(color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                  markersize=3.5, label=label)
        axes[0].plot(steps, [r["test_loss"] for r in rows], **kw)
        axes[1].plot(steps, [r["test_accuracy"] for r in rows], **kw)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("test loss (clean data)")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    if title:
        fig.suptitle(title)
    return axes


def plot_communication(runs: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Per step and rank: elements sent relative to the mean all-reduce, and collective calls.

    One horizontal bar per attacked run, its value written at its end; without ``axes`` a
    figure the width of the book's column.
    """
    rows = [r for r in runs if r.get("attacked", True)]
    if not rows:
        raise ValueError("no runs to plot")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(COLUMN_WIDTH, 0.32 * len(rows) + 1.1),
                               layout="constrained", sharey=True)
    labels = [r["run"] for r in rows]
    y = np.arange(len(rows))
    colors = [run_style(label)["color"] for label in labels]
    columns = [("traffic_vs_mean", "elements sent per rank\n(\u00d7 the mean all-reduce)", "{:.2f}"),
               ("collectives", "collective calls per step\n(latency)", "{:.0f}")]
    for ax, (key, xlabel, fmt) in zip(axes, columns):
        values = [r[key] for r in rows]
        ax.barh(y, values, color=colors, height=0.7)
        for yi, v in zip(y, values):
            ax.annotate(fmt.format(v), (v, yi), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_xlim(0, 1.22 * max(values))  # room for the values
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels)
    if not axes[0].yaxis_inverted():
        axes[0].invert_yaxis()
    if axes[1].get_shared_y_axes().joined(axes[0], axes[1]):
        axes[1].tick_params(labelleft=False)
    else:
        axes[1].set_yticks(y, [])
        axes[1].invert_yaxis()
    return axes
