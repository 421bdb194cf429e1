"""The loader of the benchmark results (benchmarks/results/*.json) and the figures of chapter 14."""

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
    benchmark_rows,
    load_benchmark_results,
    plot_hardware_floor,
    plot_solver_times,
    plot_targets,
)

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
    assert len(asked) == 5
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
