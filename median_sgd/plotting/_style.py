"""Shared style of the book's figures: one colour and marker per method, in every chapter, and
the drawing steps every chapter's figures repeat (a row or grid of panels, a median line with its
band over seeds, the records of one line).

Its names without an underscore are used by the other ``plotting`` modules; only ``COLUMN_WIDTH``,
``ROW_HEIGHT``, ``book_style`` and ``estimator_style`` are re-exported by the package.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import NullFormatter

__all__ = [
    "COLUMN_WIDTH",
    "ROW_HEIGHT",
    "book_style",
    "estimator_style",
    "figure_legend",
    "legend_entries",
    "names_in",
    "select",
    "one_axes",
    "panel_row",
    "panel_grid",
    "draw_band",
    "log_ticks",
    "label_axes",
    "scatter_scene",
]

_COLORS = {
    "mean": "tab:red",
    "coordinate median": "tab:purple",
    "geometric median": "tab:green",
}
_MARKERS = {"mean": "X", "coordinate median": "s", "geometric median": "P"}
# Online estimators (chapters 3, 4; names of experiments.tracking.ESTIMATORS): the colour of the
# median each one estimates, a lighter shade for the explicit (SGD) versions.
_COLORS.update({"momentum": "tab:red", "momentum (SGD)": "salmon", "VClip": "tab:green",
                "adaptive momentum": "yellowgreen", "CClip": "tab:purple", "signed increment": "orchid"})
_MARKERS.update({"momentum": "X", "momentum (SGD)": "x", "VClip": "P", "adaptive momentum": "+",
                 "CClip": "s", "signed increment": "d"})


def estimator_style(name: str) -> dict:
    """Colour and marker of an estimator, the same in every figure of the book."""
    if name.startswith("trimmed mean"):
        return {"color": "tab:orange", "marker": "D"}
    return {"color": _COLORS.get(name, "tab:gray"), "marker": _MARKERS.get(name, "o")}


# The book's content column is about 676 CSS pixels wide (sphinx-book-theme at 1280 px), and
# matplotlib's inline figures are drawn at 100 px per inch: a figure at most COLUMN_WIDTH inches
# wide is shown at its natural size, so its fonts are the sizes set below, never shrunk.
COLUMN_WIDTH = 6.6
#: Height of a row of panels in a figure that spans the column (inches).
ROW_HEIGHT = 2.8

_BOOK_RC = {
    "figure.dpi": 100,
    "figure.figsize": (COLUMN_WIDTH, 3.6),
    "font.size": 9.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9.5,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "figure.titlesize": 10.5,
}


def book_style() -> None:
    """Set the book's figure style for the running kernel (call once in a chapter's setup cell).

    Figures are sized for the content column (:data:`COLUMN_WIDTH` inches at 100 px per inch,
    fonts of 8.5-10.5 pt) and, inside IPython, shown as ``retina`` PNGs: drawn
    at twice the resolution and displayed at their design width, so they stay sharp on
    high-resolution screens. Library users who never call it keep matplotlib's defaults.
    """
    mpl.rcParams.update(_BOOK_RC)
    try:  # only inside an IPython kernel with the inline backend
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def legend_entries(axes) -> tuple:
    """``(handles, labels)`` of the labelled artists of every axes in ``axes``, each label once (the
    first artist drawn with it)."""
    seen: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def figure_legend(axes, ncol: int = 3, handles=None, labels=None, **kwargs) -> None:
    """The book's one legend per figure: below the panels (``loc="outside lower center"``, so it
    hides no data) when the figure has a constrained layout, else beside the last panel.

    ``handles``/``labels`` default to the labelled artists of every panel, each label once (a line
    drawn in only some panels still gets its entry); at most ``ncol`` columns, never more columns
    than entries. Other keywords go to ``legend``.
    """
    axes = list(axes)
    if handles is None:
        handles, labels = legend_entries(axes)
    fig = axes[0].figure
    ncol = max(1, min(ncol, len(labels)))
    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, **kwargs)
    else:
        axes[-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), **kwargs)


def names_in(records: List[dict], key: str, chosen: Optional[Iterable[str]] = None) -> List[str]:
    """``chosen`` as a list, or else the distinct ``record[key]`` in the order they first appear."""
    return list(dict.fromkeys(r[key] for r in records)) if chosen is None else list(chosen)


def select(records: Iterable[dict], order: str, **where) -> List[dict]:
    """The records whose every ``key`` equals ``where[key]``, sorted by ``record[order]`` (the
    points of one line of a figure)."""
    return sorted((r for r in records if all(r.get(k) == v for k, v in where.items())),
                  key=lambda r: r[order])


def one_axes(ax, height: float, width: float = COLUMN_WIDTH, layout: Optional[str] = "constrained"):
    """``ax``, or else the axes of a new ``width`` x ``height`` inch figure (constrained layout,
    so a legend below it takes room of its own)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height), layout=layout)
    return ax


