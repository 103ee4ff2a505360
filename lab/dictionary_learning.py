"""Online convolutional dictionary learning (CDL) on high-pass brain images.

First-order online CDL after Liu, Garcia-Cardona, Wohlberg & Yin (SIAM J. Imaging Sci. 2018): for every mini-batch
of images x_b (real, ``(B, ny, nx)``), split off the low-pass part with the (PH) Tikhonov filter and β_D,

    x_H = x − (I + β_D ∇ᴴ∇)⁻¹ x,

then alternate

1. convolutional sparse coding (CSC) with the current filters, by FISTA (:func:`recon.solvers.fista`):
       s_b = argmin_s ½‖Σ_k d_k ∗ s_k − x_H,b‖² + λ_D ‖s‖₁,
2. one projected gradient step on the filters for the mini-batch loss ℓ(d) = (1/2B) Σ_b ‖Σ_k d_k ∗ s_b,k − x_H,b‖²:
       d ← P(d − η ∇ℓ(d)),  η = 1 / L_d,  L_d = (1/B) max_ω Σ_b Σ_k |ŝ_b,k(ω)|²  (≥ the Lipschitz constant of ∇ℓ),
   where P crops to the k_f × k_f support (the filters are parametrised on it) and normalises each to unit ℓ2 norm.

Convolutions follow :class:`recon.dictionary.Dictionary` (true circular convolution, filter centred at the origin),
so the learned filters are used by CDL-Λ as they are. Images are scaled to unit RMS of their high-pass part, so λ_D
is relative to the high-pass signal level. Training images: every third slice of Colin27, which
ships in Debian ``mricron-data``: the training split of :mod:`lab.images` (Colin27, axial, coronal and sagittal
slices of both volumes on a 192² matrix); nothing from validation, test or out-of-distribution subjects.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cdl_lambda.lab import images as sources
from cdl_lambda.lab.manifest import update_manifest
from cdl_lambda.recon.device import choose_device
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.lowpass import tikhonov_lowpass
from cdl_lambda.recon.solvers import fista, gradient_step

log = logging.getLogger(__name__)

LEARNED_ON = "Colin27 T1 (training split of lab.images), every 3rd axial/coronal/sagittal slice, 192x192, high-pass"


# ---- images ----------------------------------------------------------------------------------------------------
def training_slices(shape: tuple[int, int] = (192, 192), step: int = 3) -> torch.Tensor:
    """Magnitude slices of the training subject (Colin27, all three orientations): float32 ``(N, ny, nx)``."""
    return torch.from_numpy(sources.load_source("colin27", shape, sources.ORIENTATIONS, step=step))


def highpass(images: torch.Tensor, beta: float) -> torch.Tensor:
    """x − (I + β∇ᴴ∇)⁻¹x for real ``(B, ny, nx)`` images, each scaled to unit RMS: float32 ``(B, ny, nx)``."""
    high = images - tikhonov_lowpass(images.to(torch.complex64), beta).real
    rms = high.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
    return (high / rms).float()


def random_crops(images: torch.Tensor, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size × size`` crops (random slice, position and 90° rotation): ``(count, size, size)``."""
    n, ny, nx = images.shape
    idx = torch.randint(n, (count,), generator=generator)
    ys = torch.randint(ny - size + 1, (count,), generator=generator)
    xs = torch.randint(nx - size + 1, (count,), generator=generator)
    rots = torch.randint(4, (count,), generator=generator)
    crops = [torch.rot90(images[i, y:y + size, x:x + size], int(r), dims=(-2, -1))
             for i, y, x, r in zip(idx.tolist(), ys.tolist(), xs.tolist(), rots.tolist())]
    return torch.stack(crops)


# ---- the two sub-problems --------------------------------------------------------------------------------------
def csc_objective(filters: torch.Tensor, codes: torch.Tensor, images: torch.Tensor, lam: float) -> float:
    """Mean over the batch of ½‖Σ_k d_k ∗ s_k − x‖² + λ‖s‖₁ (codes real or complex with zero imaginary part)."""
    d_hat = Dictionary(filters, name="learning").spectra(tuple(images.shape[-2:]), filters.device)
    synth = torch.fft.ifft2(torch.einsum("bkyx,kyx->byx", torch.fft.fft2(codes), d_hat)).real
    value = 0.5 * (synth - images).pow(2).sum(dim=(-2, -1)) + lam * codes.real.abs().sum(dim=(-3, -2, -1))
    return float(value.mean())


