"""Shared input validation.

Checks of shape, dtype and device are free and always run. Checks of *values* (finite entries,
``tau > 0`` given as a tensor, nonnegative weights) read tensor data, which on a GPU means a host
synchronisation. They run by default; hot loops that have validated their inputs once can switch
them off with :func:`value_checks` (``with median_sgd.value_checks(False): ...``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Iterator, Union

import torch

Scalar = Union[float, int, torch.Tensor]

_state = threading.local()


def value_checks_enabled() -> bool:
    """Whether value checks (finite entries, positive tau) are on in this thread."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager turning value checks on or off (they cost a host sync on CUDA).

    Shape, dtype and device checks are never turned off.
    """
    previous = value_checks_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def check_float_tensor(x, name: str, *, min_dim: int = 0) -> torch.Tensor:
    """``x`` must be a real floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (skipped when value checks are off)."""
    if value_checks_enabled() and x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_vector(v, name: str) -> torch.Tensor:
    """A floating tensor whose last dimension is a vector (at least 1-D, d >= 1), finite."""
    check_float_tensor(v, name, min_dim=1)
    if v.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last (vector) dimension: shape {tuple(v.shape)}")
    check_finite(v, name)
    return v


def check_sample_matrix(G, name: str = "G") -> torch.Tensor:
    """A sample matrix of shape (..., n, d) with n >= 1 and d >= 1, finite."""
    check_float_tensor(G, name, min_dim=2)
    n, d = G.shape[-2], G.shape[-1]
    if n == 0:
        raise ValueError(f"{name} has no samples (n = 0): shape {tuple(G.shape)}")
    if d == 0:
        raise ValueError(f"{name} has empty vectors (d = 0): shape {tuple(G.shape)}")
    check_finite(G, name)
    return G


def check_same_kind(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Same dtype and device: we never promote or move silently."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}"
        )


def check_tau(tau: Scalar, like: torch.Tensor, name: str = "tau", *, in_range: bool = False) -> Scalar:
    """Validate a positive finite step size / radius and return it ready to broadcast.

    ``tau`` is a Python number, or a real tensor holding one value per problem: its shape must
    broadcast against the batch shape ``like.shape[:-1]``. A tensor is returned with a trailing
    singleton dimension appended (so it broadcasts over the vector dimension), cast to ``like``'s
    dtype and device (in float16, values above 65504 become inf: no clipping). Bools (Python or tensor) are rejected: ``True`` is not a step size.

    ``in_range=True`` is for steps of length tau (not radii): tau must also be finite in
    ``like``'s dtype (1e39 is inf in float32, and a step of inf is no step at all). For a tensor
    that is a value check (skipped when value checks are off).
    """
    if isinstance(tau, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(tau, numbers.Real):
        tau = float(tau)
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tau}")
        if in_range and like.is_floating_point() and tau > torch.finfo(like.dtype).max:
            raise ValueError(
                f"{name} = {tau:g} is beyond the largest {like.dtype} value "
                f"({torch.finfo(like.dtype).max:g}): a step that long is inf in that dtype"
            )
        return tau
    if not isinstance(tau, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(tau).__name__}")
    if tau.is_complex() or tau.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number tensor, got {tau.dtype}")
    batch = like.shape[:-1]
    try:
        fits = torch.broadcast_shapes(tau.shape, batch) == batch
    except RuntimeError:
        fits = False
    if not fits:
        # tau may not add dimensions: a (d,)-shaped tau against one (d,) vector is ambiguous.
        raise ValueError(
            f"{name} of shape {tuple(tau.shape)} does not broadcast to the batch shape "
            f"{tuple(batch)} (one value per problem; the vector dimension is the last one)"
        )
    if value_checks_enabled() and tau.numel() > 0 and not bool(
        (torch.isfinite(tau) & (tau > 0)).all()
    ):
        raise ValueError(f"{name} must be finite and > 0 everywhere")
    out = tau.to(dtype=like.dtype, device=like.device).unsqueeze(-1)
    if in_range and value_checks_enabled() and out.numel() > 0 and not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"{name} has values beyond the largest {like.dtype} value "
            f"({torch.finfo(like.dtype).max:g}): a step that long is inf in that dtype"
        )
    return out


def check_choice(value, name: str, choices) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


class ArgumentTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type (a bool, a string, None where a number is needed).

    A ``TypeError`` as Python's convention asks, and a ``ValueError`` too, because earlier
    versions raised ``ValueError`` for some of these and callers may catch that.
    """


def _bound(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def check_real(
    x,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> float | int:
    """A finite Python real number (``integer=True``: an integer) with ``lo <= x <= hi``.

    ``lo_open``/``hi_open`` make a bound strict (``lo=0, lo_open=True`` is ``x > 0``). Returns
    ``float(x)`` (``int(x)`` for integers). Bools are rejected (``True`` is not a step size); so
    are tensors: hyperparameters are plain numbers, checked without a host synchronisation.
    Wrong types raise :class:`ArgumentTypeError`, values out of range ``ValueError``; both
    messages name the argument and the allowed range.
    """
    want_type = numbers.Integral if integer else numbers.Real
    if isinstance(x, bool) or not isinstance(x, want_type):
        raise ArgumentTypeError(f"{_wanted(name, lo, hi, lo_open, hi_open, integer)}, got {x!r} "
                                f"({type(x).__name__})")
    value: float | int = int(x) if integer else float(x)  # type: ignore[call-overload]
    if (not math.isfinite(value)
            or (lo is not None and (value < lo or (lo_open and value == lo)))
            or (hi is not None and (value > hi or (hi_open and value == hi)))):
        raise ValueError(f"{_wanted(name, lo, hi, lo_open, hi_open, integer)}, got {x!r}")
    return value


def _wanted(name: str, lo, hi, lo_open: bool, hi_open: bool, integer: bool) -> str:
    # built only for an error: optimizers check their hyperparameters at every step
    kind = "an integer" if integer else "a finite number"
    bound = _bound(lo, hi, lo_open, hi_open)
    return f"{name} must be {kind}{' ' + bound if bound else ''}"


def check_generator(generator):
    """``generator`` must be a ``torch.Generator`` or ``None`` (torch's global generator)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator
