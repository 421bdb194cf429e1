"""Figures of chapter 3 (online estimators across iterations; ``experiments.tracking``)."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import matplotlib.pyplot as plt
from matplotlib.markers import MarkerStyle

from ._style import (
    COLUMN_WIDTH,
    draw_band,
    estimator_style,
    label_axes,
    names_in,
    one_axes,
    select,
)

__all__ = ["online_style", "plot_fixed_paths", "plot_fixed_estimates", "plot_fixed_curves", "plot_drift_error",
           "plot_drift_trace"]

# The explicit (stochastic subgradient, eq. 6) estimators are drawn dashed, the SPP ones solid.
_EXPLICIT = {"momentum (SGD)", "adaptive momentum", "signed increment"}
_TARGETS = ("mean", "geometric median", "coordinate median")


def online_style(name: str) -> dict:
    """Colour, marker and line style of an online estimator (dashed for the SGD versions)."""
    return {**estimator_style(name), "linestyle": "--" if name in _EXPLICIT else "-"}


def _line(name: str) -> dict:
    """Keyword arguments of ``ax.plot`` for an estimator (dashed SGD lines drawn on top)."""
    style = online_style(name)
    return {"color": style["color"], "linestyle": style["linestyle"], "zorder": 3 if name in _EXPLICIT else 2}


def _band(ax: plt.Axes, name: str, x: Sequence[float], rows: List[dict], band: bool,
          center: Optional[Sequence[float]] = None, **line_kw) -> None:
    """An estimator's median over seeds (or ``center``) against ``x``, with its 10-90% band."""
    low, high = ([r["q10"] for r in rows], [r["q90"] for r in rows]) if band else ((), ())
    draw_band(ax, x, [r["median"] for r in rows] if center is None else center, low, high,
              band=band, alpha=0.12, **line_kw, **_line(name))


def plot_fixed_paths(
    fixed: dict,
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
    xlim: Optional[Sequence[float]] = None,
    ylim: Optional[Sequence[float]] = None,
    samples: bool = True,
    paths: bool = True,
    until: Optional[int] = None,
    legend: bool = True,
) -> plt.Axes:
    """A 2-D fixed study: samples, the three centres, each estimator's tail average (marker)
    and, with ``paths``, its path ``m_0, ..., m_until`` for the first seed.

    The legend (``legend=True``) sits outside the axes, to their right, so it hides no sample.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(COLUMN_WIDTH, 4.2), layout="constrained")
    names = list(fixed["trace"]) if estimators is None else list(estimators)
    if samples:
        pts = fixed["samples"].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=5, color="tab:blue", alpha=0.25, label="samples $g_t$", zorder=1)
    for name in names:
        style = online_style(name)
        if paths:
            path = fixed["trace"][name][: None if until is None else until + 1].numpy()
            ax.plot(path[:, 0], path[:, 1], color=style["color"], linestyle=style["linestyle"],
                    linewidth=0.9, alpha=0.8, zorder=2)
        ax.scatter(*fixed["tail_average"][name].numpy(), s=45, marker=style["marker"],
                   color=style["color"], zorder=5, label=name)
    for target in _TARGETS:
        style = estimator_style(target)
        ax.scatter(*fixed["targets"][target].numpy(), s=260, marker=style["marker"],
                   facecolor="none", edgecolor=style["color"], linewidth=1.8, zorder=4,
                   label=f"population {target}")
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return ax


def plot_fixed_estimates(
    fixed: dict,
    ax: Optional[plt.Axes] = None,
    *,
    coordinate: int = 0,
    estimators: Optional[Iterable[str]] = None,
) -> plt.Axes:
    """One coordinate (relative to ``g_hat``) of each estimator's tail average, one row each.

    Small dots are the seeds' tail averages, the large marker their pooled average, and vertical
    lines the population mean, geometric median and coordinate-wise median.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    names = list(fixed["tail_average"]) if estimators is None else list(estimators)
    origin = float(fixed["targets"]["location"][coordinate])
    for target in _TARGETS:
        style = estimator_style(target)
        ax.axvline(float(fixed["targets"][target][coordinate]) - origin, color=style["color"],
                   linewidth=2, alpha=0.6, label=f"population {target}")
    for row, name in enumerate(names):
        style = online_style(name)
        seeds = fixed["tail_average_seeds"][name][:, coordinate].numpy() - origin
        ax.scatter(seeds, [row] * len(seeds), s=8, color=style["color"], alpha=0.35, zorder=3)
        edge = {"edgecolor": "black", "linewidth": 0.5} if MarkerStyle(style["marker"]).is_filled() else {}
        ax.scatter(float(fixed["tail_average"][name][coordinate]) - origin, row, s=80,
                   marker=style["marker"], color=style["color"], zorder=4, **edge)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel(rf"coordinate {coordinate + 1} of the tail average, minus $\hat g_{{{coordinate + 1}}}$")
    ax.grid(True, axis="x", alpha=0.3)
    return ax


def plot_fixed_curves(
    curves: List[dict],
    target: str,
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
    band: bool = True,
) -> plt.Axes:
    """Distance ``||m_t - target||`` against ``t`` (median over seeds, 10-90% band), log-log."""
    ax = one_axes(ax, 3.5, width=5, layout=None)
    for name in names_in(curves, "estimator", estimators):
        rows = [r for r in select(curves, "step", estimator=name, target=target) if r["step"] > 0]
        if not rows:
            raise ValueError(f"no curve records for estimator {name!r} and target {target!r}")
        _band(ax, name, [r["step"] for r in rows], rows, band, label=name)
    label_axes(ax, "iteration $t$", rf"$\|m_t - \mathrm{{{target.replace(' ', '~')}}}\|_2$",
               xscale="log", yscale="log")
    return ax


def plot_drift_error(
    records: List[dict],
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
    field: str = "median",
    band: bool = True,
) -> plt.Axes:
    """A drift record field (``"median"`` error, ``"lag"``, ...) against ``tau``, log-log.

    With ``field="median"`` the 10-90% band over seeds is shaded. Values <= 0 are not drawn.
    """
    ax = one_axes(ax, 4, width=5.5, layout=None)
    for name in names_in(records, "estimator", estimators):
        rows = select(records, "tau", estimator=name)
        # a log axis cannot show values <= 0 (a lag within noise of zero): leave them out
        ys = [r[field] if r[field] > 0 else float("nan") for r in rows]
        _band(ax, name, [r["tau"] for r in rows], rows, band and field == "median", center=ys,
              marker=online_style(name)["marker"], markersize=5, label=name)
    label_axes(ax, r"step size $\tau$", xscale="log", yscale="log")
    return ax


def plot_drift_trace(
    drift: dict,
    tau_index: int,
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
    last: Optional[int] = None,
) -> plt.Axes:
    """Position along the motion, ``<m_{t+1}, u>``, of each estimator (first seed) and of the target."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    names = list(drift["trace"]) if estimators is None else list(estimators)
    target = drift["target_trace"].numpy()
    start = 0 if last is None else max(0, len(target) - last)
    t = range(start, len(target))
    for name in names:
        ax.plot(t, drift["trace"][name][start:, tau_index].numpy(), linewidth=1, label=name, **_line(name))
    ax.plot(t, target[start:], color="black", linewidth=2, label=r"target $\langle x_t, u\rangle$")
    ax.set_xlabel("iteration $t$")
    ax.set_ylabel(r"position along $u$")
    ax.grid(True, alpha=0.3)
    return ax
