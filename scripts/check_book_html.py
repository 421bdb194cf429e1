"""Check that a Jupyter Book build produced every page listed in _toc.yml.

Guards against a build that exits 0 but writes nothing useful (e.g. Jupyter Book 2.x run on
a 1.x book). For notebook pages it also checks the Colab launch link. Run from the repository
root after `jupyter-book build .`: `python scripts/check_book_html.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"


def toc_files(toc: dict) -> list[str]:
    """Every `file:` entry of a jb-book _toc.yml, root first, in order."""
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def main() -> int:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]["url"].rstrip("/").removeprefix("https://github.com/")
    branch = config["repository"].get("branch", "main")
    errors = []
    if not (HTML / "index.html").is_file():
        errors.append("missing _build/html/index.html")
    pages = toc_files(toc)
    for name in pages:
        page = HTML / f"{name}.html"
        if not page.is_file():
            errors.append(f"missing {page.relative_to(ROOT)}")
            continue
        if (ROOT / f"{name}.ipynb").is_file():
            colab = f"colab.research.google.com/github/{repo}/blob/{branch}/{name}.ipynb"
            if colab not in page.read_text(encoding="utf-8"):
                errors.append(f"{page.relative_to(ROOT)} has no Colab link {colab}")
    for error in errors:
        print(f"check_book_html: error: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"check_book_html: {len(pages)} pages present in {HTML.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
