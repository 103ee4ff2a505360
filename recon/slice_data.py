"""The typed input of the reconstruction: one :class:`SliceData` per slice group, with its :class:`NoiseScan`.

In the spirit of MRpro's ``KData``/``KNoise``: what was measured, as measured. The gadgets fill these from the
acquisitions (or from Gadgetron's ReconData) and hand them to :func:`recon.pipeline.reconstruct_slices`, which does
everything else (prewhitening, readout-oversampling removal, σ, coil maps, batching, device and fallback).

Conventions: k-space is complex64 and centred (the k-space centre at index n // 2 on every axis); the last axis is
the readout (x), then phase encoding (y, E1), then partitions (z, E2; nz = 1 for a 2-D slice), then coils. σ is the
standard deviation of the complex noise per k-space sample, σ² = E|n|² (1 after prewhitening with a noise scan).
Arrays may be numpy or torch; the pipeline turns them into tensors on the reconstruction's device once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cdl_lambda.recon import coils as _coils

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_INCOMPLETE = "incomplete"
STATUS_NOT_RECONSTRUCTED = "not-reconstructed"


def as_tensor(array, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``array`` (numpy or torch) as a tensor on ``device`` with ``dtype`` (a view where nothing changes)."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device=device, dtype=dtype)


@dataclass(eq=False)
class NoiseScan:
    """What is known of a scan's receiver noise: one of

    * ``samples`` ``(coils, samples)`` complex, the noise readouts (``sample_time_us`` their dwell time), or
      ``covariance`` ``(coils, coils)`` Ψ = E[n nᴴ] of such samples: the pipeline prewhitens with W = L⁻¹
      (Ψ = L Lᴴ) scaled by √(data dwell / noise dwell), after which σ = 1;
    * ``prewhitened_std``: the data were prewhitened upstream (e.g. by Gadgetron's ``NoiseAdjustGadget``) and their
      noise has this σ; ``source`` says who prewhitened. The pipeline checks the statement against the data
      (:func:`recon.noise.noise_level`).

    A scan without any of these has no NoiseScan (``SliceData.noise`` None): σ is estimated from each slice.
    """

    samples: Any = None
    covariance: Any = None
    sample_time_us: float = 0.0
    prewhitened_std: float | None = None
    source: str = ""
    _whitening: dict = field(default_factory=dict, repr=False)

    @classmethod
    def prewhitened_upstream(cls, sigma: float, source: str) -> NoiseScan:
        return cls(prewhitened_std=float(sigma), source=source)

    @property
    def usable(self) -> bool:
        """Whether the data can be prewhitened with this scan (enough samples: at least twice the coils)."""
        if self.covariance is not None:
            return True
        return self.samples is not None and self.samples.shape[1] >= 2 * self.samples.shape[0]

    def whitening(self, data_sample_time_us: float, device: torch.device) -> torch.Tensor | None:
        """W ``(coils, coils)`` complex64 on ``device`` for data of dwell time ``data_sample_time_us`` (W Ψ Wᴴ = I,
        then × √(data dwell / noise dwell): noise power grows with the bandwidth); None when the data were
        prewhitened upstream or the scan is too short. Computed once per dwell time and device."""
        if self.prewhitened_std is not None:
            return None
        key = (float(data_sample_time_us), str(device))
        if key not in self._whitening:
            self._whitening[key] = self._compute_whitening(data_sample_time_us, device)
        return self._whitening[key]

    def _compute_whitening(self, data_sample_time_us: float, device) -> torch.Tensor | None:
        if not self.usable:
            if self.samples is not None:
                log.warning("noise scan too short (%d samples for %d coils): no prewhitening", self.samples.shape[1],
                            self.samples.shape[0])
            return None
        covariance = (as_tensor(self.covariance, device) if self.covariance is not None
                      else _coils.noise_covariance(as_tensor(self.samples, device)))
        whitening = _coils.prewhitening_matrix(covariance)
        if self.sample_time_us > 0 and data_sample_time_us > 0:
            whitening = whitening * float(np.sqrt(data_sample_time_us / self.sample_time_us))
        return whitening


@dataclass(eq=False)
class SliceData:
    """One slice group as measured: a 2-D slice (nz = 1) or a 3-D slab of nz partitions.

    ``kspace`` ``(coils, nz, ny, nx_raw)`` complex64, centred, zeros where not measured, readout oversampling still
    in (``oversampling`` the readout's factor), not prewhitened unless ``noise.prewhitened_std`` says so;
    ``mask`` ``(nz, ny, nx_raw)`` bool or 0/1 of the measured samples. ``calibration``/``calibration_mask``: the
    calibration lines for coil maps in the same layout (None: the slice's own fully sampled central rows are used).
    ``noise``: the scan's :class:`NoiseScan` (None: σ estimated from the data); ``sample_time_us`` the readouts'
    dwell time. ``matrix`` ``(ny, nx)``: the grid the images are reconstructed on (k-space zero-padded or cropped
    around its centre after oversampling removal; None: as measured). ``geometry``: opaque to recon/, the caller's
    description of where the slice is (e.g. the acquisition header the image header is built from), handed back
    with each outcome. ``label`` names the slice in logs. ``status``/``status_reason``: completeness as the caller
    judged it (``ok``, ``incomplete``); the pipeline reconstructs whatever the status and passes it on.
    """

    kspace: Any
    mask: Any
    calibration: Any = None
    calibration_mask: Any = None
    noise: NoiseScan | None = None
    sample_time_us: float = 0.0
    oversampling: int = 1
    matrix: tuple | None = None
    geometry: Any = None
    label: str = "slice"
    status: str = STATUS_OK
    status_reason: str = ""

    @property
    def partitions(self) -> int:
        """nz: the 2-D images this group gives."""
        return int(self.kspace.shape[1]) if self.kspace.ndim == 4 else 1

    def describe(self, partition: int | None = None) -> str:
        return f"{self.label}, partition {partition}" if partition is not None and self.partitions > 1 else self.label
