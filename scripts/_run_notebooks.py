"""Execute notebooks in place, top to bottom, in the environment nbval checks them in.

Used by ``scripts/run_notebooks``. The kernel environment is ``NOTEBOOK_ENV`` from the
repository's ``conftest.py`` (CPU only, ci scale, fixed thread count), the working directory is
the notebook's folder (as under nbval and Jupyter Book), and a cell that raises aborts the run
without touching the file. Volatile metadata (timings, widget state, UI flags) is removed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import NOTEBOOK_ENV, notebook_env  # noqa: E402

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")


def clean(nb: nbformat.NotebookNode) -> None:
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)


def run(path: Path, timeout: int) -> None:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with notebook_env():
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute(stderr=subprocess.DEVNULL)  # as nbval: kernel log noise stays out of the way
    clean(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    cells = sum(cell.cell_type == "code" for cell in nb.cells)
    print(f"[run_notebooks] {os.path.relpath(path, ROOT)}: {cells} code cells in {time.perf_counter() - start:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: book/*.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args()
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    if not paths:
        print("[run_notebooks] no notebooks found", file=sys.stderr)
        return 1
    env = ", ".join(f"{k}={'<unset>' if v is None else repr(v)}" for k, v in NOTEBOOK_ENV.items())
    print(f"[run_notebooks] kernel environment: {env}")
    for path in paths:
        run(path, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
