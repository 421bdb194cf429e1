"""Shared style of the book's figures: one colour and marker per method, in every chapter."""

from __future__ import annotations

__all__ = ["estimator_style"]

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
