"""The reconstruction the gadgets call: coil maps and combination, then CDL-Λ, batched over slices.

Loads the dictionary and network once (a warm server keeps one :class:`Reconstructor`), chooses the device and the
batch size once, and takes plain arrays: centred multi-coil k-space ``(slices, coils, ny, nx)`` (prewhitened,
readout oversampling removed, zeros where not measured) and a mask. This module is the one owner of coil-map
estimation and of the batch loop: :func:`reconstruct_slices` takes the slices of a scan as they are ready, estimates
each one's coil maps, reconstructs them in batches of the reconstructor's ``batch_size`` and answers one
:class:`SliceOutcome` per slice, isolating a failure to the slices it concerns (a batch that fails is redone slice
by slice; a slice that fails on the GPU is redone on the CPU when a CPU reconstructor is offered).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from cdl_lambda.recon import coils as _coils
from cdl_lambda.recon.device import choose_device, keep_freed_memory_for_reuse
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.model import DEFAULT_SCALAR_BETA, DEFAULT_SCALAR_LAMBDA, CDLLambda
from cdl_lambda.recon.noise import estimate_noise_std
from cdl_lambda.recon.solvers import compile_available
from cdl_lambda.recon.weights import WeightsRegistry

log = logging.getLogger(__name__)


@dataclass
class ReconResult:
    """Numpy results, centred layout: image and zero_filled ``(slices, ny, nx)`` complex64 in the units of the
    coil-combined zero-filled image; lambda_maps ``(slices, K, ny, nx)`` float32 (noise units); coil_maps or None;
    the noise level each slice was reconstructed with and its final data residual relative to it."""

    image: np.ndarray
    zero_filled: np.ndarray
    lambda_maps: np.ndarray | None
    coil_maps: np.ndarray | None
    noise_std: np.ndarray | None = None          # (slices,) σ per complex k-space sample
    residual_to_noise: np.ndarray | None = None  # (slices,) ‖A x* − y‖ / (σ √M)
    iterations_used: np.ndarray | None = None    # (slices,) solver iterations (stopping rule, ≤ the cap)
    final_relative_change: np.ndarray | None = None  # (slices,) the stopping measure at the last iteration


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
    forward pass (0 = 8 on a GPU, 1 on the CPU). compiled: fuse FISTA's element-wise work with ``torch.compile``
    ("auto": when a compiler is available; the first slice of each size then pays a one-off compile).
    """

    def __init__(self, dictionary: str | Dictionary = "default", network: str | None = "default",
                 iterations: int = 64, device: str | None = None, batch_size: int = 8,
                 scalar_lambda: float = DEFAULT_SCALAR_LAMBDA, weights_dir: str | None = None,
                 compiled: bool | str = "auto"):
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
            self.model = CDLLambda(None, beta=DEFAULT_SCALAR_BETA, iterations=iterations, scalar_lambda=scalar_lambda,
                                   compiled=compiled)
        else:
            self.model = CDLLambda(loaded.network, beta=loaded.beta, iterations=iterations, compiled=compiled)
        self.model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size)) if batch_size else (8 if self.device.type == "cuda" else 1)
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
                    dictionary: Dictionary | None = None, noise_std=None) -> ReconResult:
        """Reconstruct every slice of ``kspace`` ``(slices, coils, ny, nx)``; ``mask`` ``(ny, nx)`` or
        ``(slices, ny, nx)``; ``noise_std``: σ per slice (1 after prewhitening; None: estimated from the data,
        :func:`recon.noise.estimate_noise_std`). Raises ValueError on bad input."""
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

        sigma = self._noise_std(kspace, mask, noise_std)
        if coil_maps is not None:
            maps = self._as_tensor(coil_maps, "coil maps", torch.complex64)
            if maps.shape != kspace.shape:
                raise ValueError(f"coil maps of shape {tuple(maps.shape)} do not match k-space {tuple(kspace.shape)}")
        elif num_coils > 1:
            calibration = (self._as_tensor(calibration_mask, "calibration mask", torch.float32)
                           if calibration_mask is not None else
                           default_calibration_mask(mask if mask.ndim == 2 else mask[0]))
            maps = torch.stack([_coils.estimate_coil_maps(kspace[i], calibration, float(sigma[i]))
                                for i in range(slices)])
        else:
            maps = None

        with self._device_lock:
            return self._reconstruct_locked(kspace, mask, maps, dictionary, slices, sigma)

    def _noise_std(self, kspace: torch.Tensor, mask: torch.Tensor, noise_std) -> torch.Tensor:
        """σ per slice ``(slices,)``: as given (a scalar or one per slice), else estimated from each slice."""
        slices = kspace.shape[0]
        if noise_std is None:
            masks = mask if mask.ndim == 3 else mask.expand(slices, *mask.shape)
            return torch.stack([estimate_noise_std(kspace[i], masks[i]) for i in range(slices)]).float()
        sigma = self._as_tensor(noise_std, "noise level", torch.float32).reshape(-1).expand(slices)
        if (sigma <= 0).any():
            raise ValueError(f"the noise level must be positive, got {sigma.tolist()}")
        return sigma

    def _reconstruct_locked(self, kspace, mask, maps, dictionary, slices, sigma) -> ReconResult:
        images, zero_filled, lambdas, ratios, used, changes = [], [], [], [], [], []
        for start in range(0, slices, self.batch_size):
            part = slice(start, start + self.batch_size)
            batch_mask = mask if mask.ndim == 2 else mask[part]
            if maps is None:
                out = self.model(kspace[part, 0], batch_mask, dictionary, noise_std=sigma[part])
            else:
                out = self.model(kspace[part], batch_mask, dictionary, coil_maps=maps[part], noise_std=sigma[part])
            images.append(out.image.cpu())
            zero_filled.append(out.zero_filled.cpu())
            lambdas.append(out.lambda_maps.float().cpu())
            ratios.append(out.residual_to_noise.float().cpu())
            used.append(out.iterations_used.cpu())
            changes.append(out.final_relative_change.float().cpu())
        return ReconResult(image=torch.cat(images).numpy(), zero_filled=torch.cat(zero_filled).numpy(),
                           lambda_maps=torch.cat(lambdas).numpy(),
                           coil_maps=None if maps is None else maps.cpu().numpy(),
                           noise_std=sigma.cpu().numpy(), residual_to_noise=torch.cat(ratios).numpy(),
                           iterations_used=torch.cat(used).numpy(), final_relative_change=torch.cat(changes).numpy())



