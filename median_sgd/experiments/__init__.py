"""Experiments of the book, as library code.

One module per experiment, on one scaffold (``._common``). Each defines a frozen config dataclass,
``CONFIGS = scales(ci=..., paper=...)`` (the two scales differ only in sizes, never in code) and
``run(config="ci", *, device, dtype, progress)`` returning a :class:`Result`: the config and named
tables of tidy records (lists of dicts) that :mod:`median_sgd.plotting` draws. Nothing here
prints or plots, so users can rerun an experiment with other settings from their own notebooks.

Random draws come from CPU generators seeded by the config and are moved to the device that
computes (``._random``), so an experiment run on a GPU sees the samples of the CPU run and its
records agree with the book's up to rounding. (``bgmd_training``, whose loop draws whole gradient
matrices at every step, keeps a generator on the device; ``aggregation_cost`` times BGmD with one.)
"""

from ._common import SCALES, Result

__all__ = ["SCALES", "Result", "select"]


def select(records, field: str = "median", **where):
    """The ``field`` of the one record matching every ``key=value`` in ``where``.

    >>> select([{"n": 5, "estimator": "mean", "median": 3.6}], n=5, estimator="mean")
    3.6
    """
    rows = [r for r in records if all(r.get(k) == v for k, v in where.items())]
    if len(rows) != 1:
        raise ValueError(f"expected exactly one record with {where}, found {len(rows)}")
    return rows[0][field]
