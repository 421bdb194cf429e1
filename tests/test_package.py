"""What ``import median_sgd`` gives a user: a light import, every submodule as an attribute, and
the packaging of ``py.typed``.

Each check runs in a fresh interpreter, so that nothing an earlier test imported counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBMODULES = ("aggregators", "attacks", "bgmd", "data", "distributed", "estimators", "experiments",
              "medians", "models", "optim", "plotting", "prox", "stable",
              "weiszfeld")


def _python(code: str) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_is_light_and_submodules_load_on_first_use():
    out = _python(
        "import sys, median_sgd\n"
        f"assert median_sgd.__file__.startswith({str(ROOT)!r}), median_sgd.__file__\n"
        "heavy = [m for m in ('matplotlib', 'median_sgd.plotting', 'median_sgd.distributed',\n"
        "         'median_sgd.experiments', 'median_sgd.optim') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "hook = median_sgd.distributed.robust_hook('gm')\n"
        "assert callable(hook)\n"
        "assert 'median_sgd.distributed' in sys.modules and 'matplotlib' not in sys.modules\n"
        "assert median_sgd.optim.MedianSGD.__name__ == 'MedianSGD'\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def test_every_submodule_is_listed_and_reachable():
    out = _python(
        "import importlib, median_sgd\n"
        f"names = {SUBMODULES!r}\n"
        "missing = [n for n in names if n not in dir(median_sgd)]\n"
        "assert not missing, missing\n"
        "for n in names:\n"
        "    assert getattr(median_sgd, n) is importlib.import_module('median_sgd.' + n), n\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def test_submodule_list_matches_the_package_directory():
    on_disk = {p.stem for p in (ROOT / "median_sgd").glob("*.py") if not p.name.startswith("_")}
    on_disk |= {p.parent.name for p in (ROOT / "median_sgd").glob("*/__init__.py")}
    assert on_disk == set(SUBMODULES)
    out = _python("import median_sgd; print(' '.join(median_sgd._SUBMODULES))")
    assert set(out.split()) == set(SUBMODULES)


def test_unknown_attribute_raises_the_usual_error():
    out = _python(
        "import median_sgd\n"
        "try:\n"
        "    median_sgd.no_such_name\n"
        "except AttributeError as err:\n"
        "    print(err)\n")
    assert out.strip() == "module 'median_sgd' has no attribute 'no_such_name'"


def test_py_typed_is_shipped():
    assert (ROOT / "median_sgd" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["median_sgd"]


def test_requires_python_matches_the_scripts():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["project"]["requires-python"] == ">=3.11"
    assert "sys.version_info < (3, 11)" in (ROOT / "scripts" / "_venv.sh").read_text(encoding="utf-8")


def test_lint_and_type_checkers_are_pinned_and_in_the_test_extra():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    test_extra = " ".join(config["project"]["optional-dependencies"]["test"])
    pins = (ROOT / "ci" / "constraints.txt").read_text(encoding="utf-8").split()
    for tool in ("ruff", "mypy"):
        assert tool in test_extra
        assert any(line.startswith(f"{tool}==") for line in pins), tool
    script = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert "ruff check" in script and "mypy" in script


def test_github_runs_the_tests_on_every_push_and_pull_request():
    yaml = __import__("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "tests.yml").read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers and "pull_request" in triggers
    assert "branches" not in (triggers["push"] or {}), "every push, not only main's"
    runs = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any(r.strip() in (".ci/run", "scripts/test") for r in runs), runs
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_no_private_name_is_imported_across_modules():
    # One rule, one place: a helper two modules share is a public name (of a private module if
    # need be), so a module's private names can change without breaking another module.
    import ast

    found = []
    for path in sorted((ROOT / "median_sgd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            package = base.joinpath(*(node.module.split(".") if node.module else []))
            for alias in node.names:
                name = alias.name
                if not name.startswith("_") or name.startswith("__"):
                    continue
                if (package / f"{name}.py").exists() or (package / name / "__init__.py").exists():
                    continue  # a private module, imported as a module
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not found, "\n".join(found)
