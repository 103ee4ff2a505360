"""Cartesian sampling masks, centred layout, shape ``(ny, nx)`` float32 with ones where k-space is measured.

Phase-encoding lines run along ``ny``; every measured line is fully sampled along the readout ``nx``.
"""

from __future__ import annotations

import numpy as np
import torch


def central_window_mask(shape: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """A centred ``window = (wy, wx)`` rectangle: the paper's low-resolution acquisition (``window = shape // 2``
    is ×2 super-resolution per axis)."""
    ny, nx = shape
    wy, wx = window
    if not (0 < wy <= ny and 0 < wx <= nx):
        raise ValueError(f"window {window} does not fit in k-space of shape {shape}")
    mask = torch.zeros(ny, nx)
    y0, x0 = ny // 2 - wy // 2, nx // 2 - wx // 2
    mask[y0:y0 + wy, x0:x0 + wx] = 1.0
    return mask


def _calibration_rows(ny: int, calib_lines: int) -> np.ndarray:
    start = ny // 2 - calib_lines // 2
    return np.arange(start, start + calib_lines)


def _lines_to_mask(rows: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[torch.as_tensor(np.unique(rows), dtype=torch.long)] = 1.0
    return mask


def equispaced_line_mask(shape: tuple[int, int], acceleration: int, calib_lines: int = 24) -> torch.Tensor:
    """Every ``acceleration``-th phase-encoding line (the centre line included) plus ``calib_lines`` central lines."""
    ny, _ = shape
    if acceleration < 1 or calib_lines < 0 or calib_lines > ny:
        raise ValueError(f"bad equispaced mask: acceleration={acceleration}, calib_lines={calib_lines}, ny={ny}")
    rows = np.arange(ny // 2 % acceleration, ny, acceleration)
    return _lines_to_mask(np.concatenate([rows, _calibration_rows(ny, calib_lines)]), shape)


def random_line_mask(shape: tuple[int, int], acceleration: float, calib_lines: int = 24,
                     seed: int | None = 0) -> torch.Tensor:
    """Uniformly random phase-encoding lines plus ``calib_lines`` central lines, ``ny / acceleration`` lines in all
    (deterministic for a given ``seed``)."""
    ny, _ = shape
    if acceleration < 1 or calib_lines < 0 or calib_lines > ny:
        raise ValueError(f"bad random mask: acceleration={acceleration}, calib_lines={calib_lines}, ny={ny}")
    calib = _calibration_rows(ny, calib_lines)
    wanted = max(int(round(ny / acceleration)), len(calib))
    others = np.setdiff1d(np.arange(ny), calib)
    rng = np.random.default_rng(seed)
    extra = rng.choice(others, size=min(wanted - len(calib), len(others)), replace=False)
    return _lines_to_mask(np.concatenate([calib, extra]), shape)
