"""Corruption models of BGmD's experiments: ``g_i <- -100 g_i`` for a fresh random ``psi``-fraction of rows, and friends.

Acharya et al. (AISTATS 2022), Section 7.2; used in the chapters "What BGmD's memory remembers"
and "Robust training experiments". Three sources of error:

* gradient corruption (rows of the ``(n, d)`` gradient matrix, one per client):
  :func:`scaled_bit_flip` ``g <- -100 g`` and :func:`gaussian_gradient_noise` ``g <- g + z``,
  ``z ~ N(0, 100 I)``;
* feature corruption (images, pixels in ``[0, 1]``): :func:`gaussian_feature_noise` adds
  ``N(0, 100)`` noise and clips back to the pixel range (as the authors' ``skimage`` code does),
  :func:`salt_and_pepper` sets 90% of the pixels to 0 or 1;
* label corruption: :func:`backdoor` relabels the corrupted samples to a target class (the paper
  uses 8, "bag", on Fashion-MNIST).

**Dynamic corruption** (the paper's strategy): at every iteration a *fresh* uniformly random set
of ``floor(psi n)`` rows (or samples) is corrupted, :func:`corrupted_mask`. (The authors' released
code re-seeds its generator at every call, so the same rows would recur; we follow the text.)
The :class:`Attack` objects bundle a rule with its ``psi``; :func:`make_attack` builds them by
name. Everything draws from a ``torch.Generator`` (``generator=None``: torch's global one), works
on any device and floating dtype, and never modifies its inputs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple, Type, Union

import torch

from ._checks import check_float_tensor, check_generator, check_real
from ._numerics import to_device

__all__ = [
    "n_corrupted",
    "corrupted_mask",
    "scaled_bit_flip",
    "gaussian_gradient_noise",
    "gaussian_feature_noise",
    "salt_and_pepper",
    "backdoor",
    "Attack",
    "NoAttack",
    "ScaledBitFlip",
    "GradientNoise",
    "FeatureNoise",
    "ImpulseNoise",
    "Backdoor",
    "ATTACKS",
    "make_attack",
    "PSI_LEVELS",
]

PSI_LEVELS = (0.0, 0.1, 0.2, 0.4)  # the corruption fractions of the paper's figures and tables


def _check_psi(psi) -> float:
    return check_real(psi, "psi (the corrupted fraction)", 0, 1, hi_open=True)


def _check_amount(amount) -> float:
    return check_real(amount, "amount (the fraction of pixels hit)", 0, 1)


def _check_target(target) -> int:
    return int(check_real(target, "target (a class index)", 0, integer=True))


def _check_clip(clip) -> Optional[Tuple[float, float]]:
    """``None`` or a pair ``(lo, hi)`` of finite numbers with ``lo < hi``, as a tuple of floats."""
    if clip is None:
        return None
    if isinstance(clip, (str, bytes)) or not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise TypeError(f"clip must be None or a pair (lo, hi) of numbers, got {clip!r}")
    lo, hi = (check_real(v, "each end of clip = (lo, hi)") for v in clip)
    if not lo < hi:
        raise ValueError(f"clip = (lo, hi) must have lo < hi, got {clip!r}")
    return lo, hi


def _draw(kind: str, shape, generator, device, dtype) -> torch.Tensor:
    """``torch.rand``/``torch.randn`` of ``shape`` on ``device`` from ``generator`` (drawn on the
    generator's own device when it differs, then moved)."""
    check_generator(generator)
    where = device if generator is None else generator.device
    fn = torch.rand if kind == "rand" else torch.randn
    return to_device(fn(shape, generator=generator, device=where, dtype=dtype), device)


def n_corrupted(n: int, psi: float) -> int:
    """``floor(psi n)``: how many of ``n`` rows (or samples) a ``psi``-fraction corrupts."""
    psi = _check_psi(psi)
    return int(math.floor(psi * n + 1e-9))


def corrupted_mask(
    size: Union[int, Tuple[int, ...]],
    psi: float,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """A bool mask of shape ``size`` with exactly ``floor(psi n)`` ``True`` in each last-dimension
    row of length ``n``, the set uniformly random (the paper's dynamic corruption: call it anew at
    every iteration). No host synchronisation."""
    if isinstance(size, numbers.Integral):
        size = (int(size),)
    size = tuple(int(s) for s in size)  # type: ignore[union-attr]
    if not size or any(s < 0 for s in size):
        raise ValueError(f"size must be a nonnegative int or a tuple of them, got {size!r}")
    m = n_corrupted(size[-1], psi)
    device = torch.device("cpu") if device is None else torch.device(device)
    # The ranks of i.i.d. uniforms are a uniform random permutation; keep the m lowest ranks.
    u = _draw("rand", size, generator, device, torch.float32)
    ranks = torch.argsort(torch.argsort(u, dim=-1), dim=-1)
    return ranks < m


def _check_mask(mask, leading: torch.Size, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != leading:
        raise ValueError(f"mask of shape {tuple(mask.shape)} must have the shape {tuple(leading)} "
                         f"of {name}'s leading dimensions")
    return mask


def scaled_bit_flip(G: torch.Tensor, mask: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``g_i <- -scale g_i`` for the rows ``i`` with ``mask[i]`` (the paper: ``scale = 100``).

    ``G`` is ``(..., n, d)`` and ``mask`` ``(..., n)``."""
    check_float_tensor(G, "G", min_dim=2)
    mask = _check_mask(mask, G.shape[:-1], "G").to(G.device)
    scale = check_real(scale, "scale", 0, lo_open=True)
    return torch.where(mask.unsqueeze(-1), G * (-scale), G)


def gaussian_gradient_noise(
    G: torch.Tensor, mask: torch.Tensor, std: float = 10.0, *, generator=None
) -> torch.Tensor:
    """``g_i <- g_i + z_i``, ``z_i ~ N(0, std^2 I)``, for the masked rows (the paper: variance 100)."""
    check_float_tensor(G, "G", min_dim=2)
    mask = _check_mask(mask, G.shape[:-1], "G").to(G.device)
    std = check_real(std, "std", 0, lo_open=True)
    z = _draw("randn", G.shape, generator, G.device, G.dtype)
    return torch.where(mask.unsqueeze(-1), G + std * z, G)


def _image_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` over the samples (the leading dimensions of ``x``), broadcast over the pixels."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() > x.dim() - 1 or x.shape[: mask.dim()] != mask.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} must match the leading (sample) "
                         f"dimensions of x of shape {tuple(x.shape)}")
    return mask.to(x.device).reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))


def gaussian_feature_noise(
    x: torch.Tensor,
    mask: torch.Tensor,
    std: float = 10.0,
    *,
    clip: Optional[Tuple[float, float]] = (0.0, 1.0),
    generator=None,
) -> torch.Tensor:
    """``x_i <- clip(x_i + z_i)``, ``z_i ~ N(0, std^2)`` per pixel, for the masked samples.

    ``x`` holds images with pixels in ``clip``'s range (``[0, 1]``), ``mask`` covers its leading
    sample dimensions. The paper adds ``N(0, 100)``; the authors' code (``skimage.util.random_noise``)
    clips to the pixel range afterwards, so most corrupted pixels end at 0 or 1. ``clip=None``
    adds the noise unclipped.
    """
    check_float_tensor(x, "x", min_dim=1)
    m = _image_mask(x, mask)
    std = check_real(std, "std", 0, lo_open=True)
    clip = _check_clip(clip)
    noisy = x + std * _draw("randn", x.shape, generator, x.device, x.dtype)
    if clip is not None:
        noisy = noisy.clamp(*clip)
    return torch.where(m, noisy, x)


def salt_and_pepper(
    x: torch.Tensor,
    mask: torch.Tensor,
    amount: float = 0.9,
    *,
    low: float = 0.0,
    high: float = 1.0,
    generator=None,
) -> torch.Tensor:
    """Impulse noise: each pixel of a masked sample becomes ``low`` or ``high`` (equally likely)
    with probability ``amount`` (the paper: 90% of the pixels)."""
    check_float_tensor(x, "x", min_dim=1)
    m = _image_mask(x, mask)
    _check_amount(amount)
    u = _draw("rand", x.shape, generator, x.device, torch.float32)
    hit = u < amount
    salt = u < amount / 2  # half of the hits
    noisy = torch.where(hit, torch.where(salt, x.new_tensor(high), x.new_tensor(low)), x)
    return torch.where(m, noisy, x)


def backdoor(y: torch.Tensor, mask: torch.Tensor, target: int = 8) -> torch.Tensor:
    """Label corruption: ``y_i <- target`` for the masked samples (the paper: 8, "bag")."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"y must be an integer tensor of class labels, got {getattr(y, 'dtype', type(y))}")
    mask = _check_mask(mask, y.shape, "y").to(y.device)
    return torch.where(mask, torch.full_like(y, _check_target(target)), y)


# ------------------------------------------------------------------------------------------------
# Attack objects: a rule plus its corrupted fraction psi
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """A corruption model with a corrupted fraction ``psi`` (a fresh random set at every call).

    ``kind`` says where it acts: ``"gradient"`` attacks transform the ``(..., n, d)`` gradient
    matrix (``attack.gradients(G, generator=...)``), ``"feature"`` and ``"label"`` attacks a batch
    of samples (``attack.batch(x, y, generator=...)`` with ``x`` ``(*S, C, H, W)`` and ``y``
    ``(*S,)``: ``floor(psi N)`` of the ``N`` samples, across all clients, are corrupted). The other
    method returns its inputs unchanged, so a training loop can call both.
    """

    psi: float = 0.0
    kind: ClassVar[str] = "none"
    name: ClassVar[str] = "none"

    def __init_subclass__(cls, *, kind: Optional[str] = None, name: Optional[str] = None,
                          **kwargs) -> None:
        # a rule says where it acts and its name in its class line, class X(Attack, kind=...);
        # a subclass that says nothing keeps its parent's
        super().__init_subclass__(**kwargs)
        cls.kind = cls.kind if kind is None else kind
        cls.name = cls.name if name is None else name

    def __post_init__(self):
        _check_psi(self.psi)
        for field in ("scale", "std"):
            if hasattr(self, field):
                check_real(getattr(self, field), field, 0, lo_open=True)
        _check_amount(getattr(self, "amount", 0.0))
        _check_target(getattr(self, "target", 0))
        if hasattr(self, "clip"):  # stored as a tuple of floats (hashable; the caller's list is kept)
            object.__setattr__(self, "clip", _check_clip(self.clip))

    def gradients(self, G: torch.Tensor, *, generator=None) -> torch.Tensor:
        """The gradient rows after the attack (unchanged unless ``kind == "gradient"``)."""
        if self.kind != "gradient":
            return G
        check_float_tensor(G, "G")
        if G.dim() < 2:  # G.shape[-2] below would be an IndexError
            raise ValueError(f"G must be a gradient matrix of shape (..., n, d), one row per worker, "
                             f"got shape {tuple(G.shape)}")
        if n_corrupted(G.shape[-2], self.psi) == 0:
            return G
        mask = corrupted_mask(G.shape[:-1], self.psi, generator=generator, device=G.device)
        return self._gradients(G, mask, generator)

    def batch(self, x: torch.Tensor, y: torch.Tensor, *, generator=None):
        """The samples ``(x, y)`` after the attack (unchanged unless a feature or label attack)."""
        if self.kind not in ("feature", "label") or n_corrupted(y.numel(), self.psi) == 0:
            return x, y
        mask = corrupted_mask(y.numel(), self.psi, generator=generator, device=y.device)
        return self._batch(x, y, mask.view(y.shape), generator)

    def _gradients(self, G, mask, generator):  # pragma: no cover - overridden
        return G

    def _batch(self, x, y, mask, generator):  # pragma: no cover - overridden
        return x, y


@dataclass(frozen=True)
class NoAttack(Attack):
    """Clean training (``psi`` is ignored)."""


@dataclass(frozen=True)
class ScaledBitFlip(Attack, kind="gradient", name="bit_flip"):
    """:func:`scaled_bit_flip` on a fresh ``psi``-fraction of the rows: ``g <- -scale g``."""

    scale: float = 100.0

    def _gradients(self, G, mask, generator):
        return scaled_bit_flip(G, mask, self.scale)


@dataclass(frozen=True)
class GradientNoise(Attack, kind="gradient", name="gradient_noise"):
    """:func:`gaussian_gradient_noise` on a fresh ``psi``-fraction of the rows: ``g <- g + N(0, std^2)``."""

    std: float = 10.0

    def _gradients(self, G, mask, generator):
        return gaussian_gradient_noise(G, mask, self.std, generator=generator)


@dataclass(frozen=True)
class FeatureNoise(Attack, kind="feature", name="feature_noise"):
    """:func:`gaussian_feature_noise` on a fresh ``psi``-fraction of the samples."""

    std: float = 10.0
    clip: Optional[Tuple[float, float]] = (0.0, 1.0)

    def _batch(self, x, y, mask, generator):
        return gaussian_feature_noise(x, mask, self.std, clip=self.clip, generator=generator), y


@dataclass(frozen=True)
class ImpulseNoise(Attack, kind="feature", name="impulse"):
    """:func:`salt_and_pepper` (90% of the pixels) on a fresh ``psi``-fraction of the samples."""

    amount: float = 0.9

    def _batch(self, x, y, mask, generator):
        return salt_and_pepper(x, mask, self.amount, generator=generator), y


@dataclass(frozen=True)
class Backdoor(Attack, kind="label", name="backdoor"):
    """:func:`backdoor` on a fresh ``psi``-fraction of the samples: their label becomes ``target``."""

    target: int = 8

    def _batch(self, x, y, mask, generator):
        return x, backdoor(y, mask, self.target)


ATTACKS: Dict[str, Type[Attack]] = {
    "none": NoAttack,
    "clean": NoAttack,
    "bit_flip": ScaledBitFlip,
    "gradient_noise": GradientNoise,
    "gradient_additive": GradientNoise,
    "feature_noise": FeatureNoise,
    "feature_additive": FeatureNoise,
    "impulse": ImpulseNoise,
    "salt_and_pepper": ImpulseNoise,
    "backdoor": Backdoor,
}


def make_attack(name: str, psi: float = 0.0, **options) -> Attack:
    """An :class:`Attack` by name: ``"none"``, ``"bit_flip"``, ``"gradient_noise"``,
    ``"feature_noise"``, ``"impulse"``, ``"backdoor"`` (aliases ``"clean"``,
    ``"gradient_additive"``, ``"feature_additive"``, ``"salt_and_pepper"``), with the corrupted
    fraction ``psi`` and the rule's options (``scale``, ``std``, ``clip``, ``amount``, ``target``)."""
    if not isinstance(name, str):
        raise TypeError(f"attack name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(sorted(ATTACKS))}")
    try:
        return ATTACKS[key](psi, **options)
    except TypeError as err:
        raise TypeError(f"bad options for attack {name!r}: {err}") from None
