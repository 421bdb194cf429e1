"""The loader of the benchmark results (benchmarks/results/*.json) and the figures of the chapter "How fast is a median?"."""

from __future__ import annotations

import io
import json
import urllib.error
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from median_sgd.plotting import (  # noqa: E402
    COLUMN_WIDTH,
    benchmark_rows,
    load_benchmark_results,
    machine_label,
    plot_bgmd_map,
    plot_hardware_floor,
    plot_solver_times,
    plot_targets,
    target_factor,
)
from median_sgd.plotting.benchmarks import SUITES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _payload(suite, rows):
    return {"suite": suite, "device": "test CPU", "device_type": "cpu", "torch": "x", "threads": 2,
            "load_average": [0.1, 0.1, 0.1], "date": "today", "rows": rows}


def _medians_rows():
    rows = []
    for n, d in [(16, 1000), (64, 256)]:
        for scenario in ("clean", "outliers"):
            rows.append({"case": "vs geom-median", "n": n, "d": d, "scenario": scenario,
                         "dtype": "float32", "geom_median_s": 0.2, "ours_s": 0.05, "ratio": 4.0,
                         "target": 2.0, "better": "higher", "met": True})
        for dtype in ("float32", "bfloat16"):
            rows.append({"case": "hardware floor", "n": n, "d": d, "dtype": dtype, "ratio": 1.5,
                         "solve_copies": 6.0, "floor_fraction": 0.4, "target": 2.5,
                         "better": "lower", "met": True})
    rows.append({"case": "batched", "n": 16, "d": 64, "dtype": "float32", "ratio": 10.0,
                 "target": 20.0, "better": "higher", "met": False})
    return rows


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)
    (folder / "medians-cpu.json").write_text(json.dumps(_payload("medians", _medians_rows())))
    (folder / "medians-quick-cpu.json").write_text(json.dumps(_payload("medians", [])))
    (folder / "alpha_stable_experiment-cpu.json").write_text(json.dumps(_payload(
        "alpha_stable_experiment",
        [{"case": "alpha-stable experiment", "config": "ci", "ratio": 2.0, "target": 10.0,
          "better": "lower", "met": True}])))
    return folder


def test_load_from_a_folder_and_by_walking_up(results_dir, tmp_path, monkeypatch):
    res = load_benchmark_results(results_dir)
    assert sorted(res) == ["alpha_stable_experiment", "medians"]  # the quick file is not a result
    assert res["medians"]["device"] == "test CPU"
    assert len(benchmark_rows(res, "medians", "vs geom-median")) == 4
    assert len(benchmark_rows(res, "medians")) == 9
    deep = tmp_path / "book" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert sorted(load_benchmark_results()) == ["alpha_stable_experiment", "medians"]
    with pytest.raises(KeyError, match="stable"):
        benchmark_rows(res, "stable")


