"""Figures of chapter 8 (beyond the paper): the l_p family, the sample size, Clip21, centred clipping."""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import estimator_style

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
                   noises: Optional[Iterable[str]] = None) -> plt.Axes:
    """Final relative error (median over seeds, min-max band) against p, one line per noise model.

    ``p`` is drawn at evenly spaced positions (``inf`` last)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    ps = sorted({r["p"] for r in records})
    x = np.arange(len(ps))
    noises = list(dict.fromkeys(r["noise"] for r in records)) if noises is None else list(noises)
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
    ax.legend(fontsize=8)
    return ax


def plot_lp_tradeoff(records: List[dict], *, rule: str, ax: Optional[plt.Axes] = None,
                     noises: Optional[Iterable[str]] = None, steps: Optional[int] = None) -> plt.Axes:
    """Robustness against speed: final error (y) against the iterations needed to reach the
    threshold (x), a point per p (labelled), a line per noise model. ``p`` that never reach the
    threshold are drawn at ``steps`` (if given) with open markers."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    noises = list(dict.fromkeys(r["noise"] for r in records)) if noises is None else list(noises)
    for noise in noises:
        rows = sorted(_rows(records, rule=rule, noise=noise), key=lambda r: r["p"])
        style = noise_style(noise)
        xs = [r["steps_to_threshold"] if r["steps_to_threshold"] is not None else steps for r in rows]
        keep = [(x, r) for x, r in zip(xs, rows) if x is not None]
        ax.plot([x for x, _ in keep], [r["median"] for _, r in keep], color=style["color"],
                linewidth=1, alpha=0.7, label=noise)
        for x, r in keep:
            reached = r["steps_to_threshold"] is not None
            ax.plot([x], [r["median"]], marker=style["marker"], markersize=6, color=style["color"],
                    markerfacecolor=style["color"] if reached else "white")
            ax.annotate(_p_label(r["p"]), (x, r["median"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=style["color"])
    ax.set_yscale("log")
    ax.set_xlabel("iterations until the median error first reaches the threshold")
    ax.set_ylabel("final relative error (median)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_batch_size(records: List[dict], *, axes: Optional[Sequence[plt.Axes]] = None,
                    estimators: Sequence[str] = ("momentum", "VClip", "CClip"),
                    aggregators: Sequence[str] = ("mean", "coordinate median")) -> Sequence[plt.Axes]:
    """Final relative error against the sample size n per iteration, one panel per noise level
    (1/alpha); colour = estimator, solid = mean of the n samples, dashed = their coordinate median."""
    inv_alphas = sorted({r["inv_alpha"] for r in records})
    if axes is None:
        _, axes = plt.subplots(1, len(inv_alphas), figsize=(4 * len(inv_alphas), 3.6), sharey=True,
                               squeeze=False, layout="constrained")
        axes = axes[0]
    lines = {"mean": "-", "coordinate median": "--"}
    for ax, inv_alpha in zip(axes, inv_alphas):
        for est in estimators:
            style = estimator_style(est)
            for agg in aggregators:
                rows = sorted(_rows(records, inv_alpha=inv_alpha, estimator=est, aggregator=agg),
                              key=lambda r: r["n"])
                ax.plot([r["n"] for r in rows], [r["median"] for r in rows], linestyle=lines[agg],
                        color=style["color"], marker=style["marker"], markersize=4,
                        label=f"{est}, {agg}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({r["n"] for r in records})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_title(rf"$1/\alpha$ = {inv_alpha:g} ($\alpha$ = {1 / inv_alpha:.3g})", fontsize=10)
        ax.set_xlabel("samples per iteration $n$")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("final relative error (median)")
    axes[-1].legend(fontsize=7)
    return axes


def plot_clip21(result: dict, ax: Optional[plt.Axes] = None) -> plt.Axes:
    """``||grad f(x_t)||`` of GD, per-worker clipped GD and Clip21 (log scale)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    colors = {"GD": "tab:gray", "clipped GD": "tab:olive", "Clip21": estimator_style("VClip")["color"]}
    for name, values in result["grad_norm"].items():
        ax.plot(np.arange(len(values)), values.numpy(), label=name, color=colors.get(name))
    ax.set_yscale("log")
    ax.set_xlabel("iteration $t$")
    ax.set_ylabel(r"$\|\nabla f(x_t)\|_2$")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_centered_clipping(result: dict, ax: Optional[plt.Axes] = None) -> plt.Axes:
    """Distance of the centred-clipping iterates to the geometric median: median and max over seeds."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    dist = result["distance"]
    t = np.arange(dist.shape[0])
    color = estimator_style("geometric median")["color"]
    ax.plot(t, dist.quantile(0.5, dim=-1).numpy(), color=color, label="median over seeds")
    ax.plot(t, dist.max(dim=-1).values.numpy(), color=color, linestyle="--", label="worst seed")
    ax.set_yscale("log")
    ax.set_xlabel("iteration $t$")
    ax.set_ylabel(r"$\|m_t - \mathrm{GM}\|_2$")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax
