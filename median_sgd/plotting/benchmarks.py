"""Figures of chapter 14 ("How fast is a median?") and the loader of the benchmark results they draw.

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

__all__ = [
    "load_benchmark_results",
    "benchmark_rows",
    "plot_solver_times",
    "plot_hardware_floor",
    "plot_targets",
]

#: the suites ``python -m benchmarks`` writes (benchmarks/__main__.py), in its order
SUITES = ("medians", "stable", "alpha_stable_experiment", "bgmd", "optim")
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


def _size_label(r: dict) -> str:
    return f"n={r['n']}\nd={r['d']:,}"


def _plain_log_ticks(axis) -> None:
    """Log-scale tick labels as plain numbers (3, not 3 x 10^0)."""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def plot_solver_times(rows: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """Time per problem size for each solver (left, log scale) and ours' speed-up (right).

    ``rows``: the ``"vs geom-median"`` rows of the ``medians`` suite. Bars in pairs per size, solid
    for clean data and hatched for 25% outliers; the dashed line on the right is the 2x target.
    """
    if not rows:
        raise ValueError("no rows to plot")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ax, ax_ratio = axes
    sizes = list(dict.fromkeys((r["n"], r["d"]) for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    x = np.arange(len(sizes))
    width = 0.8 / (len(_SOLVERS) * len(scenarios))
    k = 0
    for scenario in scenarios:
        for key, (label, color, _) in _SOLVERS.items():
            vals = [next(r[key] for r in rows if (r["n"], r["d"]) == s and r["scenario"] == scenario)
                    for s in sizes]
            ax.bar(x + (k - (len(_SOLVERS) * len(scenarios) - 1) / 2) * width, vals, width,
                   color=color, hatch="//" if scenario != scenarios[0] else None,
                   edgecolor="white" if scenario == scenarios[0] else "black", linewidth=0.5,
                   label=f"{label}, {scenario}")
            k += 1
    ax.set_yscale("log")
    top = max(max(r[key] for r in rows) for key in _SOLVERS)
    ax.set_ylim(top=top * 30)  # room for the legend above the bars
    ax.set_xticks(x, [_size_label(dict(n=n, d=d)) for n, d in sizes])
    ax.set_ylabel("seconds per solve (median)")
    ax.set_title("time to the same objective value")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    for j, scenario in enumerate(scenarios):
        vals = [next(r["ratio"] for r in rows if (r["n"], r["d"]) == s and r["scenario"] == scenario)
                for s in sizes]
        ax_ratio.bar(x + (j - (len(scenarios) - 1) / 2) * 0.35, vals, 0.35, color="tab:green",
                     hatch="//" if j else None, edgecolor="white" if not j else "black",
                     linewidth=0.5, label=scenario)
    target = rows[0]["target"]
    ax_ratio.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}x")
    ax_ratio.set_yscale("log")
    _plain_log_ticks(ax_ratio.yaxis)
    ax_ratio.set_xticks(x, [_size_label(dict(n=n, d=d)) for n, d in sizes])
    ax_ratio.set_ylabel("speed-up over geom-median")
    ax_ratio.set_title("ratio (higher is better)")
    ax_ratio.legend(fontsize=7)
    ax_ratio.grid(True, axis="y", which="major", alpha=0.3)
    return axes


def plot_hardware_floor(rows: List[dict], axes: Optional[Sequence[plt.Axes]] = None):
    """One Weiszfeld iteration against the memory traffic it cannot avoid.

    ``rows``: the ``"hardware floor"`` rows of the ``medians`` suite. Left: the cost of one
    iteration and of the whole adaptive solve in copies of the matrix (dashed: the 2.5-copy
    target). Right: the fraction of the hardware floor reached, the time of one read of the
    matrix divided by the time of an iteration (1 = an iteration costs one read).
    """
    if not rows:
        raise ValueError("no rows to plot")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax, ax_frac = axes
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    sizes = list(dict.fromkeys((r["n"], r["d"]) for r in rows))
    x = np.arange(len(sizes))
    width = 0.8 / (2 * len(dtypes))
    for j, dtype in enumerate(dtypes):
        sel = [next(r for r in rows if (r["n"], r["d"]) == s and r["dtype"] == dtype) for s in sizes]
        suffix = f" ({dtype})" if len(dtypes) > 1 else ""
        ax.bar(x + (2 * j - len(dtypes) + 0.5) * width, [r["ratio"] for r in sel], width,
               color="tab:green", alpha=1.0 - 0.4 * j, label="one iteration" + suffix)
        ax.bar(x + (2 * j - len(dtypes) + 1.5) * width, [r["solve_copies"] for r in sel], width,
               color="tab:blue", alpha=1.0 - 0.4 * j, label="whole solve" + suffix)
        ax_frac.bar(x + (j - (len(dtypes) - 1) / 2) * 0.8 / len(dtypes),
                    [r["floor_fraction"] for r in sel], 0.8 / len(dtypes), color="tab:green",
                    alpha=1.0 - 0.4 * j, label=dtype)
    target = rows[0]["target"]
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g} copies")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xticks(x, [_size_label(dict(n=n, d=d)) for n, d in sizes])
    ax.set_ylabel("cost in copies of the matrix")
    ax.set_title("iteration and solve vs. clone (lower is better)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax_frac.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax_frac.set_xticks(x, [_size_label(dict(n=n, d=d)) for n, d in sizes])
    ax_frac.set_ylabel("one read / one iteration")
    ax_frac.set_title("fraction of the hardware floor reached")
    if len(dtypes) > 1:
        ax_frac.legend(fontsize=7)
    ax_frac.grid(True, axis="y", alpha=0.3)
    return axes


def plot_targets(results: Dict[str, dict], suites: Sequence[str] = ("medians", "stable",
                                                                     "alpha_stable_experiment"),
                 ax: Optional[plt.Axes] = None) -> plt.Axes:
    """Every ratio of the given suites divided by its target (log scale): right of the line at 1
    the target is met. One horizontal bar per row; ``better="lower"`` ratios are inverted so
    that right is always better."""
    labels, scores, met, texts = [], [], [], []
    for suite in suites:
        for r in results.get(suite, {}).get("rows", []):
            if "ratio" not in r or "target" not in r:
                continue
            score = r["ratio"] / r["target"] if r.get("better", "higher") == "higher" else r["target"] / r["ratio"]
            what = [r.get("case", suite)]
            for key in ("config", "scenario", "alpha", "dtype"):
                if key in r:
                    what.append(f"alpha={r[key]}" if key == "alpha" else f"{r[key]}")
            if "n" in r and "d" in r and r.get("case") != "batched":
                what.insert(1, f"({r['n']}, {r['d']:,})")
            labels.append(" ".join(str(w) for w in what))
            scores.append(score)
            met.append(bool(r.get("met")))
            sign = ">=" if r.get("better", "higher") == "higher" else "<="
            texts.append(f"{r['ratio']:.3g} (target {sign} {r['target']:g})")
    if not scores:
        raise ValueError("no rows with a ratio and a target")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.28 * len(scores) + 1.2))
    y = np.arange(len(scores))[::-1]
    ax.barh(y, scores, color=["tab:green" if m else "tab:red" for m in met], height=0.7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    for yi, score, text in zip(y, scores, texts):
        ax.annotate(text, (score, yi), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=6)
    ax.set_xlim(min(min(scores), 0.5) / 1.5, max(max(scores), 2.0) * 6)
    _plain_log_ticks(ax.xaxis)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("ratio / target (right of the dashed line: target met)")
    ax.grid(True, axis="x", which="major", alpha=0.3)
    return ax
