"""Orthonormal 2-D Fourier transforms.

Two layouts are used:

* **centred** (``fft2c``/``ifft2c``): the k-space centre (DC) sits at index ``n // 2``, as a scanner stores it and
  as masks are drawn. ``fft2c(x) = fftshift(fft2(ifftshift(x)))``.
* **native** (``fft2``/``ifft2``): torch's own layout, DC at index 0. Circular convolutions are diagonal here, and
  the solvers run entirely in this layout (``to_native``/``from_native`` convert once, outside the loop), so no
  shift is ever done per iteration.
"""

from __future__ import annotations

import torch

DIMS = (-2, -1)


def fft2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal FFT over the last two axes, native layout."""
    return torch.fft.fft2(x, norm="ortho")


def ifft2(k: torch.Tensor) -> torch.Tensor:
    """Orthonormal inverse FFT over the last two axes, native layout."""
    return torch.fft.ifft2(k, norm="ortho")


def to_native(x: torch.Tensor) -> torch.Tensor:
    """Centred → native layout (``ifftshift`` over the last two axes)."""
    return torch.fft.ifftshift(x, dim=DIMS)


def from_native(x: torch.Tensor) -> torch.Tensor:
    """Native → centred layout (``fftshift`` over the last two axes)."""
    return torch.fft.fftshift(x, dim=DIMS)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT: image (centred) → k-space (DC at the centre)."""
    return from_native(fft2(to_native(x)))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT: k-space (DC at the centre) → image (centred)."""
    return from_native(ifft2(to_native(k)))


def fft1(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal 1-D FFT along ``dim``, native layout."""
    return torch.fft.fft(x, dim=dim, norm="ortho")


def ifft1(k: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal 1-D inverse FFT along ``dim``, native layout."""
    return torch.fft.ifft(k, dim=dim, norm="ortho")


def fft1c(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Centred orthonormal 1-D FFT along ``dim``."""
    return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(x, dim=dim), dim=dim, norm="ortho"), dim=dim)


def ifft1c(k: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Centred orthonormal 1-D inverse FFT along ``dim``."""
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(k, dim=dim), dim=dim, norm="ortho"), dim=dim)