def panel_row(axes, count: int, what: str, height: float = ROW_HEIGHT, **subplots_kw):
    """``axes`` (checked: one per panel, else ``ValueError`` naming ``what`` the panels show), or
    else a row of ``count`` panels spanning the book's column, with a constrained layout."""
    if axes is None:
        _, grid = plt.subplots(1, count, figsize=(COLUMN_WIDTH, height), squeeze=False,
                               layout="constrained", **subplots_kw)
        axes = grid[0]
    if len(axes) != count:
        raise ValueError(f"got {len(axes)} axes for {count} {what}")
    return axes


def panel_grid(panels: int, axes=None, row_height: float = ROW_HEIGHT, **subplots_kw):
    """``axes`` flattened, or else a column-wide figure of ``panels`` panels, at most 2 per row for
    4 panels and 3 otherwise, with room below for the legend (constrained layout)."""
    if axes is None:
        cols = 2 if panels == 4 else min(3, panels)
        rows = -(-panels // cols)
        _, grid = plt.subplots(rows, cols, figsize=(COLUMN_WIDTH, rows * row_height + 0.8),
                               layout="constrained", squeeze=False, **subplots_kw)
        for ax in grid.ravel()[panels:]:
            ax.set_visible(False)
        axes = grid.ravel()[:panels]
    return np.atleast_1d(axes).ravel()


def draw_band(ax, x: Sequence[float], center: Iterable[float], low: Iterable[float],
              high: Iterable[float], *, color, alpha: float = 0.15, band: bool = True, **line_kw):
    """A line ``center`` against ``x`` and, with ``band``, the region from ``low`` to ``high``
    shaded in its colour (the spread over seeds); other keywords go to ``ax.plot``."""
    ax.plot(x, center, color=color, **line_kw)
    if band:
        ax.fill_between(x, low, high, color=color, alpha=alpha, linewidth=0)


def label_axes(ax, xlabel: Optional[str] = None, ylabel: Optional[str] = None, *,
               title: Optional[str] = None, xscale: Optional[str] = None,
               yscale: Optional[str] = None, grid: str = "major") -> None:
    """A panel's scales, labels and title, and its light grid (at the ``grid`` ticks: "major",
    "minor" or "both"). The scales are set first: setting a log scale resets the axis' ticks."""
    if xscale is not None:
        ax.set_xscale(xscale)
    if yscale is not None:
        ax.set_yscale(yscale)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(True, which=grid, alpha=0.3)


def log_ticks(ax, values: Sequence[float], labels: Sequence[str]) -> None:
    """Ticks of a log x-axis at the swept ``values`` only, written as ``labels``."""
    ax.set_xticks(values)
    ax.set_xticklabels(labels)
    ax.xaxis.set_minor_formatter(NullFormatter())


def scatter_scene(ax, scene: dict, flag: str, groups, *, size: float, star_size: float,
                  estimate_size: float, edge_width: float) -> None:
    """A 2-D scene: its points in two groups (``groups``: ``(label, colour, alpha)`` of the points
    where ``scene[flag]`` is false, then of those where it is true), the population mean (a star)
    and each sample estimate in its estimator's style, on top."""
    points, flagged = scene["points"].numpy(), scene[flag].numpy()
    for rows, (label, color, alpha) in zip((~flagged, flagged), groups):
        ax.scatter(points[rows, 0], points[rows, 1], s=size, color=color, alpha=alpha, label=label)
    ax.scatter(*scene["true_mean"].numpy(), s=star_size, marker="*", color="black", zorder=5,
               label="population mean")
    for name, estimate in scene["estimates"].items():
        ax.scatter(*estimate.numpy(), s=estimate_size, zorder=6, edgecolor="white",
                   linewidth=edge_width, label=f"sample {name}", **estimator_style(name))
