"""Choosing the compute device once: CUDA when present, else CPU; an explicit choice overrides."""

from __future__ import annotations

import torch


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """Return ``requested`` if given ("cpu", "cuda", "cuda:1", "auto"/None → CUDA if available, else CPU).

    Raises ValueError when CUDA is asked for explicitly but is not available.
    """
    if requested is None or str(requested).lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but CUDA is not available on this machine")
    return device
