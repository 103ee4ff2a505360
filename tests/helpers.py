"""Small deterministic problems shared by the recon tests."""

from __future__ import annotations

import torch

from recon.dictionary import Dictionary


def random_dictionary(num_filters: int = 8, kernel_size: int = 5, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Dictionary:
    generator = torch.Generator().manual_seed(seed)
    filters = torch.randn(num_filters, kernel_size, kernel_size, generator=generator, dtype=torch.float64)
    filters = filters / filters.flatten(1).norm(dim=1)[:, None, None]
    return Dictionary(filters.to(dtype), name=f"random-{num_filters}-{kernel_size}-{seed}")


def phantom(ny: int = 32, nx: int = 32, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """A piecewise-constant ellipse phantom with a smooth phase, ``(ny, nx)``."""
    y = torch.linspace(-1, 1, ny, dtype=torch.float64)[:, None]
    x = torch.linspace(-1, 1, nx, dtype=torch.float64)[None, :]
    image = 1.0 * ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1)
    image = image - 0.6 * (((x - 0.2) / 0.25) ** 2 + (y / 0.4) ** 2 < 1)
    image = image + 0.4 * (((x + 0.3) / 0.15) ** 2 + ((y - 0.3) / 0.2) ** 2 < 1)
    phase = torch.exp(1j * (0.8 * x + 0.5 * y))
    return (image * phase).to(dtype)


def complex_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)
