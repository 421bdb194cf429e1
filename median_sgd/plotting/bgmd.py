"""Figures of part II (the geometric median, BGmD, its experiments; Acharya et al. 2022)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import (
    COLUMN_WIDTH,
    estimator_style,
    figure_legend,
    legend_entries,
    names_in,
    one_axes,
    panel_grid,
    draw_band,
    scatter_scene,
    select,
)
from .robust_mean import plot_quantile_curves

__all__ = [
    "method_style",
    "plot_gm_scenes",
    "plot_gm_zoom",
    "plot_breakdown_curves",
    "plot_gap_traces",
    "plot_cost",
    "plot_contraction",
    "plot_memory_identity",
    "plot_bgmd_cost",
    "plot_residual_training",
    "plot_accuracy_vs_time",
    "plot_ablation",
    "plot_theorem_sweeps",
]

# Aggregators of the BGmD paper; the estimators of part I keep their colours.
_METHODS = {
    "SGD": {"color": "tab:red", "marker": "X"},
    "CmD": {"color": "tab:purple", "marker": "s"},
    "GmD": {"color": "tab:green", "marker": "P"},
    "BGmD": {"color": "tab:blue", "marker": "o"},
    "trimmed mean": {"color": "tab:orange", "marker": "D"},
    "Krum": {"color": "tab:brown", "marker": "v"},
    "Weiszfeld iteration": {"color": "tab:green", "marker": "P"},
}


def method_style(name: str) -> dict:
    """Colour and marker of a method or estimator, the same in every figure of the book."""
    if name in _METHODS:
        return dict(_METHODS[name])
    return estimator_style(name)


def _legend(ax: plt.Axes, legend: str, *, ncols: int = 3, fontsize: float = 8.5) -> None:
    """``legend="axes"``: a legend inside ``ax``; ``"figure"``: one legend for the whole figure,
    below the panels (``loc="outside lower center"``: needs ``layout="constrained"``), built from
    the labelled artists of all its axes, each label once; ``"none"``: no legend."""
    if legend not in ("axes", "figure", "none"):
        raise ValueError(f"legend must be 'axes', 'figure' or 'none', got {legend!r}")
    for a in ax.figure.axes:
        old = a.get_legend()
        if old is not None:
            old.remove()
    if legend == "axes":
        ax.legend(fontsize=fontsize)
    elif legend == "figure" and _constrained(ax):
        figure_legend(ax.figure.axes, ncols, fontsize=fontsize, frameon=False)
    elif legend == "figure":  # no room of its own below the panels: over their foot
        ax.figure.legend(*legend_entries(ax.figure.axes), loc="lower center", ncols=ncols,
                         fontsize=fontsize, frameon=False)


def plot_gm_scenes(scenes: List[dict], axes: Optional[Sequence[plt.Axes]] = None, *, lim: float = 25.0,
                   legend: str = "figure"):
    """Fig. 5 of the BGmD paper: one panel per corrupted fraction, the points with the mean and
    the geometric median (:func:`plot_gm_zoom` draws the estimates close up)."""
    if axes is None:
        _, axes = plt.subplots(2, (len(scenes) + 1) // 2, figsize=(COLUMN_WIDTH, 7.0), layout="constrained")
    panels = np.atleast_1d(axes).ravel()
    for ax, scene in zip(panels, scenes):
        scatter_scene(ax, scene, "is_bad", (("uncorrupted", "tab:blue", 0.5),
                                            ("corrupted", "tab:gray", 0.6)),
                      size=6, star_size=120, estimate_size=55, edge_width=0.7)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        label = "clean data" if scene["fraction"] == 0 else f"{scene['fraction']:.0%} corruption"
        ax.set_title(label)
    _legend(panels[0], legend, ncols=3)
    return panels


def plot_gm_zoom(scenes: List[dict], ax: Optional[plt.Axes] = None, *, zoom: float = 1.0,
                 legend: str = "axes") -> plt.Axes:
    """Fig. 5 close up: the uncorrupted points of the first scene and, for every scene, its mean
    (cross) and geometric median (plus), labelled by the corrupted fraction, around the
    population mean (star)."""
    ax = one_axes(ax, 3.4)
    first = scenes[0]
    pts, bad = first["points"].numpy(), first["is_bad"].numpy()
    ax.scatter(pts[~bad, 0], pts[~bad, 1], s=6, color="tab:blue", alpha=0.35, label="uncorrupted")
    ax.scatter(*first["true_mean"].numpy(), s=120, marker="*", color="black", zorder=5,
               label="population mean")
    for i, scene in enumerate(scenes):
        shade = plt.cm.viridis(0.85 * i / max(1, len(scenes) - 1))
        for name, est in scene["estimates"].items():
            style = estimator_style(name)
            ax.scatter(*est.numpy(), s=60, zorder=6, marker=style["marker"], color=style["color"],
                       edgecolor=shade, linewidth=1.6,
                       label=f"sample {name}" if i == 0 else None)
            below = name == "geometric median"  # the medians crowd: their labels below
            ax.annotate(f"{scene['fraction']:.0%}", est.numpy(), xytext=(5, -10 if below else 4),
                        textcoords="offset points", fontsize=8, color=style["color"])
    ax.set_xlim(-zoom, zoom)
    ax.set_ylim(-zoom, zoom)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    _legend(ax, legend)
    return ax


def plot_breakdown_curves(records: List[dict], mode: str, ax: Optional[plt.Axes] = None, *,
                          legend: str = "axes") -> plt.Axes:
    """Error against the corrupted fraction (median and 10-90% band over seeds) for one corruption
    ``mode``, with the median over seeds of Minsker's bound on the geometric median's error."""
    rows = [r for r in records if r["mode"] == mode]
    ax = plot_quantile_curves(rows, "fraction", ax)
    gm = select(rows, "fraction", estimator="geometric median")
    ax.plot([r["fraction"] for r in gm], [r["bound_median"] for r in gm], "k--", linewidth=1,
            label=r"bound $C_\psi\, r$ (median)")
    ax.set_xlabel(r"corrupted fraction $\psi$")
    ax.set_ylabel(r"$\|\hat m - \mu\|_2$")
    _legend(ax, legend)
    return ax


def plot_gap_traces(traces: Dict[str, Iterable[float]], ax: Optional[plt.Axes] = None, *,
                    legend: str = "axes") -> plt.Axes:
    """Relative objective gap ``f(z_k)/f* - 1`` against the iteration ``k``, one curve per label."""
    ax = one_axes(ax, 3.2)
    for i, (label, gaps) in enumerate(traces.items()):
        gaps = np.asarray(list(gaps), dtype=float)
        ks = np.arange(len(gaps))
        keep = gaps > 0
        ax.semilogy(ks[keep], gaps[keep], marker="o", markersize=3, label=label,
                    color=plt.cm.viridis(i / max(1, len(traces) - 1)))
    ax.set_xlabel("Weiszfeld iteration $k$")
    ax.set_ylabel(r"$f(z_k)/f^\star - 1$")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, legend, ncols=4)
    return ax


def plot_cost(records: List[dict], sweep: str, ax: Optional[plt.Axes] = None, *,
              methods: Optional[Iterable[str]] = None, legend: str = "axes") -> plt.Axes:
    """Measured seconds against the swept size (log-log), one line per method, with a dashed
    slope-1 reference through the last point of the first method."""
    ax = one_axes(ax, 3.2)
    rows = [r for r in records if r.get("sweep") == sweep and "seconds" in r]
    for i, name in enumerate(names_in(rows, "method", methods)):
        pts = sorted((r[sweep], r["seconds"]) for r in rows if r["method"] == name)
        xs, ys = np.array(pts).T
        ax.loglog(xs, ys, label=name, **method_style(name), markersize=5)
        if i == 0:
            ax.loglog(xs, ys[-1] * xs / xs[-1], "k--", linewidth=0.8, label="slope 1 (linear)")
    ax.set_xlabel(sweep)
    ax.set_ylabel("seconds")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, legend, ncols=4)
    return ax


# ------------------------------------------------------------------ chapter "Block geometric median descent"

_SELECTION_STYLE = {
    "uniform": {"color": "tab:gray", "marker": "o", "linestyle": ":"},
    "norm": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "norm (power 1)": {"color": "tab:cyan", "marker": "^", "linestyle": "-"},
    "topk": {"color": "tab:orange", "marker": "s", "linestyle": "--"},
}


def plot_contraction(records: List[dict], profile: str, ax: Optional[plt.Axes] = None, *,
                     legend: str = "axes", ylabel: bool = True) -> plt.Axes:
    """Lemma 1: the relative residual ``1 - xi`` against ``beta = k/d`` for every selection rule
    (mean over the draws, 10-90% band) with the bound ``1 - k/d``, for one column profile."""
    ax = one_axes(ax, 3.2, width=4)
    rows = [r for r in records if r["profile"] == profile]
    for name in names_in(rows, "selection"):
        pts = select(rows, "beta", selection=name)
        style = _SELECTION_STYLE.get(name, {"color": "tab:gray", "marker": "o", "linestyle": "-"})
        draw_band(ax, [r["beta"] for r in pts], [r["mean"] for r in pts], [r["q10"] for r in pts],
                  [r["q90"] for r in pts], band=name != "topk", alpha=0.12, label=name,
                  markersize=4, **style)
    bound = sorted({(r["beta"], r["bound"]) for r in rows})
    ax.plot(*zip(*bound), "k-", linewidth=1.2, alpha=0.6, label=r"bound $1 - k/d$")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\beta = k/d$")
    if ylabel:
        ax.set_ylabel(r"$1 - \xi$")
    ax.set_title(profile)
    ax.grid(True, alpha=0.3)
    _legend(ax, legend, ncols=5)
    return ax


def plot_memory_identity(runs: Dict[str, List[dict]], ax: Optional[plt.Axes] = None, *,
                         floor: float = 1e-18, legend: str = "axes") -> plt.Axes:
    """Lemma 5: ``||x_t - x~_t - m_t|| / max ||m||`` along BGmD runs, with the virtual sequence
    built from averages over all rows (solid) and over the good rows only (dashed)."""
    ax = one_axes(ax, 3.2)
    for i, (label, rows) in enumerate(runs.items()):
        color = plt.cm.tab10(i)
        ts = [r["t"] for r in rows]
        ax.semilogy(ts, [max(r["all_rows"], floor) for r in rows], color=color, linestyle="-",
                    label=f"{label}: all rows")
        ax.semilogy(ts, [max(r["good_rows"], floor) for r in rows], color=color, linestyle="--",
                    label=f"{label}: good rows only")
    ax.set_xlabel("step $t$")
    ax.set_ylabel(r"$\|x_t - \tilde x_t - m_t\| \,/\, \max_s \|m_s\|$")
    ax.grid(True, alpha=0.3)
    _legend(ax, legend, ncols=2)
    return ax


def plot_bgmd_cost(records: List[dict], solver: str, ax: Optional[plt.Axes] = None, *,
                   legend: str = "axes", ylabel: bool = True) -> plt.Axes:
    """Proposition 1 measured: seconds per aggregation against ``beta = k/d`` for BGmD and its two
    parts (block selection, Gm of the block), with GmD and the mean as horizontal lines."""
    ax = one_axes(ax, 3.2, width=4)
    styles = {"BGmD": method_style("BGmD"),
              "block selection": {"color": "tab:gray", "marker": "s"},
              "Gm of the block": {"color": "tab:olive", "marker": "^"}}
    for name, style in styles.items():
        pts = sorted((r["beta"], r["seconds"]) for r in records
                     if r["method"] == name and r["solver"] == solver)
        ax.loglog(*zip(*pts), label=name, markersize=5, **style)
    for name, linestyle in (("GmD", "--"), ("mean", ":")):
        rows = [r for r in records if r["method"] == name and r["solver"] in (solver, "-")]
        for r in rows:
            ax.axhline(r["seconds"], color=method_style("GmD" if name == "GmD" else "SGD")["color"],
                       linestyle=linestyle, linewidth=1.2, label=f"{name} (all d coordinates)")
    ax.set_xlabel(r"$\beta = k/d$")
    if ylabel:
        ax.set_ylabel("seconds per aggregation")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, legend, ncols=3)
    return ax


def _beta_color(label: str, betas: Sequence[float]):
    beta = float(label.split("=")[1])
    rank = sorted(betas).index(beta)
    return plt.cm.viridis(0.15 + 0.7 * rank / max(1, len(betas) - 1))


def plot_residual_training(records: List[dict], setup: str, axes: Optional[Sequence[plt.Axes]] = None, *,
                           legend: str = "figure"):
    """Figs. 7-8 of the BGmD paper: (a) the relative residual ``1 - xi`` of BGmD's block (dashed:
    the bound ``1 - beta``), (b) test accuracy and (c) training loss against the iteration, for
    BGmD with several ``beta = k/d`` and SGD."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(COLUMN_WIDTH, 2.6), layout="constrained")
    rows = [r for r in records if r["setup"] == setup]
    methods = names_in(rows, "method")
    betas = [float(m.split("=")[1]) for m in methods if m.startswith("BGmD")]
    for m in methods:
        pts = select(rows, "iteration", method=m)
        it = [r["iteration"] for r in pts]
        if m.startswith("BGmD"):
            color, beta = _beta_color(m, betas), float(m.split("=")[1])
            label = rf"BGmD $\beta$ = {beta:g}"
            axes[0].plot(it, [r["relative_residual"] for r in pts], color=color, label=label)
            axes[0].axhline(1 - beta, color=color, linestyle="--", linewidth=0.8)
        else:
            color, label = method_style(m)["color"], m
        axes[1].plot(it, [100 * r["test_accuracy"] for r in pts], color=color, label=label)
        axes[2].plot(it, [r["train_loss"] for r in pts], color=color, label=label)
    axes[0].set_ylim(0, 1)
    titles = (r"residual $1 - \xi$ (dashed: $1 - \beta$)", "test accuracy (%)", "training loss")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    _legend(axes[-1], legend, ncols=4)
    return axes


