"""Training and evaluation data for the paper's single-coil low-field task, simulated on the fly from magnitude
slices of the packaged image splits (:mod:`lab.images`).

Examples (:class:`LowFieldDataset`), all plain tensors, for a slice of shape ``(ny, nx)``:

* ``target``  ``(ny, nx)`` complex64 — the complex ground truth x (random smooth phase), scaled by ``1/scale``;
* ``kspace``  ``(ny, nx)`` complex64 — y = S (F x + e), zero outside the window, scaled by ``1/scale``;
* ``mask``    ``(ny, nx)`` float32 — S, a centred rectangular window;
* ``noise_level`` () float32 — the drawn σ² / Var(S F x) (noise variance relative to measured k-space variance);
* ``sigma``  () float32 — the per-sample noise standard deviation after scaling (E|e|² = σ²);
* ``scale``  () float32 — the standard deviation of the measured noisy k-space, by which both were divided, so the
  measured samples of ``kspace`` have unit standard deviation.

Augmentation: random flips of each axis and 90° rotations (square slices), the window removes r lines on each side
of each axis with r uniform in [40, 119] at 320 (scaled by n/320 for other sizes, drawn independently per axis), the
noise level is uniform in [0.15, 0.30]. With ``train=False`` there is no augmentation and the window and noise
level are fixed (the paper's test: central half per axis, σ² = 0.2 or 0.3). Every example is a pure function of
(seed, epoch, index), so results do not depend on worker count or order.

Batches (:class:`Batch`: target and kspace complex64 ``(B, n, n)``, centred layout, normalised; mask float32
``(B, n, n)``), so the training loop and the evaluation never depend on a data set's details:

* :class:`TrainingStream` — endless random training batches (each batch a fresh draw of window, noise and phase);
* :func:`fixed_examples` — deterministic evaluation examples (central n/2 window, fixed σ²).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from cdl_lambda.lab import images
from cdl_lambda.lab.contrasts import tissue_fractions, with_t2_weighted
from cdl_lambda.lab.physics import complex_image
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon import sampling

log = logging.getLogger(__name__)


def removed_lines_range(n: int, at_320: tuple[int, int] = (40, 119)) -> tuple[int, int]:
    """The paper's range of lines removed per side (40…119 at 320), scaled to ``n``; inclusive bounds."""
    lo = max(0, int(round(at_320[0] * n / 320)))
    hi = max(lo, int(round(at_320[1] * n / 320)))
    return lo, min(hi, (n - 2) // 2)


class LowFieldDataset(torch.utils.data.Dataset):
    """Single-coil central-window examples from magnitude slices ``images`` ``(n, ny, nx)`` (see module docstring).

    ``noise_range``: U(lo, hi) relative noise variance for training; ``test_noise`` / ``test_window`` ``(wy, wx)``
    fix them when ``train=False`` (default window: half of each axis)."""

    def __init__(self, images: np.ndarray | torch.Tensor, seed: int = 0, train: bool = True,
                 noise_range: tuple[float, float] = (0.15, 0.30), test_noise: float = 0.2,
                 test_window: tuple[int, int] | None = None):
        images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if images.ndim != 3:
            raise ValueError(f"images must be (n, ny, nx), got {tuple(images.shape)}")
        self.images = images
        self.seed, self.train, self.epoch = seed, train, 0
        self.noise_range, self.test_noise = noise_range, test_noise
        ny, nx = images.shape[-2:]
        self.test_window = test_window or (ny // 2, nx // 2)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations, windows, phases and noise for every epoch."""
        self.epoch = epoch

    def _window(self, rng: np.random.Generator, n: int) -> int:
        lo, hi = removed_lines_range(n)
        return n - 2 * int(rng.integers(lo, hi + 1))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch if self.train else 0, index])
        mag = self.images[index]
        if self.train:
            if rng.random() < 0.5:
                mag = mag.flip(-1)
            if rng.random() < 0.5:
                mag = mag.flip(-2)
            if mag.shape[-1] == mag.shape[-2]:
                mag = torch.rot90(mag, int(rng.integers(4)), dims=(-2, -1))
        ny, nx = mag.shape
        target = torch.from_numpy(complex_image(mag.numpy(), rng))
        if self.train:
            window = (self._window(rng, ny), self._window(rng, nx))
            level = float(rng.uniform(*self.noise_range))
        else:
            window, level = self.test_window, self.test_noise
        mask = sampling.central_window_mask((ny, nx), window)
        clean = _fft.fft2c(target)
        measured = clean[mask > 0]
        variance = float((measured - measured.mean()).abs().pow(2).mean())
        sigma = (level * variance) ** 0.5
        noise = torch.from_numpy(
            ((rng.normal(size=(ny, nx)) + 1j * rng.normal(size=(ny, nx))) * (sigma / 2 ** 0.5)).astype(np.complex64))
        kspace = mask * (clean + noise)
        scale = float(kspace[mask > 0].std()) or 1.0  # complex std: sqrt(mean |y − ȳ|²)
        return {
            "target": target / scale,
            "kspace": kspace / scale,
            "mask": mask,
            "noise_level": torch.tensor(level, dtype=torch.float32),
            "sigma": torch.tensor(sigma / scale, dtype=torch.float32),
            "scale": torch.tensor(scale, dtype=torch.float32),
        }


