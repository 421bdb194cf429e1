"""Shared style of the book's figures: one colour and marker per method, in every chapter."""

from __future__ import annotations

__all__ = ["estimator_style"]

_COLORS = {
    "mean": "tab:red",
    "coordinate median": "tab:purple",
    "geometric median": "tab:green",
}
_MARKERS = {"mean": "X", "coordinate median": "s", "geometric median": "P"}


def estimator_style(name: str) -> dict:
    """Colour and marker of an estimator, the same in every figure of the book."""
    if name.startswith("trimmed mean"):
        return {"color": "tab:orange", "marker": "D"}
    return {"color": _COLORS.get(name, "tab:gray"), "marker": _MARKERS.get(name, "o")}
