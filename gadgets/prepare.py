"""From buffered k-space to reconstruction inputs: prewhitening, readout-oversampling removal, 3-D partitions.

The maths is ``recon.coils`` (torch); this module only moves arrays in and out. A :class:`SliceInput` is one 2-D
image to reconstruct: ``kspace`` ``(coils, ny, nx)`` complex64 centred, prewhitened, oversampling removed, zeros
where not measured; ``mask`` ``(ny, nx)`` float32; ``calibration``/``calibration_mask`` likewise or None. A 3-D group
is transformed along k2 (centred inverse FFT) and gives one SliceInput per partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from gadgets.buffer import GroupKey, InputError, SliceGroup
from recon import coils as _coils
from recon import fft as _fft

log = logging.getLogger(__name__)


@dataclass
class SliceInput:
    key: GroupKey
    partition: int
    partitions: int
    kspace: np.ndarray
    mask: np.ndarray
    reference: object
    calibration: np.ndarray | None = None
    calibration_mask: np.ndarray | None = None
    errors: list = field(default_factory=list)
    readouts: int = 0      # readouts of the acquisition group this slice comes from

    def describe(self) -> str:
        where = self.key.describe()
        return f"{where}, partition {self.partition}" if self.partitions > 1 else where


def whitening_matrix(noise: np.ndarray | None, noise_dwell_us: float = 0.0, data_dwell_us: float = 0.0):
    """Prewhitening ``(coils, coils)`` complex64 from noise ``(coils, samples)`` scaled for the data's dwell time,
    or None when there is no usable noise scan."""
    if noise is None or noise.shape[1] < 2 * noise.shape[0]:
        if noise is not None:
            log.warning("noise scan too short (%d samples for %d coils): no prewhitening", noise.shape[1], noise.shape[0])
        return None
    whitening = _coils.prewhitening_matrix(_coils.noise_covariance(torch.from_numpy(noise)))
    if noise_dwell_us > 0 and data_dwell_us > 0:
        whitening = whitening * float(np.sqrt(data_dwell_us / noise_dwell_us))
    return whitening.numpy()


def _readout_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Mask along a readout whose field of view was cropped by ``factor`` (k-space spacing × factor)."""
    n_old = mask.shape[-1]
    n_new = n_old // factor
    index = n_old // 2 + factor * (torch.arange(n_new) - n_new // 2)
    return mask[..., index.clamp(0, n_old - 1)]


def _process(kspace: np.ndarray, mask: np.ndarray, whitening, oversampling: int):
    """(coils, nz, ny, nxr), (nz, ny, nxr) → (coils, nz, ny, nx) hybrid (x-k1-k2→z), (ny, nx) 2-D mask per partition."""
    k = torch.from_numpy(np.require(kspace, requirements=["C", "W"]))
    mask = np.require(mask, requirements=["C", "W"])
    m = torch.from_numpy(mask)
    if whitening is not None:
        if whitening.shape[0] != k.shape[0]:
            raise InputError(f"noise scan has {whitening.shape[0]} channels, the data {k.shape[0]}")
        k = _coils.prewhiten(k, torch.from_numpy(whitening), coil_dim=0)
    if oversampling > 1:
        k = _coils.remove_readout_oversampling(k, oversampling, dim=-1)
        m = _readout_mask(m, oversampling)
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


def prepare_group(group: SliceGroup, whitening, oversampling: int) -> list[SliceInput]:
    """One :class:`SliceInput` per partition of ``group`` (see the module docstring)."""
    kspace, mask = _process(group.kspace, group.mask, whitening, oversampling)
    calibration = calibration_mask = None
    if group.calibration is not None:
        calibration, calibration_mask = _process(group.calibration, group.calibration_mask, whitening, oversampling)
    partitions = kspace.shape[1]
    return [SliceInput(key=group.key, partition=z, partitions=partitions, kspace=kspace[:, z], mask=mask,
                       reference=group.reference,
                       calibration=None if calibration is None else calibration[:, z],
                       calibration_mask=calibration_mask, errors=list(group.errors),
                       readouts=group.readouts)
            for z in range(partitions)]
