"""The physics of a simulated low-field scan: complex ground truth with a smooth phase, birdcage receive coils,
correlated channel noise, and readout oversampling.

Conventions: images ``(..., ny, nx)``, ny = phase encoding (E1, rows), nx = readout (columns); k-space centred
(DC at ``n // 2``), orthonormal FFTs (:mod:`recon.fft`); coil maps ``(coils, ny, nx)`` with Σ_j |c_j|² = 1;
noise covariance Ψ ``(coils, coils)``.
"""

from __future__ import annotations

import numpy as np
import torch

from cdl_lambda.recon import fft as _fft

def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1): ``(v, u)`` for rows and columns, 0 at the centre pixel ``n // 2``."""
    ny, nx = shape
    v = (np.arange(ny) - ny // 2) / (ny / 2)
    u = (np.arange(nx) - nx // 2) / (nx / 2)
    return np.meshgrid(v, u, indexing="ij")


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator, amplitude: float = np.pi,
                 cycles: float = 1.5) -> np.ndarray:
    """A smooth, low-order phase map (radians) ``(ny, nx)`` float32: a random offset, a linear ramp (a small shift
    of the echo / k-space centre), a quadratic term (B0 inhomogeneity) and a random field of spatial frequencies up
    to ``cycles`` per field of view; the non-constant part spans about ±``amplitude``."""
    v, u = _grid(shape)
    c = rng.normal(size=6)
    poly = c[0] * u + c[1] * v + 0.5 * (c[2] * u * u + c[3] * v * v + c[4] * u * v)
    field = np.zeros(shape)
    for _ in range(4):
        ky, kx = rng.uniform(-cycles, cycles, size=2)
        field += rng.normal() * np.cos(np.pi * (kx * u + ky * v) + rng.uniform(0, 2 * np.pi))
    smooth = poly + 0.5 * field
    smooth = smooth - smooth.mean()
    smooth = amplitude * smooth / max(np.abs(smooth).max(), 1e-12)
    return (smooth + rng.uniform(-np.pi, np.pi)).astype(np.float32)


def bias_field(shape: tuple[int, int], rng: np.random.Generator, strength: float = 0.3) -> np.ndarray:
    """A smooth multiplicative intensity non-uniformity ``exp(b)`` ``(ny, nx)`` float32, b a low-order field like
    :func:`smooth_phase`'s with zero mean and ``|b| ≤ strength`` (0.3: the brightest part of the object up to
    1.8 × its darkest, as a receive-array profile left in a magnitude image gives)."""
    field = smooth_phase(shape, rng, amplitude=strength)
    return np.exp(field - field.mean()).astype(np.float32)


def complex_image(magnitude: np.ndarray, rng: np.random.Generator, amplitude: float = np.pi) -> np.ndarray:
    """Complex ground truth ``magnitude · exp(iφ)`` with a :func:`smooth_phase` φ; complex64 ``(ny, nx)``."""
    phase = smooth_phase(magnitude.shape[-2:], rng, amplitude)
    return (magnitude * np.exp(1j * phase)).astype(np.complex64)


def birdcage_maps(coils: int, shape: tuple[int, int], radius: float = 1.5, rotation: float = 0.0) -> np.ndarray:
    """Birdcage-like receive sensitivities ``(coils, ny, nx)`` complex64, normalised so Σ_j |c_j|² = 1.

    Coil j sits at angle θ_j = 2πj/coils + ``rotation`` on a circle of ``radius`` (in half fields of view) around
    the centre; its sensitivity falls off as 1/distance and its phase follows the azimuth around the coil, offset
    by −θ_j (the model of sigpy's ``birdcage_maps``). One coil gives a uniform map."""
    if coils < 1:
        raise ValueError(f"coils must be ≥ 1, got {coils}")
    if coils == 1:
        return np.ones((1, *shape), dtype=np.complex64)
    v, u = _grid(shape)
    theta = 2 * np.pi * np.arange(coils) / coils + rotation
    du = u[None] - radius * np.cos(theta)[:, None, None]
    dv = v[None] - radius * np.sin(theta)[:, None, None]
    maps = np.exp(1j * (np.arctan2(du, -dv) - theta[:, None, None])) / np.hypot(du, dv)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0))).astype(np.complex64)


def channel_covariance(coils: int, rng: np.random.Generator, correlation: float = 0.3,
                       gain_spread: float = 0.15) -> np.ndarray:
    """Receiver noise covariance Ψ ``(coils, coils)`` complex128 with mean diagonal 1.

    Ψ_ij = g_i g_j ρ^{d(i,j)}, d the distance between channels around the ring (neighbours couple most), g_i
    log-normal channel gains (spread ``gain_spread``). ``correlation`` ρ ∈ [0, 1)."""
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    idx = np.arange(coils)
    dist = np.abs(idx[:, None] - idx[None, :])
    dist = np.minimum(dist, coils - dist)
    gains = np.exp(gain_spread * rng.normal(size=coils))
    cov = gains[:, None] * gains[None, :] * correlation ** dist
    return (cov / np.mean(np.diag(cov))).astype(np.complex128)


def correlated_noise(rng: np.random.Generator, covariance: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Complex Gaussian noise ``(coils, *shape)`` complex64 with channel covariance E[n nᴴ] = ``covariance``."""
    eigval, eigvec = np.linalg.eigh(covariance)  # Ψ = A Aᴴ with A = V √Λ (also for a singular or zero Ψ)
    chol = eigvec * np.sqrt(np.clip(eigval, 0.0, None))
    white = (rng.normal(size=(len(covariance), *shape)) + 1j * rng.normal(size=(len(covariance), *shape))) / np.sqrt(2)
    return np.tensordot(chol, white, axes=(1, 0)).astype(np.complex64)


def kspace_variance(k: np.ndarray) -> float:
    """Var(k) = mean |k − mean k|² over all given samples."""
    return float(np.mean(np.abs(k - k.mean()) ** 2))


def oversample_readout(k: np.ndarray, factor: int = 2) -> np.ndarray:
    """What a scanner samples with ``factor``× readout oversampling: the readout field of view is enlarged by
    zero-padding the hybrid (x, k_y) profile, so :func:`recon.coils.remove_readout_oversampling` inverts it exactly.
    ``k`` ``(..., nx)`` centred k-space along the readout → ``(..., factor·nx)``."""
    if factor == 1:
        return k
    t = torch.from_numpy(np.ascontiguousarray(k))
    profile = _fft.ifft1c(t, dim=-1)
    n = t.shape[-1]
    pad = (factor * n - n) // 2
    padded = torch.nn.functional.pad(profile, (pad, factor * n - n - pad))
    return _fft.fft1c(padded, dim=-1).numpy().astype(np.complex64)
