"""Mutation testing with a small AST mutator: how many injected bugs do a module's tests catch?

    python scripts/mutate.py median_sgd/prox.py tests/test_prox.py tests/test_prox_lp.py \
        --n 40 --seed 0 --json benchmarks/results/mutation/prox.json
    python scripts/mutate.py summary benchmarks/results/mutation/*.json

The module is parsed and every mutation site is listed (in source order): a comparison made
strict or non-strict (``<`` <-> ``<=``) or negated (``<`` -> ``>=``, ``==`` -> ``!=``, ``in`` ->
``not in``, ``is`` -> ``is not``), an arithmetic or bitwise operator swapped (``+`` <-> ``-``,
``*`` <-> ``/``, ``//`` -> ``/``, ``**`` -> ``*``, ``%`` -> ``//``, ``&`` <-> ``|``, ``<<`` ->
``>>``), a unary minus or ``not`` removed, a number changed (``0`` <-> ``1``, ``n`` -> ``n + 1``,
a float ``x`` -> ``2 x``, ``0.0`` -> ``1.0``), a boolean flipped, ``and`` <-> ``or``, an ``if``
(or conditional expression) condition negated, ``return x`` -> ``return None``. Docstrings,
strings, annotations and f-strings are left alone. ``--n`` sites are sampled with ``--seed``
(the same sample on every run), each is written into a temporary copy of the repository (the
real tree is never written), and the tests run there (``pytest -x -q``). A mutant is *killed*
when the tests fail or use more than ``--timeout-factor`` times the clean run's CPU time (a
hang counts as a catch; CPU time, not wall time, so that a loaded machine does not kill mutants), *survived* when they pass. The score is killed / sampled.

Mutants that survive are either holes in the tests or *equivalent* (the mutated program behaves
the same, e.g. ``<`` -> ``<=`` where equality cannot happen); the table prints each survivor's
line, original and mutated code, so every one can be judged.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Comparison operators: the strictness change and the negation of each.
_STRICTNESS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
_NEGATION = {
    ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Gt: ast.LtE, ast.GtE: ast.Lt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_BINOP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
    ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
}


@dataclass
class Site:
    """One mutation: the source span it replaces and the code that replaces it."""

    kind: str
    line: int
    col: int
    end_line: int
    end_col: int
    original: str
    mutated: str


@dataclass
class Outcome:
    site: Site
    status: str  # "killed", "survived" or "timeout" (counted as killed)
    seconds: float
    detail: str  # the first failing test, when killed


def _mutated_number(value):
    """The changed constant: 0 <-> 1, other ints n + 1, floats doubled (0.0 -> 1.0)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return 1 if value == 0 else 0 if value == 1 else value + 1
    if isinstance(value, float):
        return 1.0 if value == 0.0 else value * 2.0
    return None