@dataclass
class Batch:
    target: torch.Tensor   # complex (B, n, n)
    kspace: torch.Tensor   # complex (B, n, n)
    mask: torch.Tensor     # float (B, n, n)
    noise_std: torch.Tensor | None = None  # (B,) σ of the k-space noise, in the units of ``kspace``
    coil_maps = None       # single coil

    def to(self, device) -> "Batch":
        sigma = None if self.noise_std is None else self.noise_std.to(device)
        return Batch(self.target.to(device), self.kspace.to(device), self.mask.to(device), sigma)


def load_images(split: str, size: int, step: int = 1) -> dict[str, torch.Tensor]:
    """Magnitude slices of every available source of ``split`` (train/val/test/ood): ``{source: (N, n, n)}``."""
    return {name: torch.from_numpy(stack) for name, stack in images.load_split(split, (size, size), step=step).items()}


def validation_images(size: int) -> dict[str, np.ndarray]:
    """The multi-coil validation split at ``size``²: the held-out person in T1 and in T2 weighting
    (:func:`lab.contrasts.with_t2_weighted`), ``{source: (N, n, n)}``, for training and the evaluation's tuning."""
    return with_t2_weighted(images.load_split("val", (size, size)))


def training_fractions(size: int) -> torch.Tensor | None:
    """Tissue fractions (:func:`lab.contrasts.tissue_fractions`) of the T1-weighted training volumes (Colin27 and
    the MNI152 T1 template, each classified on its own), ``(M, 4, size, size)``; None when neither is installed."""
    out = []
    for name in ("colin27", "mni152-t1"):
        try:
            stack = images.load_source(name, (size, size), images.ORIENTATIONS)
        except images.SourceUnavailable as error:  # a missing package only narrows the contrasts trained on
            log.warning("no synthetic contrasts from %s: %s", name, error)
            continue
        out.append(tissue_fractions(stack))
    return torch.from_numpy(np.concatenate(out)) if out else None


class TrainingStream:
    """Endless random training batches from magnitude slices ``(N, n, n)``: batch t draws ``batch_size`` random
    slices and simulates them with :class:`LowFieldDataset` at epoch t (new augmentation, window,
    phase and noise every batch)."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0,
                 noise_range: tuple[float, float] = (0.15, 0.30)):
        self.dataset = LowFieldDataset(images, seed=seed, train=True, noise_range=noise_range)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0

    def __next__(self) -> Batch:
        self.dataset.set_epoch(self.count)
        self.count += 1
        indices = torch.randint(len(self.dataset), (self.batch_size,), generator=self.generator).tolist()
        return collate([self.dataset[i] for i in indices])

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "count": self.count}

    def set_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.count = int(state["count"])


def collate(examples: list[dict]) -> Batch:
    return Batch(torch.stack([e["target"] for e in examples]), torch.stack([e["kspace"] for e in examples]),
                 torch.stack([e["mask"] for e in examples]), torch.stack([e["sigma"] for e in examples]))


def fixed_examples(images: torch.Tensor, noise_variance: float, seed: int = 1234) -> Batch:
    """Deterministic evaluation examples: every slice of ``images`` with the central n/2 window and σ² fixed."""
    dataset = LowFieldDataset(images, seed=seed, train=False, test_noise=noise_variance)
    return collate([dataset[i] for i in range(len(dataset))])


def pick_slices(images: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` slices evenly spread through a stack (all of them when it is smaller)."""
    if len(images) <= count:
        return images
    return images[np.linspace(0, len(images) - 1, count).round().astype(int)]
