"""A simulated acquisition: how the scan is sampled (:class:`Setting`) and the raw data it produces (:class:`Scan`).

Settings (:class:`Setting`):

* ``lowres`` — the paper's low-field task: a centred ``ny/f × nx/f`` window of k-space (a low-resolution scan with
  the same field of view; ``f = 2`` by default), one coil unless asked otherwise, heavy noise.
* ``lines`` — multi-coil random phase-encoding lines (``ny / acceleration`` of them) with fully sampled central
  calibration lines.

Noise level: ``noise_level`` is the noise variance relative to the variance of the noise-free measured k-space,
σ² = level · Var(y_clean) over the acquired samples of all coils, in the k-space the reconstruction sees (readout
oversampling removed; removing it keeps white noise white with the same variance). Channel noise has covariance Ψ
with mean diagonal σ²; the noise pre-scan carries noise with the same Ψ.

Raw readouts carry ``(coils, oversampling·nx_enc)`` samples (2× readout oversampling by default: the readout field
of view is doubled, k_max unchanged). Conventions as in :mod:`lab.physics`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cdl_lambda.lab.physics import (birdcage_maps, channel_covariance, complex_image, correlated_noise, kspace_variance,
                         oversample_readout)
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon import sampling

SETTINGS = ("lowres", "lines")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How the scan is acquired. ``matrix``: reconstruction matrix (ny, nx). ``lowres``: ``window_factor`` ×
    lower resolution per axis. ``lines``: ``acceleration`` and ``calib_lines``. ``noise_level``: relative noise
    variance (module docstring); ``correlation``: neighbour-channel noise correlation."""

    kind: str = "lowres"
    matrix: tuple[int, int] = (320, 320)
    coils: int = 1
    noise_level: float = 0.2
    correlation: float = 0.3
    window_factor: int = 2
    acceleration: float = 4.0
    calib_lines: int = 24
    oversampling: int = 2

    def __post_init__(self):
        if self.kind not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.kind!r}")
        if self.noise_level < 0:
            raise ValueError("noise_level must be ≥ 0")

    @property
    def encoded(self) -> tuple[int, int]:
        """The encoded matrix (E1 lines, readout samples before oversampling)."""
        ny, nx = self.matrix
        if self.kind == "lowres":
            return ny // self.window_factor, nx // self.window_factor
        return ny, nx

    def recon_mask(self, seed: int = 0) -> np.ndarray:
        """The sampled k-space positions on the reconstruction grid ``(ny, nx)`` float32."""
        if self.kind == "lowres":
            return sampling.central_window_mask(self.matrix, self.encoded).numpy()
        return sampling.random_line_mask(self.matrix, self.acceleration, self.calib_lines, seed=seed).numpy()

    def calibration_rows(self) -> np.ndarray:
        """E1 indices (encoded grid) flagged as calibration lines (none for ``lowres``)."""
        if self.kind == "lowres" or self.calib_lines == 0:
            return np.zeros(0, dtype=int)
        ny = self.matrix[0]
        start = ny // 2 - self.calib_lines // 2
        return np.arange(start, start + self.calib_lines)


class Scan:
    """A simulated multi-slice scan: ground truth and everything needed to produce its raw data, lazily.

    ``image`` ``(slices, ny, nx)`` complex64, ``coil_maps`` ``(slices, coils, ny, nx)``, ``covariance`` Ψ
    ``(coils, coils)`` (scaled to the requested noise level), ``mask`` ``(ny, nx)`` on the reconstruction grid,
    ``rows`` the acquired E1 lines of the encoded grid. :meth:`raw` gives one (repetition, slice)'s oversampled data
    ``(lines, coils, oversampling·nx_enc)``; it is deterministic in (seed, repetition, slice), whatever the order."""

    def __init__(self, magnitudes: np.ndarray, setting: Setting, seed: int = 0):
        magnitudes = np.asarray(magnitudes, dtype=np.float32)
        if magnitudes.ndim == 2:
            magnitudes = magnitudes[None]
        if magnitudes.shape[-2:] != tuple(setting.matrix):
            raise ValueError(f"images are {magnitudes.shape[-2:]}, the setting's matrix is {setting.matrix}")
        self.setting, self.seed = setting, seed
        rng = np.random.default_rng([seed, 0])
        self.image = np.stack([complex_image(m, rng) for m in magnitudes])
        rotation = rng.uniform(0, 2 * np.pi)
        maps = birdcage_maps(setting.coils, setting.matrix, rotation=rotation)
        self.coil_maps = np.repeat(maps[None], len(self.image), axis=0)
        self.mask = setting.recon_mask(seed)
        ny, nx = setting.matrix
        wy, wx = setting.encoded
        self._y0, self._x0 = ny // 2 - wy // 2, nx // 2 - wx // 2
        if setting.kind == "lowres":
            self.rows = np.arange(wy)
        else:
            self.rows = np.nonzero(self.mask[:, 0] > 0)[0]
        clean = [self.clean(s) for s in range(len(self.image))]
        self.signal_variance = float(np.mean([kspace_variance(c) for c in clean]))
        self.sigma2 = setting.noise_level * self.signal_variance
        self.covariance = channel_covariance(setting.coils, rng, setting.correlation) * self.sigma2

    @property
    def slices(self) -> int:
        return len(self.image)

    def clean(self, slice_index: int) -> np.ndarray:
        """Noise-free acquired k-space of one slice on the encoded grid, oversampling removed:
        ``(lines, coils, nx_enc)`` complex64."""
        k = _fft.fft2c(torch.from_numpy(self.coil_maps[slice_index] * self.image[slice_index])).numpy()
        wy, wx = self.setting.encoded
        k = k[:, self._y0:self._y0 + wy, self._x0:self._x0 + wx] if self.setting.kind == "lowres" else k
        return np.ascontiguousarray(k[:, self.rows].transpose(1, 0, 2))

    def raw(self, repetition: int, slice_index: int) -> np.ndarray:
        """Oversampled noisy readouts ``(lines, coils, oversampling·nx_enc)`` complex64."""
        signal = oversample_readout(self.clean(slice_index), self.setting.oversampling)
        rng = np.random.default_rng([self.seed, 1, repetition, slice_index])
        noise = correlated_noise(rng, self.covariance, (signal.shape[0], signal.shape[2])).transpose(1, 0, 2)
        return signal + noise

    def noise_prescan(self, samples: int) -> np.ndarray:
        """Noise-only readouts ``(coils, samples)`` complex64 with covariance Ψ."""
        return correlated_noise(np.random.default_rng([self.seed, 2]), self.covariance, (samples,))
