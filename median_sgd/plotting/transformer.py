"""Figures of the chapter "A transformer with fixed weights" (the workshop paper's Figs. 3-4)."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch

from ._style import COLUMN_WIDTH, ROW_HEIGHT, estimator_style, figure_legend, panel_row

__all__ = [
    "summarize_curves",
    "plot_estimation_error",
    "plot_tau_sweep",
    "plot_noise_kurtosis",
    "plot_zipf",
]

_ERROR_LABEL = r"$\|m_t - \hat g\|_2 \,/\, \|\hat g\|_2$"


def _panels(axes, n: int, what: str, height: float, **kwargs) -> Sequence[plt.Axes]:
    """``axes``, or else a row of ``n`` panels spanning the book's column (a list, as the chapters
    index it), with a constrained layout."""
    if axes is None:
        return list(panel_row(None, n, what, height, **kwargs))
    return panel_row(axes, n, what, height)


def summarize_curves(curves: List[dict], **where) -> Dict[str, np.ndarray]:
    """Median, min and max over seeds of the ``"error"`` curves matching every ``key=value``.

    Returns arrays of length ``iterations + 1`` under ``"median"``, ``"min"``, ``"max"``, and
    the number of seeds under ``"seeds"``.
    """
    rows = [r for r in curves if all(r.get(k) == v for k, v in where.items())]
    if not rows:
        raise ValueError(f"no curves with {where}")
    errors = np.asarray([r["error"] for r in rows], dtype=float)
    return {"median": np.median(errors, axis=0), "min": errors.min(axis=0),
            "max": errors.max(axis=0), "seeds": len(rows)}


def _values(curves: List[dict], key: str, **where) -> list:
    return sorted({r[key] for r in curves if all(r.get(k) == v for k, v in where.items())})


def plot_estimation_error(
    curves: List[dict],
    *,
    corpus: str,
    tau: float,
    estimators: Sequence[str] = ("momentum", "CClip", "VClip"),
    batch_sizes: Optional[Sequence[int]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
    logy: bool = True,
) -> Sequence[plt.Axes]:
    """Figs. 3-4: relative error against the iteration, one panel per batch size, one line per
    estimator (median over seeds) and its min-max band over seeds.

    Without ``axes``, the panels span the book's column in one row and the legend (its title
    gives ``tau``) sits below them."""
    if batch_sizes is None:
        batch_sizes = _values(curves, "batch_size", corpus=corpus)
    axes = _panels(axes, len(batch_sizes), "batch sizes", ROW_HEIGHT + 0.3, sharey=True)
    for ax, b in zip(axes, batch_sizes):
        for name in estimators:
            s = summarize_curves(curves, corpus=corpus, batch_size=b, estimator=name, tau=tau)
            t = np.arange(len(s["median"]))
            style = estimator_style(name)
            ax.plot(t, s["median"], color=style["color"], label=name, linewidth=1.5)
            if s["seeds"] > 1:
                ax.fill_between(t, s["min"], s["max"], color=style["color"], alpha=0.2, linewidth=0)
        if logy:
            ax.set_yscale("log")
        ax.set_title(f"batch size {b}")
        ax.set_xlabel("iteration $t$")
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel(_ERROR_LABEL)
    figure_legend(axes, len(estimators), *axes[0].get_legend_handles_labels(), title=rf"$\tau = {tau:g}$")
    return axes


def plot_tau_sweep(
    curves: List[dict],
    *,
    corpus: str,
    iterations: Sequence[int],
    estimators: Sequence[str] = ("momentum", "CClip", "VClip"),
    batch_sizes: Optional[Sequence[int]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
) -> Sequence[plt.Axes]:
    """Relative error at the given iterations against ``tau`` (log-log), one panel per batch size:
    a line per estimator and iteration (solid for the last iteration, dashed for earlier ones).

    Without ``axes``, the panels span the book's column and the legend sits below them."""
    if batch_sizes is None:
        batch_sizes = _values(curves, "batch_size", corpus=corpus)
    axes = _panels(axes, len(batch_sizes), "batch sizes", ROW_HEIGHT + 0.6, sharey=True)
    iterations = sorted(iterations)
    dashes = {it: ("-" if it == iterations[-1] else (0, (1 + 2 * i, 2))) for i, it in enumerate(iterations)}
    for ax, b in zip(axes, batch_sizes):
        for name in estimators:
            taus = _values(curves, "tau", corpus=corpus, batch_size=b, estimator=name)
            style = estimator_style(name)
            for it in iterations:
                y = [summarize_curves(curves, corpus=corpus, batch_size=b, estimator=name,
                                      tau=tau)["median"][it] for tau in taus]
                ax.plot(taus, y, color=style["color"], marker=style["marker"], markersize=4,
                        linestyle=dashes[it], label=f"{name}, $t = {it}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"batch size {b}")
        ax.set_xlabel(r"$\tau$")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(_ERROR_LABEL)
    figure_legend(axes, len(estimators), *axes[0].get_legend_handles_labels())
    return axes


def plot_noise_kurtosis(
    kurtosis: Mapping[Tuple[str, int], torch.Tensor],
    groups: Mapping[str, Tuple[int, int]],
    *,
    corpus: str,
    panels: Optional[Mapping[str, Sequence[str]]] = None,
    axes: Optional[Sequence[plt.Axes]] = None,
    bins: int = 40,
) -> Sequence[plt.Axes]:
    """Histograms (log-spaced bins) of the per-coordinate kurtosis of the mini-batch noise, one
    step line per batch size, in one panel per group of parameters; Gaussian noise has 3.

    Without ``axes``, the panels span the book's column and the legend sits below them."""
    if panels is None:
        panels = {"embedding and decoder": ("embedding", "decoder"),
                  "transformer layers": ("transformer layers",)}
    batch_sizes = sorted(b for (c, b) in kurtosis if c == corpus)
    if not batch_sizes:
        raise ValueError(f"no kurtosis for corpus {corpus!r}")
    axes = _panels(axes, len(panels), "panels", ROW_HEIGHT + 0.3)
    values = {}
    for b in batch_sizes:
        k = kurtosis[(corpus, b)]
        for title, names in panels.items():
            part = torch.cat([k[groups[n][0]:groups[n][1]] for n in names])
            values[title, b] = part[torch.isfinite(part)].numpy()
    everything = np.concatenate(list(values.values()))
    edges = np.logspace(np.log10(max(everything.min(), 1.0)), np.log10(everything.max()), bins + 1)
    shades = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(batch_sizes)))
    for ax, title in zip(axes, panels):
        for shade, b in zip(shades, batch_sizes):
            v = values[title, b]
            ax.hist(v, bins=edges, histtype="step", color=shade, linewidth=1.5,
                    weights=np.full(len(v), 1.0 / len(v)), label=f"batch size {b}")
        ax.axvline(3.0, color="black", linestyle="--", linewidth=1, label="Gaussian (3)")
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel(r"kurtosis $\mathbb{E}[\xi_i^4] / \mathbb{E}[\xi_i^2]^2$")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("fraction of coordinates")
    figure_legend(axes, len(batch_sizes) + 1, *axes[0].get_legend_handles_labels())
    return axes


def plot_zipf(counts: torch.Tensor, ax: Optional[plt.Axes] = None, *, label: str = "corpus",
              color: str = "tab:blue", reference: bool = True) -> plt.Axes:
    """Word frequency against frequency rank (log-log), with the Zipf line ``p_k ∝ 1/k`` through
    rank 1 (``reference=False`` leaves it out: several corpora on one axes, one line each)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * COLUMN_WIDTH, ROW_HEIGHT), layout="constrained")
    sorted_counts = torch.sort(counts.double(), descending=True).values
    freq = (sorted_counts[sorted_counts > 0] / sorted_counts.sum()).numpy()
    rank = np.arange(1, len(freq) + 1)
    ax.loglog(rank, freq, color=color, linewidth=1.5, label=label)
    if reference:
        ax.loglog(rank, freq[0] / rank, color=color, linestyle="--", linewidth=1,
                  label=rf"$p_k \propto 1/k$ ({label})")
    ax.set_xlabel("frequency rank $k$")
    ax.set_ylabel("relative frequency $p_k$")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return ax
