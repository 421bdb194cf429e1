"""Figures of the chapter "How fast is a median?" and the loader of the benchmark results they draw.

The numbers come from ``python -m benchmarks`` (the repository's ``benchmarks/`` package), which
writes one JSON file per suite and device to ``benchmarks/results/``; the chapter draws the
committed files, so its figures do not depend on the machine that builds the book.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._style import COLUMN_WIDTH, ROW_HEIGHT

__all__ = [
    "load_benchmark_results",
    "benchmark_rows",
    "plot_solver_times",
    "plot_hardware_floor",
    "plot_targets",
    "plot_bgmd_map",
    "machine_label",
    "target_factor",
]

#: the suites ``python -m benchmarks`` writes (benchmarks/__main__.py), in its order
SUITES = ("medians", "stable", "alpha_stable_experiment", "bgmd", "optim", "floor")
#: where the committed results live when there is no local checkout (e.g. on Colab)
RESULTS_URL = "https://raw.githubusercontent.com/median-sgd/median-sgd/main/benchmarks/results/"

_SOLVERS = {  # label, colour, hatch
    "geom_median_s": ("geom-median (reference)", "tab:gray", None),
    "ours_s": ("median_sgd.geometric_median", "tab:green", None),
}


def _find_results_dir(start: Path) -> Optional[Path]:
    for folder in (start, *start.parents):
        candidate = folder / "benchmarks" / "results"
        if candidate.is_dir():
            return candidate
    return None


def load_benchmark_results(
    directory=None,
    *,
    device: str = "cpu",
    suites: Sequence[str] = SUITES,
    url: Optional[str] = RESULTS_URL,
    opener=urllib.request.urlopen,
) -> Dict[str, dict]:
    """``{suite: payload}`` of the committed ``<suite>-<device>.json`` files.

    ``directory`` defaults to the first ``benchmarks/results`` folder found from the working
    directory upwards (a checkout of the repository). Without one, the files are fetched from
    ``url`` (the repository on GitHub), skipping suites that have none. Each payload holds the
    machine (``device``, ``torch``, ``threads``, ``load_average``, ``date``) and the ``rows``.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; expected some of {list(SUITES)}")
    folder = Path(directory) if directory is not None else _find_results_dir(Path.cwd())
    results: Dict[str, dict] = {}
    if folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"no benchmark results folder {folder}")
        for suite in suites:
            path = folder / f"{suite}-{device}.json"
            if path.is_file():
                results[suite] = json.loads(path.read_text())
    elif url is not None:
        for suite in suites:
            try:
                with opener(f"{url}{suite}-{device}.json") as response:
                    results[suite] = json.loads(response.read().decode())
            except OSError:  # urllib's HTTPError (404: no such suite) and URLError are OSErrors
                continue
    if not results:
        raise FileNotFoundError(
            f"found no benchmark results for device {device!r} (looked in "
            f"{folder if folder is not None else url}); run `python -m benchmarks` in a checkout"
        )
    return results


def benchmark_rows(results: Dict[str, dict], suite: str, case: Optional[str] = None) -> List[dict]:
    """The rows of one suite (those of one ``case``, e.g. ``"hardware floor"``, if given)."""
    if suite not in results:
        raise KeyError(f"no results for suite {suite!r}; have {sorted(results)}")
    rows = results[suite]["rows"]
    return [r for r in rows if case is None or r.get("case") == case]


def machine_label(payload: dict) -> str:
    """The machine a suite ran on, in words: ``"AMD EPYC, 2 cores, 1 thread"`` or the GPU's name.

    Built from the payload's ``cpu``, ``cpu_count`` and ``threads`` on the CPU (the ``device``
    string of results written before the harness said "1 thread" reads "1 threads"); the
    ``device`` string elsewhere.
    """
    if payload.get("device_type") == "cpu" and "cpu" in payload:
        parts = [str(payload["cpu"])]
        for key, word in (("cpu_count", "core"), ("threads", "thread")):
            if key in payload:
                k = payload[key]
                parts.append(f"{k} {word}{'' if k == 1 else 's'}")
        return ", ".join(parts)
    return str(payload.get("device", "unknown device"))


