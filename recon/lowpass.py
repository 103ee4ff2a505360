"""(PH): the low-pass / high-pass split.

x_L = argmin_x ½‖x − x₀‖² + (β/2)‖∇x‖²  ⇔  (I + β ∇ᴴ∇) x_L = x₀,
with circular forward differences, so ∇ᴴ∇ is diagonal in Fourier with eigenvalues
4 sin²(π k_y / n_y) + 4 sin²(π k_x / n_x) and x_L is one exact FFT-domain division. β = softplus(raw) > 0 is learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def laplacian_eigenvalues(shape: tuple[int, int], device=None) -> torch.Tensor:
    """Eigenvalues of ∇ᴴ∇ (circular forward differences) in native FFT order, float32 ``(ny, nx)``."""
    ny, nx = shape
    wy = torch.sin(math.pi * torch.arange(ny, device=device) / ny).pow(2) * 4
    wx = torch.sin(math.pi * torch.arange(nx, device=device) / nx).pow(2) * 4
    return wy[:, None] + wx[None, :]


def tikhonov_lowpass(x0: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Solve (I + β∇ᴴ∇) x_L = x₀ for complex ``x0`` ``(..., ny, nx)``. Layout-independent (circulant)."""
    eig = laplacian_eigenvalues(x0.shape[-2:], device=x0.device)
    return torch.fft.ifft2(torch.fft.fft2(x0) / (1 + beta * eig))


class LowPassSplit(nn.Module):
    """The (PH) step with a learnable β = softplus(raw_beta)."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(beta))))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return tikhonov_lowpass(x0, self.beta)
