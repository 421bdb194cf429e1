"""median_sgd: robust (median-based) gradient estimation for SGD in PyTorch.

Clipping is secretly estimating the median gradient: the stochastic proximal point method on
``E ||m - g||`` is vectorwise clipping (Clip21), on ``E ||m - g||_1`` componentwise clipping, and on
``E ||m - g||^2 / 2`` heavy-ball momentum. The public names below are those of the contract
(``CONTRACT.md``); every function works on CPU and CUDA tensors of any floating dtype, with leading
batch dimensions, and raises ``ValueError``/``TypeError`` on bad input.

The submodules are attributes of the package, imported on first use (PEP 562), so that
``import median_sgd`` stays light (no matplotlib, no ``torch.distributed`` hooks) while
``median_sgd.distributed.robust_hook("gm")`` or ``median_sgd.optim.MedianSGD`` work after it.
"""

import importlib
import types

from ._checks import value_checks
from .bgmd import BGmD, select_block
from .estimators import sgd_step, sgd_step_lp, spp_step, spp_step_lp
from .medians import (
    GeometricMedianResult,
    coordinate_median,
    geometric_median,
    geometric_median_objective,
    trimmed_mean,
)
from .prox import clip_l1, clip_l2, clip_lp, prox_l1, prox_l2, prox_lp, prox_sq
from .stable import sample_stable

__version__ = "0.1.0"

# The public submodules, imported by ``__getattr__`` on first access (``prox``, ``estimators``,
# ``medians``, ``stable`` and ``bgmd`` are already imported above).
_SUBMODULES = (
    "aggregators",
    "attacks",
    "bgmd",
    "data",
    "distributed",
    "estimators",
    "experiments",
    "medians",
    "models",
    "optim",
    "plotting",
    "prox",
    "stable",
    "weiszfeld",
)


def __getattr__(name: str) -> types.ModuleType:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))


__all__ = [
    "prox_l1",
    "prox_l2",
    "prox_sq",
    "clip_l1",
    "clip_l2",
    "spp_step",
    "sgd_step",
    "coordinate_median",
    "geometric_median",
    "geometric_median_objective",
    "GeometricMedianResult",
    "trimmed_mean",
    "sample_stable",
    "value_checks",
    "prox_lp",
    "clip_lp",
    "spp_step_lp",
    "sgd_step_lp",
    "select_block",
    "BGmD",
]
