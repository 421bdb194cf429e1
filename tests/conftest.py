"""Shared fixtures and the hypothesis profile of the library's test suite.

* ``device``: every test taking it runs on the CPU and, when CUDA is present, on the GPU too (the
  CUDA parameter carries the ``cuda`` marker, so ``-m "not cuda"`` deselects it).
* ``dtype``: float32 and float64.
* hypothesis runs derandomized (the same examples on every run, no example database written), with
  a modest number of examples so the whole suite stays well under two minutes on two CPU cores.
  ``HYPOTHESIS_PROFILE=thorough`` runs many more examples (still derandomized).
"""

from __future__ import annotations

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