class _Collector(ast.NodeVisitor):
    """Lists mutation sites in source order, skipping docstrings, annotations and f-strings."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sites: list[Site] = []

    def _add(self, kind: str, node: ast.AST, mutated: str) -> None:
        original = ast.get_source_segment(self.source, node)
        if original is None:
            return
        self.sites.append(Site(kind, node.lineno, node.col_offset, node.end_lineno or node.lineno,
                               node.end_col_offset or 0, original, mutated))

    # -- things never mutated -------------------------------------------------------------
    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:  # f-strings: messages only
        return

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        return

    def _visit_body(self, body: list) -> None:
        start = 1 if body and isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str) else 0
        for stmt in body[start:]:
            self.visit(stmt)

    def visit_Module(self, node: ast.Module) -> None:
        self._visit_body(node.body)

    def visit_FunctionDef(self, node) -> None:
        for deco in node.decorator_list:
            self.visit(deco)
        self.visit(node.args)  # defaults (annotations skipped by visit_arg)
        self._visit_body(node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for deco in node.decorator_list:
            self.visit(deco)
        self._visit_body(node.body)

    def visit_If(self, node: ast.If) -> None:
        test_src = ast.get_source_segment(self.source, node.test)
        if test_src is not None and not _is_main_guard(node.test):
            self._add("negate-if", node.test, f"not ({test_src})")
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        test_src = ast.get_source_segment(self.source, node.test)
        if test_src is not None:
            self._add("negate-if", node.test, f"not ({test_src})")
        self.generic_visit(node)

    # -- operators and constants ------------------------------------------------------------
    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            for kind, table in (("compare-strict", _STRICTNESS), ("compare-negate", _NEGATION)):
                new_op = table.get(type(op))
                if new_op is None:
                    continue
                ops = list(node.ops)
                ops[i] = new_op()
                self._add(kind, node, _unparse(ast.Compare(node.left, ops, node.comparators)))
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        new_op = _BINOP.get(type(node.op))
        if new_op is not None:
            self._add("binop", node, _unparse(ast.BinOp(node.left, new_op(), node.right)))
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        new_op = _BINOP.get(type(node.op))
        if new_op is not None:
            self._add("augassign", node, _unparse(ast.AugAssign(node.target, new_op(), node.value)))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, (ast.USub, ast.Not)):
            operand = ast.get_source_segment(self.source, node.operand)
            if operand is not None:
                self._add("unary-drop", node, f"({operand})")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self._add("boolop", node, _unparse(ast.BoolOp(other, node.values)))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        new = _mutated_number(node.value)
        if new is not None:
            self._add("constant", node, repr(new))

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self._add("return-none", node, "return None")
        self.generic_visit(node)


def _is_main_guard(test: ast.expr) -> bool:
    return isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"


def _unparse(node: ast.AST) -> str:
    return ast.unparse(ast.fix_missing_locations(node))


def find_sites(source: str) -> list[Site]:
    """Every mutation site of ``source``, in source order."""
    collector = _Collector(source)
    collector.visit(ast.parse(source))
    return sorted(collector.sites, key=lambda s: (s.line, s.col, s.end_line, s.end_col, s.kind, s.mutated))


def apply(source: str, site: Site) -> str:
    """``source`` with the span of ``site`` replaced (parenthesised unless it is a statement)."""
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for text in lines:
        offsets.append(offsets[-1] + len(text.encode()))
    data = source.encode()
    start = offsets[site.line - 1] + site.col
    end = offsets[site.end_line - 1] + site.end_col
    is_statement = site.kind in ("return-none", "augassign")
    replacement = site.mutated if is_statement else f"({site.mutated})"
    mutated = (data[:start] + replacement.encode() + data[end:]).decode()
    ast.parse(mutated)  # a mutant must still compile
    return mutated


def sample(sites: list[Site], n: int, seed: int) -> list[Site]:
    """``n`` sites drawn with ``seed`` (all when there are fewer), back in source order."""
    if n >= len(sites):
        return list(sites)
    chosen = random.Random(seed).sample(range(len(sites)), n)
    return [sites[i] for i in sorted(chosen)]


def _copy_tree(root: Path, dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "_build", "__pycache__", ".hypothesis",
                                    ".pytest_cache", "*.ipynb", "results")
    for name in os.listdir(root):
        src = root / name
        if name in (".git", ".venv", "_build", "book", ".hypothesis", ".pytest_cache"):
            continue
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, dest / name)


# A fork server: imports pytest, torch and hypothesis once (never the mutated package), then
# forks a child per test run, so that a run does not pay the ~2 s of those imports again.
_SERVER = r"""
import json, os, resource, signal, sys, time
import pytest
for name in ("torch", "numpy", "hypothesis", "hypothesis.strategies", "_hypothesis_pytestplugin"):
    try:
        __import__(name)
    except ImportError:
        pass
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if job["cpu"] is not None:
                seconds = int(job["cpu"]) + 1
                resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))
            code = int(pytest.main(job["args"]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    start, walled = time.monotonic(), False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if job["wall"] is not None and time.monotonic() - start > job["wall"]:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            walled = True
            break
        time.sleep(0.02)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime,
                      "walled": walled}), flush=True)