def sparse_code(filters: torch.Tensor, images: torch.Tensor, lam: float, iterations: int = 40) -> torch.Tensor:
    """CSC by FISTA: argmin_s ½‖D s − x‖² + λ‖s‖₁ for real ``images`` (B, ny, nx) → codes complex ``(B, K, ny, nx)``
    with zero imaginary part (the solver works on complex codes; real data keep them real)."""
    dictionary = Dictionary(filters.detach().cpu(), name="learning")
    shape = tuple(images.shape[-2:])
    d_hat = dictionary.spectra(shape, images.device)
    x_hat = torch.fft.fft2(images.to(torch.complex64))
    step = 0.99 / dictionary.lipschitz(shape)

    def gradient(z: torch.Tensor) -> torch.Tensor:
        residual = torch.einsum("bkyx,kyx->byx", torch.fft.fft2(z), d_hat) - x_hat
        return torch.fft.ifft2(residual.unsqueeze(1) * d_hat.conj())

    codes0 = torch.zeros(images.shape[0], dictionary.num_filters, *shape, dtype=torch.complex64,
                         device=images.device)
    with torch.no_grad():
        return fista(gradient_step(gradient, step), torch.full((), step * lam, device=images.device), codes0,
                     iterations)


def normalise(filters: torch.Tensor) -> torch.Tensor:
    """Project onto unit-norm filters (a zero filter is replaced by a centred delta)."""
    norms = filters.flatten(1).norm(dim=1)[:, None, None]
    dead = norms.squeeze() < 1e-8
    if dead.any():
        filters = filters.clone()
        filters[dead] = 0
        c = filters.shape[-1] // 2
        filters[dead, c, c] = 1
        norms = filters.flatten(1).norm(dim=1)[:, None, None]
    return filters / norms


