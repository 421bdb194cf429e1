"""The book's notebooks are stored "clean": outputs of one top-to-bottom CPU run at ci scale.

nbval (run by ``scripts/test``) re-executes every notebook and compares outputs; these checks
catch what nbval cannot see: cells run out of order or never run (nbval does not compare an
unexecuted cell), outputs from a GPU or paper-scale run, machine paths, widget state, timing
metadata, algorithms defined in a chapter instead of the library, a missing Colab install cell.
Fix a failure by regenerating the outputs with ``scripts/run_notebooks``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 3_000_000

TEXT_MIME_TYPES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")
MACHINE_PATH = re.compile(r"(/work/|/tmp/|/root/|/home/|/Users/|[A-Za-z]:\\Users)")
CUDA = re.compile(r"cuda", re.IGNORECASE)
PAPER_SCALE = re.compile(r"scale\s*[=:]\s*['\"]?paper", re.IGNORECASE)
DEFINITION = re.compile(r"^\s*(?:async\s+def|def|class)\s+\w+", re.MULTILINE)
IMPORTS_LIBRARY = re.compile(r"^\s*(?:import\s+median_sgd\b|from\s+median_sgd[\s.])", re.MULTILINE)
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")


def test_book_has_chapters():
    assert NOTEBOOKS, "book/ has no notebooks: the book must have chapters"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_cells(nb: dict) -> list[dict]:
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def output_texts(output: dict) -> list[str]:
    """The human-readable text of one output (never base64 image data)."""
    texts = []
    if "text" in output:
        texts.append(source({"source": output["text"]}))
    for mime in TEXT_MIME_TYPES:
        if mime in output.get("data", {}):
            value = output["data"][mime]
            texts.append(value if isinstance(value, str) else json.dumps(value) if mime.endswith("json") else "".join(value))
    if output.get("output_type") == "error":
        texts.append(f"{output.get('ename')}: {output.get('evalue')}")
    return texts


def cell_label(nb: dict, cell: dict) -> str:
    index = code_cells(nb).index(cell)
    first_line = source(cell).strip().splitlines()[0] if source(cell).strip() else "<empty>"
    return f"code cell {index} ({first_line[:60]!r})"


notebook_params = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


@notebook_params
def test_executed_top_to_bottom(path):
    nb = load(path)
    cells = code_cells(nb)
    assert cells, f"{path.name} has no code cells"
    for cell in cells:
        assert source(cell).strip(), f"{path.name}: {cell_label(nb, cell)} is empty; delete it"
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(cells)}: "
        "regenerate the outputs with scripts/run_notebooks"
    )


@notebook_params
def test_kernelspec_is_python3(path):
    kernelspec = load(path)["metadata"].get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path.name}: kernelspec {kernelspec!r}"
    assert kernelspec.get("language", "python") == "python"


@notebook_params
def test_outputs_are_clean(path):
    nb = load(path)
    problems = []
    for cell in code_cells(nb):
        where = f"{path.name}: {cell_label(nb, cell)}"
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"{where} stored an error: {output.get('ename')}: {output.get('evalue')}")
            if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                problems.append(f"{where} stored a widget output")
            for text in output_texts(output):
                if CUDA.search(text):
                    problems.append(f"{where} output mentions CUDA (outputs must come from a CPU run)")
                if PAPER_SCALE.search(text):
                    problems.append(f"{where} output comes from a paper-scale run")
                if match := MACHINE_PATH.search(text):
                    problems.append(f"{where} output contains a machine path ({match.group(0)!r})")
    assert not problems, "\n".join(problems)


@notebook_params
def test_no_volatile_metadata(path):
    nb = load(path)
    problems = []
    if "widgets" in nb["metadata"]:
        problems.append("notebook metadata stores widget state")
    for cell in nb["cells"]:
        keys = sorted(set(cell.get("metadata", {})) & set(VOLATILE_CELL_METADATA))
        if keys:
            label = cell_label(nb, cell) if cell["cell_type"] == "code" else "a markdown cell"
            problems.append(f"{label} has volatile metadata {keys}")
    assert not problems, f"{path.name} (run scripts/run_notebooks to strip it):\n" + "\n".join(problems)
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, (
        f"{path.name} is {path.stat().st_size} bytes (> {MAX_NOTEBOOK_BYTES}): lower the figures' dpi"
    )


@notebook_params
def test_no_algorithms_defined_in_chapter(path):
    # Chapters import every algorithm from median_sgd; they define no functions or classes.
    nb = load(path)
    found = [
        f"{cell_label(nb, cell)}: {match.group(0).strip()}"
        for cell in code_cells(nb)
        for match in DEFINITION.finditer(source(cell))
    ]
    assert not found, f"{path.name} defines code that belongs in median_sgd:\n" + "\n".join(found)


@notebook_params
def test_first_code_cell_installs_on_colab(path):
    first = source(code_cells(load(path))[0])
    assert "google.colab" in first and "pip install" in first, (
        f"{path.name}: the first code cell must be the Colab install cell "
        '(`if "google.colab" in sys.modules: %pip install ...`)'
    )


@notebook_params
def test_imports_the_library(path):
    assert any(IMPORTS_LIBRARY.search(source(cell)) for cell in code_cells(load(path))), (
        f"{path.name} does not import median_sgd"
    )
