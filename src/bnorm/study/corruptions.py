"""Corrupted test sets for the study's ``shift`` experiment: seeded, one severity each.

Every corruption maps a batch of images with values in [0, 1] (what
:meth:`bnorm.study.data.Dataset.inputs` gives before standardization; digits' 0–16 and
MNIST's/CIFAR's 0–255 are both scaled there) to images in [0, 1]. Per image x (N, C, H,
W), with ``m`` the image's mean over (C, H, W):

* ``gaussian_noise`` σ: ``clip(x + σ·ε, 0, 1)``, ε ~ N(0, 1) i.i.d. per pixel, drawn
  from ``Generator(seed)``;
* ``contrast`` c: ``m + c·(x − m)`` — every deviation from the image's mean scaled by c
  (stays in [0, 1] for 0 < c ≤ 1);
* ``brightness`` b: ``clip(x + b, 0, 1)``;
* ``blur`` s: Gaussian blur with standard deviation s pixels: the separable kernel
  ``k_i ∝ exp(−i²/(2s²))``, i = −r..r with r = ⌊2s + ½⌋, normalized to sum 1, borders replicated
  (scipy's ``gaussian_filter(mode="nearest", truncate=2)``);
* ``invert``: ``1 − x`` — a shift of the input's sign, not of its statistics alone:
  the case where adapting normalization statistics is expected to fail.

``clean`` (the identity) is the reference. The severities are those a teammate measured on
Fashion-MNIST, and they apply to every dataset alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "CORRUPTIONS",
    "Corruption",
    "blur",
    "brightness",
    "contrast",
    "corrupt",
    "gaussian_noise",
    "invert",
]


def gaussian_noise(x: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return (x + sigma * noise.to(x.device)).clamp(0.0, 1.0)


def contrast(x: Tensor, factor: float, gen: torch.Generator | None = None) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


def brightness(x: Tensor, shift: float, gen: torch.Generator | None = None) -> Tensor:
    return (x + shift).clamp(0.0, 1.0)


def gaussian_kernel(sigma: float) -> Tensor:
    radius = int(2 * sigma + 0.5)  # scipy's gaussian_filter with truncate=2
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    return k / k.sum()


def blur(x: Tensor, sigma: float, gen: torch.Generator | None = None) -> Tensor:
    k = gaussian_kernel(sigma).to(x.dtype).to(x.device)
    r = (k.numel() - 1) // 2
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def invert(x: Tensor, level: float | None = None, gen: torch.Generator | None = None) -> Tensor:
    return 1.0 - x


@dataclass(frozen=True)
class Corruption:
    """A named corruption at one severity. ``adaptation_should_help``: the shift is one of
    the input's statistics (what adapting BN statistics can undo)."""

    name: str
    label: str
    severity: float | None
    function: Callable[..., Tensor] | None
    adaptation_should_help: bool = True

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "label": self.label, "severity": self.severity,
                "adaptation_should_help": self.adaptation_should_help}  # fmt: skip


CORRUPTIONS: list[Corruption] = [
    Corruption("clean", "clean", None, None),
    Corruption("gaussian_noise", "Gaussian noise σ=0.3", 0.3, gaussian_noise),
    Corruption("contrast", "contrast ×0.3", 0.3, contrast),
    Corruption("brightness", "brightness +0.4", 0.4, brightness),
    Corruption("blur", "blur σ=1 px", 1.0, blur),
    Corruption("invert", "inverted (1 − x)", None, invert, adaptation_should_help=False),
]


def corrupt(x: Tensor, corruption: Corruption, seed: int) -> Tensor:
    """``x`` (N, C, H, W) in [0, 1] under ``corruption``; random draws from
    ``Generator(seed · 1,000,003 + index of the corruption)``, so each (seed, corruption)
    gives the same images every time."""
    if corruption.function is None:
        return x.clone()
    index = next(i for i, c in enumerate(CORRUPTIONS) if c.name == corruption.name)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return corruption.function(x, corruption.severity, gen)
