"""Figures of chapter 2 (proximal operators and clipping): the operators in 1-D and in the plane."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Circle, Rectangle

__all__ = ["plot_operators_1d", "plot_operator_2d"]

Operator = Callable[[torch.Tensor, float], torch.Tensor]

_LINESTYLES = ("-", "--", "-.", ":")


def plot_operators_1d(
    operators: Dict[str, Operator],
    tau: float = 1.0,
    ax: Optional[plt.Axes] = None,
    *,
    limit: float = 3.0,
    points: int = 601,
    legend: bool = True,
) -> plt.Axes:
    """``v -> op(v, tau)`` on ``[-limit, limit]`` for each operator (applied to 1-D vectors).

    The identity is drawn dotted and the thresholds ``+-tau`` as thin vertical lines. The legend
    (``legend=True``) goes below the axes, where it hides no curve.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    v = torch.linspace(-limit, limit, points, dtype=torch.float64)[:, None]
    ax.plot(v[:, 0], v[:, 0], color="0.6", linestyle=":", linewidth=1, label="identity")
    for i, (name, op) in enumerate(operators.items()):
        y = op(v, tau)[:, 0]
        ax.plot(v[:, 0], y, linewidth=2, linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                color=f"C{i}", label=name)
    for x in (-tau, tau):
        ax.axvline(x, color="0.8", linewidth=0.8, zorder=0)
    ax.axhline(0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xlim(-limit, limit)
    ax.set_xlabel("$v$")
    ax.set_aspect("equal")
    if legend:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), borderaxespad=0.0)
    return ax


def plot_operator_2d(
    operator: Operator,
    points: torch.Tensor,
    tau: float = 1.0,
    ax: Optional[plt.Axes] = None,
    *,
    ball: Optional[str] = None,
    color: str = "C0",
    limit: Optional[float] = None,
) -> plt.Axes:
    """Arrows from points ``v`` (an ``(n, 2)`` tensor) to ``operator(v, tau)``.

    ``ball`` draws the set of radius ``tau`` the operator maps into or onto: ``"l2"`` (the disc,
    for ``clip_l2``) or ``"linf"`` (the box, for ``clip_l1``).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    if points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {tuple(points.shape)}")
    v = points.detach().cpu().double()
    out = operator(v, tau)
    if ball == "l2":
        ax.add_patch(Circle((0, 0), tau, facecolor="0.92", edgecolor="0.4", zorder=0))
    elif ball == "linf":
        ax.add_patch(Rectangle((-tau, -tau), 2 * tau, 2 * tau, facecolor="0.92", edgecolor="0.4", zorder=0))
    elif ball is not None:
        raise ValueError(f"unknown ball {ball!r}; expected 'l2', 'linf' or None")
    v_np, out_np = v.numpy(), out.numpy()
    moved = np.linalg.norm(out_np - v_np, axis=-1) > 1e-9
    ax.quiver(v_np[moved, 0], v_np[moved, 1], (out_np - v_np)[moved, 0], (out_np - v_np)[moved, 1],
              angles="xy", scale_units="xy", scale=1, width=0.004, color=color, alpha=0.6)
    ax.scatter(v_np[:, 0], v_np[:, 1], s=8, color="0.5", zorder=3)
    ax.scatter(out_np[:, 0], out_np[:, 1], s=10, color=color, zorder=4)
    if limit is None:
        limit = 1.05 * float(np.abs(v_np).max())
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.85", linewidth=0.8, zorder=0)
    ax.axvline(0, color="0.85", linewidth=0.8, zorder=0)
    return ax