# ------------------------------------------------------------------------------------------- slices of a scan
class SliceKSpace(Protocol):
    """One 2-D slice to reconstruct: ``kspace`` ``(coils, ny, nx)`` complex64 centred, ``mask`` ``(ny, nx)``,
    ``calibration``/``calibration_mask`` the same layout or None (then the slice's own central lines are used)."""

    kspace: np.ndarray
    mask: np.ndarray
    calibration: np.ndarray | None
    calibration_mask: np.ndarray | None
    noise_std: float | None  # σ per complex sample: 1.0 after prewhitening with a noise scan, None: unknown

    def describe(self) -> str: ...


NOISE_FROM_SCAN = "noise scan (prewhitened)"
NOISE_ESTIMATED = "estimated from the data (median absolute Haar detail along the readout and outer k-space)"


@dataclass
class SliceOutcome:
    """What became of one slice: ``image`` and ``zero_filled`` ``(ny, nx)`` complex64, ``lambda_maps``
    ``(K, ny, nx)`` or None, the ``device`` it ran on and a ``note`` (a CPU fallback), the noise level σ, where it
    came from and the final data residual relative to it; or the ``error`` that lost it (then the arrays are
    None)."""

    image: np.ndarray | None = None
    zero_filled: np.ndarray | None = None
    lambda_maps: np.ndarray | None = None
    device: str = "cpu"
    note: str = ""
    error: Exception | None = None
    noise_std: float | None = None
    noise_source: str = ""
    residual_to_noise: float | None = None
    iterations_used: int | None = None
    final_relative_change: float | None = None


def noise_levels(slices: Sequence[SliceKSpace]) -> tuple[np.ndarray, list[str]]:
    """σ per slice ``(slices,)`` and where each came from: the slice's own (prewhitened with a noise scan) or
    estimated from its measured samples (:func:`recon.noise.estimate_noise_std`)."""
    sigmas, sources = [], []
    for one in slices:
        known = getattr(one, "noise_std", None)
        if known is not None:
            sigmas.append(float(known))
            sources.append(NOISE_FROM_SCAN)
        else:
            sigma = estimate_noise_std(torch.from_numpy(one.kspace), torch.from_numpy(one.mask))
            sigmas.append(float(sigma))
            sources.append(NOISE_ESTIMATED)
    return np.asarray(sigmas, dtype=np.float32), sources


def coil_maps(slices: Sequence[SliceKSpace], noise_std: Sequence[float] | None = None) -> np.ndarray | None:
    """Coil maps ``(slices, coils, ny, nx)`` complex64, each slice's from its calibration lines (or, without
    them, from its own fully sampled central rows), ESPIRiT with the slice's noise level; None for single-coil
    data."""
    if slices[0].kspace.shape[0] <= 1:
        return None
    noise_std = noise_levels(slices)[0] if noise_std is None else noise_std
    maps = []
    for one, sigma in zip(slices, noise_std):
        if one.calibration is not None:
            cal_k, cal_m = torch.from_numpy(one.calibration), torch.from_numpy(one.calibration_mask)
        else:
            cal_k = torch.from_numpy(one.kspace)
            cal_m = default_calibration_mask(torch.from_numpy(one.mask))
        maps.append(_coils.estimate_coil_maps(cal_k, cal_m, float(sigma)).numpy())
    return np.stack(maps)


