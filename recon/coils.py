"""Coil preprocessing: noise prewhitening, readout-oversampling removal, coil sensitivities and combination.

Coil maps for reconstruction come from :func:`estimate_coil_maps` (ESPIRiT, support-cropped); Walsh's adaptive
maps (:func:`walsh_coil_maps`, unit norm everywhere) remain for a quick combination.

Shapes: noise samples ``(coils, samples)``; k-space ``(..., coils, ny, nx)`` with nx the readout; coil maps
``(..., coils, ny, nx)`` normalised so Σ_j |c_j|² = 1 (so the multi-coil operator has ‖A‖ ≤ 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _box_smooth(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over a ``kernel``×``kernel`` window of a complex ``(..., ny, nx)`` array (circular edges)."""
    lead = x.shape[:-2]
    flat = torch.view_as_real(x.reshape(-1, *x.shape[-2:])).permute(0, 3, 1, 2)  # (B, 2, ny, nx)
    pad = kernel // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="circular")
    flat = F.avg_pool2d(flat, kernel, stride=1)
    return torch.view_as_complex(flat.permute(0, 2, 3, 1).contiguous()).reshape(*lead, *x.shape[-2:])


def walsh_coil_maps(coil_images: torch.Tensor, kernel: int = 7, iterations: int = 12) -> torch.Tensor:
    """Walsh's adaptive coil sensitivities (Walsh et al., MRM 2000).

    For each pixel, the dominant eigenvector of the locally averaged channel correlation R = ⟨x xᴴ⟩ (window
    ``kernel``²), found by power iteration. ``coil_images``: ``(..., coils, ny, nx)``. The maps have unit norm over
    coils at every pixel and share the phase of coil 0's map, so the combined image keeps a smooth phase.
    """
    x = coil_images.to(torch.complex64)
    corr = x.unsqueeze(-3) * x.conj().unsqueeze(-4)  # (..., C, C, ny, nx): R[i, j] = x_i conj(x_j)
    corr = _box_smooth(corr, kernel)
    corr = corr.movedim((-4, -3), (-2, -1))  # (..., ny, nx, C, C)
    vec = corr.sum(dim=-1, keepdim=True)  # start from R·1, close to the dominant eigenvector
    for _ in range(iterations):
        vec = corr @ vec
        vec = vec / vec.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    maps = vec.squeeze(-1).movedim(-1, -3)  # (..., C, ny, nx)
    ref = maps.narrow(-3, 0, 1)
    phase = torch.where(ref.abs() > 0, ref / ref.abs().clamp_min(1e-30), torch.ones_like(ref))
    return maps * phase.conj()


def calibration_coil_images(kspace: torch.Tensor, calibration_mask: torch.Tensor) -> torch.Tensor:
    """Low-resolution coil images from the calibration region: ``kspace`` ``(..., coils, ny, nx)`` centred,
    ``calibration_mask`` ``(ny, nx)``; a Hann taper over the calibrated rows limits ringing."""
    rows = torch.nonzero(calibration_mask.sum(dim=-1) > 0).flatten()
    if rows.numel() == 0:
        raise ValueError("no calibration lines: cannot estimate coil sensitivities")
    taper = torch.zeros(calibration_mask.shape[-2], dtype=torch.float32, device=kspace.device)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    taper[lo:hi] = torch.hann_window(hi - lo + 2, periodic=False, device=kspace.device)[1:-1]
    weights = taper[:, None] * calibration_mask.to(kspace.device)
    return _fft.ifft2c(kspace * weights)


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
