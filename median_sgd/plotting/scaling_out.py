"""Figures of chapter 13 (scaling out: robust DDP communication hooks through a Byzantine rank)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import estimator_style

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


def plot_byzantine_training(curves: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Test loss (log scale) and test accuracy against the step, one line per run."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = list(dict.fromkeys(r["run"] for r in curves))
    for label in runs:
        rows = sorted((r for r in curves if r["run"] == label), key=lambda r: r["step"])
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
    axes[1].legend(fontsize=8, loc="best")
    return axes


def plot_communication(runs: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Per step and rank: elements sent relative to the mean all-reduce, and collective calls."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    rows = [r for r in runs if r.get("attacked", True)]
    labels = [r["run"] for r in rows]
    y = np.arange(len(rows))
    colors = [run_style(label)["color"] for label in labels]
    axes[0].barh(y, [r["traffic_vs_mean"] for r in rows], color=colors)
    axes[0].axvline(1.0, color="black", linewidth=0.8)
    axes[0].set_xlabel("elements sent per rank, relative to the mean all-reduce")
    axes[1].barh(y, [r["collectives"] for r in rows], color=colors)
    axes[1].set_xlabel("collective calls per step (latency)")
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    return axes
