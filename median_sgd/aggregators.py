"""Gradient aggregators ``agg(G) -> u``: one interface from the ``(..., n, d)`` rows to a ``(..., d)`` update.

The robust-training chapters ("Block geometric median descent", "What BGmD's memory remembers",
"Robust training experiments") compare these rules as the server's step of distributed SGD:
``x <- x - agg(gamma G)`` with one row of ``G`` per client (or per sample). Every aggregator is
positively homogeneous (``agg(c G) = c agg(G)`` for ``c > 0``), so scaling by the step size
before or after aggregating is the same, except for BGmD whose memory mixes steps.

* ``mean`` (SGD): ``mean_i G_i``; breakdown point 0.
* ``cmd``: coordinate-wise median (CmD; Yin et al. 2018).
* ``gmd``: geometric median (GmD), smoothed Weiszfeld from the coordinate-wise median.
* ``bgmd``: block geometric median with memory (:class:`median_sgd.BGmD`).
* ``trimmed_mean``: coordinate-wise trimmed mean (Yin et al. 2018).
* ``krum`` / ``multi_krum``: Krum (Blanchard et al. 2017): the row whose ``n - f - 2`` nearest
  other rows are closest in squared distance (multi-Krum averages the ``m`` best such rows).

Use :func:`make_aggregator` (``make_aggregator("cmd")``, ``make_aggregator("bgmd", k=0.1)``).
Every aggregator is a callable object with ``reset()`` (a no-op for the stateless ones) and keeps
``G``'s dtype and device; none modifies ``G``.

**Rows that are not finite are dropped.** The aggregators are where the workers' data arrives, so a
row with a NaN or an infinite entry is a faulty (or hostile) worker's: every aggregator gives it
weight 0 in that call, as if it had not been sent, and ``agg.last_dropped`` ((...,) tensor) counts
the rows dropped. The whole row goes, also for the coordinate-wise rules (a worker that sends NaN
in one coordinate is broken, and its other coordinates are not to be trusted either; it is also
what the DDP hooks of :mod:`median_sgd.distributed` do, where a rank's flag travels with the
collectives). The rules then act on the rows that remain; when none remains the update is 0 (no
step; ``bgmd``'s memory stays as it was). Huge but finite rows are data, not faults: they are
outliers like any other, and the sums of the mean and the trimmed mean cannot overflow (half
precision is summed in float32; a sum that overflows is redone from terms divided by their count
first); the geometric medians start at the coordinate-wise median, which such rows cannot drag
away. No check synchronises with the host:
the dropping is done with masks and weights. The plain functions
(:func:`median_sgd.coordinate_median`, :func:`median_sgd.geometric_median`, :func:`krum`, ...)
still raise ``ValueError`` on NaN or Inf: there a non-finite value is a bug in the caller's code.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ._checks import ArgumentTypeError, check_choice, check_real, check_sample_matrix, value_checks
from .bgmd import (MEMORY_RULES, MODES, BGmD, bgmd_step, check_block_generator, column_stats,
                   resolve_block_size, take_columns, zero_columns)
from ._masked import (
    finite_rows,
    gm_weights,
    masked_coordinate_median,
    masked_mean,
    masked_trimmed_mean,
    zero_dropped,
)
from .medians import GeometricMedianResult, geometric_median

__all__ = [
    "Aggregator",
    "Mean",
    "CoordinateMedian",
    "GeometricMedian",
    "TrimmedMean",
    "Krum",
    "BGmD",
    "krum",
    "krum_scores",
    "make_aggregator",
    "AGGREGATORS",
    "Option",
    "Rule",
    "REGISTRY",
    "PLACES",
    "get_rule",
    "resolve_rule",
    "place_defaults",
]


# --------------------------------------------------------------------------------------------
# The registry: every robust rule once, with its names, its options and their defaults, for each
# place it runs (``PLACES``): make_aggregator ("aggregator"), optim.SampleMedianSGD
# ("optimizer") and distributed.robust_hook ("hook"). Each option is checked by one function,
# wherever it is given.

#: The places a rule runs in, in this order (:func:`make_aggregator`,
#: :class:`median_sgd.optim.SampleMedianSGD`, :func:`median_sgd.distributed.robust_hook`).
PLACES = ("aggregator", "optimizer", "hook")

#: the default of an option that has none: the caller must give it (Krum's ``f``)
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


@dataclass(frozen=True)
class Option:
    """One option of a rule: its ``name``, its ``default`` and ``check(value) -> value``, which
    returns the value normalised (``float``/``int``/as given) or raises ``TypeError`` /
    ``ValueError`` with a message that names the option and what it accepts."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str = ""

    def with_default(self, default: Any) -> "Option":
        """The same option with another default (a place where the rule runs differently)."""
        return Option(self.name, default, self.check, self.doc)


