"""The one door into the reconstruction: typed slice groups in, one outcome per 2-D image out.

:func:`reconstruct_slices` takes :class:`recon.slice_data.SliceData` (k-space as measured) and does everything on
the reconstruction's device, in torch from the door to the outcome:

1. preparation (:func:`prepare`): prewhitening with the scan's :class:`recon.slice_data.NoiseScan`, readout-
   oversampling removal, the image grid, k2 → partitions for a 3-D slab (:func:`recon.preprocessing.prepare_kspace`);
2. σ of each image by the one noise-level rule (:func:`recon.noise.noise_level`);
3. coil maps of each image by the one coil-map rule (:func:`coil_maps_for`: ESPIRiT from the calibration lines),
   computed once: a retry keeps them;
4. CDL-Λ (:meth:`Reconstructor.solve`) in batches of ``batch_size`` images of one shape; a batch that fails is
   redone image by image, an image that fails on the GPU is redone on the CPU (its prepared data and maps moved
   there, not recomputed), bad input (ValueError) fails alone everywhere;
5. one :class:`SliceOutcome` per image, its arrays in numpy for the caller (the only copy off the device).

:class:`Reconstructor` loads the dictionary and network once (a warm server keeps one) and chooses the device and
batch size once; :meth:`Reconstructor.reconstruct` is the arrays-in, arrays-out form for the lab and benchmarks,
with the same σ and coil-map rules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from cdl_lambda.recon import coils as _coils
from cdl_lambda.recon.device import choose_device, keep_freed_memory_for_reuse
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.model import DEFAULT_SCALAR_BETA, DEFAULT_SCALAR_LAMBDA, CDLLambda, ReconOutput
from cdl_lambda.recon.noise import NOISE_ESTIMATED, NOISE_FROM_SCAN, noise_level
from cdl_lambda.recon.preprocessing import prepare_kspace
from cdl_lambda.recon.slice_data import STATUS_NOT_RECONSTRUCTED, SliceData, as_tensor
from cdl_lambda.recon.solvers import compile_available
from cdl_lambda.recon.weights import DEFAULT_SOLVER, WeightsRegistry

log = logging.getLogger(__name__)

__all__ = ["NOISE_ESTIMATED", "NOISE_FROM_SCAN", "PreparedSlice", "ReconResult", "Reconstructor", "SliceOutcome",
           "coil_maps_for", "default_calibration_mask", "prepare", "reconstruct_slices"]


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


def coil_maps_for(kspace: torch.Tensor, mask: torch.Tensor, noise_std: float, calibration: torch.Tensor | None = None,
                  calibration_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The one coil-map rule: ESPIRiT maps ``(coils, ny, nx)`` (:func:`recon.coils.estimate_coil_maps`) of one image
    ``kspace`` ``(coils, ny, nx)`` with noise level ``noise_std``, from its ``calibration`` lines when given, else
    from its own k-space over ``calibration_mask`` (default: the fully sampled rows around the centre of ``mask``);
    None for a single coil."""
    if kspace.shape[-3] <= 1:
        return None
    if calibration is None:
        calibration = kspace
        calibration_mask = default_calibration_mask(mask) if calibration_mask is None else calibration_mask
    return _coils.estimate_coil_maps(calibration, calibration_mask.to(calibration.device), float(noise_std))


# ------------------------------------------------------------------------------------------------- the model, loaded
@dataclass
class ReconResult:
    """Arrays out of :meth:`Reconstructor.reconstruct`, centred layout: image and zero_filled ``(slices, ny, nx)``
    complex64 in the units of the coil-combined zero-filled image; lambda_maps ``(slices, K, ny, nx)`` float32
    (noise units); coil_maps or None; σ per slice and the final data residual relative to it."""

    image: np.ndarray
    zero_filled: np.ndarray
    lambda_maps: np.ndarray | None
    coil_maps: np.ndarray | None
    noise_std: np.ndarray | None = None          # (slices,) σ per complex k-space sample
    residual_to_noise: np.ndarray | None = None  # (slices,) ‖A x* − y‖ / (σ √M)
    iterations_used: np.ndarray | None = None    # (slices,) solver iterations (stopping rule, ≤ the cap)
    final_relative_change: np.ndarray | None = None  # (slices,) the stopping measure at the last iteration
    background_disagreement: np.ndarray | None = None  # (slices,) the data against the background weight
    background_withdrawn: np.ndarray | None = None     # (slices,) bool: reconstructed without the weight
    background_kept: np.ndarray | None = None          # (slices,) share of b > ½ whose factor the image keeps
    dictionary_scale: float = 1.0  # the grid the dictionary's filters were resampled onto (recon.model)


