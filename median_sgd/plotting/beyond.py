"""Figures of chapter 8 (beyond the paper): the l_p family, the sample size, Clip21, centred clipping."""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import COLUMN_WIDTH, ROW_HEIGHT, estimator_style, figure_legend, label_axes, names_in, one_axes

__all__ = [
    "noise_style",
    "plot_lp_errors",
    "plot_lp_tradeoff",
    "plot_batch_size",
    "plot_clip21",
    "plot_centered_clipping",
]

_NOISE_COLORS = {"gaussian": "tab:blue", "cauchy": "tab:orange", "stable 2/3": "tab:red",
                 "contaminated": "tab:brown"}
_NOISE_MARKERS = {"gaussian": "o", "cauchy": "s", "stable 2/3": "^", "contaminated": "D"}


def noise_style(name: str) -> dict:
    """Colour and marker of a noise model of the l_p study."""
    return {"color": _NOISE_COLORS.get(name, "tab:gray"), "marker": _NOISE_MARKERS.get(name, "o")}


def _p_label(p: float) -> str:
    return r"$\infty$" if math.isinf(p) else f"{p:g}"


def _rows(records: List[dict], **where) -> List[dict]:
    rows = [r for r in records if all(r[k] == v for k, v in where.items())]
    if not rows:
        raise ValueError(f"no records with {where}")
    return rows


def plot_lp_errors(records: List[dict], *, rule: str, ax: Optional[plt.Axes] = None,
                   noises: Optional[Iterable[str]] = None, legend: bool = True) -> plt.Axes:
    """Final relative error (median over seeds, min-max band) against p, one line per noise model.

    ``p`` is drawn at evenly spaced positions (``inf`` last). ``legend=False`` leaves the legend
    out (for a figure of several panels with one legend)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * COLUMN_WIDTH, ROW_HEIGHT), layout="constrained")
    ps = sorted({r["p"] for r in records})
    x = np.arange(len(ps))
    noises = names_in(records, "noise", noises)
    for noise in noises:
        rows = {r["p"]: r for r in _rows(records, rule=rule, noise=noise)}
        style = noise_style(noise)
        ax.plot(x, [rows[p]["median"] for p in ps], label=noise, **style, markersize=5)
        ax.fill_between(x, [rows[p]["min"] for p in ps], [rows[p]["max"] for p in ps],
                        color=style["color"], alpha=0.12, linewidth=0)
    ax.set_xticks(x, [_p_label(p) for p in ps])
    ax.set_yscale("log")
    ax.set_xlabel(r"$p$ (SPP on $\mathcal{D} = \|\cdot\|_p$)")
    ax.set_ylabel(r"final $\|m_T - \hat g\|_2 / \|\hat g\|_2$")
    ax.grid(True, which="major", alpha=0.3)
    if legend:
        ax.legend()
    return ax


def _p_colors(ps: Sequence[float]) -> dict:
    """A colour per p: a sequential ramp over the finite p, black for ``inf``."""
    finite = [p for p in ps if not math.isinf(p)]
    ramp = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(finite), 1)))
    colors = {p: ramp[i] for i, p in enumerate(finite)}
    colors.update({p: "black" for p in ps if math.isinf(p)})
    return colors


def plot_lp_tradeoff(records: List[dict], *, rule: str, axes: Optional[Sequence[plt.Axes]] = None,
                     noises: Optional[Iterable[str]] = None,
                     steps: Optional[int] = None) -> Sequence[plt.Axes]:
    """Robustness against speed, one panel per noise model: final error (y) against the
    iterations needed to reach the threshold (x), a point per p, joined in the order of p.

    The colour of a point is its p (one legend for the figure, no labels on the points, so
    close points stay readable); ``p`` that never reach the threshold are drawn at ``steps``
    (if given) with open markers, or left out. Without ``axes`` the panels are a 2-column grid
    spanning the book's column, each with its own scales."""
    noises = names_in(records, "noise", noises)
    if axes is None:
        n_rows = math.ceil(len(noises) / 2)
        _, grid = plt.subplots(n_rows, 2, figsize=(COLUMN_WIDTH, 2.3 * n_rows + 0.5), squeeze=False,
                               layout="constrained")
        for ax in grid.ravel()[len(noises):]:
            ax.set_visible(False)
        axes = list(grid.ravel()[:len(noises)])
    axes = list(axes)
    if len(axes) != len(noises):
        raise ValueError(f"got {len(axes)} axes for {len(noises)} noise models")
    ps = sorted({r["p"] for r in records})
    colors = _p_colors(ps)
    for ax, noise in zip(axes, noises):
        rows = sorted(_rows(records, rule=rule, noise=noise), key=lambda r: r["p"])
        xs = [r["steps_to_threshold"] if r["steps_to_threshold"] is not None else steps for r in rows]
        keep = [(x, r) for x, r in zip(xs, rows) if x is not None]
        ax.plot([x for x, _ in keep], [r["median"] for _, r in keep], color="0.6", linewidth=1,
                zorder=1)
        for x, r in keep:
            reached = r["steps_to_threshold"] is not None
            ax.scatter([x], [r["median"]], s=36, marker=noise_style(noise)["marker"], zorder=2,
                       color=colors[r["p"]] if reached else "white", edgecolors=colors[r["p"]],
                       linewidths=1.2)
        ax.set_yscale("log")
        ax.set_title(noise)
        ax.grid(True, which="major", alpha=0.3)
        ax.margins(x=0.12, y=0.12)
    for ax in axes:
        spec = ax.get_subplotspec()
        if spec is None or spec.is_last_row() or ax is axes[-1]:
            ax.set_xlabel("iterations to the threshold")
        if spec is None or spec.is_first_col():
            ax.set_ylabel("final error (median)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="none", marker="o", markersize=6, color=colors[p])
               for p in ps]
    labels = [f"p = {_p_label(p)}" for p in ps]
    if steps is not None:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=6, color="0.3",
                              markerfacecolor="white"))
        labels.append(f"never (drawn at {steps})")
    figure_legend(axes, ncol=4, handles=handles, labels=labels)
    return axes