@dataclass(frozen=True)
class Rule:
    """A robust rule: its canonical ``name``, the ``aliases`` that also select it, and for each
    place of :data:`PLACES` it runs in, the options it accepts there with their defaults.

    ``differences`` says why a default differs between places (each such difference is
    deliberate: a place runs the rule under other constraints).
    """

    name: str
    summary: str
    aliases: Tuple[str, ...] = ()
    options: Mapping[str, Tuple[Option, ...]] = field(default_factory=dict, hash=False)
    differences: str = ""

    def __post_init__(self) -> None:  # read-only, like the record itself
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def names(self) -> Tuple[str, ...]:
        """The canonical name, then the aliases."""
        return (self.name, *self.aliases)

    @property
    def places(self) -> Tuple[str, ...]:
        """The places (of :data:`PLACES`) where the rule runs."""
        return tuple(p for p in PLACES if p in self.options)

    def options_in(self, place: str) -> Tuple[Option, ...]:
        """The options the rule accepts in ``place`` (``ValueError`` if it does not run there)."""
        if place not in self.options:
            raise ValueError(f"rule {self.name!r} does not run in the {place}; it runs in "
                             f"{', '.join(self.places)}")
        return self.options[place]

    def defaults(self, place: str) -> Dict[str, Any]:
        """``{option: default}`` in ``place`` (the options without a default left out)."""
        return {o.name: o.default for o in self.options_in(place) if o.default is not REQUIRED}

    def check(self, options: Mapping[str, Any], place: str) -> Dict[str, Any]:
        """The given ``options`` checked (and normalised); no default is added.

        An option the rule does not take in ``place`` raises ``TypeError`` (as an unexpected
        keyword argument does), a bad value ``TypeError`` or ``ValueError``.
        """
        accepted = {o.name: o for o in self.options_in(place)}
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"unknown {self.name} option(s) {unknown}; expected some of "
                            f"{list(accepted)}")
        return {name: accepted[name].check(value) for name, value in options.items()}

    def resolve(self, options: Mapping[str, Any], place: str) -> Dict[str, Any]:
        """Every option of the rule in ``place``: the defaults, overridden by the checked
        ``options``."""
        return {**self.defaults(place), **self.check(options, place)}


def _real_option(name: str, default: Any, lo=None, hi=None, doc: str = "", *,
                 label: Optional[str] = None, **bounds) -> Option:
    """An option checked by :func:`median_sgd._checks.check_real` (``label`` names it in errors)."""
    shown = label or name
    return Option(name, default, lambda value: check_real(value, shown, lo, hi, **bounds), doc)


def _choice_option(name: str, default: Any, choices: Tuple[Any, ...], doc: str = "") -> Option:
    return Option(name, default, lambda value: check_choice(value, name, choices), doc)


def _check_flag(name: str) -> Callable[[Any], bool]:
    def check(value):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
        return value
    return check


