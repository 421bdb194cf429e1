"""Numerics shared by every module: the arithmetic dtype, exact power-of-two scaling, and moving
tensors to a device without a host synchronisation.

Sums of squares overflow (a float32 entry of 1e20, a float16 one of 256) or underflow long before
the values themselves do. Multiplying by a power of two is exact, so a norm computed on scaled
values and scaled back has the bits of the plain one wherever that one is right (LAPACK's ``nrm2``
scales the same way). :func:`pow2_scale` is the one place that picks the power; the ℓ2 clipping
(:mod:`median_sgd.prox`), the geometric median and BGmD's column statistics
(:mod:`median_sgd.medians`, :mod:`median_sgd.bgmd`) and the DDP hook's distances
(:mod:`median_sgd.distributed`) all use it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["opmath_dtype", "host_reads_are_free", "midpoint", "pow2_scale", "scaled_l2_norm", "to_device"]

_HALF = (torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on ``dtype`` is done in: float32 for the half types, else itself."""
    return torch.float32 if dtype in _HALF else dtype


def host_reads_are_free(x: torch.Tensor) -> bool:
    """Whether reading a flag of ``x`` on the host costs nothing: a CPU tensor, eager mode."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def known_all(flags: torch.Tensor) -> bool:
    """Whether every flag is true, where the host can read them at no cost
    (:func:`host_reads_are_free`); else False, so that the caller takes its general,
    synchronisation-free path."""
    return host_reads_are_free(flags) and bool(flags.all())


def midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a + b) / 2``, or ``a / 2 + b / 2`` where ``a + b`` overflows (two values near the dtype's
    largest; half precision: above ~32,752). Halving each is exact for normal numbers, so the
    bits elsewhere are those of ``(a + b) / 2``. The middle of the two middle values of the
    medians."""
    mid = (a + b) / 2
    return torch.where(torch.isfinite(mid), mid, a / 2 + b / 2)


def pow2_scale(amax: torch.Tensor, top: int = 0) -> torch.Tensor:
    """``2**-e`` with ``amax * 2**-e`` in ``[2**(top-1), 2**top)``: the power of two that brings
    ``amax`` to ``2**top`` (to 1 by default).

    1 where ``amax`` is not finite; the exponent is clipped so that the scale and its reciprocal
    are normal numbers of ``amax``'s dtype (float32 or float64). Multiplying by a power of two is
    exact (barring underflow into subnormals), so a result computed on scaled values and scaled
    back has the same bits as the unscaled computation whenever that one does not overflow.
    """
    dtype = amax.dtype
    finfo = torch.finfo(dtype)
    # 128 for float32, 1024 for float64 (not int(log2(max)) + 1: log2 of float64's max rounds
    # to 1024.0, which made the clip 2**-1023 and the scale 0 for max |x| >= 2**1022)
    max_exp = math.frexp(finfo.max)[1]
    min_exp = int(math.log2(finfo.tiny))  # -126 for float32
    _, e = torch.frexp(amax)
    e = torch.where(torch.isfinite(amax), e - top, 0).clamp(min_exp + 2, max_exp - 2)
    # the bits of 2**-e (exact; torch.ldexp goes through pow, in the default dtype)
    if dtype == torch.float32:
        return ((127 - e).to(torch.int32) << 23).view(torch.float32)
    if dtype == torch.float64:
        return ((1023 - e).to(torch.int64) << 52).view(torch.float64)
    raise TypeError(f"pow2_scale needs float32 or float64, got {dtype}")


def scaled_l2_norm(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``||v||_2`` over ``dim`` as ``||v s|| / s``, ``s`` the power of two bringing ``max |v|`` to [1, 2).

    The squares neither overflow nor underflow, and the scaling is exact, so the result is the
    plain norm's wherever that one is right. ``inf`` only if the norm exceeds the dtype or ``v``
    holds an inf, NaN if ``v`` holds a NaN. In ``v``'s dtype (computed in float32 for half data).
    """
    work = opmath_dtype(v.dtype)
    top = v.abs().amax(dim).to(work)
    s = pow2_scale(top, 1)
    norm = torch.linalg.vector_norm(v.to(work) * s.unsqueeze(dim), dim=dim) / s
    return torch.where(torch.isfinite(top), norm, top).to(v.dtype)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` on ``device``: ``x`` itself there already; from the CPU to CUDA through pinned memory,
    without waiting for the copy (a copy from pageable memory synchronises; later work on the
    device's current stream is ordered after this one)."""
    device = torch.device(device)
    if x.device.type == device.type and (device.index is None or x.device == device):
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
