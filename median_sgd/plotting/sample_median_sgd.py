"""Figures of chapter 5 (the median gradient across samples; ``experiments.sample_median_sgd``)."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._style import (
    COLUMN_WIDTH,
    ROW_HEIGHT,
    draw_band,
    label_axes,
    estimator_style,
    figure_legend,
    log_ticks,
    names_in,
    one_axes,
    panel_row,
    select,
)

__all__ = [
    "plot_stationary_spread",
    "plot_sgd_final_error",
    "plot_sgd_curves",
    "plot_sample_size",
    "plot_skew_fixed_points",
    "plot_gm_passes",
]

#: errors at or above this are drawn at the top of the axis as "diverged"
_CEILING = 1e6
_GM_STYLES = {
    "Weiszfeld": {"color": "black", "marker": "o", "linestyle": "-"},
    "SPP, constant tau": {"color": "tab:olive", "marker": "^", "linestyle": "-"},
    "SPP, tau0/sqrt(p)": {"color": "tab:cyan", "marker": "v", "linestyle": "-"},
    "SPP, tau0/p": {"color": "tab:green", "marker": "P", "linestyle": "-"},
    "SGD, tau0/p": {"color": "yellowgreen", "marker": "+", "linestyle": "--"},
}


def _rows(records: List[dict], key: str, **where) -> List[dict]:
    rows = select(records, key, **where)
    if not rows:
        raise ValueError(f"no records with {where}")
    return rows


def plot_stationary_spread(
    records: List[dict],
    *,
    quantile: Callable[[float], float],
    axes: Optional[Sequence[plt.Axes]] = None,
) -> Sequence[plt.Axes]:
    """One panel per alpha: the spread of constant-step SGD's error against the step ``eta``.

    Markers: the measured median of ``|e_T|`` (flattest coordinate) for mean- and
    coordinate-median SGD, with error bars from ``spread_low`` to ``spread_high`` where the
    records have them (a confidence interval for that median); dashed line: the closed form
    ``scale * quantile(alpha)`` for the mean (``quantile(alpha)`` is the 3/4-quantile of the
    standard symmetric alpha-stable law). Without ``axes``: two panels per row in the book's
    column, one legend below them.
    """
    alphas = sorted({r["alpha"] for r in records}, reverse=True)
    if axes is None:  # two panels per row
        n_rows = (len(alphas) + 1) // 2
        fig, grid = plt.subplots(n_rows, 2, figsize=(COLUMN_WIDTH, 2.3 * n_rows + 0.5), squeeze=False,
                                 layout="constrained")
        for ax in grid.flat[len(alphas):]:
            ax.set_visible(False)
        axes = list(grid.flat[:len(alphas)])
    if len(axes) != len(alphas):
        raise ValueError(f"got {len(axes)} axes for {len(alphas)} tail indices")
    for ax, alpha in zip(axes, alphas):
        for name in ("mean", "coordinate median"):
            rows = _rows(records, "eta", alpha=alpha, estimator=name)
            style = estimator_style(name)
            eta = [r["eta"] for r in rows]
            spread = np.array([r["spread"] for r in rows])
            if all("spread_low" in r and "spread_high" in r for r in rows):
                yerr = np.array([spread - [r["spread_low"] for r in rows],
                                 [r["spread_high"] for r in rows] - spread])
            else:
                yerr = None
            ax.errorbar(eta, spread, yerr=yerr, linestyle="none", marker=style["marker"],
                        color=style["color"], capsize=2, markersize=5,
                        label=f"{name} SGD (measured)")
            if name == "mean":
                q = quantile(alpha)
                ax.plot(eta, [r["scale"] * q for r in rows], "--", color=style["color"],
                        label="mean SGD (closed form)")
        # a sqrt(eta) guide through the median-SGD point at the smallest step
        rows = _rows(records, "eta", alpha=alpha, estimator="coordinate median")
        etas = np.array([r["eta"] for r in rows])
        ax.plot(etas, rows[0]["spread"] * np.sqrt(etas / etas[0]), ":", color="gray",
                label=r"$\propto \sqrt{\eta}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_ticks(ax, etas, [f"{e:g}" for e in etas])
        ax.set_xlabel(r"step size $\eta$")
        ax.set_title(rf"$\alpha = {alpha:g}$")
        ax.grid(True, which="major", alpha=0.3)
    for i, ax in enumerate(axes):
        if i % 2 == 0:
            ax.set_ylabel(r"median $|e_T|$, $h = h_{\min}$")
    figure_legend(axes, ncol=2, frameon=False)
    return axes


def _clip(values: Iterable[float]) -> List[float]:
    return [min(v, _CEILING) for v in values]


def _clipped_band(ax: plt.Axes, x: Sequence[float], rows: List[dict], **line_kw) -> None:
    """The median over seeds and its 10-90% band against ``x``, clipped at the ceiling."""
    draw_band(ax, x, _clip(r["median"] for r in rows), _clip(r["q10"] for r in rows),
              _clip(r["q90"] for r in rows), **line_kw)


def plot_sgd_final_error(
    final: List[dict],
    ax: Optional[plt.Axes] = None,
    *,
    estimators: Optional[Iterable[str]] = None,
) -> plt.Axes:
    """Final error ``||w_T - w*||`` against ``1/alpha``: median over seeds and the 10-90% band per
    estimator; values beyond ``1e6`` (blown up or diverged) are drawn at ``1e6``. One legend
    below the axes."""
    ax = one_axes(ax, 3.3)
    for name in names_in(final, "estimator", estimators):
        rows = sorted((r for r in final if r["estimator"] == name), key=lambda r: 1 / r["alpha"])
        _clipped_band(ax, [1 / r["alpha"] for r in rows], rows, label=f"{name} SGD", markersize=5,
                      **estimator_style(name))
    ax.axhline(_CEILING, color="gray", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], _CEILING, r" $\geq 10^6$ (blown up)", va="bottom", fontsize=8,
            color="gray")
    label_axes(ax, r"$1/\alpha$ (heavier tails to the right)", r"final $\|w_T - w^\star\|_2$",
               yscale="log")
    figure_legend([ax], ncol=3, frameon=False)
    return ax


def plot_sgd_curves(
    curves: List[dict],
    *,
    alphas: Sequence[float],
    estimators: Optional[Sequence[str]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
    reference_slope: Optional[float] = -0.5,
) -> Sequence[plt.Axes]:
    """One panel per alpha: ``||w_t - w*||`` against ``t`` (log-log), median and 10-90% band per
    estimator, clipped at ``1e6``; a dotted ``t^reference_slope`` guide; one legend below."""
    estimators = names_in(curves, "estimator", estimators)
    axes = panel_row(axes, len(alphas), "tail indices", ROW_HEIGHT + 0.3, sharey=True)
    for ax, alpha in zip(axes, alphas):
        ends = []
        for name in estimators:
            rows = [r for r in _rows(curves, "step", alpha=alpha, estimator=name) if r["step"] > 0]
            t = [r["step"] for r in rows]
            _clipped_band(ax, t, rows, color=estimator_style(name)["color"], label=f"{name} SGD")
            ends.append(rows[-1]["median"])
        if reference_slope is not None:
            # a guide through half the smallest final error, over the last decade of steps
            t_guide = np.array([t[-1] / 10, t[-1]], dtype=float)
            ax.plot(t_guide, 0.5 * min(ends) * (t_guide / t_guide[-1]) ** reference_slope, ":", color="gray",
                    linewidth=2, label=rf"$\propto t^{{{reference_slope:g}}}$")
        label_axes(ax, "step $t$", title=rf"$\alpha = {alpha:g}$", xscale="log", yscale="log")
    axes[0].set_ylabel(r"$\|w_t - w^\star\|_2$")
    figure_legend(axes, ncol=4, frameon=False)
    return axes


def plot_sample_size(records: List[dict], ax: Optional[plt.Axes] = None) -> plt.Axes:
    """Final error of coordinate-median SGD against the sample size ``n`` (one heavy tail), with
    the sizes where the median has a finite variance (``alpha (k + 1) > 2``) shaded; one legend
    below the axes."""
    ax = one_axes(ax, 3.0)
    rows = sorted(records, key=lambda r: r["n"])
    n = [r["n"] for r in rows]
    _clipped_band(ax, n, rows, label="coordinate median SGD", **estimator_style("coordinate median"))
    finite = [r["n"] for r in rows if r["tail_exponent"] > 2]
    if finite:
        ax.axvspan(min(finite) - 0.5, max(n) + 0.5, color="tab:green", alpha=0.08,
                   label=r"finite variance: $\alpha(k+1) > 2$")
    ax.axhline(_CEILING, color="gray", linewidth=0.8, linestyle=":")
    label_axes(ax, "samples per step $n = 2k + 1$", r"final $\|w_T - w^\star\|_2$", yscale="log")
    ax.set_xticks(n)
    figure_legend([ax], ncol=2, frameon=False)
    return ax


def plot_skew_fixed_points(
    records: List[dict],
    ax: Optional[plt.Axes] = None,
    *,
    prediction: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    limit: Optional[float] = None,
) -> plt.Axes:
    """Where SGD settles under skewed noise: ``z = h e / sigma0`` (coordinate average, mean over
    seeds, +-2 standard errors) against ``n`` for mean- and median-SGD; ``prediction(n)`` drawn as
    a line (the closed form), ``limit`` as a dotted line (the population median's offset); one
    legend below the axes."""
    ax = one_axes(ax, 3.4)
    for name in ("mean", "coordinate median"):
        rows = _rows(records, "n", estimator=name)
        style = estimator_style(name)
        ax.errorbar([r["n"] for r in rows], [r["z"] for r in rows],
                    yerr=[2 * r["stderr"] for r in rows], linestyle="none", marker=style["marker"],
                    color=style["color"], capsize=3, label=f"{name} SGD (measured)")
    if prediction is not None:
        grid = np.arange(1, max(r["n"] for r in records) + 1, 2)
        ax.plot(grid, prediction(grid), "-", color=estimator_style("coordinate median")["color"],
                alpha=0.6, label=r"closed form $-b_n$")
    if limit is not None:
        ax.axhline(limit, linestyle=":", color="gray", label=r"$n\to\infty$: population median")
    ax.axhline(0.0, color="black", linewidth=0.8, label=r"$w^\star$ (minimiser of $f$)")
    ax.set_xscale("log")
    sizes = sorted({r["n"] for r in records})
    log_ticks(ax, sizes, [str(n) for n in sizes])
    ax.set_xlabel("samples per step $n$")
    ax.set_ylabel(r"$h_j (\bar w_j - w^\star_j) / \sigma_0$")
    ax.grid(True, which="major", alpha=0.3)
    figure_legend([ax], ncol=2, frameon=False)
    return ax


def plot_gm_passes(records: List[dict], ax: Optional[plt.Axes] = None, *, floor: float = 1e-16) -> plt.Axes:
    """Relative objective gap of the geometric median against passes over the sample (Weiszfeld
    iterations or online SPP/SGD passes), median and 10-90% band over seeds; gaps below ``floor``
    (exact to rounding) are drawn at ``floor``; one legend below the axes."""
    ax = one_axes(ax, 3.6)
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in _rows(records, "passes", method=method) if r["passes"] > 0]
        p = [r["passes"] for r in rows]
        style = _GM_STYLES.get(method, {"color": "tab:gray", "marker": "o", "linestyle": "-"})
        draw_band(ax, p, [max(r["median"], floor) for r in rows], [max(r["q10"], floor) for r in rows],
                  [max(r["q90"], floor) for r in rows], alpha=0.12, label=method, markersize=3, **style)
    label_axes(ax, "passes over the sample (Weiszfeld: iterations)", r"$(f(m) - f^\star) / f^\star$",
               xscale="log", yscale="log")
    figure_legend([ax], ncol=3, frameon=False)
    return ax
