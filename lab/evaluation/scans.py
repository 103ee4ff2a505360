"""The multi-coil evaluation's scans: magnitude slices turned into prewhitened 8-channel k-space as a scanner sends it.

A magnitude slice becomes complex ground truth with a smooth phase (:func:`lab.physics.complex_image`), seen by an
8-channel birdcage array whose channel noise is correlated (neighbour correlation 0.3, gain spread), with a noise
pre-scan; image SNR (mean object magnitude over the noise std of the fully sampled SENSE-1 image) 10 or 20;
Cartesian phase-encoding lines at R = 1…4 (equispaced outside 16 fully sampled calibration lines). Every method gets
the same data, prewhitened with the noise scan as the gadget does (:meth:`recon.slice_data.NoiseScan.whitening`), so
the noise is white with σ = 1.

Reference: the true image combined with the true (whitened) maps, |x|·‖W c‖, over the whole field of view.

Splits (:data:`lab.images.SPLITS`): ``val`` (tuning), ``test`` (the held-out T1 head), ``t2`` (the same head with a
T2-weighted contrast, :func:`lab.contrasts.t2_weighted`) and ``ood``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch

from cdl_lambda.lab.contrasts import with_t2_weighted
from cdl_lambda.lab.images import load_split
from cdl_lambda.lab.physics import birdcage_maps, channel_covariance, complex_image, correlated_noise
from cdl_lambda.recon import coils as _coils
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.pipeline import default_calibration_mask
from cdl_lambda.recon.slice_data import NoiseScan
from cdl_lambda.recon.sampling import equispaced_line_mask

ACCELERATIONS = (1, 2, 3, 4)
SNRS = (10, 20)
CALIBRATION_LINES = 16
COILS = 8
SPLIT_SEEDS = {"val": 0, "test": 1, "ood": 2, "t2": 3}  # deterministic across processes (unlike hash() of a str)


@dataclass
class Scan:
    """One prewhitened scan: ``kspace`` ``(coils, ny, nx)``, ``mask`` ``(ny, nx)``, ``reference`` ``(ny, nx)``."""

    kspace: torch.Tensor
    mask: torch.Tensor
    reference: np.ndarray
    split: str
    source: str
    acceleration: int
    snr: float
    maps: torch.Tensor | None = None  # recon.espirit maps, estimated once per scan
    cache: dict = field(default_factory=dict, repr=False)  # per-scan products of a method (BART's ecalib maps)

    @property
    def size(self) -> int:
        return int(self.mask.shape[-1])

    @property
    def setting(self) -> tuple[int, int, float]:
        """(matrix size, R, SNR): the unit every classical parameter is tuned for."""
        return self.size, self.acceleration, self.snr


def simulate_scan(magnitude: np.ndarray, acceleration: int, snr: float, seed, split: str = "",
                  source: str = "") -> Scan:
    """The scan of one magnitude slice (module docstring), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    ny, nx = magnitude.shape
    x = complex_image(magnitude, rng)
    maps = birdcage_maps(COILS, (ny, nx), rotation=rng.uniform(0, 2 * np.pi))
    inside = magnitude > 0.1 * magnitude.max()
    sigma = float(np.abs(x)[inside].mean() / snr)
    covariance = channel_covariance(COILS, rng, 0.3) * sigma ** 2
    clean = _fft.fft2c(torch.from_numpy(maps * x)).numpy()
    noisy = clean + correlated_noise(rng, covariance, (ny, nx))
    noise_scan = correlated_noise(rng, covariance, (1024,))
    mask = (equispaced_line_mask((ny, nx), acceleration, CALIBRATION_LINES) if acceleration > 1
            else torch.ones(ny, nx))
    whitening = NoiseScan(samples=noise_scan).whitening(0.0, torch.device("cpu"))
    kspace = _coils.prewhiten(torch.from_numpy((noisy * mask.numpy()).astype(np.complex64)), whitening, coil_dim=0)
    whitened_maps = _coils.prewhiten(torch.from_numpy(maps), whitening, coil_dim=0)
    reference = np.abs(x) * whitened_maps.abs().pow(2).sum(0).sqrt().numpy()
    return Scan(kspace, mask.float(), reference.astype(np.float32), split, source, acceleration, snr)


def scans_of(images: dict[str, np.ndarray], split: str, per_source: int, accelerations=ACCELERATIONS,
             snrs=SNRS, seed: int = 0) -> list[Scan]:
    """Every (R, SNR) for ``per_source`` evenly spread interior slices of each source of a split (one slice: the
    middle one)."""
    out = []
    for s_index, (source, stack) in enumerate(images.items()):
        count = min(per_source, len(stack))
        picks = np.linspace(0, len(stack) - 1, count + 2)[1:-1].round().astype(int) if count < len(stack) else \
            np.arange(len(stack))
        for i, pick in enumerate(picks):
            for acceleration, snr in product(accelerations, snrs):  # the seed names the setting, not its position
                seed_ = [seed, SPLIT_SEEDS[split], s_index, i, acceleration, int(snr), stack.shape[-1]]
                out.append(simulate_scan(stack[pick], acceleration, snr, seed=seed_, split=split, source=source))
    return out


def espirit_maps(scan: Scan) -> torch.Tensor:
    """The product's coil maps (:func:`recon.coils.estimate_coil_maps` on the calibration lines), once per scan."""
    if scan.maps is None:
        scan.maps = _coils.estimate_coil_maps(scan.kspace, default_calibration_mask(scan.mask), noise_std=1.0)
    return scan.maps


PRODUCT_ACCELERATIONS = (2, 3, 4)


def held_out_slices(split: str, per_contrast: int, size: int = 128) -> dict[str, np.ndarray]:
    """``{contrast: (n, size, size)}``: evenly spread slices (between 30 % and 70 % of the stack) of the split's
    person, T1 and T2-weighted (:func:`lab.contrasts.with_t2_weighted`)."""
    stacks = with_t2_weighted(load_split(split, (size, size)))
    return {name: stack[np.unique(np.linspace(0.3 * (len(stack) - 1), 0.7 * (len(stack) - 1),
                                              per_contrast).round().astype(int))]
            for name, stack in stacks.items()}


def product_scans(split: str, per_contrast: int, size: int = 128) -> list[tuple[str, int, Scan]]:
    """(contrast, R, scan) for every slice of :func:`held_out_slices` at R = 2, 3, 4 and SNR 10, 20, with the
    product's ESPIRiT maps: the scans the network and solver are judged on together (bench/codesign.py) and, with
    ``--held-out-scans``, the ones training keeps its best checkpoint by (lab.train)."""
    out = []
    for c_index, (contrast, stack) in enumerate(held_out_slices(split, per_contrast, size).items()):
        for i, magnitude in enumerate(stack):
            for acceleration in PRODUCT_ACCELERATIONS:
                for snr in SNRS:
                    scan = simulate_scan(magnitude, acceleration, snr, seed=[7, c_index, i, acceleration, snr])
                    espirit_maps(scan)
                    out.append((contrast, acceleration, scan))
    return out