class Reconstructor:
    """CDL-Λ with its dictionary and network loaded once.

    dictionary / network: names from ``weights/manifest.yaml`` ("default" = the manifest's default; network
    "none" = the scalar-λ baseline). device: None/"auto" → CUDA when present, else CPU. batch_size: images per
    forward pass (0 = 8 on a GPU, 1 on the CPU). compiled: fuse FISTA's element-wise work with ``torch.compile``
    ("auto": when a compiler is available; the first slice of each size then pays a one-off compile).
    iterations: the solver's cap; None or 0 → the one the network was trained and validated for (its manifest
    entry's ``solver``, :meth:`recon.weights.LoadedNetwork.solver_settings`), which also sets the solver and its
    stopping rule; the scalar-λ baseline runs :data:`recon.weights.DEFAULT_SOLVER`. dictionary_scale: "auto" (the
    filters resampled by n / m on an image larger than the matrix m the network was trained at) or a number (1: as
    learned), :meth:`recon.model.CDLLambda.dictionary_scale_for`.
    """

    def __init__(self, dictionary: str | Dictionary = "default", network: str | None = "default",
                 iterations: int | None = None, device: str | None = None, batch_size: int = 8,
                 scalar_lambda: float = DEFAULT_SCALAR_LAMBDA, weights_dir: str | None = None,
                 compiled: bool | str = "auto", dictionary_scale: float | str = "auto"):
        self.device = choose_device(device)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        if compiled == "auto":
            compiled = compile_available(self.device)
        registry = WeightsRegistry(weights_dir)
        self.dictionary = dictionary if isinstance(dictionary, Dictionary) else registry.dictionary(dictionary)
        loaded = registry.network(network)
        solver = loaded.solver_settings() if loaded is not None else dict(DEFAULT_SOLVER)
        cap = int(iterations) if iterations else int(solver["iterations"])
        if loaded is None:
            log.warning("no trained Λ network selected: using the scalar-λ baseline (λ = %g)", scalar_lambda)
            self.model = CDLLambda(None, beta=DEFAULT_SCALAR_BETA, iterations=cap,
                                   scalar_lambda=scalar_lambda, compiled=compiled, dictionary_scale=dictionary_scale)
        else:
            self.model = CDLLambda.deployed(loaded, cap, compiled=compiled, dictionary_scale=dictionary_scale)
        self.model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size)) if batch_size else (8 if self.device.type == "cuda" else 1)
        self._device_lock = threading.Lock()  # one reconstruction at a time on the device (and torch.compile)
        self.identity = {
            "dictionary": self.dictionary.name,
            "dictionary_sha256": str(self.dictionary.meta.get("sha256", "builtin")),
            "network": loaded.name if loaded else "none (scalar lambda)",
            "network_sha256": loaded.sha256 if loaded else "none",
            "solver": f"{self.model.solver}, cap {cap}, tolerance {self.model.tolerance:g}",
        }
        log.info("reconstructor ready on %s: %s", self.device, self.identity)

    @property
    def iterations(self) -> int:
        """The solver's iteration cap (the model's)."""
        return self.model.iterations

    @torch.inference_mode()
    def solve(self, kspace: torch.Tensor, mask: torch.Tensor, coil_maps: torch.Tensor | None,
              noise_std: torch.Tensor) -> ReconOutput:
        """CDL-Λ of a batch on this reconstructor's device: ``kspace`` ``(B, coils, ny, nx)`` complex64 centred,
        ``mask`` ``(B, ny, nx)`` or ``(ny, nx)``, ``coil_maps`` like ``kspace`` (None for one coil), ``noise_std``
        ``(B,)``. Tensors in, tensors out (:class:`recon.model.ReconOutput`, on the device)."""
        ny, nx = kspace.shape[-2:]
        if min(ny, nx) < self.dictionary.kernel_size:
            raise ValueError(f"image {ny}×{nx} is smaller than the dictionary's {self.dictionary.kernel_size}² filters")
        kspace = kspace.to(device=self.device, dtype=torch.complex64)
        mask = mask.to(device=self.device, dtype=torch.float32)
        sigma = noise_std.to(device=self.device, dtype=torch.float32)
        with self._device_lock:
            if coil_maps is None:
                return self.model(kspace[:, 0], mask, self.dictionary, noise_std=sigma)
            maps = coil_maps.to(device=self.device, dtype=torch.complex64)
            return self.model(kspace, mask, self.dictionary, coil_maps=maps, noise_std=sigma)

    def _checked(self, array, name: str, dtype) -> torch.Tensor:
        tensor = as_tensor(array, self.device, dtype)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or Inf values")
        return tensor

    @torch.inference_mode()
    def reconstruct(self, kspace, mask, calibration_mask=None, coil_maps=None, noise_std=None) -> ReconResult:
        """Arrays in and out (numpy or torch): every slice of prepared ``kspace`` ``(slices, coils, ny, nx)``
        (prewhitened, oversampling removed, zeros where not measured), ``mask`` ``(ny, nx)`` or ``(slices, ny, nx)``,
        ``noise_std`` σ per slice (None: :func:`recon.noise.noise_level`), ``coil_maps`` (None: :func:`coil_maps_for`
        over ``calibration_mask``). Raises ValueError on bad input."""
        kspace = self._checked(kspace, "k-space", torch.complex64)
        if kspace.ndim != 4:
            raise ValueError(f"k-space must be (slices, coils, ny, nx), got shape {tuple(kspace.shape)}")
        slices, _, ny, nx = kspace.shape
        mask = self._checked(mask, "mask", torch.float32)
        if mask.shape[-2:] != (ny, nx) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != slices):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match k-space of shape {tuple(kspace.shape)}")
        masks = mask if mask.ndim == 3 else mask.expand(slices, ny, nx)
        known = None if noise_std is None else torch.as_tensor(noise_std, dtype=torch.float32).reshape(-1)
        given = [None if known is None else known[min(i, len(known) - 1)] for i in range(slices)]
        sigma = torch.stack([noise_level(kspace[i], masks[i], given[i])[0] for i in range(slices)])
        if coil_maps is not None:
            maps = self._checked(coil_maps, "coil maps", torch.complex64)
            if maps.shape != kspace.shape:
                raise ValueError(f"coil maps of shape {tuple(maps.shape)} do not match k-space {tuple(kspace.shape)}")
        else:
            calibration = None if calibration_mask is None else self._checked(calibration_mask, "calibration mask",
                                                                             torch.float32)
            per_slice = [coil_maps_for(kspace[i], masks[i], float(sigma[i]), calibration_mask=calibration)
                         for i in range(slices)]
            maps = None if per_slice[0] is None else torch.stack(per_slice)
        parts = [self.solve(kspace[s], masks[s], None if maps is None else maps[s], sigma[s])
                 for s in (slice(i, i + self.batch_size) for i in range(0, slices, self.batch_size))]
        return ReconResult(image=torch.cat([p.image for p in parts]).cpu().numpy(),
                           zero_filled=torch.cat([p.zero_filled for p in parts]).cpu().numpy(),
                           lambda_maps=torch.cat([p.lambda_maps.float() for p in parts]).cpu().numpy(),
                           coil_maps=None if maps is None else maps.cpu().numpy(), noise_std=sigma.cpu().numpy(),
                           residual_to_noise=torch.cat([p.residual_to_noise.float() for p in parts]).cpu().numpy(),
                           iterations_used=_joined([p.iterations_used for p in parts]),
                           final_relative_change=_joined([p.final_relative_change for p in parts]),
                           background_disagreement=_joined([p.background_disagreement for p in parts]),
                           background_withdrawn=_joined([p.background_withdrawn for p in parts]),
                           background_kept=_joined([p.background_kept for p in parts]),
                           dictionary_scale=parts[0].dictionary_scale)


