"""The reconstruction the gadgets call: coil maps and combination, then CDL-Λ, batched over slices.

Loads the dictionary and network once (a warm server keeps one :class:`Reconstructor`), chooses the device once,
and takes plain arrays: centred multi-coil k-space ``(slices, coils, ny, nx)`` (prewhitened, readout oversampling
removed, zeros where not measured) and a mask.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from recon import coils as _coils
from recon.device import choose_device, keep_freed_memory_for_reuse
from recon.dictionary import Dictionary
from recon.model import DEFAULT_SCALAR_LAMBDA, CDLLambda
from recon.solvers import compile_available
from recon.weights import WeightsRegistry

log = logging.getLogger(__name__)


@dataclass
class ReconResult:
    """Numpy results, centred layout: image and zero_filled ``(slices, ny, nx)`` complex64 in the units of the
    coil-combined zero-filled image; lambda_maps ``(slices, K, ny, nx)`` float32; coil_maps or None."""

    image: np.ndarray
    zero_filled: np.ndarray
    lambda_maps: np.ndarray | None
    coil_maps: np.ndarray | None


def default_calibration_mask(mask: torch.Tensor) -> torch.Tensor:
    """The fully sampled block of phase-encoding rows around the k-space centre of a ``(ny, nx)`` mask."""
    rows = mask.amax(dim=-1) > 0
    centre = mask.shape[-2] // 2
    if not rows[centre]:
        raise ValueError("the k-space centre line is not sampled: cannot find calibration lines")
    lo = hi = centre
    while lo > 0 and rows[lo - 1]:
        lo -= 1
    while hi + 1 < rows.numel() and rows[hi + 1]:
        hi += 1
    calibration = torch.zeros_like(mask)
    calibration[lo:hi + 1] = mask[lo:hi + 1]
    return calibration


class Reconstructor:
    """CDL-Λ with its dictionary and network loaded once.

    dictionary / network: names from ``weights/manifest.yaml`` ("default" = the manifest's default; network
    "none" = the scalar-λ baseline). device: None/"auto" → CUDA when present, else CPU. batch_size: slices per
    forward pass. compiled: fuse FISTA's element-wise work with ``torch.compile`` ("auto": when a compiler is
    available; the first slice of each size then pays a one-off compile).
    """

    def __init__(self, dictionary: str | Dictionary = "default", network: str | None = "default",
                 iterations: int = 64, device: str | None = None, batch_size: int = 8,
                 scalar_lambda: float = DEFAULT_SCALAR_LAMBDA, weights_dir: str | None = None, compiled: bool | str = "auto"):
        self.device = choose_device(device)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        if compiled == "auto":
            compiled = compile_available(self.device)
        registry = WeightsRegistry(weights_dir)
        self.dictionary = dictionary if isinstance(dictionary, Dictionary) else registry.dictionary(dictionary)
        loaded = registry.network(network)
        if loaded is None:
            log.warning("no trained Λ network selected: using the scalar-λ baseline (λ = %g)", scalar_lambda)
            self.model = CDLLambda(None, iterations=iterations, scalar_lambda=scalar_lambda, compiled=compiled)
        else:
            self.model = CDLLambda(loaded.network, beta=loaded.beta, iterations=iterations, compiled=compiled)
        self.model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self._device_lock = threading.Lock()  # one reconstruction at a time on the device (and torch.compile)
        self.identity = {
            "dictionary": self.dictionary.name,
            "dictionary_sha256": str(self.dictionary.meta.get("sha256", "builtin")),
            "network": loaded.name if loaded else "none (scalar lambda)",
            "network_sha256": loaded.sha256 if loaded else "none",
        }
        log.info("reconstructor ready on %s: %s", self.device, self.identity)

    def _as_tensor(self, array, name: str, dtype) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or Inf values")
        return tensor.to(device=self.device, dtype=dtype)

    @torch.inference_mode()
    def reconstruct(self, kspace, mask, calibration_mask=None, coil_maps=None,
                    dictionary: Dictionary | None = None) -> ReconResult:
        """Reconstruct every slice of ``kspace`` ``(slices, coils, ny, nx)``; ``mask`` ``(ny, nx)`` or
        ``(slices, ny, nx)``. Raises ValueError on bad input."""
        kspace = self._as_tensor(kspace, "k-space", torch.complex64)
        if kspace.ndim != 4:
            raise ValueError(f"k-space must be (slices, coils, ny, nx), got shape {tuple(kspace.shape)}")
        slices, num_coils, ny, nx = kspace.shape
        mask = self._as_tensor(mask, "mask", torch.float32)
        if mask.shape[-2:] != (ny, nx) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != slices):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match k-space of shape {tuple(kspace.shape)}")
        dictionary = dictionary or self.dictionary
        if min(ny, nx) < dictionary.kernel_size:
            raise ValueError(f"image {ny}×{nx} is smaller than the dictionary's {dictionary.kernel_size}² filters")

        if coil_maps is not None:
            maps = self._as_tensor(coil_maps, "coil maps", torch.complex64)
            if maps.shape != kspace.shape:
                raise ValueError(f"coil maps of shape {tuple(maps.shape)} do not match k-space {tuple(kspace.shape)}")
        elif num_coils > 1:
            calibration = (self._as_tensor(calibration_mask, "calibration mask", torch.float32)
                           if calibration_mask is not None else
                           default_calibration_mask(mask if mask.ndim == 2 else mask[0]))
            maps = _coils.estimate_coil_maps(kspace, calibration)
        else:
            maps = None

        with self._device_lock:
            return self._reconstruct_locked(kspace, mask, maps, dictionary, slices)

    def _reconstruct_locked(self, kspace, mask, maps, dictionary, slices) -> ReconResult:
        images, zero_filled, lambdas = [], [], []
        for start in range(0, slices, self.batch_size):
            part = slice(start, start + self.batch_size)
            batch_mask = mask if mask.ndim == 2 else mask[part]
            if maps is None:
                out = self.model(kspace[part, 0], batch_mask, dictionary)
            else:
                out = self.model(kspace[part], batch_mask, dictionary, coil_maps=maps[part])
            images.append(out.image.cpu())
            zero_filled.append(out.zero_filled.cpu())
            lambdas.append(out.lambda_maps.float().cpu())
        return ReconResult(image=torch.cat(images).numpy(), zero_filled=torch.cat(zero_filled).numpy(),
                           lambda_maps=torch.cat(lambdas).numpy(),
                           coil_maps=None if maps is None else maps.cpu().numpy())