def plot_batch_size(records: List[dict], *, axes: Optional[Sequence[plt.Axes]] = None,
                    estimators: Sequence[str] = ("momentum", "VClip", "CClip"),
                    aggregators: Sequence[str] = ("mean", "coordinate median")) -> Sequence[plt.Axes]:
    """Final relative error against the sample size n per iteration, one panel per noise level
    (1/alpha); colour = estimator, solid = mean of the n samples, dashed = their coordinate median.

    Without ``axes`` the panels span the book's column and one legend sits below them."""
    inv_alphas = sorted({r["inv_alpha"] for r in records})
    if axes is None:
        _, grid = plt.subplots(1, len(inv_alphas), figsize=(COLUMN_WIDTH, ROW_HEIGHT + 0.7),
                               sharey=True, squeeze=False, layout="constrained")
        axes = grid[0]
    lines = {"mean": "-", "coordinate median": "--"}
    for ax, inv_alpha in zip(axes, inv_alphas):
        for est in estimators:
            style = estimator_style(est)
            for agg in aggregators:
                rows = sorted(_rows(records, inv_alpha=inv_alpha, estimator=est, aggregator=agg),
                              key=lambda r: r["n"])
                ax.plot([r["n"] for r in rows], [r["median"] for r in rows], linestyle=lines[agg],
                        color=style["color"], marker=style["marker"], markersize=4,
                        label=f"{est}, {'median' if agg == 'coordinate median' else agg}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({r["n"] for r in records})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_title(rf"$\alpha$ = {1 / inv_alpha:.3g}")
        ax.set_xlabel("samples per iteration $n$")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("final relative error (median)")
    figure_legend(axes, len(estimators), *axes[0].get_legend_handles_labels())
    return axes


def plot_clip21(result: dict, ax: Optional[plt.Axes] = None) -> plt.Axes:
    """``||grad f(x_t)||`` of GD, per-worker clipped GD and Clip21 (log scale)."""
    ax = one_axes(ax, ROW_HEIGHT, width=0.75 * COLUMN_WIDTH)
    colors = {"GD": "tab:gray", "clipped GD": "tab:olive", "Clip21": estimator_style("VClip")["color"]}
    for name, values in result["grad_norm"].items():
        ax.plot(np.arange(len(values)), values.numpy(), label=name, color=colors.get(name))
    label_axes(ax, "iteration $t$", r"$\|\nabla f(x_t)\|_2$", yscale="log")
    ax.legend()
    return ax


def plot_centered_clipping(result: dict, ax: Optional[plt.Axes] = None) -> plt.Axes:
    """Distance of the centred-clipping iterates to the geometric median: median and max over seeds."""
    ax = one_axes(ax, ROW_HEIGHT, width=0.75 * COLUMN_WIDTH)
    dist = result["distance"]
    t = np.arange(dist.shape[0])
    color = estimator_style("geometric median")["color"]
    ax.plot(t, dist.quantile(0.5, dim=-1).numpy(), color=color, label="median over seeds")
    ax.plot(t, dist.max(dim=-1).values.numpy(), color=color, linestyle="--", label="worst seed")
    label_axes(ax, "iteration $t$", r"$\|m_t - \mathrm{GM}\|_2$", yscale="log")
    ax.legend()
    return ax