# ------------------------------------------------------------------------------------------------------- the door
@dataclass(eq=False)
class PreparedSlice:
    """One 2-D image ready for CDL-Λ, on one device: ``kspace`` ``(coils, ny, nx)`` complex64 (prewhitened,
    oversampling removed, zeros where not measured), ``mask`` ``(ny, nx)`` float32, ``coil_maps`` ``(coils, ny, nx)``
    or None (one coil), σ and where it came from; ``source`` and ``partition`` say which image of which group."""

    source: SliceData
    partition: int
    kspace: torch.Tensor
    mask: torch.Tensor
    coil_maps: torch.Tensor | None
    noise_std: float
    noise_source: str
    note: str = ""
    on_cpu_fallback: bool = False  # prepared on the CPU after a GPU failure: solved by the CPU reconstructor

    def to(self, device: torch.device) -> PreparedSlice:
        """The same image on ``device`` (the coil maps moved, not recomputed)."""
        return replace(self, kspace=self.kspace.to(device), mask=self.mask.to(device),
                       coil_maps=None if self.coil_maps is None else self.coil_maps.to(device))

    def describe(self) -> str:
        return self.source.describe(self.partition)


@dataclass
class SliceOutcome:
    """What became of one 2-D image (``partition`` of ``source``): ``image`` and ``zero_filled`` ``(ny, nx)``
    complex64 in the units of the prewhitened data, ``lambda_maps`` ``(K, ny, nx)`` float32 (noise units), σ and
    where it came from, the final data residual relative to σ, the solver's ``iterations`` when the model reports
    them, the ``device`` it ran on and a ``note`` (a CPU fallback); ``status`` the source's, or
    ``not-reconstructed`` with the ``error`` that lost it (then the arrays are None)."""

    source: SliceData
    partition: int = 0
    image: np.ndarray | None = None
    zero_filled: np.ndarray | None = None
    lambda_maps: np.ndarray | None = None
    noise_std: float | None = None
    noise_source: str = ""
    residual_to_noise: float | None = None
    iterations_used: int | None = None          # the solver's iterations (its stopping rule, at most the cap)
    final_relative_change: float | None = None  # the stopping measure at the last iteration
    background_disagreement: float | None = None  # the data against the background weight (None: no weight)
    background_withdrawn: bool = False          # reconstructed without the weight: the data disagreed
    background_kept: float | None = None        # share of b > ½ whose factor the image keeps (1: all, 0: none)
    dictionary_scale: float = 1.0               # the grid the dictionary's filters were resampled onto (recon.model)
    status: str = ""
    device: str = "cpu"
    note: str = ""
    error: Exception | None = None

    def describe(self) -> str:
        return self.source.describe(self.partition)


