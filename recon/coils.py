"""Coil preprocessing: noise prewhitening, readout-oversampling removal, coil sensitivities and combination.

Coil maps for reconstruction come from :func:`estimate_coil_maps` (ESPIRiT, support-cropped).

Shapes: noise samples ``(coils, samples)``; k-space ``(..., coils, ny, nx)`` with nx the readout; coil maps
``(..., coils, ny, nx)`` normalised so Σ_j |c_j|² = 1 (so the multi-coil operator has ‖A‖ ≤ 1).
"""

from __future__ import annotations

import torch

from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.espirit import espirit_maps


def noise_covariance(noise: torch.Tensor) -> torch.Tensor:
    """Sample channel covariance Ψ = n nᴴ / (N − 1) of ``noise`` ``(coils, samples)`` (zero-mean assumed)."""
    if noise.ndim != 2 or noise.shape[1] < 2:
        raise ValueError(f"noise must be (coils, samples) with at least 2 samples, got {tuple(noise.shape)}")
    noise = noise.to(torch.complex128)
    return noise @ noise.conj().T / (noise.shape[1] - 1)


def prewhitening_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """W = L⁻¹ with Ψ = L Lᴴ (Cholesky), so that W n has identity covariance. Returns complex64 ``(coils, coils)``.

    Raises ValueError when Ψ is not positive definite (a dead or duplicated channel)."""
    try:
        chol = torch.linalg.cholesky(covariance.to(torch.complex128))
    except RuntimeError as error:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ValueError(f"noise covariance is not positive definite (dead or duplicated channel?): {error}") from None
    eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False).to(torch.complex64)


def prewhiten(data: torch.Tensor, whitening: torch.Tensor, coil_dim: int = -3) -> torch.Tensor:
    """Apply ``whitening`` ``(coils, coils)`` along ``coil_dim`` of ``data``."""
    moved = data.movedim(coil_dim, -1)
    return (moved @ whitening.T.to(moved.dtype)).movedim(-1, coil_dim)


def remove_readout_oversampling(data: torch.Tensor, factor: int = 2, dim: int = -1) -> torch.Tensor:
    """Crop the readout field of view by ``factor``: inverse FFT along the readout, keep the central 1/factor of the
    samples, FFT back. ``data`` is k-space along ``dim``; the result has ``n // factor`` samples there."""
    n = data.shape[dim]
    keep = n // factor
    if factor < 1 or keep < 1:
        raise ValueError(f"cannot remove oversampling factor {factor} from {n} readout samples")
    if factor == 1:
        return data
    start = (n - keep) // 2
    return _fft.fft1c(_fft.ifft1c(data, dim=dim).narrow(dim, start, keep), dim=dim)


def estimate_coil_maps(kspace: torch.Tensor, calibration_mask: torch.Tensor,
                       noise_std: float | None = None) -> torch.Tensor:
    """Coil sensitivities from the calibration lines of ``kspace`` ``(..., coils, ny, nx)``: ESPIRiT
    (:mod:`recon.espirit`), support-cropped, Σ_j |c_j|² = 1 on the support and 0 outside it. ``noise_std``: the
    std of the complex noise per k-space sample (1 after prewhitening; None: estimated from the data)."""
    lead = kspace.shape[:-3]
    flat = kspace.reshape(-1, *kspace.shape[-3:])
    maps = [espirit_maps(one, calibration_mask, noise_std) for one in flat]
    return torch.stack(maps).reshape(*lead, *kspace.shape[-3:])


def combine_coils(coil_images: torch.Tensor, coil_maps: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j conj(c_j) x_j (the adjoint of C); root-sum-of-squares when no maps are given."""
    if coil_maps is None:
        return coil_images.abs().pow(2).sum(dim=-3).sqrt().to(coil_images.dtype)
    return (coil_maps.conj() * coil_images).sum(dim=-3)