# ------------------------------------------------------------------ chapter "Robust training experiments"


def plot_accuracy_vs_time(records: List[dict], attack: str, axes: Optional[Sequence[plt.Axes]] = None, *,
                          experiment: str = "table2", methods: Optional[Iterable[str]] = None):
    """Figs. 1-3 of the BGmD paper: test accuracy against training wall-clock time, one panel per
    corrupted fraction (the clean runs in the first panel), one line per method (seed 0). A run
    that diverged ends with a cross at 0. Without ``axes``: a column-wide figure (two rows of two
    panels for the paper's four fractions) with one legend below the panels."""
    rows = [r for r in records if r.get("experiment", experiment) == experiment]
    first_seed = min(r["seed"] for r in rows)
    rows = [r for r in rows if r["seed"] == first_seed]
    psis = sorted({r["psi"] for r in rows if r["psi"] == 0 or r["attack"] == attack})
    panels = panel_grid(len(psis), axes, row_height=2.2, sharex=True, sharey=True)
    names = names_in(rows, "method", methods)
    for ax, psi in zip(panels, psis):
        wanted = "none" if psi == 0 else attack
        for name in names:
            pts = select(rows, "iteration", psi=psi, attack=wanted, method=name)
            if not pts:
                continue
            style = method_style(name)
            good = [r for r in pts if not r["diverged"]]
            ax.plot([r["time_s"] for r in good], [100 * r["test_accuracy"] for r in good],
                    color=style["color"], marker=style["marker"], markersize=3, label=name)
            if pts[-1]["diverged"]:
                ax.plot([pts[-1]["time_s"]], [0], marker="x", color=style["color"], markersize=8,
                        linestyle="none", clip_on=False)
        ax.set_title("no corruption" if psi == 0 else f"{psi:.0%} corruption")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    for ax in panels:
        spec = ax.get_subplotspec()
        if spec is None or spec.is_first_col():
            ax.set_ylabel("test accuracy (%)")
        if spec is None or spec.is_last_row():
            ax.set_xlabel("training time (s)")
    by_label: Dict[str, Any] = {}
    for ax in panels:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                by_label.setdefault(line.get_label(), line)
    handles, labels = list(by_label.values()), list(by_label)
    if _constrained(panels[0]):  # one legend, below the panels
        panels[0].figure.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    else:
        panels[0].legend(handles, labels, loc="lower right")
    return panels


