"""Shared fixtures and the hypothesis profile of the library's test suite.

* ``device``: every test taking it runs on the CPU and, when CUDA is present, on the GPU too (the
  CUDA parameter carries the ``cuda`` marker, so ``-m "not cuda"`` deselects it).
  The CUDA device is ``torch.device("cuda", torch.cuda.current_device())`` (``cuda:0``), the device
  a tensor made with ``device="cuda"`` reports, so ``t.device == device`` holds on both.
* ``dtype``: float32 and float64.
* ``no_host_sync``: a context manager in which any synchronising CUDA call raises (value checks,
  which synchronise by design, are off inside it).
* hypothesis runs derandomized (the same examples on every run, no example database written), with
  a modest number of examples so the whole suite stays well under two minutes on two CPU cores.
  ``HYPOTHESIS_PROFILE=thorough`` runs many more examples (still derandomized).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "median_sgd",
    derandomize=True,
    max_examples=40,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    parent=settings.get_profile("median_sgd"),
    max_examples=1000,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "median_sgd"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=[pytest.param("cpu")] + [pytest.param("cuda", marks=pytest.mark.cuda)] * HAS_CUDA)
def device(request) -> torch.device:
    if request.param == "cuda":
        # torch.device("cuda") != torch.device("cuda:0"): compare with what tensors report.
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def devices() -> list:
    """All devices available here: ``["cpu"]`` plus ``"cuda"`` when present."""
    return list(DEVICES)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator (a fresh one per test, so tests do not depend on each other)."""
    return torch.Generator().manual_seed(20230901)


@contextlib.contextmanager
def _no_host_sync():
    """Inside, any synchronising CUDA call raises RuntimeError (value checks, which sync, are off)."""
    import median_sgd as ms

    torch.cuda.synchronize()
    with ms.value_checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def no_host_sync():
    """``with no_host_sync(): ...`` fails on any host synchronisation (CUDA tests only)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return _no_host_sync