@torch.inference_mode()
def prepare(data: SliceData, device: torch.device | str = "cpu") -> list[PreparedSlice]:
    """The images of ``data`` on ``device``, one per partition, with σ and coil maps. ValueError on bad input
    (shapes, NaN/Inf, a noise scan of other coils, no calibration lines)."""
    kspace = as_tensor(data.kspace, device)
    mask = as_tensor(data.mask, device)
    if kspace.ndim == 3:  # a 2-D slice given as (coils, ny, nx)
        kspace, mask = kspace.unsqueeze(1), mask.reshape(1, *mask.shape[-2:])
    if kspace.ndim != 4 or not kspace.is_complex():
        raise ValueError(f"k-space must be complex (coils, nz, ny, nx), got {kspace.dtype} {tuple(kspace.shape)}")
    if tuple(mask.shape) != tuple(kspace.shape[1:]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match k-space of shape {tuple(kspace.shape)}")
    if not torch.isfinite(kspace).all():
        raise ValueError("k-space contains NaN or Inf values")
    noise = data.noise
    whitening = noise.whitening(data.sample_time_us, kspace.device) if noise is not None else None
    hybrid, mask2d = prepare_kspace(kspace, mask, whitening, data.oversampling, data.matrix)
    calibration = calibration_mask = None
    if data.calibration is not None:
        cal_k, cal_m = as_tensor(data.calibration, device), as_tensor(data.calibration_mask, device)
        if cal_k.ndim == 3:
            cal_k, cal_m = cal_k.unsqueeze(1), cal_m.reshape(1, *cal_m.shape[-2:])
        calibration, calibration_mask = prepare_kspace(cal_k, cal_m, whitening, data.oversampling, data.matrix)
    upstream = noise is not None and noise.prewhitened_std is not None
    known = 1.0 if whitening is not None else (noise.prewhitened_std if upstream else None)
    images = []
    for z in range(hybrid.shape[1]):
        one = hybrid[:, z]
        sigma, source = noise_level(one, mask2d, known, noise.source if upstream else "")
        maps = coil_maps_for(one, mask2d, float(sigma), None if calibration is None else calibration[:, z],
                             calibration_mask)
        images.append(PreparedSlice(source=data, partition=z, kspace=one, mask=mask2d, coil_maps=maps,
                                    noise_std=float(sigma), noise_source=source))
    return images


def release_gpu_memory() -> None:
    """Return cached GPU memory after a failure (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device(reconstructor) -> torch.device:
    """Where the door puts the data: the reconstructor's ``data_device`` when it names one, else its device."""
    device = getattr(reconstructor, "data_device", None) or getattr(reconstructor, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _on_gpu(reconstructor) -> bool:
    return getattr(getattr(reconstructor, "device", None), "type", "cpu") != "cpu"


def _failure_reason(error: Exception) -> str:
    return "GPU out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else (
        f"GPU failure ({type(error).__name__})")


def _failed(data: SliceData, error: Exception, partitions: Sequence[int] | None = None) -> list[SliceOutcome]:
    return [SliceOutcome(source=data, partition=z, status=STATUS_NOT_RECONSTRUCTED, error=error)
            for z in (range(max(data.partitions, 1)) if partitions is None else partitions)]


def _joined(parts: list) -> np.ndarray | None:
    """Per-batch ``(B,)`` tensors joined into one array; None when the model did not report them."""
    return None if any(p is None for p in parts) else torch.cat(list(parts)).cpu().numpy()


def _scalar(values, i: int) -> int | float | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor) and values.ndim > 0:
        return values[i].item()
    return values.item() if isinstance(values, torch.Tensor) else values


