"""scripts/mutate.py on a toy module: sites, deterministic sampling, kills, survivors, timeouts."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutate.py"
_spec = importlib.util.spec_from_file_location("mutate_script", _SCRIPT)
assert _spec is not None and _spec.loader is not None
mutate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutate  # dataclasses look their module up there
_spec.loader.exec_module(mutate)

TOY = '''"""A toy module (this docstring is not mutated)."""


def clamp(x: float, lo: float = 0.0, hi: float = 2.0) -> float:
    if x < lo:
        return lo
    return hi if x > hi else x


def count_up(n):
    i = 0
    while i < n:
        i += 1
    return i
'''

TOY_TEST = '''from toy import clamp, count_up


def test_clamp():
    assert clamp(-1.0) == 0.0
    assert clamp(3.0) == 2.0
    assert clamp(1.5) == 1.5
    assert clamp(5.0, hi=4.0) == 4.0


def test_count_up():
    assert count_up(3) == 3
'''


def test_sites_skip_docstrings_and_annotations_and_every_mutant_compiles():
    sites = mutate.find_sites(TOY)
    kinds = {s.kind for s in sites}
    assert {"compare-strict", "compare-negate", "negate-if", "constant", "augassign", "return-none"} <= kinds
    assert all(s.line > 1 for s in sites)  # not the docstring
    assert not any(s.original == "float" for s in sites)  # annotations are left alone
    for site in sites:
        mutated = mutate.apply(TOY, site)
        ast.parse(mutated)
        assert mutated != TOY
        # Only the mutated line changes.
        changed = [a for a, b in zip(TOY.splitlines(), mutated.splitlines()) if a != b]
        assert len(changed) == 1 and site.original in changed[0]


def test_sampling_is_deterministic_and_in_source_order():
    sites = mutate.find_sites(mutate.Path(__file__).read_text())
    a = mutate.sample(sites, 10, seed=3)
    assert a == mutate.sample(sites, 10, seed=3)
    assert a != mutate.sample(sites, 10, seed=4)
    assert [s.line for s in a] == sorted(s.line for s in a)
    assert mutate.sample(sites[:5], 10, seed=0) == sites[:5]


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "test_toy.py").write_text(TOY_TEST)
    return tmp_path


def test_run_kills_and_reports_survivors_without_touching_the_tree(toy_repo: Path, tmp_path: Path):
    result = mutate.run("toy.py", ["test_toy.py"], n=100, seed=0, root=toy_repo, progress=False,
                        min_timeout=3.0, plugins=False)
    assert (toy_repo / "toy.py").read_text() == TOY  # the real tree is never written
    by_change = {(m["original"], m["mutated"]): m["status"] for m in result["mutants"]}
    # x < lo -> x <= lo only differs at x == lo, which returns lo either way: equivalent, survives.
    assert by_change[("x < lo", "x <= lo")] == "survived"
    assert by_change[("x < lo", "x >= lo")] == "killed"
    assert by_change[("0.0", "1.0")] == "killed"  # the default lo
    # i += 1 -> i -= 1 never ends: caught by the timeout.
    assert by_change[("i += 1", "i -= 1")] == "timeout"
    assert result["sampled"] == result["sites"] == len(result["mutants"])
    assert result["killed"] + result["survived"] == result["sampled"]
    assert result["score"] == pytest.approx(result["killed"] / result["sampled"])
    json.dumps(result)
    text = mutate.table(result)
    assert "x <= lo" in text and f"{result['killed']}/{result['sampled']} killed" in text
    saved = tmp_path / "toy-result.json"
    saved.write_text(json.dumps(result))
    row = mutate.summary([str(saved)]).splitlines()[1]
    assert f"{result['killed']}/{result['sampled']}" in row and str(5) in row.split()[-1].split(",")
    # --survivors-of: only the survivors run again; the killed stay killed
    again = mutate.run("toy.py", ["test_toy.py"], n=100, seed=0, root=toy_repo, progress=False,
                       min_timeout=3.0, plugins=False, survivors_of=result)
    assert [m["status"] for m in again["mutants"]] == [m["status"] for m in result["mutants"]]
    assert sum(m["detail"].startswith("(earlier run)") for m in again["mutants"]) == result["killed"]


def test_run_refuses_failing_clean_tests(toy_repo: Path):
    (toy_repo / "test_toy.py").write_text("def test_fails():\n    assert False\n")
    with pytest.raises(SystemExit, match="unmutated"):
        mutate.run("toy.py", ["test_toy.py"], n=2, root=toy_repo, progress=False, plugins=False)
