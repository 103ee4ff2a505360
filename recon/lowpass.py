"""(PH): the low-pass / high-pass split.

x_L = argmin_x ½‖A x − y‖² + (β/2)‖∇x‖²  ⇔  (AᴴA + β∇ᴴ∇) x_L = Aᴴy,  with circular forward differences.

* Single coil (A = S F): AᴴA + β∇ᴴ∇ = Fᴴ(S + βΛ_∇)F is diagonal in Fourier, with Λ_∇ the eigenvalues
  4 sin²(π k_y / n_y) + 4 sin²(π k_x / n_x) of ∇ᴴ∇. On measured frequencies x̂_L = ŷ / (1 + βΛ_∇), elsewhere 0: this
  is exactly the paper's (I + β∇ᴴ∇) x_L = x₀ with x₀ = Aᴴy, one FFT-domain division (:func:`tikhonov_lowpass`).
* Several coils (A = S F C): AᴴA is not diagonal, and filtering x₀ would keep the aliasing of undersampled data in
  x_L. The normal equations are solved by conjugate gradients (:func:`data_consistent_lowpass`), warm-started at
  the paper's filtered x₀; the system is symmetric positive definite where the coils see the object (β > 0 and the
  sampled k-space centre fix the constants, ∇ᴴ∇'s null space), so x_L is a smooth SENSE reconstruction that agrees
  with the data. Outside the support of cropped coil maps only the gradient term acts (a smooth continuation).

β = softplus(raw) > 0 is learned.
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


def gradient_normal(x: torch.Tensor) -> torch.Tensor:
    """∇ᴴ∇ x for circular forward differences (the negated 5-point Laplacian) on ``(..., ny, nx)``."""
    return 4 * x - x.roll(1, -1) - x.roll(-1, -1) - x.roll(1, -2) - x.roll(-1, -2)


def tikhonov_lowpass(x0: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Solve (I + β∇ᴴ∇) x_L = x₀ for complex ``x0`` ``(..., ny, nx)``. Layout-independent (circulant)."""
    eig = laplacian_eigenvalues(x0.shape[-2:], device=x0.device)
    return torch.fft.ifft2(torch.fft.fft2(x0) / (1 + beta * eig))


def conjugate_gradient(apply, rhs: torch.Tensor, x: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` conjugate-gradient steps for the Hermitian positive definite system apply(x) = rhs, batched
    over the leading axis (every item has its own step sizes). Differentiable."""
    dims = tuple(range(1, rhs.ndim))
    r = rhs - apply(x)
    p = r
    rr = r.abs().pow(2).sum(dim=dims, keepdim=True)
    for _ in range(iterations):
        ap = apply(p)
        alpha = rr / (p.conj() * ap).real.sum(dim=dims, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = r.abs().pow(2).sum(dim=dims, keepdim=True)
        p = r + (rr_next / rr.clamp_min(1e-30)) * p
        rr = rr_next
    return x


def data_consistent_lowpass(op, x0: torch.Tensor, beta: torch.Tensor | float, iterations: int,
                            weight: torch.Tensor | None = None) -> torch.Tensor:
    """x_L = (AᴴA + β∇ᴴ∇ + diag(w))⁻¹ x₀ with x₀ = Aᴴy, by ``iterations`` CG steps from the paper's filtered x₀.
    ``op`` is any operator with ``normal`` (layout-independent: ∇ᴴ∇ is circulant); ``weight`` w ≥ 0 ``(B, ny, nx)``
    in ``op``'s layout (the background term of :mod:`recon.background`), None for none."""
    def normal(x: torch.Tensor) -> torch.Tensor:
        out = op.normal(x) + beta * gradient_normal(x)
        return out if weight is None else out + weight * x

    return conjugate_gradient(normal, x0, tikhonov_lowpass(x0, beta), iterations)


class LowPassSplit(nn.Module):
    """The (PH) step with a learnable β = softplus(raw_beta): ``forward(x0)`` for a single coil (exact),
    ``data_consistent(op, x0, iterations)`` for several coils (CG).

    ``scale``: how many times finer the image's grid is than the one β was learned on (the dictionary's scale,
    :meth:`recon.dictionary.Dictionary.resampled`). At a fixed frequency in the anatomy ∇ᴴ∇'s eigenvalue falls by
    scale² on the finer grid, so β · scale² keeps the split's cut-off where the filters' band starts."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(beta))))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x0: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return tikhonov_lowpass(x0, self.beta * scale ** 2)

    def data_consistent(self, op, x0: torch.Tensor, iterations: int,
                        weight: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        return data_consistent_lowpass(op, x0, self.beta * scale ** 2, iterations, weight)