def _solve(reconstructor, batch: list[PreparedSlice], note: str = "") -> list[SliceOutcome]:
    """Outcomes of ``batch`` (one shape, one device) solved in one pass by ``reconstructor``."""
    maps = None if batch[0].coil_maps is None else torch.stack([one.coil_maps for one in batch])
    out = reconstructor.solve(torch.stack([one.kspace for one in batch]), torch.stack([one.mask for one in batch]),
                              maps, torch.tensor([one.noise_std for one in batch], dtype=torch.float32))
    image, zero_filled = out.image.cpu().numpy(), out.zero_filled.cpu().numpy()
    lambdas = None if out.lambda_maps is None else out.lambda_maps.float().cpu().numpy()
    ratios = None if out.residual_to_noise is None else out.residual_to_noise.float().cpu()
    device = str(getattr(reconstructor, "device", "cpu"))
    disagreement = getattr(out, "background_disagreement", None)
    withdrawn = getattr(out, "background_withdrawn", None)
    kept = getattr(out, "background_kept", None)
    outcomes = []
    for i, one in enumerate(batch):
        pulled = bool(withdrawn[i]) if withdrawn is not None else False
        notes = (one.note, note,
                 _withdrawal_note(_scalar(disagreement, i), _scalar(kept, i), reconstructor) if pulled else "")
        outcomes.append(SliceOutcome(
            source=one.source, partition=one.partition, image=image[i], zero_filled=zero_filled[i],
            lambda_maps=None if lambdas is None else lambdas[i], noise_std=one.noise_std,
            noise_source=one.noise_source, residual_to_noise=_scalar(ratios, i),
            iterations_used=_scalar(getattr(out, "iterations_used", None), i),
            final_relative_change=_scalar(getattr(out, "final_relative_change", None), i),
            background_disagreement=_scalar(disagreement, i), background_withdrawn=pulled,
            background_kept=_scalar(kept, i), dictionary_scale=float(getattr(out, "dictionary_scale", 1.0)),
            status=one.source.status, device=device, note="; ".join(n for n in notes if n)))
    return outcomes


def _withdrawal_note(disagreement: float, kept: float | None, reconstructor) -> str:
    limit = getattr(getattr(reconstructor, "model", None), "withdraw_z", None)
    why = (f"background weight withdrawn: the data show signal where it acted (disagreement {disagreement:.1f}"
           f"{f' > {limit:g}' if limit is not None else ''}), reconstructed without it")
    if kept:  # recon.background.kept_where_data_agree
        return f"{why}; its factor kept where the data agree ({100 * kept:.0f} % of its area)"
    return why