def _reconstruct_batch(reconstructor, slices: Sequence[SliceKSpace]) -> tuple[ReconResult, list[str]]:
    kspace = np.stack([one.kspace for one in slices])
    mask = np.stack([one.mask for one in slices])
    sigma, sources = noise_levels(slices)
    return reconstructor.reconstruct(kspace, mask, coil_maps=coil_maps(slices, sigma), noise_std=sigma), sources


def _outcomes(done: tuple[ReconResult, list[str]], count: int, device: str, note: str = "") -> list[SliceOutcome]:
    result, sources = done

    def item(values, i):
        return None if values is None else float(values[i])

    return [SliceOutcome(image=result.image[i], zero_filled=result.zero_filled[i],
                         lambda_maps=None if result.lambda_maps is None else result.lambda_maps[i],
                         device=device, note=note, noise_std=item(result.noise_std, i), noise_source=sources[i],
                         residual_to_noise=item(result.residual_to_noise, i),
                         iterations_used=None if result.iterations_used is None else int(result.iterations_used[i]),
                         final_relative_change=item(result.final_relative_change, i)) for i in range(count)]


def release_gpu_memory() -> None:
    """Return cached GPU memory after a failure (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(reconstructor) -> str:
    return str(getattr(reconstructor, "device", "cpu"))


def _redo_on_cpu(reconstructor, one: SliceKSpace, error: Exception, cpu_fallback) -> SliceOutcome:
    on_gpu = getattr(getattr(reconstructor, "device", None), "type", "cpu") != "cpu"
    if not on_gpu or cpu_fallback is None or isinstance(error, ValueError):  # bad input fails anywhere
        return SliceOutcome(error=error)
    reason = "GPU out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else (
        f"GPU failure ({type(error).__name__})")
    log.warning("%s: %s (%s); reconstructing this slice on the CPU", one.describe(), reason, error)
    release_gpu_memory()
    try:
        result = _reconstruct_batch(cpu_fallback(), [one])
    except Exception as cpu_error:  # noqa: BLE001 - the slice fails alone, with both reasons
        return SliceOutcome(error=RuntimeError(f"{error}; on the CPU as well: {cpu_error}"))
    return _outcomes(result, 1, "cpu", f"reconstructed on the CPU after {reason}")[0]


def _reconstruct_isolated(reconstructor, batch: list, cpu_fallback) -> list[SliceOutcome]:
    """Outcomes of ``batch`` (one shape): batched; one by one when the batch fails."""
    try:
        return _outcomes(_reconstruct_batch(reconstructor, batch), len(batch), _device_name(reconstructor))
    except Exception as error:  # noqa: BLE001 - isolate the failure to the slices it concerns
        if len(batch) == 1:
            return [_redo_on_cpu(reconstructor, batch[0], error, cpu_fallback)]
        log.warning("a batch of %d slices failed (%s: %s): reconstructing them one by one", len(batch),
                    type(error).__name__, error)
        release_gpu_memory()
    outcomes = []
    for one in batch:
        try:
            outcomes += _outcomes(_reconstruct_batch(reconstructor, [one]), 1, _device_name(reconstructor))
        except Exception as error:  # noqa: BLE001 - one slice's failure must not take the others
            outcomes.append(_redo_on_cpu(reconstructor, one, error, cpu_fallback))
    return outcomes


def reconstruct_slices(reconstructor, slices: Sequence[SliceKSpace],
                       cpu_fallback: Callable[[], object] | None = None) -> Iterator[tuple[SliceKSpace, SliceOutcome]]:
    """``(slice, outcome)`` for every slice, a batch at a time as each finishes: slices of the same shape in
    batches of ``reconstructor.batch_size``, the first remaining slice's shape first. ``reconstructor``: a
    :class:`Reconstructor` (or anything with ``reconstruct(kspace, mask, coil_maps=)``, ``device``, ``batch_size``);
    ``cpu_fallback``: returns a CPU reconstructor for slices that fail on the GPU (None: no fallback)."""
    batch_size = max(1, int(getattr(reconstructor, "batch_size", 1)))
    pending = list(slices)
    while pending:
        shape = pending[0].kspace.shape
        batch = [one for one in pending if one.kspace.shape == shape][:batch_size]
        pending = [one for one in pending if not any(one is b for b in batch)]
        yield from zip(batch, _reconstruct_isolated(reconstructor, batch, cpu_fallback))
