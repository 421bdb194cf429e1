"""Figures of the chapter "What BGmD's memory remembers" (memory rules of BGmD under corruption)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import matplotlib.pyplot as plt

from ._style import figure_legend, names_in, panel_grid, draw_band, select
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


def plot_memory_errors(final: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Relative error of the average update after T steps against the corrupted fraction psi,
    one panel per noise level sigma; the band is the spread over seeds (10%-90%)."""
    sigmas = sorted({r["sigma"] for r in final})
    panels = panel_grid(len(sigmas), axes, sharey=True)
    for ax, sigma in zip(panels, sigmas):
        for name in names_in(final, "method"):
            rows = select(final, "psi", method=name, sigma=sigma)
            style = memory_style(name)
            draw_band(ax, [100 * r["psi"] for r in rows], [r["median"] for r in rows],
                      [r["q10"] for r in rows], [r["q90"] for r in rows], label=name,
                      markersize=5, **style)
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
    panels = panel_grid(len(psis), axes, row_height=2.3, sharex=True, sharey=True)
    for ax, psi in zip(panels, psis):
        for name in names_in(rows, "method"):
            pts = select(rows, "step", method=name, psi=psi)
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
    panels = panel_grid(len(psis), axes, sharey=True)
    for ax, psi in zip(panels, psis):
        for name in names_in(records, "method"):
            rows = select(records, "iteration", method=name, psi=psi)
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
