"""Multi-coil training and validation examples as the gadget receives them (after prewhitening).

Every batch draws one acquisition (coil count, array geometry, channel noise correlation, sampling) and several
images that share it:

* coils: 1–16; a receive array of ``coils`` elements on an arc (a full ring like a birdcage head coil, or a partial
  arc like a posterior array) at a random distance, sensitivity falling off as 1/distance with the azimuthal phase
  of a loop; channel noise covariance Ψ with neighbour correlation up to 0.5 and gain spread. Prewhitening with
  W = L⁻¹ (Ψ = L Lᴴ) makes the noise white and mixes the sensitivities into W c, which is what the gadget
  reconstructs; the examples are simulated in that whitened space directly.
* noise: white, σ chosen for an image SNR (mean object magnitude / noise std of the fully sampled SENSE-1 image)
  log-uniform in [5, 40] (the ``"site"`` mix of :data:`SCAN_MIXES`: 8–16 coils, R 2–4, SNR 8–30); single-coil
  low-resolution examples use the paper's relative k-space noise variance U(0.15, 0.30) instead.
* sampling: Cartesian phase-encoding lines, R ∈ {1, 2, 3, 4} outside 12–32 fully sampled calibration lines,
  equispaced (random offset) or random; or, for a single coil, the paper's central low-resolution window.
* coil maps: estimated from the calibration lines by ESPIRiT, as at the scanner (not the true maps).
* target: the noise-free coil images combined with the estimated maps, Σ_j conj(ĉ_j) c_j x: the true image in the
  maps' phase convention (≈ x·‖W c‖ inside their support, 0 outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from cdl_lambda.recon import fft as _fft
from cdl_lambda.lab.datasets import removed_lines_range
from cdl_lambda.lab.contrasts import random_contrast
from cdl_lambda.lab.physics import bias_field, complex_image
from cdl_lambda.recon.sampling import central_window_mask
from cdl_lambda.recon.espirit import espirit_maps

COIL_CHOICES = (1, 2, 4, 6, 8, 8, 12, 16)
ACCELERATIONS = (1, 2, 2, 3, 3, 4)
# The draws of a scan mix: "broad" (the module docstring's) or "site" (head arrays of 8 or more channels at R 2–4,
# SNR 8–30: what the held-out scans of lab.evaluation.scans.product_scans look like).
SCAN_MIXES = {"broad": {"coils": COIL_CHOICES, "accelerations": ACCELERATIONS, "snr": (5.0, 40.0)},
              "site": {"coils": (8, 8, 12, 16), "accelerations": (2, 3, 4), "snr": (8.0, 30.0)}}


@dataclass
class Batch:
    target: torch.Tensor      # complex (B, n, n)
    kspace: torch.Tensor      # complex (B, C, n, n), or (B, n, n) for a single coil
    mask: torch.Tensor        # float (n, n)
    coil_maps: torch.Tensor | None  # complex (B, C, n, n) or None
    noise_std: torch.Tensor   # (B,)

    def to(self, device) -> "Batch":
        maps = None if self.coil_maps is None else self.coil_maps.to(device)
        return Batch(self.target.to(device), self.kspace.to(device), self.mask.to(device), maps,
                     self.noise_std.to(device))


def array_maps(coils: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Sensitivities ``(coils, ny, nx)`` of loop elements on an arc around the object (unnormalised)."""
    ny, nx = shape
    v, u = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    arc = 2 * np.pi if rng.random() < 0.6 else rng.uniform(0.8, 1.6) * np.pi
    radius = rng.uniform(1.2, 2.2)
    theta = rng.uniform(0, 2 * np.pi) + arc * np.arange(coils) / coils
    du = u[None] - radius * np.cos(theta)[:, None, None]
    dv = v[None] - radius * np.sin(theta)[:, None, None]
    return (np.exp(1j * (np.arctan2(du, -dv) - theta[:, None, None])) / np.hypot(du, dv)).astype(np.complex64)


def whitening_mix(coils: int, rng: np.random.Generator) -> np.ndarray:
    """W = L⁻¹ for a random channel covariance Ψ = L Lᴴ (neighbour correlation ρ ~ U(0, 0.5), gains ±20 %)."""
    rho = rng.uniform(0, 0.5)
    idx = np.arange(coils)
    dist = np.minimum(np.abs(idx[:, None] - idx[None, :]), coils - np.abs(idx[:, None] - idx[None, :]))
    gains = np.exp(0.2 * rng.normal(size=coils))
    cov = gains[:, None] * gains[None, :] * rho ** dist
    return np.linalg.inv(np.linalg.cholesky(cov)).astype(np.complex64)