def target_factor(row: dict) -> float:
    """By how much a row's ``ratio`` meets its ``target``: ``ratio / target`` when higher is
    better, ``target / ratio`` when lower is; at least 1 exactly when the target is met."""
    if row.get("better", "higher") == "higher":
        return row["ratio"] / row["target"]
    return row["target"] / row["ratio"]


def _dim(d: int) -> str:
    """``d`` compactly: a large power of ten as ``10^k`` (mathtext), else with thousands commas."""
    k = len(str(d)) - 1
    return f"$10^{{{k}}}$" if d >= 10**5 and d == 10**k else f"{d:,}"


def _size_label(r: dict) -> str:
    return f"n={r['n']}\nd={_dim(r['d'])}"


def _plain_log_ticks(axis) -> None:
    """Log-scale tick labels as plain numbers (3, not 3 x 10^0)."""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _size_axes(ax, sizes: Sequence[tuple], ylabel: str, title: str, log: Optional[str] = None) -> None:
    """A panel of bars over the problem sizes ``(n, d)``: a size label under each group, a light
    horizontal grid; ``log="log"``: a log y-axis, ``"plain"``: one with plain tick labels."""
    if log is not None:
        ax.set_yscale("log")
    if log == "plain":
        _plain_log_ticks(ax.yaxis)
    ax.set_xticks(np.arange(len(sizes)), [_size_label(dict(n=n, d=d)) for n, d in sizes])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", which="major", alpha=0.3)


def _figure(axes, ncols, height, **kw):
    if axes is not None:
        return axes[0].figure, axes
    fig, axes = plt.subplots(1, ncols, figsize=(COLUMN_WIDTH, height), layout="constrained", **kw)
    return fig, axes


def _scenario_handles(scenarios):
    return [Patch(facecolor="white", edgecolor="black", linewidth=0.5,
                  hatch="//" if j else None, label=s) for j, s in enumerate(scenarios)]