def filter_step(filters: torch.Tensor, codes: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """One projected gradient step on the filters (K, k_f, k_f) for fixed codes; returns unit-norm filters."""
    shape = images.shape[-2:]
    s_hat = torch.fft.fft2(codes.real.to(torch.complex64))
    d = filters.detach().clone().requires_grad_(True)
    synth = torch.fft.ifft2(torch.einsum("bkyx,kyx->byx", s_hat, Dictionary(d, name="learning").spectra(tuple(shape),
                                                                                                        d.device))).real
    loss = 0.5 * (synth - images).pow(2).sum() / images.shape[0]
    (grad,) = torch.autograd.grad(loss, d)
    lipschitz = float(s_hat.abs().pow(2).sum(dim=(0, 1)).max()) / images.shape[0]
    return normalise(d.detach() - grad / max(lipschitz, 1e-12))


# ---- the learner -----------------------------------------------------------------------------------------------
@dataclass
class LearningConfig:
    num_filters: int = 32
    kernel_size: int = 9
    lambda_d: float = 0.1
    beta_d: float = 0.25
    steps: int = 150
    batch_size: int = 8
    patch_size: int = 64
    csc_iterations: int = 40
    seed: int = 0


def initial_filters(config: LearningConfig, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random k_f × k_f patches of the high-pass images plus a little noise, unit norm: ``(K, k_f, k_f)``."""
    patches = random_crops(images, config.kernel_size, config.num_filters, generator)
    patches = patches + 0.1 * torch.randn(patches.shape, generator=generator)
    return normalise(patches - patches.mean(dim=(-2, -1), keepdim=True))


def learn_dictionary(config: LearningConfig, images: torch.Tensor | None = None, device=None,
                     progress: bool = True, name: str | None = None) -> tuple[Dictionary, list[float]]:
    """Learn one dictionary. ``images``: real ``(N, ny, nx)`` in [0, 1] (default: :func:`training_slices`).
    Returns the dictionary and the CSC objective per step (on each step's mini-batch, before its filter update)."""
    device = choose_device(device)
    generator = torch.Generator().manual_seed(config.seed)
    images = training_slices() if images is None else images
    high = highpass(images, config.beta_d)
    filters = initial_filters(config, high, generator).to(device)
    history: list[float] = []
    bar = tqdm(range(config.steps), disable=not progress, desc=name or "cdl", leave=False)
    for _ in bar:
        batch = random_crops(high, config.patch_size, config.batch_size, generator).to(device)
        codes = sparse_code(filters, batch, config.lambda_d, config.csc_iterations)
        history.append(csc_objective(filters, codes, batch, config.lambda_d))
        filters = filter_step(filters, codes, batch)
        bar.set_postfix(objective=f"{history[-1]:.1f}", nonzero=f"{float((codes.real != 0).float().mean()):.3f}")
    name = name or f"cdl-K{config.num_filters}-k{config.kernel_size}-l{config.lambda_d:g}-b{config.beta_d:g}"
    meta = {"K": config.num_filters, "kernel_size": config.kernel_size, "lambda_d": config.lambda_d,
            "beta_d": config.beta_d, "learned_on": LEARNED_ON, "steps": config.steps, "seed": config.seed}
    return Dictionary(filters.cpu(), name=name, meta=meta), history


# ---- the shipped family ----------------------------------------------------------------------------------------
# (K, k_f, λ_D, β_D, split). Training: K ∈ {16, 32}, k_f ∈ {7, 9, 11}; validation adds λ_D/β_D pairs not used in
# training and K = 64, a filter count never seen in training.
FAMILY = [
    (16, 7, 0.2, 0.5, "train"), (16, 9, 0.1, 0.25, "train"), (16, 9, 0.5, 0.5, "train"),
    (16, 11, 0.1, 0.1, "train"), (16, 11, 0.5, 0.25, "train"), (32, 7, 0.2, 0.25, "train"),
    (32, 9, 0.1, 0.1, "train"), (32, 9, 0.5, 0.25, "train"), (32, 11, 0.1, 0.25, "train"),
    (32, 11, 0.5, 0.5, "train"),
    (16, 11, 0.2, 0.1, "validation"), (32, 9, 0.2, 0.5, "validation"), (64, 11, 0.2, 0.25, "validation"),
]


def family_name(k: int, kf: int, lam: float, beta: float) -> str:
    return f"cdl-K{k}-k{kf}-l{lam:g}-b{beta:g}"


def write_family(weights_dir: Path, steps: int, seed: int, device=None, only: list[str] | None = None) -> None:
    """Learn every dictionary of :data:`FAMILY` into ``weights_dir/dictionaries`` and record it in the manifest
    (entries of the same name are replaced; other entries and ``default`` are kept)."""
    weights_dir = Path(weights_dir)
    (weights_dir / "dictionaries").mkdir(parents=True, exist_ok=True)
    images = training_slices()
    for i, (k, kf, lam, beta, split) in enumerate(FAMILY):
        name = family_name(k, kf, lam, beta)
        if only and name not in only:
            continue
        start = time.time()
        config = LearningConfig(num_filters=k, kernel_size=kf, lambda_d=lam, beta_d=beta, steps=steps, seed=seed + i)
        dictionary, history = learn_dictionary(config, images, device=device, name=name)
        sha = dictionary.save(weights_dir / "dictionaries" / f"{name}.pt")
        entry = {"name": name, "file": f"dictionaries/{name}.pt", "K": k, "kernel_size": kf, "lambda_d": lam,
                 "beta_d": beta, "learned_on": LEARNED_ON, "split": split, "sha256": sha,
                 "learning": {"steps": steps, "batch_size": config.batch_size, "patch_size": config.patch_size,
                              "csc_iterations": config.csc_iterations, "seed": config.seed,
                              "objective_first_10": round(float(np.mean(history[:10])), 2),
                              "objective_last_10": round(float(np.mean(history[-10:])), 2)}}
        update_manifest(weights_dir, "dictionaries", entry)
        log.info("%s: objective %.1f → %.1f in %.0f s", name, entry["learning"]["objective_first_10"],
                 entry["learning"]["objective_last_10"], time.time() - start)
