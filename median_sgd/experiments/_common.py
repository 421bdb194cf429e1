"""The scaffold every experiment shares: its two scales, config lookup, checks, progress, threads, Result.

An experiment module defines a frozen config dataclass, ``CONFIGS = scales(ci=..., paper=...)``
and ``run(config="ci", *, device="cpu", dtype=..., progress=False) -> Result``: ``run`` resolves
its config with :func:`resolve_config` (a scale name or a config object), calls the named study
functions of the module and returns their tables in one :class:`Result`. Nothing here draws
random numbers, so moving an experiment onto the scaffold leaves its draws (and the book's
numbers) unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Type, TypeVar

import torch

from .._checks import check_real

__all__ = [
    "SCALES",
    "scales",
    "resolve_config",
    "check_fields",
    "check_each",
    "check_dtype",
    "only_dtype",
    "progress",
    "cpu_threads",
    "single_threaded_on_cpu",
    "Result",
    "records_of",
]

#: the two scales every experiment defines: ``"ci"`` (the book's stored run) and ``"paper"``
SCALES: Tuple[str, str] = ("ci", "paper")

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])


def scales(*, ci: C, paper: C) -> Dict[str, C]:
    """``{"ci": ci, "paper": paper}``, the two scales of one experiment (configs of one type).

    The scales differ only in sizes, never in code: both must be instances of the same class.
    """
    if type(ci) is not type(paper):
        raise TypeError(f"both scales must be of one config type, got {type(ci).__name__} "
                        f"and {type(paper).__name__}")
    return {"ci": ci, "paper": paper}


def resolve_config(config: Any, configs: Mapping[str, C], name: str = "config") -> C:
    """``configs[config]`` for a scale name, ``config`` itself for a config of the scales' type."""
    kind: Type[Any] = type(next(iter(configs.values())))
    if isinstance(config, str):
        if config not in configs:
            raise ValueError(f"unknown scale {config!r}; expected one of {', '.join(configs)}")
        return configs[config]
    if not isinstance(config, kind):
        raise TypeError(f"{name} must be a scale name or a {kind.__name__}, got {type(config).__name__}")
    return config


def check_fields(config: Any, names: Iterable[str], lo: Optional[float] = None,
                 hi: Optional[float] = None, **options: bool) -> None:
    """:func:`~median_sgd._checks.check_real` on each field ``names`` of ``config`` (same bounds)."""
    for field_name in names:
        check_real(getattr(config, field_name), field_name, lo, hi, **options)


def check_each(values: Any, name: str, lo: Optional[float] = None, hi: Optional[float] = None,
                **options: bool) -> None:
    """``values`` is a non-empty sequence whose every entry passes ``check_real`` (same bounds)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty tuple of numbers, got {values!r}")
    for i, value in enumerate(values):
        check_real(value, f"{name}[{i}]", lo, hi, **options)


def check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if it is a floating ``torch.dtype`` (the experiments compute in it)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def only_dtype(dtype: Any, own: torch.dtype = torch.float32) -> torch.dtype:
    """``own`` when ``dtype`` is ``None`` or ``own``: the experiments that train a model compute
    in its dtype only (``run`` accepts ``dtype`` for the common signature)."""
    if dtype is not None and dtype != own:
        raise TypeError(f"dtype must be None or {own} (the model's), got {dtype!r}")
    return own


class _NoBar:
    """What :func:`progress` returns for a disabled counter: ``update``/``close`` do nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Optional[Iterable[Any]] = None, *, enabled: bool = False, desc: str = "",
             total: Optional[int] = None, **options: Any) -> Any:
    """``tqdm(iterable, desc=desc, leave=False)`` when ``enabled``, else ``iterable`` untouched.

    Only long loops show a bar, and only when asked (every ``run`` has ``progress=False``): tqdm
    is imported then and never otherwise. With ``iterable=None`` it returns a counter to
    ``update()`` and ``close()`` (a no-op object when disabled).
    """
    if not enabled:
        return _NoBar() if iterable is None else iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, **{"leave": False, **options})


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous value."""
    threads = int(check_real(threads, "threads", 1, integer=True))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _device_of(kwargs: Mapping[str, Any]) -> torch.device:
    if isinstance(kwargs.get("h"), torch.Tensor):
        return kwargs["h"].device
    return torch.device(kwargs.get("device", "cpu"))


def single_threaded_on_cpu(fn: F) -> F:
    """Run ``fn`` with one intra-op CPU thread (restored afterwards) when it computes on the CPU.

    The thread policy of the experiments whose loops are thousands of operations on small tensors:
    a second thread only adds synchronisation (on a busy machine a spinning OpenMP worker made
    them ten times slower). The device is the ``device`` keyword (or that of a tensor ``h``).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _device_of(kwargs).type != "cpu":
            return fn(*args, **kwargs)
        with cpu_threads(1):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Result(Mapping):
    """What every experiment's ``run`` returns: its config and named tables.

    A table is a list of tidy records (dicts) in most studies, a dict or a tensor where a study
    returns one. ``result.final`` and ``result["final"]`` are the same object; iterating gives
    the table names (a ``Mapping``, so ``dict(result)`` and ``result.keys()`` work).
    """

    def __init__(self, config: Any, **tables: Any):
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_tables", dict(tables))

    def __getattr__(self, name: str) -> Any:
        tables = self.__dict__.get("_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"this Result has no table {name!r}; it has {', '.join(tables) or 'none'}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Result is read-only; build a new one")

    def __getitem__(self, name: str) -> Any:
        return self._tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def __dir__(self) -> Sequence[str]:
        return sorted(set(super().__dir__()) | set(self._tables))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v) if isinstance(v, (list, dict)) else type(v).__name__}"
                          for k, v in self._tables.items())
        return f"Result({type(self.config).__name__}, {sizes})"

    def __reduce__(self):
        return (_rebuild, (self.config, self._tables))


def _rebuild(config: Any, tables: Dict[str, Any]) -> Result:
    return Result(config, **tables)


def records_of(records: Any, table: str = "records") -> Any:
    """The list of records in ``records``: its table ``table`` if it is a :class:`Result`."""
    return records[table] if isinstance(records, Result) else records
