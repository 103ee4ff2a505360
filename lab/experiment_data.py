"""Batches for training and evaluation: the paper's low-field task on packaged MR images.

A thin adapter over :mod:`lab.images` (the image splits) and :class:`lab.data.LowFieldDataset` (one simulated,
normalised single-coil example per slice: complex ground truth with smooth phase, centred k-space window, complex
noise relative to the measured k-space variance, flips/rotations in training), so the training loop and the
evaluation see batches of one shape and never depend on a data set's details:

* :class:`TrainingStream` — endless random training batches (each batch a fresh draw of window, noise and phase);
* :func:`fixed_examples` — deterministic evaluation examples (central n/2 window, fixed σ²).

Shapes: target and kspace complex64 ``(B, n, n)`` (centred layout, normalised), mask float32 ``(B, n, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lab.data import LowFieldDataset


@dataclass
class Batch:
    target: torch.Tensor   # complex (B, n, n)
    kspace: torch.Tensor   # complex (B, n, n)
    mask: torch.Tensor     # float (B, n, n)

    def to(self, device) -> "Batch":
        return Batch(self.target.to(device), self.kspace.to(device), self.mask.to(device))


def load_images(split: str, size: int, step: int = 1) -> dict[str, torch.Tensor]:
    """Magnitude slices of every available source of ``split`` (train/val/test/ood): ``{source: (N, n, n)}``."""
    from lab import images

    return {name: torch.from_numpy(stack) for name, stack in images.load_split(split, (size, size), step=step).items()}


class TrainingStream:
    """Endless random training batches from magnitude slices ``(N, n, n)``: batch t draws ``batch_size`` random
    slices and simulates them with :class:`~lab.data.LowFieldDataset` at epoch t (new augmentation, window,
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
                 torch.stack([e["mask"] for e in examples]))


def fixed_examples(images: torch.Tensor, noise_variance: float, seed: int = 1234) -> Batch:
    """Deterministic evaluation examples: every slice of ``images`` with the central n/2 window and σ² fixed."""
    dataset = LowFieldDataset(images, seed=seed, train=False, test_noise=noise_variance)
    return collate([dataset[i] for i in range(len(dataset))])


def pick_slices(images: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` slices evenly spread through a stack (all of them when it is smaller)."""
    if len(images) <= count:
        return images
    return images[np.linspace(0, len(images) - 1, count).round().astype(int)]