"""


class _Runner:
    """Runs pytest in ``copy`` through the fork server; returns (status, CPU seconds, first failure).

    The limit is on CPU time (``RLIMIT_CPU``), not wall time: on a loaded machine a run may wait
    for a core several times as long as it computes, but a mutant that loops forever burns CPU.
    A wall-clock limit 20 times larger catches a mutant that hangs without computing."""

    def __init__(self, copy: Path, env: dict, plugins: tuple[str, ...]) -> None:
        self.copy = copy
        self.args = ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        for plugin in plugins:
            self.args += ["-p", plugin]
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=copy, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the fork server did not start")

    def __call__(self, tests: list[str], cpu_limit: float | None) -> tuple[str, float, str]:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        out = self.copy / ".mutate-output.txt"
        job = {"args": self.args + tests, "out": str(out), "cpu": cpu_limit,
               "wall": None if cpu_limit is None else 20 * cpu_limit}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        seconds = reply["cpu"]
        if reply["walled"]:
            return "timeout", seconds, "(wall-clock limit)"
        if reply["rc"] == 0:
            return "survived", seconds, ""
        if reply["rc"] in (-signal.SIGXCPU, -signal.SIGKILL):
            return "timeout", seconds, "(CPU-time limit)"
        text = out.read_text(errors="replace")
        failed = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        detail = failed[0] if failed else (text.strip().splitlines() or ["(no output)"])[-1]
        return "killed", seconds, detail[:200]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def _invalidate(path: Path) -> None:
    """Remove the module's cached bytecode, so a same-size mutant written within the same second
    as the previous one is not replaced by the stale ``.pyc``."""
    for pyc in (path.parent / "__pycache__").glob(path.stem + ".*.pyc"):
        pyc.unlink()


def run(module: str, tests: list[str], n: int = 40, seed: int = 0, timeout_factor: float = 3.0,
        threads: int = 1, progress: bool = True, root: Path = ROOT, min_timeout: float = 10.0,
        plugins: bool = True, survivors_of: dict | None = None, lines: set[int] | None = None) -> dict:
    """Sample ``n`` mutants of ``module`` and run ``tests`` (paths relative to ``root``, the tree
    that is copied) against each; the results as a dict. pytest starts without autoloading its
    installed plugins (nbval's import alone costs a second per run) but with hypothesis's;
    ``plugins=False``: without hypothesis's either. ``survivors_of``, an
    earlier result on the same module source and sample, re-tests only its survivors (a mutant that
    a subset of ``tests`` killed stays killed), for measuring what added tests catch. ``lines``:
    every site on these lines instead of a sample (to check what a new test catches)."""
    root = Path(root).resolve()
    module_path = (root / module).resolve()
    rel = module_path.relative_to(root)
    source = module_path.read_text()
    sites = find_sites(source)
    chosen = sample(sites, n, seed) if lines is None else [s for s in sites if s.line in lines]
    outcomes: list[Outcome] = []
    earlier: dict = {}
    if survivors_of is not None:
        earlier = {(m["line"], m["col"], m["kind"], m["mutated"]): m for m in survivors_of["mutants"]}
        if survivors_of["sites"] != len(sites) or set(earlier) != {
                (s.line, s.col, s.kind, s.mutated) for s in chosen}:
            raise SystemExit("survivors_of: a result of another module source or sample")
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = Path(tmp)
        _copy_tree(root, copy)
        target = copy / rel
        env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        loaded = ("_hypothesis_pytestplugin",) if plugins and importlib.util.find_spec("_hypothesis_pytestplugin") else ()
        runner = _Runner(copy, env, loaded)
        try:
            status, clean_seconds, detail = runner(tests, None)
            if status != "survived":
                raise SystemExit(f"the tests fail on the unmutated module: {detail}")
            timeout = max(min_timeout, timeout_factor * clean_seconds)
            if progress:
                print(f"{rel}: {len(sites)} sites, {len(chosen)} sampled; clean run {clean_seconds:.1f} s CPU, "
                      f"limit {timeout:.0f} s CPU", file=sys.stderr)
            for i, site in enumerate(chosen):
                before = earlier.get((site.line, site.col, site.kind, site.mutated))
                if before is not None and before["status"] != "survived":
                    outcomes.append(Outcome(site, before["status"], before["seconds"],
                                            "(earlier run) " + before["detail"]))
                    continue
                target.write_text(apply(source, site))
                _invalidate(target)
                status, seconds, detail = runner(tests, timeout)
                outcomes.append(Outcome(site, status, seconds, detail))
                if progress:
                    print(f"  [{i + 1}/{len(chosen)}] line {site.line} {site.kind}: {status} ({seconds:.1f} s)",
                          file=sys.stderr)
        finally:
            target.write_text(source)
            runner.close()
    killed = sum(o.status != "survived" for o in outcomes)
    return {
        "module": str(rel),
        "tests": tests,
        "commit": _commit(root),
        "seed": seed,
        "n": n,
        "sites": len(sites),
        "sampled": len(outcomes),
        "killed": killed,
        "timeout_seconds": round(timeout, 1),
        "timeouts": sum(o.status == "timeout" for o in outcomes),
        "survived": len(outcomes) - killed,
        "score": killed / len(outcomes) if outcomes else 1.0,
        "clean_seconds": round(clean_seconds, 2),
        "mutants": [dict(asdict(o.site), status=o.status, seconds=round(o.seconds, 2), detail=o.detail)
                    for o in outcomes],
    }


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return ""


def table(result: dict) -> str:
    """The result as text: one row per mutant, then the score."""
    rows = [f"{'line':>5}  {'kind':<15} {'status':<9} original -> mutated"]
    for m in result["mutants"]:
        orig = " ".join(m["original"].split())
        rows.append(f"{m['line']:>5}  {m['kind']:<15} {m['status']:<9} {orig[:60]}  ->  {m['mutated'][:60]}")
    rows.append(f"{result['module']}: {result['killed']}/{result['sampled']} killed "
                f"({100 * result['score']:.0f}%), {result['timeouts']} by timeout; "
                f"{result['sites']} sites, seed {result['seed']}")
    return "\n".join(rows)


def summary(paths: list[str]) -> str:
    """One row per result file: module, commit, killed / sampled, score, and the survivors' lines."""
    rows = [f"{'result':<40} {'commit':<14} {'killed':>9} {'score':>6}  survivors (line)"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        lines = ",".join(str(m["line"]) for m in r["mutants"] if m["status"] == "survived")
        rows.append(f"{Path(path).stem:<40} {r['commit']:<14} {r['killed']:>4}/{r['sampled']:<4} "
                    f"{100 * r['score']:>5.0f}%  {lines}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["summary"]:
        print(summary(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the module file to mutate (inside this repository)")
    parser.add_argument("tests", nargs="+", help="test files (or node ids) that must catch the mutants")
    parser.add_argument("--n", type=int, default=40, help="mutants to sample (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-factor", type=float, default=3.0,
                        help="a mutant whose tests use more CPU time than this times the clean run is killed")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the test runs")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--root", default=str(ROOT), help="the tree to copy (default: this repository)")
    parser.add_argument("--survivors-of", help="an earlier --json result: re-test only its survivors")
    parser.add_argument("--list", action="store_true", help="only list the sampled sites")
    parser.add_argument("--lines", help="comma-separated line numbers: every site there, no sampling")
    args = parser.parse_args(argv)
    if args.list:
        sites = find_sites(Path(args.module).read_text())
        lines = {int(x) for x in args.lines.split(",")} if args.lines else None
        for s in sample(sites, args.n, args.seed) if lines is None else [s for s in sites if s.line in lines]:
            print(f"{s.line:>5}  {s.kind:<15} {' '.join(s.original.split())[:60]}  ->  {s.mutated[:60]}")
        print(f"{len(sites)} sites")
        return 0
    earlier = json.loads(Path(args.survivors_of).read_text()) if args.survivors_of else None
    result = run(args.module, args.tests, args.n, args.seed, args.timeout_factor, args.threads,
                 root=Path(args.root), survivors_of=earlier,
                 lines={int(x) for x in args.lines.split(",")} if args.lines else None)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
