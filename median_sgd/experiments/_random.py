"""Random draws that do not depend on the device: made on the generator's device, then moved.

The experiments seed a *CPU* generator (:func:`generator`) and draw with the helpers below, which
draw on the generator's own device and move the result to the device that computes. A chapter
run on a GPU then sees the same samples as the stored CPU run, and its numbers agree with the
book's up to rounding; a CUDA generator with the same seed would give another stream (and a
run whose statistical claims hold for a different sample). On the CPU nothing changes: the
stream is the one ``torch.Generator().manual_seed(seed)`` always gave.

The price is a host-to-device copy per draw. The experiments draw small tensors (at most a few
megabytes per call); on CUDA the copy goes through pinned memory with ``non_blocking=True``, so
it does not make the host wait for the device (no synchronisation inside the loops). The
training loop of ``bgmd_training`` does the same through the attacks' and BGmD's own draws (a
CPU generator, moved); its largest draw, additive gradient noise on the whole ``(b, d)`` matrix,
is a CPU ``randn`` of ``b d`` values per step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .._numerics import to_device
from ..stable import sample_stable

__all__ = ["generator", "to_device", "rand", "randn", "randint", "randperm", "stable"]

Size = Union[int, Sequence[int], torch.Size]


def generator(seed: int) -> torch.Generator:
    """``torch.Generator().manual_seed(seed)``: the CPU generator every experiment draws from."""
    return torch.Generator().manual_seed(int(seed))


def _where(generator: Optional[torch.Generator], device) -> torch.device:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device if generator is not None else torch.device(device)


def rand(size: Size, *, generator: Optional[torch.Generator], device="cpu", dtype=None) -> torch.Tensor:
    """``torch.rand(size)`` drawn on ``generator``'s device, returned on ``device``."""
    x = torch.rand(size, generator=generator, device=_where(generator, device), dtype=dtype)
    return to_device(x, device)


def randn(size: Size, *, generator: Optional[torch.Generator], device="cpu", dtype=None) -> torch.Tensor:
    """``torch.randn(size)`` drawn on ``generator``'s device, returned on ``device``."""
    x = torch.randn(size, generator=generator, device=_where(generator, device), dtype=dtype)
    return to_device(x, device)


def randint(high: int, size: Union[Tuple[int, ...], List[int], torch.Size], *, generator: Optional[torch.Generator], device="cpu") -> torch.Tensor:
    """``torch.randint(high, size)`` drawn on ``generator``'s device, returned on ``device``."""
    x = torch.randint(high, size, generator=generator, device=_where(generator, device))
    return to_device(x, device)


def randperm(n: int, *, generator: Optional[torch.Generator], device="cpu") -> torch.Tensor:
    """``torch.randperm(n)`` drawn on ``generator``'s device, returned on ``device``."""
    return to_device(torch.randperm(n, generator=generator, device=_where(generator, device)), device)


def stable(alpha, size: Size, *, loc=0.0, scale=1.0, generator: Optional[torch.Generator],
           device="cpu", dtype=None) -> torch.Tensor:
    """:func:`median_sgd.sample_stable` drawn on ``generator``'s device, returned on ``device``.

    Tensor ``alpha``, ``loc`` and ``scale`` are taken to the generator's device first (pass them
    there already inside loops: a copy from a GPU to the CPU waits for the GPU).
    """
    where = _where(generator, device)
    alpha, loc, scale = (v.to(where) if isinstance(v, torch.Tensor) else v for v in (alpha, loc, scale))
    x = sample_stable(alpha, size, loc=loc, scale=scale, generator=generator, device=where, dtype=dtype)
    return to_device(x, device)
