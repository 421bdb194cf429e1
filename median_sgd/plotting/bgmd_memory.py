"""Figures of the chapter "What BGmD's memory remembers" (memory rules of BGmD under corruption)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import COLUMN_WIDTH, ROW_HEIGHT, figure_legend
from .bgmd import method_style

__all__ = ["memory_style", "plot_memory_errors", "plot_memory_curves", "plot_memory_training"]

_RULES = {
    "BGmD, mean memory (paper)": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "BGmD, median memory": {"color": "tab:olive", "marker": "s", "linestyle": "-"},
    "BGmD, GM memory": {"color": "tab:pink", "marker": "P", "linestyle": "--"},
    "BGmD, no memory": {"color": "tab:gray", "marker": "v", "linestyle": ":"},
}
_REFERENCES = {"SGD": "SGD", "CmD": "CmD", "GmD": "GmD"}


def memory_style(name: str) -> dict:
    """Colour, marker and line style of a BGmD memory rule or a reference aggregator."""
    if name in _RULES:
        return dict(_RULES[name])
    style = method_style(_REFERENCES.get(name, name))
    style.setdefault("linestyle", "-")
    return style


def _names(records: List[dict]) -> List[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def _grid(panels: int, row_height: float = ROW_HEIGHT, **kw):
    """A column-wide figure of ``panels`` panels, at most 2 per row for 4 panels and 3 otherwise,
    with room below for the legend (constrained layout)."""
    cols = 2 if panels == 4 else min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(COLUMN_WIDTH, rows * row_height + 0.8),
                             layout="constrained", squeeze=False, **kw)
    for ax in axes.ravel()[panels:]:
        ax.set_visible(False)
    return axes.ravel()[:panels]


def plot_memory_errors(final: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Relative error of the average update after T steps against the corrupted fraction psi,
    one panel per noise level sigma; the band is the spread over seeds (10%-90%)."""
    sigmas = sorted({r["sigma"] for r in final})
    if axes is None:
        axes = _grid(len(sigmas), sharey=True)
    panels = np.atleast_1d(axes).ravel()
    for ax, sigma in zip(panels, sigmas):
        for name in _names(final):
            rows = sorted((r for r in final if r["method"] == name and r["sigma"] == sigma),
                          key=lambda r: r["psi"])
            style = memory_style(name)
            psis = [100 * r["psi"] for r in rows]
            ax.plot(psis, [r["median"] for r in rows], label=name, markersize=5, **style)
            ax.fill_between(psis, [r["q10"] for r in rows], [r["q90"] for r in rows],
                            color=style["color"], alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel(r"corrupted rows $\psi$ (%)")
        ax.set_title(rf"noise $\sigma = {sigma:g}$")
        ax.grid(True, which="major", alpha=0.3)
    panels[0].set_ylabel("relative error of the\naverage update")
    figure_legend(panels, 3, *panels[0].get_legend_handles_labels())
    return panels


def plot_memory_curves(curves: List[dict], sigma: float, axes: Optional[Sequence[plt.Axes]] = None,
                       *, psis: Optional[Sequence[float]] = None):
    """Relative error of the running average of the updates against the step, one panel per
    corrupted fraction (at noise level ``sigma``)."""
    rows = [r for r in curves if r["sigma"] == sigma]
    psis = sorted({r["psi"] for r in rows}) if psis is None else list(psis)
    if axes is None:
        axes = _grid(len(psis), row_height=2.3, sharex=True, sharey=True)
    panels = np.atleast_1d(axes).ravel()
    for ax, psi in zip(panels, psis):
        for name in _names(rows):
            pts = sorted((r for r in rows if r["method"] == name and r["psi"] == psi),
                         key=lambda r: r["step"])
            style = memory_style(name)
            style.pop("marker")
            ax.plot([r["step"] for r in pts], [r["error"] for r in pts], label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("step $t$")
        ax.set_title(rf"$\psi = {100 * psi:g}\%$")
        ax.grid(True, which="major", alpha=0.3)
    for ax in panels:
        if ax.get_subplotspec() is None or ax.get_subplotspec().is_first_col():
            ax.set_ylabel("relative error of the\naverage update")
        if ax.get_subplotspec() is not None and not ax.get_subplotspec().is_last_row():
            ax.set_xlabel("")
    figure_legend(panels, 3, *panels[0].get_legend_handles_labels())
    return panels


def plot_memory_training(records: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Test accuracy against the iteration, one panel per corrupted fraction; a run that
    diverged (stopped by the training loop) is a cross at the iteration it was stopped, drawn at
    chance level 0.1 (its accuracy is undefined)."""
    psis = sorted({r["psi"] for r in records})
    if axes is None:
        axes = _grid(len(psis), sharey=True)
    panels = np.atleast_1d(axes).ravel()
    for ax, psi in zip(panels, psis):
        for name in _names(records):
            rows = sorted((r for r in records if r["method"] == name and r["psi"] == psi),
                          key=lambda r: r["iteration"])
            if not rows:
                continue
            style = memory_style(name)
            style.pop("marker")
            ok = [r for r in rows if not r["diverged"]]
            ax.plot([r["iteration"] for r in ok], [r["test_accuracy"] for r in ok], label=name,
                    **style)
            if rows[-1]["diverged"]:  # stopped: a cross at chance level where it was stopped
                ax.plot([rows[-1]["iteration"]], [0.1], marker="x", markersize=9,
                        color=style["color"], linestyle="none")
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 1)
        ax.set_title(rf"bit flip, $\psi = {100 * psi:g}\%$" if psi else "clean")
        ax.grid(True, alpha=0.3)
    for ax in panels:
        if ax.get_subplotspec() is None or ax.get_subplotspec().is_first_col():
            ax.set_ylabel("test accuracy")
    figure_legend(panels, 2, *panels[0].get_legend_handles_labels())
    return panels
