"""The book's table of contents, chapters, citations and Colab install cells agree.

Fast checks that do not need a book build (``scripts/book`` builds it with warnings as errors).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from check_book_html import toc_files  # noqa: E402  (the one _toc.yml walker)

BOOK = ROOT / "book"
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)


def toc_entries() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    assert toc.get("format") == "jb-book"
    return toc_files(toc)


def resolve(entry: str) -> list[Path]:
    return [p for p in (ROOT / f"{entry}.ipynb", ROOT / f"{entry}.md") if p.is_file()]


def test_every_toc_entry_exists_once():
    entries = toc_entries()
    assert len(entries) == len(set(entries)), f"duplicate _toc.yml entries: {entries}"
    for entry in entries:
        found = resolve(entry)
        assert found, f"_toc.yml lists {entry!r}, but neither {entry}.ipynb nor {entry}.md exists"
        assert len(found) == 1, f"{entry!r} is ambiguous: {found}"


def test_every_notebook_is_in_the_toc():
    listed = {ROOT / f"{entry}.ipynb" for entry in toc_entries()}
    notebooks = sorted(BOOK.glob("*.ipynb"))
    assert notebooks, "book/ has no notebooks: the book must have chapters"
    missing = [p.relative_to(ROOT).as_posix() for p in notebooks if p not in listed]
    assert not missing, f"not listed in _toc.yml (and so never rendered): {missing}"


def markdown_sources() -> dict[str, str]:
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(BOOK.glob("*.md"))}
    for path in sorted(BOOK.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        sources[path.name] = "\n".join(
            "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for cell in nb["cells"]
            if cell["cell_type"] == "markdown"
        )
    return sources


def test_every_citation_is_in_the_bibliography():
    keys = set(BIB_KEY.findall((BOOK / "references.bib").read_text(encoding="utf-8")))
    assert keys, "book/references.bib has no entries"
    unknown = []
    for name, text in markdown_sources().items():
        for group in CITE.findall(text):
            unknown += [f"{name}: {key.strip()}" for key in group.split(",") if key.strip() not in keys]
    assert not unknown, f"cited but not in book/references.bib: {unknown}"


def test_colab_install_cells_use_the_configured_repository():
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    url = config["repository"]["url"].rstrip("/")
    branch = config["repository"].get("branch", "main")
    target = f"git+{url}@{branch}"
    for path in sorted(BOOK.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        first = "".join(code[0]["source"]) if code else ""
        assert target in first, f"{path.name}: the install cell should install {target}"


# The public names of the contract (CONTRACT.md, kept outside this repository): the API reference
# page must document each, and each must exist where the page says.
CONTRACT_NAMES = (
    "prox_l1", "prox_l2", "prox_sq", "clip_l1", "clip_l2", "spp_step", "sgd_step",
    "coordinate_median", "geometric_median", "trimmed_mean", "sample_stable", "select_block", "BGmD",
    "optim.MedianSGD", "distributed.robust_hook",
)
AUTODOC = re.compile(r"^\.\. auto(?:function|class)::\s+(\S+)", re.MULTILINE)
CURRENT = re.compile(r"^\.\. currentmodule::\s+(\S+)", re.MULTILINE)


def api_entries() -> set[str]:
    """Fully qualified names of the autodoc entries of book/api.md (``currentmodule`` applied)."""
    text = (BOOK / "api.md").read_text(encoding="utf-8")
    entries, module = set(), ""
    for match in sorted([*AUTODOC.finditer(text), *CURRENT.finditer(text)], key=lambda m: m.start()):
        if match.re is CURRENT:
            module = match.group(1)
        else:
            name = match.group(1)
            entries.add(name if name.startswith("median_sgd.") else f"{module}.{name}")
    return entries


def test_api_reference_is_in_the_toc():
    assert "book/api" in toc_entries()
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    extensions = config["sphinx"]["extra_extensions"]
    assert {"sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"} <= set(extensions)


def test_api_reference_documents_every_public_name():
    import functools

    import median_sgd

    entries = api_entries()
    wanted = {f"median_sgd.{name}" for name in CONTRACT_NAMES}
    wanted |= {f"median_sgd.{name}" for name in median_sgd.__all__}
    missing = sorted(wanted - entries)
    assert not missing, f"book/api.md has no autodoc entry for {missing}"
    for entry in sorted(entries):  # every entry names a real object with a docstring
        obj = functools.reduce(getattr, entry.split(".")[1:], median_sgd)
        assert (obj.__doc__ or "").strip(), f"{entry} has no docstring"