def line_mask(n: int, acceleration: int, calib: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.zeros(n, bool)
    if acceleration <= 1:
        rows[:] = True
    elif rng.random() < 0.5:
        rows[int(rng.integers(acceleration))::acceleration] = True
    else:
        rows[rng.choice(n, n // acceleration, replace=False)] = True
    rows[n // 2 - calib // 2:n // 2 - calib // 2 + calib] = True
    return np.repeat(rows[:, None], n, axis=1).astype(np.float32)


def window_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's low-resolution window: 40–119 of 320 lines removed per side (scaled), both axes."""
    lo, hi = removed_lines_range(n)
    window = tuple(n - 2 * int(rng.integers(lo, hi + 1)) for _ in range(2))
    return central_window_mask((n, n), window).numpy()


def augment(mag: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips, a rotation by any angle, a field of view from 0.85× to 1.2× the source's, and (half the time) a smooth
    intensity non-uniformity (:func:`lab.physics.bias_field`)."""
    if rng.random() < 0.5:
        mag = mag[:, ::-1]
    if rng.random() < 0.5:
        mag = mag[::-1]
    n = mag.shape[-1]
    angle, zoom = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.2)  # zoom > 1: a larger field of view
    rotation = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = (np.array(mag.shape) - 1) / 2
    mag = ndimage.affine_transform(np.ascontiguousarray(mag), rotation, offset=centre - rotation @ centre, order=1,
                                   mode="constant", cval=0.0)
    mag = np.clip(mag, 0.0, None)
    if rng.random() < 0.5:
        mag = mag * bias_field((n, n), rng)
    return np.ascontiguousarray(mag, dtype=np.float32)


def simulate_batch(mags: np.ndarray, rng: np.random.Generator, coils: int | None = None,
                   acceleration: int | None = None, snr: float | None = None, calib: int | None = None,
                   window: bool | None = None, train: bool = True, mix: str = "broad") -> Batch:
    """One batch from magnitude slices ``mags`` ``(B, n, n)`` (module docstring); arguments fix the draws, the
    others come from the scan mix ``mix`` (:data:`SCAN_MIXES`)."""
    draws = SCAN_MIXES[mix]
    b, n, _ = mags.shape
    coils = int(rng.choice(draws["coils"])) if coils is None else coils
    window = (coils == 1 and rng.random() < 0.5) if window is None else window
    if window:
        mask = window_mask(n, rng)
    else:
        acceleration = int(rng.choice(draws["accelerations"])) if acceleration is None else acceleration
        calib = int(rng.integers(12, 33)) if calib is None else calib
        calib = min(calib, n // 2)
        mask = line_mask(n, acceleration, calib, rng)
    if coils > 1:
        maps = np.tensordot(whitening_mix(coils, rng), array_maps(coils, (n, n), rng), axes=(1, 0))
    else:
        maps = np.ones((1, n, n), np.complex64)
    norm = np.sqrt((np.abs(maps) ** 2).sum(0))
    targets, kspaces, sigmas = [], [], []
    for mag in mags:
        mag = augment(mag, rng) if train else mag
        x = complex_image(mag, rng)
        k = _fft.fft2c(torch.from_numpy(maps * x)).numpy()
        obj = mag > 0.1 * mag.max()
        if window:
            measured = k[:, mask > 0]
            sigma = float(np.sqrt(rng.uniform(0.15, 0.30) * np.mean(np.abs(measured - measured.mean()) ** 2)))
        else:
            low, high = draws["snr"]
            level = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if snr is None else snr
            sigma = float(np.abs(x * norm)[obj].mean() / level)
        noise = (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)) * (sigma / np.sqrt(2))
        kspaces.append(((k + noise) * mask).astype(np.complex64))
        targets.append((x * norm).astype(np.complex64))
        sigmas.append(sigma)
    kspace = torch.from_numpy(np.stack(kspaces))
    mask_t = torch.from_numpy(mask)
    sigma_t = torch.tensor(sigmas, dtype=torch.float32)
    if coils == 1:
        return Batch(torch.from_numpy(np.stack(targets)), kspace[:, 0], mask_t, None, sigma_t)
    calibration = torch.zeros_like(mask_t)
    c0 = n // 2 - calib // 2
    calibration[c0:c0 + calib] = 1
    maps_est = torch.stack([espirit_maps(kspace[i], calibration, float(sigma_t[i]))
                            for i in range(b)])
    # the target in the estimated maps' phase convention: Σ_j conj(ĉ_j) c_j x, zero outside their support
    coil_images = torch.from_numpy(maps)[None] * (torch.from_numpy(np.stack(targets)) /
                                                 torch.from_numpy(norm).clamp_min(1e-12))[:, None]
    target = (maps_est.conj() * coil_images).sum(dim=1)
    return Batch(target, kspace, mask_t, maps_est, sigma_t)


class TrainingStream:
    """Endless batches: batch t is drawn with the generator seeded by (seed, t), so a resumed run continues
    exactly. ``images``: magnitude slices ``(N, n, n)``. With ``fractions`` (tissue fractions ``(M, 4, n, n)`` of
    T1-weighted slices, :func:`lab.contrasts.tissue_fractions`), a batch is, with probability ``synthetic``, a
    T1-, T2-, PD- or FLAIR-weighted contrast drawn afresh (:func:`lab.contrasts.random_contrast`) instead."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int = 0, fractions: np.ndarray | None = None,
                 synthetic: float = 0.6, mix: str = "broad"):
        if mix not in SCAN_MIXES:
            raise ValueError(f"unknown scan mix {mix!r}: one of {', '.join(SCAN_MIXES)}")
        self.mix = mix
        self.images = np.asarray(images, np.float32)
        self.fractions = None if fractions is None else np.asarray(fractions, np.float32)
        self.batch_size, self.seed, self.count, self.synthetic = batch_size, seed, 0, synthetic

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        if self.fractions is not None and rng.random() < self.synthetic:
            picks = rng.choice(len(self.fractions), self.batch_size)
            mags = np.stack([random_contrast(self.fractions[p], rng) for p in picks])
        else:
            mags = self.images[rng.choice(len(self.images), self.batch_size)]
        return simulate_batch(mags, rng, mix=self.mix)

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"count": self.count}

    def set_state(self, state: dict) -> None:
        check_stream_layout(state, 1)
        self.count = int(state["count"])


def check_stream_layout(state: dict, sizes: int) -> None:
    """Refuse a checkpoint's stream ``state`` drawn over another number of matrix sizes (``--mixed-size``)."""
    found = len(state.get("streams", [state]))
    if found != sizes:
        raise ValueError(f"the checkpoint's data stream has {found} matrix size(s), this run {sizes}: resume with "
                         "the same --mixed-size")


VALIDATION_SETTINGS = ((8, 1, 10), (8, 2, 20), (8, 3, 10), (4, 2, 20), (16, 4, 20), (1, 1, 20))


class MixedStream:
    """Batches from several streams (the deployed matrix sizes): batch t comes from stream k with probability
    ``weights[k]``, drawn with the generator seeded by (seed, t), so a resumed run continues exactly."""

    def __init__(self, streams: list, weights: list[float], seed: int = 0):
        if len(streams) != len(weights) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"one non-negative weight per stream is needed, got {weights} for {len(streams)}")
        self.streams, self.seed, self.count = list(streams), seed, 0
        self.weights = np.asarray(weights, np.float64) / sum(weights)

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.count, len(self.streams)])
        self.count += 1
        return next(self.streams[int(rng.choice(len(self.streams), p=self.weights))])

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"count": self.count, "streams": [s.state() for s in self.streams]}

    def set_state(self, state: dict) -> None:
        check_stream_layout(state, len(self.streams))
        self.count = int(state["count"])
        for stream, own in zip(self.streams, state["streams"]):
            stream.set_state(own)


def validation_batches(images: np.ndarray, seed: int = 1234) -> list[Batch]:
    """Fixed examples: 8-coil R = 1/2/3, 4-coil R = 2, 16-coil R = 4 (24 calibration lines) and a single-coil
    low-resolution window, two images each."""
    out = []
    for i, (coils, acceleration, snr) in enumerate(VALIDATION_SETTINGS):
        rng = np.random.default_rng([seed, i])
        picks = np.linspace(0, len(images) - 1, 2).astype(int) + i % 2
        picks = np.clip(picks, 0, len(images) - 1)
        out.append(simulate_batch(images[picks], rng, coils=coils, acceleration=acceleration, snr=snr, calib=24,
                                  window=coils == 1, train=False))
    return out
