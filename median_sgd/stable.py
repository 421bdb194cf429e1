"""Symmetric alpha-stable noise by the Chambers-Mallows-Stuck method.

``X = sin(alpha V) / cos(V)^(1/alpha) * (cos((1 - alpha) V) / W)^((1 - alpha) / alpha)`` with
``V ~ U(-pi/2, pi/2)`` and ``W ~ Exp(1)`` independent is standard symmetric alpha-stable
(skewness 0) in the parameterisation of ``scipy.stats.levy_stable`` (S0 and S1 agree when the
skewness is 0). ``alpha = 1`` gives ``tan(V)``, the standard Cauchy law, with no special case;
``alpha = 2`` gives ``2 sin(V) sqrt(W)``, a Gaussian of variance 2. Used in the chapter
"Estimating a gradient under alpha-stable noise".
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from ._checks import check_generator, check_real, value_checks_enabled

__all__ = ["sample_stable"]

Param = Union[float, torch.Tensor]


def sample_stable(
    alpha: Param,
    size: Union[int, Sequence[int], torch.Size],
    *,
    loc: Param = 0.0,
    scale: Param = 1.0,
    generator: Optional[torch.Generator] = None,
    device=None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``loc + scale * X``, ``X`` symmetric alpha-stable (CMS), of shape ``size``; ``0 < alpha <= 2``.

    ``alpha``, ``loc`` and ``scale`` are numbers or tensors broadcastable to ``size`` (for example
    one ``alpha`` per row, to draw every noise level of an experiment in one call). ``device``
    defaults to the generator's device (else the CPU) and ``dtype`` to torch's default. The
    samples are computed in float64 and rounded to ``dtype`` (very small ``alpha`` can overflow
    float32 to +-inf: such draws are genuinely beyond its range).
    """
    if isinstance(size, numbers.Integral):
        size = (int(size),)
    try:
        size = torch.Size(size)  # type: ignore[arg-type]  # checked here
    except (TypeError, ValueError):
        raise TypeError(f"size must be an int or a sequence of ints, got {size!r}") from None
    if any(s < 0 for s in size):
        raise ValueError(f"size must be nonnegative, got {tuple(size)}")
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    check_generator(generator)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but samples were asked on {device}; "
            "pass a generator created with torch.Generator(device=...) on the same device"
        )
    work = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64

    alpha_t = _param(alpha, "alpha", size, device, work)
    loc_t = _param(loc, "loc", size, device, work)
    scale_t = _param(scale, "scale", size, device, work)
    if value_checks_enabled():
        if not bool(((alpha_t > 0) & (alpha_t <= 2)).all()):
            raise ValueError(f"alpha must lie in (0, 2], got {_show(alpha)}")
        if not bool((torch.isfinite(scale_t) & (scale_t > 0)).all()):
            raise ValueError(f"scale must be finite and > 0, got {_show(scale)}")
        if not bool(torch.isfinite(loc_t).all()):
            raise ValueError(f"loc must be finite, got {_show(loc)}")

    u = torch.rand(size, generator=generator, device=device, dtype=work)
    v = math.pi * (u - 0.5)
    cauchy = isinstance(alpha, numbers.Real) and float(alpha) == 1.0
    if device.type == "cpu":
        # exactly the stream (and generator state) of exponential_, which on the CPU draws the
        # same uniforms and returns -log1p(-u), three times slower
        w = torch.rand(size, generator=generator, device=device, dtype=work)
        if not cauchy:  # alpha = 1 does not use w; it is drawn to leave the generator as usual
            w = w.neg_().log1p_().neg_()
    else:
        w = torch.empty(size, device=device, dtype=work).exponential_(generator=generator)
    if cauchy:
        x = torch.tan(v)  # sin(v) / cos(v): Cauchy
    elif isinstance(alpha, numbers.Real) and float(alpha) == 2.0:
        x = 2.0 * torch.sin(v) * w.sqrt_()  # sin(2v) / sqrt(cos v) * sqrt(w / cos v): Gaussian
    else:
        # the two powers through one exp of a sum of logs (pow is several times slower than
        # exp and log here, and the sum cannot overflow where a factor alone would)
        a = float(alpha) if isinstance(alpha, numbers.Real) else alpha_t
        t = (1.0 - a) / a
        log_c = torch.cos((1.0 - a) * v).log_()
        expo = (log_c - w.log_()).mul_(t)
        if isinstance(a, torch.Tensor):
            expo = torch.where(t == 0, 0.0, expo)  # alpha = 1: (c / w)^0 = 1, even for w = 0
        expo -= torch.cos(v).log_() / a
        x = torch.sin(a * v).mul_(expo.exp_())
    if not (isinstance(scale, numbers.Real) and float(scale) == 1.0):
        x = scale_t * x
    if not (isinstance(loc, numbers.Real) and float(loc) == 0.0):
        x = loc_t + x
    return x.to(dtype)


def _param(value: Param, name: str, size: torch.Size, device, work) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):  # a number (a bool is not one)
        return torch.tensor(check_real(value, f"{name} (a number or a tensor)"), device=device,
                            dtype=work)
    try:
        shape = torch.broadcast_shapes(value.shape, size)
    except RuntimeError:
        shape = None
    if shape != size:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to size {tuple(size)}"
        )
    return value.to(device=device, dtype=work)


def _show(value: Param) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor with values in [{value.min().item():g}, {value.max().item():g}]"
    return repr(value)