def _constrained(ax) -> bool:
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    return isinstance(ax.figure.get_layout_engine(), ConstrainedLayoutEngine)


def plot_ablation(records: List[dict], ax: Optional[plt.Axes] = None, *, experiment: str = "fig6") -> plt.Axes:
    """Fig. 6 of the BGmD paper: test accuracy (the mean over the seeds) against the iteration for
    BGmD with several ``beta = k/d``, with memory (solid, label ending in "M") and without
    (dashed), and GmD. Without ``ax``: a column-wide figure with the legend below the panel."""
    ax = one_axes(ax, 3.4)
    rows = [r for r in records if r.get("experiment", experiment) == experiment]
    names = names_in(rows, "method")
    betas = sorted({float(n.split()[1]) for n in names if n.startswith("BGmD")})
    for name in names:
        pts = select(rows, "iteration", method=name)
        if name.startswith("BGmD"):
            beta = float(name.split()[1])
            color = plt.cm.viridis(0.15 + 0.7 * betas.index(beta) / max(1, len(betas) - 1))
            linestyle = "-" if name.endswith(" M") else "--"
            label = rf"BGmD $\beta$ = {beta:g}" + (" with memory" if name.endswith(" M") else ", no memory")
        else:
            color, linestyle, label = method_style(name)["color"], ":", name
        by_iteration: Dict[int, List[float]] = {}
        for r in pts:
            by_iteration.setdefault(r["iteration"], []).append(100 * r["test_accuracy"])
        ax.plot(list(by_iteration), [sum(v) / len(v) for v in by_iteration.values()], color=color,
                linestyle=linestyle, label=label)
    ax.set_xlabel("iteration")
    seeds = len({r.get("seed", 0) for r in rows})
    ax.set_ylabel("test accuracy (%)" if seeds == 1 else f"test accuracy (%), mean of {seeds} seeds")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    if _constrained(ax):
        ax.figure.legend(loc="outside right center")
    else:
        ax.legend()
    return ax


# ------------------------------------------------------------------ chapter "BGmD's convergence theory"


def plot_theorem_sweeps(records: List[dict], axes: Optional[Sequence[plt.Axes]] = None, *,
                        legend: str = "figure"):
    """Theorem 2 measured: ``E||x^_T - x*||^2`` (mean over seeds, with the seeds' range) against
    (a) the noise variance, (b) the block fraction ``beta`` and (c) the corrupted fraction
    (additive corruption) for BGmD, GmD (``beta = 1``) and SGD."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(COLUMN_WIDTH, 2.6), layout="constrained")

    def band(ax, rows, x, **style):
        rows = sorted(rows, key=lambda r: r[x])
        xs = [r[x] ** 2 if x == "noise" else r[x] for r in rows]
        draw_band(ax, xs, [r["final"].mean().item() for r in rows],
                  [r["final"].min().item() for r in rows], [r["final"].max().item() for r in rows],
                  markersize=4, **style)

    bgmd = method_style("BGmD")
    band(axes[0], [r for r in records if r["sweep"] == "noise"], "noise", **bgmd)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel(r"noise variance $s^2$")
    axes[0].set_ylabel(r"$\|\hat x_T - x^\star\|^2$")
    band(axes[1], [r for r in records if r["sweep"] == "beta"], "beta", **bgmd)
    axes[1].set_xscale("log")
    axes[1].set_xlabel(r"$\beta = k/d$")
    psi_rows = [r for r in records if r["sweep"] == "psi"]
    for name, pick in (("BGmD", lambda r: r["method"] == "bgmd" and r["beta"] < 1),
                       ("GmD", lambda r: r["method"] == "bgmd" and r["beta"] == 1),
                       ("SGD", lambda r: r["method"] == "sgd")):
        band(axes[2], [r for r in psi_rows if pick(r)], "psi", label=name, **method_style(name))
    axes[2].set_yscale("log")
    axes[2].set_xlabel(r"corrupted fraction $\psi$")
    for ax, title in zip(axes, ("noise", "block", "corruption")):
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    _legend(axes[2], legend, ncols=3)
    return axes
