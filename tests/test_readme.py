"""The README's code runs as printed.

Every ```python block of ``README.md`` runs in a fresh interpreter with this tree first on the
path, on the CPU, exactly as written: a block needs nothing that the README does not show. The
one block that calls ``torch.distributed.init_process_group`` is the body of a script that the
README launches with ``torchrun``; it gets the environment that ``torchrun --nproc-per-node 1``
gives (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...). ```bash blocks are not
run (they install, build and benchmark), but every repository file they name must exist, and so
must every benchmark suite. Every ``median_sgd.a.b`` the prose names must resolve after a plain
``import median_sgd`` (a user's report: ``median_sgd.distributed`` did not).
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = [(lang, body) for lang, body in FENCE.findall(README)]
PYTHON = [body for lang, body in BLOCKS if lang == "python"]
BASH = [body for lang, body in BLOCKS if lang == "bash"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(code: str, extra_env: dict[str, str] | None = None, timeout: float = 120.0):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON) >= 3, f"expected the library, training and DDP blocks, found {len(PYTHON)}"
    assert any("init_process_group" in body for body in PYTHON)
    assert BASH


@functools.cache
def _run_block(index: int):
    code = PYTHON[index]
    env = {}
    if "init_process_group" in code:  # the body of a torchrun script: torchrun's environment
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    return _run(code, env)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written(index):
    code = PYTHON[index]
    result = _run_block(index)
    assert result.returncode == 0, (
        f"README python block {index} failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}")


def test_the_library_block_prints_what_the_prose_says():
    """The first block's claim: the medians, offline and online, beat the mean on Cauchy noise."""
    result = _run_block(0)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = dict(re.findall(r"^(.*?\S)\s+error (\d+\.\d+)$", result.stdout, re.MULTILINE))
    assert set(errors) == {"mean", "coordinate median", "geometric median", "online (SPP, l1)"}, result.stdout
    errors = {k: float(v) for k, v in errors.items()}
    assert all(errors[k] < errors["mean"] for k in errors if k != "mean"), errors


def test_every_median_sgd_name_in_the_readme_resolves_after_import_median_sgd():
    # (a module run as a command, ``python -m median_sgd.x.y``, is imported by that command:
    # test_python_m_modules_exist checks those)
    names = sorted(set(re.findall(r"(?<!-m )\bmedian_sgd(?:\.[A-Za-z_]\w*)+", README)))
    assert "median_sgd.distributed.robust_hook" in names
    code = ("import functools, median_sgd\n"
            f"for name in {names!r}:\n"
            "    functools.reduce(getattr, name.split('.')[1:], median_sgd)\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_python_m_modules_exist():
    modules = sorted(set(re.findall(r"python -m (median_sgd(?:\.\w+)+)", README)))
    assert "median_sgd.experiments.paper_scale" in modules
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_bash_blocks_name_files_that_exist():
    named = set()
    for body in BASH:
        for line in body.splitlines():
            command = line.split("#", 1)[0]
            named |= set(re.findall(r"(?<![\w/.-])((?:scripts|ci|\.ci|benchmarks)/[\w./-]+)", command))
    assert "scripts/test" in named and "scripts/gpu-check" in named, named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README bash blocks name files that do not exist: {missing}"


def test_bash_blocks_name_existing_benchmark_suites():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.__main__ import SUITES
    finally:
        sys.path.remove(str(ROOT))
    named = set()
    for body in BASH:
        for line in body.splitlines():
            match = re.search(r"python -m benchmarks((?:\s+[a-z_]+)*)", line.split("#", 1)[0])
            if match:
                named |= set(match.group(1).split())
    assert named, "the README shows no `python -m benchmarks SUITE` command"
    assert named <= set(SUITES), f"unknown suites in the README: {sorted(named - set(SUITES))}"
