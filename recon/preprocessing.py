"""From measured k-space to reconstruction input: prewhitening, readout-oversampling removal, 3-D partitions.

Prewhitening: with the noise covariance Ψ = n nᴴ / samples of a noise scan ``(coils, samples)``, the whitening W
(``recon.coils.prewhitening_matrix``, W Ψ Wᴴ = I) is applied across coils, scaled by √(data dwell / noise dwell)
since noise power grows with the bandwidth. Oversampling removal crops the readout's field of view by ``factor``
(``recon.coils.remove_readout_oversampling``) and the mask follows (k-space spacing × factor). A 3-D volume
``(coils, nz, ny, nx)`` is transformed along k2 (centred inverse FFT) into partitions, each reconstructed as a 2-D
slice with the union of the partitions' masks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cdl_lambda.recon import coils as _coils
from cdl_lambda.recon import fft as _fft

log = logging.getLogger(__name__)


def whitening_matrix(noise: np.ndarray | None, noise_dwell_us: float = 0.0, data_dwell_us: float = 0.0):
    """Prewhitening ``(coils, coils)`` complex64 from noise ``(coils, samples)`` scaled for the data's dwell time,
    or None when there is no usable noise scan."""
    if noise is None or noise.shape[1] < 2 * noise.shape[0]:
        if noise is not None:
            log.warning("noise scan too short (%d samples for %d coils): no prewhitening", noise.shape[1],
                        noise.shape[0])
        return None
    whitening = _coils.prewhitening_matrix(_coils.noise_covariance(torch.from_numpy(noise)))
    if noise_dwell_us > 0 and data_dwell_us > 0:
        whitening = whitening * float(np.sqrt(data_dwell_us / noise_dwell_us))
    return whitening.numpy()


def readout_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Mask ``(..., n)`` along a readout whose field of view was cropped by ``factor``: ``(..., n // factor)``
    sampled at k-space spacing × factor around the centre n // 2."""
    n_old = mask.shape[-1]
    n_new = n_old // factor
    index = n_old // 2 + factor * (torch.arange(n_new) - n_new // 2)
    return mask[..., index.clamp(0, n_old - 1)]


def resize_centred(data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Centred k-space ``(..., ny, nx)`` zero-padded or cropped to ``shape`` (ny, nx), the centre n // 2 kept at
    n // 2: a finer image grid over the same field of view (zero-filling) or a coarser one."""
    out = data
    for dim, new in zip((-2, -1), shape):
        old = out.shape[dim]
        if new == old:
            continue
        if new < old:
            out = out.narrow(dim, old // 2 - new // 2, new)
        else:
            size = list(out.shape)
            size[dim] = new
            padded = out.new_zeros(size)
            padded.narrow(dim, new // 2 - old // 2, old).copy_(out)
            out = padded
    return out


def prepare_kspace(kspace: np.ndarray, mask: np.ndarray, whitening, oversampling: int, matrix=None):
    """``kspace`` ``(coils, nz, ny, nx_raw)`` complex, ``mask`` ``(nz, ny, nx_raw)`` → hybrid space
    ``(coils, nz, ny, nx)`` complex64 (prewhitened with ``whitening`` ``(coils, coils)`` or None, readout
    oversampling removed, zeros where not measured, k2 → z by a centred inverse FFT when nz > 1) and the 2-D mask
    ``(ny, nx)`` float32 every partition uses, both on the grid ``matrix`` (ny, nx) when given (:func:`resize_centred`).
    ValueError when the whitening's coils differ from the data's."""
    k = torch.from_numpy(np.require(kspace, requirements=["C", "W"]))
    mask = np.require(mask, requirements=["C", "W"])
    m = torch.from_numpy(mask)
    if whitening is not None:
        if whitening.shape[0] != k.shape[0]:
            raise ValueError(f"noise scan has {whitening.shape[0]} channels, the data {k.shape[0]}")
        k = _coils.prewhiten(k, torch.from_numpy(whitening), coil_dim=0)
    if oversampling > 1:
        k = _coils.remove_readout_oversampling(k, oversampling, dim=-1)
        m = readout_mask(m, oversampling)
    if matrix is not None and tuple(matrix) != tuple(k.shape[-2:]) and all(matrix):
        k, m = resize_centred(k, tuple(matrix)), resize_centred(m, tuple(matrix))
    k = k * m.to(k.dtype)
    if k.shape[1] > 1:
        planes = m.any(dim=-1).any(dim=-1)
        union = m[planes].any(dim=0) if planes.any() else m.any(dim=0)
        if planes.any() and not bool((m[planes] == union).all()):
            log.warning("3-D sampling differs between k2 partitions: each partition uses the union mask")
        k = _fft.ifft1c(k, dim=1)
    else:
        union = m[0]
    return k.to(torch.complex64).numpy(), union.to(torch.float32).numpy()