def plot_solver_times(rows: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Time per problem size for each solver (left, log scale) and ours' speed-up (right).

    ``rows``: the ``"vs geom-median"`` rows of the ``medians`` suite. Bars in pairs per size, solid
    for clean data and hatched for 25% outliers; the dashed line on the right is the 2x target.
    Without ``axes``: a figure the width of the book's column, one legend below the panels.
    """
    if not rows:
        raise ValueError("no rows to plot")
    fig, axes = _figure(axes, 2, ROW_HEIGHT + 0.8, gridspec_kw={"width_ratios": [3, 2]})
    ax, ax_ratio = axes
    sizes = list(dict.fromkeys((r["n"], r["d"]) for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    x = np.arange(len(sizes))
    width = 0.8 / (len(_SOLVERS) * len(scenarios))
    k = 0
    for j, scenario in enumerate(scenarios):
        for key, (_, color, _) in _SOLVERS.items():
            vals = [next(r[key] for r in rows if (r["n"], r["d"]) == s and r["scenario"] == scenario)
                    for s in sizes]
            ax.bar(x + (k - (len(_SOLVERS) * len(scenarios) - 1) / 2) * width, vals, width,
                   color=color, hatch="//" if j else None,
                   edgecolor="white" if not j else "black", linewidth=0.5)
            k += 1
    _size_axes(ax, sizes, "seconds per solve (median)", "time to the same objective value",
               log="log")
    for j, scenario in enumerate(scenarios):
        vals = [next(r["ratio"] for r in rows if (r["n"], r["d"]) == s and r["scenario"] == scenario)
                for s in sizes]
        ax_ratio.bar(x + (j - (len(scenarios) - 1) / 2) * 0.35, vals, 0.35, color="tab:green",
                     hatch="//" if j else None, edgecolor="white" if not j else "black",
                     linewidth=0.5)
    target = rows[0]["target"]
    ax_ratio.axhline(target, color="black", linestyle="--", linewidth=1)
    _size_axes(ax_ratio, sizes, "speed-up over geom-median", "speed-up (higher is better)",
               log="plain")
    handles = [Patch(color=color, label=label) for label, color, _ in _SOLVERS.values()]
    handles += _scenario_handles(scenarios)
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1,
                          label=f"target {target:g}x speed-up"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3)
    return axes


def plot_hardware_floor(rows: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """One Weiszfeld iteration against the memory traffic it cannot avoid.

    ``rows``: the ``"hardware floor"`` rows of the ``medians`` suite. Left: the cost of one
    iteration and of the whole adaptive solve in copies of the matrix (dashed: the 2.5-copy
    target). Right: the fraction of the hardware floor reached, the time of one read of the
    matrix divided by the time of an iteration (1 = an iteration costs one read). Without
    ``axes``: a figure the width of the book's column, one legend below the panels.
    """
    if not rows:
        raise ValueError("no rows to plot")
    fig, axes = _figure(axes, 2, ROW_HEIGHT + 0.8)
    ax, ax_frac = axes
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    sizes = list(dict.fromkeys((r["n"], r["d"]) for r in rows))
    x = np.arange(len(sizes))
    width = 0.8 / (2 * len(dtypes))
    handles = []
    for j, dtype in enumerate(dtypes):
        sel = [next(r for r in rows if (r["n"], r["d"]) == s and r["dtype"] == dtype) for s in sizes]
        suffix = f" ({dtype})" if len(dtypes) > 1 else ""
        alpha = 1.0 - 0.4 * j
        ax.bar(x + (2 * j - len(dtypes) + 0.5) * width, [r["ratio"] for r in sel], width,
               color="tab:green", alpha=alpha)
        ax.bar(x + (2 * j - len(dtypes) + 1.5) * width, [r["solve_copies"] for r in sel], width,
               color="tab:blue", alpha=alpha)
        ax_frac.bar(x + (j - (len(dtypes) - 1) / 2) * 0.8 / len(dtypes),
                    [r["floor_fraction"] for r in sel], 0.8 / len(dtypes), color="tab:green",
                    alpha=alpha)
        handles += [Patch(color="tab:green", alpha=alpha, label="one iteration" + suffix),
                    Patch(color="tab:blue", alpha=alpha, label="whole solve" + suffix)]
    target = rows[0]["target"]
    ax.axhline(target, color="black", linestyle="--", linewidth=1)
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1,
                          label=f"target: an iteration {target:g} copies"))
    _size_axes(ax, sizes, "cost in copies of the matrix", "cost vs. a copy (lower is better)",
               log="plain")
    ax_frac.axhline(1.0, color="black", linestyle=":", linewidth=1)
    _size_axes(ax_frac, sizes, "one read / one iteration", "fraction of the floor reached")
    fig.legend(handles=handles, loc="outside lower center", ncol=3)
    return axes


_CASES = {  # short names of the cases in the targets chart
    "vs geom-median": "vs geom-median",
    "hardware floor": "iteration vs copy",
    "batched": "batched vs loop",
    "sample_stable vs scipy": "sampler vs scipy",
    "alpha-stable experiment": "Fig. 2 run",
}
# units of a "lower" ratio: (after the measured value, after the target)
_UNITS = {"hardware floor": (" copies", ""), "alpha-stable experiment": (" s", " s")}


def _target_text(r: dict) -> str:
    """The measured ratio and its target in words: "5.72× faster; target 2×", "0.544 copies;
    target at most 2.5"."""
    if r.get("better", "higher") == "higher":
        return f"{r['ratio']:.3g}\u00d7 faster; target {r['target']:g}\u00d7"
    unit, target_unit = _UNITS.get(r.get("case"), ("", ""))
    return f"{r['ratio']:.3g}{unit}; target at most {r['target']:g}{target_unit}"


def plot_targets(results: Dict[str, dict], suites: Sequence[str] = ("medians", "stable",
                                                                     "alpha_stable_experiment"),
                 ax: Optional[plt.Axes] = None) -> plt.Axes:
    """By how much every ratio of the given suites meets its target (log scale).

    One horizontal bar per row, of length :func:`target_factor` (ratio / target, or target /
    ratio where lower is better): right of the dashed line at 1 the target is met (green),
    left of it missed (red). The measured ratio and the target are written in words in a column
    right of the panel, where no line crosses them.
    """
    labels, factors, texts = [], [], []
    for suite in suites:
        rows = [r for r in results.get(suite, {}).get("rows", []) if "ratio" in r and "target" in r]
        # a row's dtype is named only where its case has several
        dtypes: dict[str, set] = {}
        for r in rows:
            dtypes.setdefault(r.get("case", suite), set()).add(r.get("dtype"))
        for r in rows:
            case = r.get("case", suite)
            what = [_CASES.get(case, case)]
            if "n" in r and "d" in r and case != "batched":
                what.append(f"{r['n']}\u00d7{_dim(r['d'])}")
            for key in ("config", "scenario", "alpha", "dtype"):
                if key == "dtype" and len(dtypes[case]) < 2:
                    continue
                if key in r:
                    what.append(f"\u03b1={r[key]}" if key == "alpha" else f"{r[key]}")
            labels.append(" ".join(str(w) for w in what))
            factors.append(target_factor(r))
            texts.append(_target_text(r))
    if not factors:
        raise ValueError("no rows with a ratio and a target")
    if ax is None:
        _, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.21 * len(factors) + 1.0),
                             layout="constrained")
    y = np.arange(len(factors))[::-1]
    ax.barh(y, factors, color=["tab:green" if f >= 1 else "tab:red" for f in factors],
            height=0.7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(min(min(factors), 0.5) / 1.3, max(max(factors), 2.0) * 1.3)
    _plain_log_ticks(ax.xaxis)
    ax.set_ylim(-0.6, len(factors) - 0.4)
    ax.set_yticks(y, labels, fontsize=8)
    # the ratios and targets in words: a column right of the panel (axes coordinates in x)
    trans = ax.get_yaxis_transform()
    for yi, text in zip(y, texts):
        ax.text(1.02, yi, text, transform=trans, va="center", ha="left", fontsize=8,
                clip_on=False)
    ax.set_xlabel("target met by a factor of (log scale; below 1: missed)")
    ax.grid(True, axis="x", which="major", alpha=0.3)
    return ax


_N_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def plot_bgmd_map(rows: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Where converged BGmD beats the converged full geometric median: ``gm_s / bgmd_s`` against
    ``d``, one panel per block fraction ``k/d``, one colour per ``n``.

    ``rows``: the ``"map"`` rows of the ``bgmd`` suite. Solid lines: clean data, dashed: 20% bit
    flips; open circles: the ratio the cost model predicts (``predicted_ratio``, clean and bit
    flips alike). Above the dotted line at 1 BGmD is faster. Log scales on both axes, the same
    ratio axis in every panel. Without ``axes``: a figure the width of the book's column, one
    legend below the panels.
    """
    if not rows:
        raise ValueError("no rows to plot")
    fracs = sorted({r["k_frac"] for r in rows})
    ns = sorted({r["n"] for r in rows})
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, drawn = _figure(axes, len(fracs), ROW_HEIGHT + 0.6, sharey=True)
    panels = list(np.atleast_1d(drawn))
    for ax, frac in zip(panels, fracs):
        for i, n in enumerate(ns):
            color = _N_COLORS[i % len(_N_COLORS)]
            for j, scenario in enumerate(scenarios):
                sel = sorted((r for r in rows if r["k_frac"] == frac and r["n"] == n
                              and r["scenario"] == scenario), key=lambda r: r["d"])
                if not sel:
                    continue
                ds = [r["d"] for r in sel]
                ax.plot(ds, [r["ratio"] for r in sel], color=color, marker="o", markersize=4,
                        linestyle="--" if j else "-", linewidth=1.3)
                ax.plot(ds, [r["predicted_ratio"] for r in sel], linestyle="none", marker="o",
                        markersize=7, markerfacecolor="none", markeredgecolor=color,
                        markeredgewidth=0.8)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"k/d = {frac:g}")
        ax.set_xlabel("d")
        ax.grid(True, which="major", alpha=0.3)
    panels[0].set_ylabel("full GM time / BGmD time")
    handles = [Line2D([], [], color=_N_COLORS[i % len(_N_COLORS)], linewidth=1.3, label=f"n = {n}")
               for i, n in enumerate(ns)]
    handles += [Line2D([], [], color="black", linestyle="--" if j else "-", linewidth=1.3,
                       label=s.replace("_", " ")) for j, s in enumerate(scenarios)]
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                          markeredgecolor="black", label="cost model"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3)
    return panels