def _prepare_isolated(reconstructor, data: SliceData, cpu_fallback) -> tuple[list[PreparedSlice], list[SliceOutcome]]:
    """(prepared images, failed outcomes) of one group: on the device; on the CPU when that fails on a GPU."""
    try:
        return prepare(data, _device(reconstructor)), []
    except ValueError as error:  # bad input fails anywhere
        return [], _failed(data, error)
    except Exception as failure:  # noqa: BLE001 - one group's failure must not take the others
        if not _on_gpu(reconstructor) or cpu_fallback is None:
            return [], _failed(data, failure)
        error = failure
    reason = _failure_reason(error)
    log.warning("%s: %s while preparing it (%s); preparing and reconstructing it on the CPU", data.describe(), reason,
                error)
    release_gpu_memory()
    try:
        images = prepare(data, torch.device("cpu"))
    except Exception as cpu_error:  # noqa: BLE001 - the group fails alone, with both reasons
        return [], _failed(data, RuntimeError(f"{error}; on the CPU as well: {cpu_error}"))
    for one in images:
        one.note, one.on_cpu_fallback = f"reconstructed on the CPU after {reason}", True
    return images, []


def _redo_on_cpu(reconstructor, one: PreparedSlice, error: Exception, cpu_fallback) -> SliceOutcome:
    if not _on_gpu(reconstructor) or cpu_fallback is None or isinstance(error, ValueError):
        return _failed(one.source, error, [one.partition])[0]
    reason = _failure_reason(error)
    log.warning("%s: %s (%s); reconstructing this image on the CPU", one.describe(), reason, error)
    release_gpu_memory()
    try:
        return _solve(cpu_fallback(), [one.to(torch.device("cpu"))], f"reconstructed on the CPU after {reason}")[0]
    except Exception as cpu_error:  # noqa: BLE001 - the image fails alone, with both reasons
        return _failed(one.source, RuntimeError(f"{error}; on the CPU as well: {cpu_error}"), [one.partition])[0]


def _solve_isolated(reconstructor, batch: list[PreparedSlice], cpu_fallback) -> list[SliceOutcome]:
    """Outcomes of ``batch``: batched; one by one when the batch fails; each failure on a GPU redone on the CPU."""
    if batch[0].on_cpu_fallback:
        reconstructor, cpu_fallback = cpu_fallback(), None
    try:
        return _solve(reconstructor, batch)
    except Exception as error:  # noqa: BLE001 - isolate the failure to the images it concerns
        if len(batch) == 1:
            return [_redo_on_cpu(reconstructor, batch[0], error, cpu_fallback)]
        log.warning("a batch of %d images failed (%s: %s): reconstructing them one by one", len(batch),
                    type(error).__name__, error)
        release_gpu_memory()
    outcomes = []
    for one in batch:
        try:
            outcomes += _solve(reconstructor, [one])
        except Exception as error:  # noqa: BLE001 - one image's failure must not take the others
            outcomes.append(_redo_on_cpu(reconstructor, one, error, cpu_fallback))
    return outcomes


def _next_batch(ready: list[PreparedSlice], batch_size: int) -> tuple[list[PreparedSlice], list[PreparedSlice]]:
    """(the next batch: up to ``batch_size`` images of the first image's shape, the rest)."""
    key = (ready[0].kspace.shape, ready[0].on_cpu_fallback)
    batch = [one for one in ready if (one.kspace.shape, one.on_cpu_fallback) == key][:batch_size]
    return batch, [one for one in ready if not any(one is b for b in batch)]


def reconstruct_slices(reconstructor, slices: Sequence[SliceData],
                       cpu_fallback: Callable[[], object] | None = None) -> Iterator[SliceOutcome]:
    """One :class:`SliceOutcome` per image of every group in ``slices``, as each is known: a group that cannot be
    prepared at once, the others a batch at a time, images of one shape in batches of ``reconstructor.batch_size``
    (a batch is solved as soon as it is full, so about one batch of prepared images is held on the device).
    ``reconstructor``: a :class:`Reconstructor` (or anything with ``solve``, ``device``, ``batch_size``);
    ``cpu_fallback``: returns a CPU reconstructor for images that fail on the GPU (None: no fallback)."""
    batch_size = max(1, int(getattr(reconstructor, "batch_size", 1)))
    ready: list[PreparedSlice] = []
    for data in slices:
        images, failed = _prepare_isolated(reconstructor, data, cpu_fallback)
        yield from failed
        ready.extend(images)
        while ready:
            batch, rest = _next_batch(ready, batch_size)
            if len(batch) < batch_size:
                break
            ready = rest
            yield from _solve_isolated(reconstructor, batch, cpu_fallback)
    while ready:
        batch, ready = _next_batch(ready, batch_size)
        yield from _solve_isolated(reconstructor, batch, cpu_fallback)
