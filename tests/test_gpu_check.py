"""scripts/gpu-check on a machine without a GPU: it says so and runs nothing; its parts that run
anywhere (argument checks, the chapter runner's report of the failing cell, the dry run) work.

The GPU path itself runs on a GPU machine only (README.md, "Checking on a GPU").
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"
EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU, EXIT_ENV = 1, 2, 3, 4


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def gpu_check(*args, env=None, timeout=120):
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full.pop("OUT", None)  # the tarball for the device tool is not wanted here
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_no_gpu_says_so_and_runs_nothing(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this is the CPU machine's path everywhere
    out = tmp_path / "check"
    res = gpu_check("--out", out, env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == EXIT_NO_GPU, res.stdout + res.stderr
    assert "no GPU" in res.stdout and "Nothing was run" in res.stdout
    assert "torch.cuda.is_available() is False" in res.stdout
    assert "CUDA_VISIBLE_DEVICES is set to ''" in res.stdout  # the reason, where it is this
    assert not out.exists()


def test_a_python_without_torch_is_named(tmp_path):
    # -I -S: no site-packages, so no torch. Without a GPU that is still "no GPU" (exit 3); with
    # one, it is a missing package (exit 4). Either way the message names torch.
    wrapper = tmp_path / "python-without-torch"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    wrapper.chmod(0o755)
    res = gpu_check(env={"PYTHON": str(wrapper)})
    expected = EXIT_ENV if load_script().nvidia_smi_gpus() else EXIT_NO_GPU
    assert res.returncode == expected, res.stdout + res.stderr
    assert "torch" in res.stdout + res.stderr and str(wrapper) in res.stdout + res.stderr


def test_bad_arguments_exit_2():
    for args in (["--jobs", "0"], ["--budget", "-1"], ["--notebooks", "no_such.ipynb"]):
        res = gpu_check(*args)
        assert res.returncode == EXIT_USAGE, (args, res.stderr)
        assert "error" in res.stderr


def write_notebook(path: Path, cells) -> None:
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
          "cells": [{"cell_type": "markdown", "id": "m0", "metadata": {}, "source": "# title"}]
          + [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
              "outputs": [], "source": src} for i, src in enumerate(cells)]}
    path.write_text(json.dumps(nb))


EXECUTORS = ["script"] + (
    ["nbclient"] if all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel"))
    else [])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_chapter_runner_reports_the_failing_cell_and_line(tmp_path, executor):
    nb = tmp_path / "chapter.ipynb"
    write_notebook(nb, [
        "import sys\nif 'google.colab' in sys.modules:\n    %pip install nothing\nx = 1",
        "print('device=cpu')\ny = x + 1\nassert y == 3, f'y is {y}'\nprint('not reached')",
        "print('never run')",
    ])
    result = tmp_path / "result.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--_notebook", nb, "--_json", result,
                          "--_executor", executor, "--_timeout", "60"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(result.read_text())
    # cell 2: the notebook's third cell (the markdown title counts), as in the H200 logs
    assert report["status"] == "failed" and report["cell"] == 2 and report["line"] == 3
    assert report["code"] == "assert y == 3, f'y is {y}'"
    assert report["error"] == "AssertionError: y is 2"
    assert "device=cpu" in res.stdout and "never run" not in res.stdout


def test_cpu_dry_run_exercises_every_step(tmp_path):
    # tests, one chapter and one quick benchmark suite, on the CPU: the same machinery as on a GPU
    out = tmp_path / "dry"
    res = gpu_check("--cpu-dry-run", "--out", out, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["tests"]["passed"] >= 1 and summary["tests"]["failed"] == 0
    assert [r["status"] for r in summary["chapters"]["results"]] == ["ok"]
    assert summary["chapters"]["results"][0]["device"] == "cpu"
    assert [w["file"] for w in summary["benchmarks"]["written"]] == [
        "alpha_stable_experiment-quick-cpu.json"]
    assert (out / "benchmarks" / "alpha_stable_experiment-quick-cpu.json").exists()
    text = (out / "summary.txt").read_text()
    assert "RESULT: PASSED" in text and text in res.stdout


def test_on_a_gpu_a_chapter_run_on_the_cpu_fails(tmp_path, monkeypatch, capsys):
    # The GPU path with the probe told that CUDA is there: a chapter that prints device=cpu
    # fails, as does a test run that selects nothing and a benchmark run that cannot start.
    gc = load_script()
    real = gc.choose_python
    monkeypatch.setattr(gc, "choose_python", lambda env: {**real(env), "cuda_available": True,
                                                          "gpu": "a GPU said to be there"})
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the children see no GPU, even on a GPU machine
    monkeypatch.delenv("OUT", raising=False)
    nb = tmp_path / "chapter.ipynb"
    write_notebook(nb, ["print('scale=ci device=cpu')"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = gc.main(["--out", str(tmp_path / "out"), "--notebooks", str(nb), "--executor",
                      "script", "--tests", "tests/test_models_cnn.py", "--suites",
                      "alpha_stable_experiment", "--quick", "--budget", "300"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert rc == EXIT_FAILED
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (chapter,) = summary["chapters"]["results"]
    assert chapter["status"] == "failed" and chapter["error"] == "ran on cpu, not cuda"
    assert not summary["tests"]["ok"] and summary["tests"]["returncode"] == 5  # none selected
    assert not summary["benchmarks"]["ok"] and summary["benchmarks"]["written"] == []
    text = capsys.readouterr().out
    assert "ran on cpu, not cuda" in text and "RESULT: FAILED" in text
    assert "torch.cuda.is_available() is False" in text  # why the benchmarks could not start


@pytest.mark.skipif("nbclient" not in EXECUTORS, reason="needs nbclient, nbformat and ipykernel")
def test_chapter_runner_without_a_kernel_runs_the_chapter_as_a_script(tmp_path):
    # A kernel that cannot start (here: an ipykernel_launcher that exits) must not cost the check
    # its chapters: the runner says so and executes the cells itself.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ipykernel_launcher.py").write_text("import sys\nsys.exit(3)\n")
    nb, result = tmp_path / "chapter.ipynb", tmp_path / "result.json"
    write_notebook(nb, ["x = 20 + 1", "print('device=cpu', 2 * x)"])
    res = subprocess.run([sys.executable, str(SCRIPT), "--_notebook", nb, "--_json", result,
                          "--_executor", "nbclient", "--_timeout", "60"],
                         env={**os.environ, "PYTHONPATH": str(fake)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(result.read_text())
    assert report["status"] == "ok" and report["executor"].startswith("script (no kernel")
    assert "device=cpu 42" in res.stdout and "could not start a kernel" in res.stdout
