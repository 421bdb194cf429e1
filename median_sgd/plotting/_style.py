"""Shared style of the book's figures: one colour and marker per method, in every chapter."""

from __future__ import annotations

__all__ = ["COLUMN_WIDTH", "ROW_HEIGHT", "book_style", "estimator_style", "figure_legend"]

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
    import matplotlib as mpl

    mpl.rcParams.update(_BOOK_RC)
    try:  # only inside an IPython kernel with the inline backend
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def figure_legend(axes, ncol: int = 3, handles=None, labels=None, **kwargs) -> None:
    """The book's one legend per figure: below the panels (``loc="outside lower center"``, so it
    hides no data) when the figure has a constrained layout, else beside the last panel.

    ``handles``/``labels`` default to the labelled artists of every panel, each label once (a line
    drawn in only some panels still gets its entry); at most ``ncol`` columns, never more columns
    than entries. Other keywords go to ``legend``.
    """
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    axes = list(axes)
    if handles is None:
        seen: dict = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
        handles, labels = list(seen.values()), list(seen)
    fig = axes[0].figure
    ncol = max(1, min(ncol, len(labels)))
    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, **kwargs)
    else:
        axes[-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), **kwargs)
