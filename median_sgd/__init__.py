"""median_sgd: robust (median-based) gradient estimation for SGD in PyTorch.

Clipping is secretly estimating the median gradient: the stochastic proximal point method on
``E ||m - g||`` is vectorwise clipping (Clip21), on ``E ||m - g||_1`` componentwise clipping, and on
``E ||m - g||^2 / 2`` heavy-ball momentum. The public names below are those of the contract
(``CONTRACT.md``); every function works on CPU and CUDA tensors of any floating dtype, with leading
batch dimensions, and raises ``ValueError``/``TypeError`` on bad input.
"""

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