def _check_block_size(k):
    """``k``: an int ``>= 1`` (coordinates) or a float fraction in ``(0, 1]`` (of ``d``), as
    given (the block size itself depends on ``d``: :func:`median_sgd.resolve_block_size`)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be an int (a number of coordinates) or a float fraction, got {k!r}")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
    else:
        resolve_block_size(k, 1)  # type: ignore[arg-type]  # validates the fraction
    return k


# Weiszfeld's options (:func:`median_sgd.geometric_median`, whose defaults these are)
EPS = _real_option("eps", 1e-8, 0, lo_open=True, doc="smoothing floor, relative to the median distance")
TOL = _real_option("tol", 1e-6, 0, doc="stopping tolerance of the optimality test")
MAX_ITER = _real_option("max_iter", 100, 1, integer=True, doc="iterations (hook: rounds)")
FIXED_ITER = Option("fixed_iter", False, _check_flag("fixed_iter"),
                    "always run max_iter iterations (no host synchronisation)")
WEISZFELD = (EPS, TOL, MAX_ITER, FIXED_ITER)
#: one step of an optimizer or one bucket of a hook must not wait for the host: a fixed,
#: small budget of iterations (10 per step; 8 rounds, each two collectives, per bucket)
INIT = _choice_option("init", "median", ("median", "mean"),
                      "Weiszfeld's starting point: the coordinate-wise median (robust: in the "
                      "honest rows' range whatever the others send) or the mean (RFA)")
_OPTIMIZER_WEISZFELD = (INIT.with_default("mean"), EPS, TOL, MAX_ITER.with_default(10),
                        FIXED_ITER.with_default(True))
_HOOK_WEISZFELD = (EPS, TOL, MAX_ITER.with_default(8), FIXED_ITER.with_default(True))
TRIM = _real_option("trim", 0.1, 0, 0.5, hi_open=True,
                    doc="fraction trimmed at each end: floor(trim n) values")
K = Option("k", 0.1, _check_block_size, "BGmD's block: int coordinates or float fraction of d")
MODE = _choice_option("mode", "norm", MODES, "BGmD's block choice (select_block)")
MEMORY = _choice_option("memory", "mean", MEMORY_RULES, "BGmD's memory rule")
POWER = _real_option("power", 2.0, 0, lo_open=True, doc="exponent of the column norms in 'norm' mode")
GENERATOR = Option("generator", None, check_block_generator,
                   "BGmD's block sampler ('norm' mode); a tuple: one per leading problem")
SEED = _real_option("seed", 0, integer=True, doc="the hook's block sampler seed, the same on every rank")
F = _real_option("f", REQUIRED, 0, integer=True, label="f (the number of Byzantine rows)",
                 doc="Krum's assumed number of Byzantine rows")
M = _real_option("m", 1, 1, integer=True, doc="Krum: rows averaged (multi-Krum)")


# --------------------------------------------------------------------------------------------
# The aggregators


class Aggregator:
    """Base class: ``agg(G)`` maps ``(..., n, d)`` rows to a ``(..., d)`` update; ``reset()``.

    Rows with a NaN or Inf are dropped (see the module's docstring); ``last_dropped`` counts them.
    """

    name = "aggregator"
    last_dropped: Optional[torch.Tensor] = None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state (a no-op for stateless aggregators)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _rows(self, G: torch.Tensor) -> torch.Tensor:
        """Check the shape and dtype of ``G``; its finite rows (counted in ``last_dropped``)."""
        with value_checks(False):  # NaN and Inf are data here, not a caller's error
            check_sample_matrix(G)
        ok = finite_rows(G)
        self.last_dropped = G.shape[-2] - ok.sum(-1)
        return ok


class Mean(Aggregator):
    """``mean_i G_i`` over the finite rows: plain mini-batch SGD (breakdown point 0)."""

    name = "mean"

    def __call__(self, G):
        return masked_mean(G, self._rows(G))


class CoordinateMedian(Aggregator):
    """``median_i G_ij`` per coordinate over the finite rows (CmD), as
    :func:`median_sgd.coordinate_median` computes it."""

    name = "cmd"

    def __call__(self, G):
        return masked_coordinate_median(G, self._rows(G))


class GeometricMedian(Aggregator):
    """``argmin_z sum_i ||z - G_i||`` over the finite rows (GmD):
    :func:`median_sgd.geometric_median` with weight 1 on the finite rows and 0 on the others.

    ``gm_options`` (``init``, ``eps``, ``tol``, ``max_iter``, ``fixed_iter``) go to the solver,
    which starts at the coordinate-wise median of the finite rows unless ``init="mean"`` (see
    :data:`REGISTRY`); the result of the last call is ``agg.last_gm`` (iterations, convergence).
    """

    name = "gmd"

    def __init__(self, **gm_options) -> None:
        REGISTRY["geometric_median"].check(gm_options, "aggregator")
        self.gm_options = _with_robust_start(gm_options)
        self.last_gm: Optional[GeometricMedianResult] = None

    def __call__(self, G):
        ok = self._rows(G)
        self.last_gm = geometric_median(zero_dropped(G, ok), gm_weights(ok, G.dtype),
                                        **self.gm_options)
        return self.last_gm.median

    def reset(self) -> None:
        self.last_gm = None

    def __repr__(self) -> str:
        return f"GeometricMedian({', '.join(f'{k}={v!r}' for k, v in self.gm_options.items())})"


class TrimmedMean(Aggregator):
    """Per coordinate, the mean of the finite rows' values after dropping ``floor(trim n)`` at each
    end (``n`` all rows: dropped rows do not lower the number trimmed, see
    :func:`masked_trimmed_mean`; at least one value is kept)."""

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        self.trim: float = TRIM.check(trim)

    def __call__(self, G):
        ok = self._rows(G)
        return masked_trimmed_mean(G, ok, int(math.floor(self.trim * G.shape[-2])))

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim!r})"


def _check_f(f, n: int) -> int:
    f = F.check(f)
    if n - f - 2 < 1:
        raise ValueError(
            f"Krum needs n - f - 2 >= 1 neighbours (n >= f + 3; Blanchard et al. assume "
            f"n >= 2f + 3), got n = {n}, f = {f}"
        )
    return f


def _krum_scores(G: torch.Tensor, f: int, ok: torch.Tensor) -> torch.Tensor:
    """:func:`krum_scores` of the rows in ``ok``, as if the others had not been sent: the sum over
    the ``m - f - 2`` nearest other ok rows (``m`` ok rows, at least one neighbour, ``f`` as
    given); ``inf`` for the rows outside ``ok``."""
    n = G.shape[-2]
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    work = zero_dropped(work, ok)
    sq = torch.cdist(work, work).square()  # (..., n, n)
    # Exclude i itself and the dropped rows: push them to +inf (also a distance that overflowed
    # to NaN in cdist's ||a||^2 + ||b||^2 - 2 a.b), then the n - f - 2 smallest of each row.
    eye = torch.eye(n, dtype=torch.bool, device=G.device)
    pair = ok.unsqueeze(-1) & ok.unsqueeze(-2) & ~eye
    sq = torch.where(pair & ~torch.isnan(sq), sq, torch.inf)
    nearest = torch.topk(sq, n - f - 2, dim=-1, largest=False).values  # ascending
    neighbours = (ok.sum(-1) - f - 2).clamp_min(1)[..., None, None]  # m - f - 2 of the m ok rows
    pos = torch.arange(n - f - 2, device=G.device)
    scores = torch.where(pos < neighbours, nearest, 0.0).sum(-1)
    return torch.where(ok, scores, torch.inf).to(G.dtype)


def krum_scores(G: torch.Tensor, f: int) -> torch.Tensor:
    """``score_i = sum of ||G_i - G_j||^2`` over the ``n - f - 2`` rows ``j != i`` closest to ``G_i``.

    Shape ``(..., n)``. Blanchard, El Mhamdi, Guerraoui, Stainer (NeurIPS 2017), eq. of Sec. 4.
    (The self-distance 0 is excluded, unlike the BGmD authors' code.)
    """
    check_sample_matrix(G)
    f = _check_f(f, G.shape[-2])
    return _krum_scores(G, f, torch.ones(G.shape[:-1], dtype=torch.bool, device=G.device))


def _krum(G: torch.Tensor, f: int, m: int, ok: torch.Tensor) -> torch.Tensor:
    """:func:`krum` over the rows in ``ok``: the mean of the ok rows among the ``m`` best."""
    n = G.shape[-2]
    m = int(check_real(m, f"m (at most n = {n})", 1, n, integer=True))
    scores = _krum_scores(G, _check_f(f, n), ok)
    best = torch.topk(scores, m, dim=-1, largest=False).indices  # (..., m)
    rows = torch.gather(G, -2, best.unsqueeze(-1).expand(*best.shape, G.shape[-1]))
    return masked_mean(rows, torch.gather(ok, -1, best))


def krum(G: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """Krum (``m = 1``): the row of smallest :func:`krum_scores`; multi-Krum: the mean of the ``m`` best rows."""
    check_sample_matrix(G)
    return _krum(G, f, m, torch.ones(G.shape[:-1], dtype=torch.bool, device=G.device))


class Krum(Aggregator):
    """Krum / multi-Krum with ``f`` Byzantine rows assumed (:func:`krum`), over the finite rows:
    Krum of the ``m`` finite rows as if the others had not been sent, ``f`` unchanged (each score
    sums ``m - f - 2`` neighbours, at least one). A dropped row is never chosen unless fewer than
    ``m`` rows have a finite score; the update averages the finite rows among the chosen."""

    name = "krum"

    def __init__(self, f: int, m: int = 1) -> None:
        self.f: int = F.check(f)
        self.m: int = M.check(m)

    def __call__(self, G):
        return _krum(G, self.f, self.m, self._rows(G))

    def __repr__(self) -> str:
        return f"Krum(f={self.f}, m={self.m})"


class _WorkersBGmD(BGmD):
    """:class:`median_sgd.BGmD` over the finite rows: what ``make_aggregator("bgmd")`` returns.

    The same step as BGmD's (and on finite data the same numbers, for the same ``init``: here
    the geometric medians start at the coordinate-wise median by default, see :data:`REGISTRY`),
    with the rows that hold a NaN or Inf given weight 0 everywhere: in the column norms that
    choose the block, in the block's geometric median, and in the memory rule (the mean or the median of the finite rows, their
    geometric median). A memory that would overflow saturates at the largest finite value, and a
    row whose block overflows once the memory is added is dropped from that block's median.
    A call in which every row is dropped is no step (:func:`~median_sgd.bgmd.bgmd_step`'s
    ``absent``): it returns 0 and leaves the memory as it was, whatever the memory rule.
    ``last_dropped`` counts the rows dropped.
    """

    last_dropped: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self.last_dropped = None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        with value_checks(False):  # NaN and Inf are data here, not a caller's error
            check_sample_matrix(G)
        n, d = G.shape[-2], G.shape[-1]
        k = resolve_block_size(self.k, d)
        m = self._memory_for(G)
        ok = finite_rows(G)
        self.last_dropped = n - ok.sum(-1)
        with value_checks(False):
            return self._dropping_step(zero_dropped(G, ok), ok, m, k)

    def _dropping_step(self, G, ok, m, k):
        count = ok.sum(-1, keepdim=True)  # (..., 1): the rows that count
        # scaled by s, s^2 (so they cannot overflow); the dropped rows are zero: they add nothing
        s, colsum, sq = column_stats(G)
        if m is not None:  # A = G + 1 m^T over the rows that count
            ms_ = m.to(colsum.dtype) * s.unsqueeze(-1)
            colsum_a = colsum + count * ms_
            sq = (sq + ms_ * (2 * colsum + count * ms_)).clamp_min_(0.0)
        else:
            colsum_a = colsum
        sq = torch.nan_to_num(sq, nan=torch.inf)  # an overflowed column (inf - inf) ranks first

        def block_median(idx):
            block = take_columns(G, idx)
            if m is not None:
                block = block + torch.gather(m, -1, idx).unsqueeze(-2)
            block_ok = ok & finite_rows(block)
            self.last_gm = geometric_median(zero_dropped(block, block_ok), gm_weights(block_ok, G.dtype),
                                            **self.gm_options)
            return self.last_gm.median

        def memory_of(idx):
            rule = self.memory_rule
            if rule == "mean":
                new = colsum_a / (count.clamp_min(1) * s.unsqueeze(-1))  # exact unscaling (s = 2^k)
            elif rule == "median":
                # The coordinate-wise median commutes with adding m_j to a whole column.
                med = masked_coordinate_median(G, ok)
                new = med if m is None else med + m
            else:  # "gm": the residual rows A - C_k(A), which are zero on the block
                A = zero_columns(G.clone() if m is None else G + m.unsqueeze(-2), idx)
                A_ok = ok & finite_rows(A)
                new = geometric_median(zero_dropped(A, A_ok), gm_weights(A_ok, G.dtype),
                                       **self.gm_options).median
            # a memory that overflowed saturates (the next step drops rows that overflow with it)
            return torch.nan_to_num(new.to(G.dtype), nan=0.0)

        idx, update, self.memory = bgmd_step(sq, k, self.mode, self.generator, self.power,
                                             block_median, memory_of if self.memory_rule else None,
                                             absent=count.squeeze(-1) == 0, memory=m)
        self._record(sq, idx, self.last_gm, G.dtype)
        return update


def _with_robust_start(gm_options: dict) -> dict:
    """The aggregators' solver options: ``init`` defaults to the registry's robust start (the
    coordinate-wise median or the medoid, where ``geometric_median`` itself starts at the mean)."""
    return {"init": INIT.default, **gm_options}


def _bgmd(k=0.1, **options) -> BGmD:
    return _WorkersBGmD(k, **_with_robust_start(options))  # the block's median: as gmd's


def _multi_krum(f: int, m: Optional[int] = None) -> Krum:
    # Blanchard et al.'s multi-Krum uses m = n - f rows; n is not known before the first call,
    # so m must be given here.
    if m is None:
        raise ValueError("multi_krum needs m, the number of rows averaged (e.g. n - f)")
    return Krum(f, m)


#: every rule by its canonical name; :func:`get_rule` also finds it by an alias
REGISTRY: Dict[str, Rule] = {rule.name: rule for rule in (
    Rule("mean", "mean_i G_i: plain (mini-batch) SGD, breakdown point 0", ("sgd",),
         {place: () for place in PLACES}),
    Rule("coordinate_median", "median_i G_ij per coordinate (CmD)", ("cmd",),
         {place: () for place in PLACES}),
    Rule("trimmed_mean", "per coordinate, the mean after dropping floor(trim n) values at each end",
         (), {"aggregator": (TRIM,), "optimizer": (TRIM,), "hook": (TRIM.with_default(0.25),)},
         differences="the hook trims 0.25 of the ranks: world sizes are small, and with 0.1 "
                     "fewer than 10 ranks would trim nothing (floor(0.1 W) = 0), the mean"),
    Rule("geometric_median", "argmin_z sum_i ||z - G_i||, smoothed Weiszfeld (GmD; RFA in the hook)",
         ("gmd", "gm"),
         {"aggregator": (INIT, *WEISZFELD), "optimizer": _OPTIMIZER_WEISZFELD,
          "hook": (INIT, *_HOOK_WEISZFELD)},
         differences="the aggregator runs geometric_median's own iteration defaults "
                     "(max_iter=100, stop when converged); the optimizer runs a fixed 10 "
                     "iterations per step and the hook a fixed 8 rounds per bucket (each round "
                     "two collectives), so that neither waits for the host. The aggregator and "
                     "the hook start at the coordinate-wise median (init='median', where the "
                     "function geometric_median starts at the mean): from the mean a huge "
                     "Byzantine vector leaves a trace that max_iter iterations do not remove "
                     "(one row of 1e300 among 32 is still ~1e149 away after 100; chapter "
                     "'Scaling out'). The optimizer's samples are the model's own per-sample "
                     "gradients: it starts at their mean (init='median' is robust to heavy "
                     "tails in the 10 iterations: tests/test_medians_init.py)"),
    Rule("bgmd", "block geometric median with memory (Acharya et al. 2022; median_sgd.BGmD)", (),
         {"aggregator": (K, MODE, MEMORY, GENERATOR, POWER, INIT, *WEISZFELD),
          "hook": (K, MODE.with_default("topk"),
                   _choice_option("memory", "median", ("median", "mean", None), MEMORY.doc),
                   SEED, POWER, INIT, *_HOOK_WEISZFELD)},
         differences="the aggregator reproduces the paper (mode='norm' sampling, memory='mean'); "
                     "the hook defaults to mode='topk' (a deterministic block: no sampler to keep "
                     "in step across ranks, no host synchronisation) and memory='median' (with "
                     "the paper's mean memory one Byzantine rank controls the memory and, through "
                     "it, every later update: chapter 'Scaling out', 'The mean memory lets the "
                     "mean through'); the hook has no 'gm' memory rule"),
    Rule("krum", "the row whose n - f - 2 nearest rows are closest (Blanchard et al. 2017)", (),
         {"aggregator": (F, M)}),
    Rule("multi_krum", "the mean of the m rows of smallest Krum score", (),
         {"aggregator": (F, M.with_default(REQUIRED))}),
)}

_BY_NAME: Dict[str, Rule] = {name: rule for rule in REGISTRY.values() for name in rule.names}

# make_aggregator's constructor of each rule
_FACTORIES: Dict[str, Callable[..., Aggregator]] = {
    "mean": Mean,
    "coordinate_median": CoordinateMedian,
    "geometric_median": GeometricMedian,
    "bgmd": _bgmd,  # type: ignore[dict-item]
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multi_krum": _multi_krum,
}

#: every name :func:`make_aggregator` takes (canonical names and aliases) -> its constructor
AGGREGATORS: Dict[str, Callable[..., Aggregator]] = {
    name: _FACTORIES[rule.name] for rule in REGISTRY.values() if "aggregator" in rule.options
    for name in rule.names
}


def get_rule(name: str, place: Optional[str] = None, *, what: str = "rule") -> Rule:
    """The :class:`Rule` called ``name`` (its canonical name or an alias, any case); with
    ``place``, one that runs there. ``what`` names the argument in the errors: a ``TypeError``
    for a name that is not a string, a ``ValueError`` listing the names accepted otherwise."""
    if place is not None:
        check_choice(place, "place", PLACES)
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a string, got {type(name).__name__}")
    rule = _BY_NAME.get(name.lower())
    if rule is not None and (place is None or place in rule.options):
        return rule
    accepted = sorted(n for r in REGISTRY.values() if place is None or place in r.options
                      for n in r.names)
    where = "" if rule is None else f" ({rule.name!r} does not run in the {place})"
    raise ValueError(f"unknown {what} {name!r}{where}; expected one of {', '.join(accepted)}")


def resolve_rule(name: str, place: str = "aggregator", **options) -> Tuple[Rule, Dict[str, Any]]:
    """``(rule, options)``: the rule called ``name`` in ``place`` and every one of its options
    there, the defaults overridden by the given (checked) ``options``."""
    rule = get_rule(name, place)
    return rule, rule.resolve(options, place)


def place_defaults(place: str) -> Dict[str, Any]:
    """``{option: default}`` over every rule that runs in ``place``. An option has one default
    per place (a test checks it), so this is well defined."""
    out: Dict[str, Any] = {}
    for rule in REGISTRY.values():
        if place in rule.options:
            out.update(rule.defaults(place))
    return out


def make_aggregator(name: str, **options):
    """An aggregator by name: ``"mean"``/``"sgd"``, ``"cmd"``, ``"gmd"``, ``"bgmd"``,
    ``"trimmed_mean"``, ``"krum"``, ``"multi_krum"`` (aliases: ``"coordinate_median"``, ``"gm"``,
    ``"geometric_median"``; :data:`REGISTRY`); ``options`` are its constructor's keywords
    (``bgmd``: ``k`` (default 0.1, the paper's 10%), ``mode``, ``memory``, ``generator``,
    Weiszfeld options; ``krum``: ``f``, ``m``; ``trimmed_mean``: ``trim``; ``gmd``: Weiszfeld
    options). ``REGISTRY[name].options["aggregator"]`` lists them with their defaults."""
    rule = get_rule(name, "aggregator", what="aggregator")
    try:
        rule.check(options, "aggregator")
        return _FACTORIES[rule.name](**options)
    except TypeError as err:  # a wrong type of value stays an ArgumentTypeError (a ValueError too)
        kind = ArgumentTypeError if isinstance(err, ArgumentTypeError) else TypeError
        raise kind(f"bad options for aggregator {name!r}: {err}") from None
