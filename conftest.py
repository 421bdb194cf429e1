"""Repository-wide pytest configuration (library tests and nbval notebook checks).

Notebooks in ``book/`` are committed with the outputs of a CPU run at ``ci`` scale and are
checked with ``pytest --nbval`` (see ``scripts/test``). Two things keep that comparison honest:

* stderr is never compared (warnings embed the kernel's temporary file path, progress bars write
  timings there); ``nbval_sanitize.cfg`` masks memory addresses and kernel paths elsewhere;
* every notebook kernel starts with the environment ``scripts/run_notebooks`` used to make the
  stored outputs (:data:`NOTEBOOK_ENV`, which that script imports from here): CPU only, two
  threads, ``MEDIAN_SGD_SCALE`` unset, so a machine with a GPU or many cores, or a shell with
  ``MEDIAN_SGD_SCALE=paper``, still reproduces the stored outputs.
"""

from __future__ import annotations

import contextlib
import os

import pytest

#: Environment of the kernels that execute notebooks, under nbval and in
#: ``scripts/run_notebooks`` (which imports it). ``None`` removes a variable.
NOTEBOOK_ENV: dict[str, str | None] = {
    "MEDIAN_SGD_SCALE": None,  # chapters default to the "ci" scale
    "CUDA_VISIBLE_DEVICES": "",  # stored outputs come from a CPU run
    "OMP_NUM_THREADS": "2",  # CPU reductions can change in the last bit with the thread count
}


@contextlib.contextmanager
def notebook_env():
    saved = {key: os.environ.get(key) for key in NOTEBOOK_ENV}
    try:
        for key, value in NOTEBOOK_ENV.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_collectstart(collector):
    # nbval's documented hook for not comparing an output type anywhere.
    if collector.path is not None and collector.path.suffix == ".ipynb" and hasattr(collector, "skip_compare"):
        collector.skip_compare = (*collector.skip_compare, "stderr")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    # nbval starts a notebook's kernel while setting up its first cell; the kernel copies
    # os.environ at that moment, so the variables are changed only for that window.
    if item.path is not None and item.path.suffix == ".ipynb":
        with notebook_env():
            yield
    else:
        yield