def test_load_errors(results_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_benchmark_results(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cuda"):
        load_benchmark_results(results_dir, device="cuda")
    with pytest.raises(ValueError, match="device"):
        load_benchmark_results(results_dir, device="tpu")
    with pytest.raises(ValueError, match="suites"):
        load_benchmark_results(results_dir, suites=["nope"])


def test_load_from_the_repository_url_without_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no benchmarks/results above tmp_path
    asked = []

    def opener(url):
        asked.append(url)
        if url.endswith("/medians-cpu.json"):
            return io.BytesIO(json.dumps(_payload("medians", _medians_rows())).encode())
        raise urllib.error.HTTPError(url, 404, "not found", {}, None)

    res = load_benchmark_results(opener=opener)
    assert list(res) == ["medians"]
    assert all(u.startswith("https://raw.githubusercontent.com/") for u in asked)
    assert len(asked) == len(SUITES)  # one request per suite
    with pytest.raises(FileNotFoundError):
        load_benchmark_results(opener=opener, suites=["stable"])
    with pytest.raises(FileNotFoundError):
        load_benchmark_results(url=None)


def test_figures_draw(results_dir):
    res = load_benchmark_results(results_dir)
    axes = plot_solver_times(benchmark_rows(res, "medians", "vs geom-median"))
    assert axes[0].get_yscale() == "log" and len(axes[0].patches) == 8  # 2 sizes x 2 solvers x 2
    assert len(axes[1].patches) == 4
    axes = plot_hardware_floor(benchmark_rows(res, "medians", "hardware floor"))
    assert len(axes[0].patches) == 8 and len(axes[1].patches) == 4
    ax = plot_targets(res)
    # every row with a target: 4 + 4 + 1 (medians) + 1 (experiment); the batched one missed
    assert len(ax.patches) == 10
    colors = [p.get_facecolor() for p in ax.patches]
    assert sum(c == matplotlib.colors.to_rgba("tab:red") for c in colors) == 1
    for fig in map(plt.figure, plt.get_fignums()):  # designed for the book's column
        assert fig.get_figwidth() <= COLUMN_WIDTH + 1e-9
    plt.close("all")
    with pytest.raises(ValueError):
        plot_solver_times([])
    with pytest.raises(ValueError):
        plot_targets({})


def test_committed_results_are_complete():
    # the results the chapter draws: every suite of ours is there, on the CPU, with every ratio
    folder = REPO / "benchmarks" / "results"
    if not (folder / "medians-cpu.json").is_file():
        pytest.skip("no committed benchmark results yet")
    res = load_benchmark_results(folder, suites=["medians", "stable", "alpha_stable_experiment"])
    assert sorted(res) == ["alpha_stable_experiment", "medians", "stable"]
    cases = {r["case"] for r in benchmark_rows(res, "medians")}
    assert cases == {"vs geom-median", "hardware floor", "batched"}
    assert len(benchmark_rows(res, "medians", "vs geom-median")) == 6
    for payload in res.values():
        assert payload["device_type"] == "cpu" and payload["rows"]
        for r in payload["rows"]:
            assert {"ratio", "target", "better", "met"} <= set(r)


def test_targets_chart_bar_label_and_axis_agree(results_dir):
    # the bar is the factor by which the target is met (>= 1: met), whichever way the ratio
    # goes; the label says the measured ratio and the target, the colour whether it was met
    rows = {"higher": {"ratio": 5.0, "target": 2.0, "better": "higher"},
            "lower": {"case": "hardware floor", "ratio": 0.5, "target": 2.5, "better": "lower"},
            "missed": {"case": "hardware floor", "ratio": 5.0, "target": 2.5, "better": "lower"}}
    assert target_factor(rows["higher"]) == pytest.approx(2.5)
    assert target_factor(rows["lower"]) == pytest.approx(5.0)
    assert target_factor(rows["missed"]) == pytest.approx(0.5)
    ax = plot_targets({"medians": _payload("medians", list(rows.values()))}, suites=["medians"])
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == pytest.approx([0.5, 2.5, 5.0])
    assert "factor" in ax.get_xlabel()
    texts = [t.get_text() for t in ax.texts]
    assert "5\u00d7 faster; target 2\u00d7" in texts
    assert "0.5 copies; target at most 2.5" in texts
    assert "5 copies; target at most 2.5" in texts
    green, red = (matplotlib.colors.to_rgba(c) for c in ("tab:green", "tab:red"))
    for p in ax.patches:
        assert p.get_facecolor() == (green if p.get_width() >= 1 else red)
    # the labels sit right of the panel, so the line at 1 crosses none of them
    ax.figure.canvas.draw()
    right = ax.get_window_extent().x1
    assert all(t.get_window_extent().x0 > right for t in ax.texts)
    assert all(t.get_fontsize() >= 7.5 for t in ax.texts)
    plt.close("all")


def test_machine_label():
    cpu = {"device_type": "cpu", "device": "X (2 cores, 1 threads)", "cpu": "AMD EPYC",
           "cpu_count": 2, "threads": 1}
    assert machine_label(cpu) == "AMD EPYC, 2 cores, 1 thread"
    assert machine_label(dict(cpu, cpu_count=1, threads=4)) == "AMD EPYC, 1 core, 4 threads"
    assert machine_label({"device_type": "cuda", "device": "NVIDIA H100"}) == "NVIDIA H100"


def _map_rows():
    rows = []
    for frac in (0.01, 0.1):
        for n in (8, 32):
            for scenario in ("clean", "bit_flip"):
                for d in (10**4, 10**5):
                    rows.append({"case": "map", "n": n, "d": d, "k": int(frac * d), "k_frac": frac,
                                 "scenario": scenario, "ratio": 0.5 + n / 16, "predicted_ratio": 1.0})
    return rows


def test_bgmd_map_draws_one_panel_per_block_fraction():
    axes = plot_bgmd_map(_map_rows())
    assert len(axes) == 2 and [ax.get_title() for ax in axes] == ["k/d = 0.01", "k/d = 0.1"]
    # per panel: 2 n x 2 scenarios, a measured line and the model's circles each, and the line at 1
    assert all(len(ax.lines) == 2 * 2 * 2 + 1 for ax in axes)
    assert axes[0].get_xscale() == "log" and axes[0].get_yscale() == "log"
    measured = [ln for ln in axes[0].lines if ln.get_linestyle() in ("-", "--")]
    assert sorted({tuple(ln.get_ydata()) for ln in measured}) == [(1.0, 1.0), (2.5, 2.5)]
    fig = axes[0].figure
    assert fig.get_figwidth() <= COLUMN_WIDTH + 1e-9
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["n = 8", "n = 32", "clean", "bit flip", "cost model"]
    plt.close("all")
    with pytest.raises(ValueError):
        plot_bgmd_map([])


def test_committed_bgmd_map_is_complete():
    # chapter 14 draws the map from the committed bgmd results: every (n, d, k/d, scenario)
    folder = REPO / "benchmarks" / "results"
    if not (folder / "bgmd-cpu.json").is_file():
        pytest.skip("no committed bgmd results")
    res = load_benchmark_results(folder, suites=["bgmd"])
    pay = benchmark_rows(res, "bgmd", "map")
    assert len({(r["n"], r["d"], r["k_frac"], r["scenario"]) for r in pay}) == len(pay) == 54
    assert len(benchmark_rows(res, "bgmd", "map topk")) == 18
    for r in pay:
        assert r["ratio"] == pytest.approx(r["gm_s"] / r["bgmd_s"])
        assert {"predicted_ratio", "gm_iter", "bgmd_iter", "gram", "select_s", "pass_s"} <= set(r)


def test_suites_are_those_python_m_benchmarks_writes():
    from benchmarks.__main__ import SUITES as WRITTEN

    assert SUITES == WRITTEN
