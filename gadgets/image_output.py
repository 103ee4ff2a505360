"""The images returned to the scanner: headers, meta, display window, numbering, ImageArray and PNG previews.

Header from the acquisition (``ismrmrd.Image.from_acquisition``: position, directions, counters, time stamps), field
of view from the XML header, 1-based image index per series, meta for Gadgetron (``GADGETRON_*``) and for
MRD/FIRE/Open Recon (``DataRole``, ``ImageComments``, ``WindowCenter`` …) plus the weights' identity (``CDL_*``).

Pixel layout: ``pixels`` ``(ny, nx)`` (rows = phase encoding E1, columns = readout) or ``(channels, ny, nx)``;
ISMRMRD stores ``(channels, z, y, x)`` with x along ``read_dir``, so ``matrix_size = (nx, ny, 1)``. An ImageArray
has ``data`` ``[X, Y, Z, CHA=1, N, S, LOC]`` complex64 (X along the readout), ``headers`` ``[N, S, LOC]`` and one
meta string per image in Fortran order of ``[N, S, LOC]``.
"""

from __future__ import annotations

import io

import ismrmrd
import numpy as np
from PIL import Image

from cdl_lambda.gadgets.completeness import INCOMPLETE, NOT_RECONSTRUCTED as STATUS_NOT_RECONSTRUCTED, OK, Assessment
from cdl_lambda.gadgets.provenance import parameters_text, software_version
from cdl_lambda.gadgets.wire import ImageArray

# series: the CDL-Λ images, the zero-filled and Λ-map series, and CDL-Λ images of incomplete slices apart
SERIES_OFFSETS = {"image": 0, "zero_filled": 1, "lambda": 2, "incomplete": 3}
DESCRIPTIONS = {"image": "CDL-Lambda", "zero_filled": "zero-filled", "lambda": "Lambda maps",
                "incomplete": "CDL-Lambda INCOMPLETE"}


# ------------------------------------------------------------------------------------------------------ window
OBJECT_LEVEL = 0.10   # pixels above this share of the 99.5th percentile are the object (inside the coil support)
WINDOW_TOP = 2.5      # the window's top: this many times the object's median magnitude (soft tissue)


def window_limits(magnitude: np.ndarray) -> tuple[float, float]:
    """(low, high) of the display window, chosen for soft tissue: low = the 0.5th percentile of ``magnitude``;
    high = ``WINDOW_TOP`` × the median of the object (the pixels above ``OBJECT_LEVEL`` × the 99.5th percentile:
    inside the coil support, where the background noise is left out), at most the 99.5th percentile. The brightest
    few percent (a skull or fat ring) saturate instead of pushing soft tissue into dark grey. (0, 1) when empty."""
    if magnitude.size == 0:
        return 0.0, 1.0
    low, top = np.percentile(magnitude, [0.5, 99.5])
    inside = magnitude[magnitude > OBJECT_LEVEL * top]
    high = min(top, WINDOW_TOP * float(np.median(inside))) if inside.size else top
    return float(low), float(max(high, low + 1e-12))


def window(pixels: np.ndarray) -> tuple[float, float]:
    """(centre, width) of :func:`window_limits` of the magnitude."""
    magnitude = np.abs(pixels)
    if magnitude.size == 0:
        return 0.0, 1.0
    low, high = window_limits(magnitude)
    width = float(max(high - low, 1e-12))
    return float(low + width / 2), width


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``pixels`` ``(ny, nx)``: magnitude, the display window (:func:`window_limits`)
    mapped to 0–255."""
    magnitude = np.abs(np.asarray(pixels, dtype=np.complex64 if np.iscomplexobj(pixels) else np.float32))
    low, high = window_limits(magnitude)
    scaled = np.clip((magnitude - low) / max(high - low, 1e-12), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((scaled * 255 + 0.5).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def preview_pixels(data: np.ndarray) -> np.ndarray:
    """What a preview shows of an image's ``data`` ``(channels, z, ny, nx)``: the first partition; several channels
    (the Λ maps, one per filter) side by side in a near-square grid, one pixel of the darkest value between them,
    so that they share one display window and their levels compare."""
    channels = np.abs(np.asarray(data)[:, 0])
    count, ny, nx = channels.shape
    if count == 1:
        return np.asarray(data)[0, 0]
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    grid = np.full((rows * (ny + 1) - 1, cols * (nx + 1) - 1), channels.min(), dtype=np.float32)
    for index, channel in enumerate(channels):
        row, col = divmod(index, cols)
        grid[row * (ny + 1):row * (ny + 1) + ny, col * (nx + 1):col * (nx + 1) + nx] = channel
    return grid


# ---------------------------------------------------------------------------------------------------- numbering
class ImageNumbers:
    """1-based image index per series, in the order images are built."""

    def __init__(self):
        self.last: dict[int, int] = {}

    def next(self, series: int) -> int:
        self.last[series] = self.last.get(series, 0) + 1
        return self.last[series]


def field_of_view(encoding, partitions: int) -> tuple:
    """(x, y, z) mm of one image, the one rule for every image of a scan (reconstructed, placeholder, array): in
    plane the grid the slices are put on (``encoding.image_fov``) when known, else recon x and encoded y; through
    plane the recon slab divided among a 3-D volume's partitions."""
    efov, rfov = encoding.encoded_fov, encoding.recon_fov
    z = rfov[2] / partitions if partitions > 1 else rfov[2]
    image_fov = getattr(encoding, "image_fov", None)
    if image_fov and all(image_fov[:2]):
        return (image_fov[0], image_fov[1], z)
    return (rfov[0], efov[1], z)


# -------------------------------------------------------------------------------------------------------- meta
def _directions(values) -> list[str]:
    return [f"{float(v):.18f}" for v in values]


def identity_meta(identity: dict, chain: str) -> dict:
    """The ``CDL_*`` keys: software version, chain and the dictionary's and network's names and sha256."""
    return {
        "CDL_SoftwareVersion": software_version(),
        "CDL_Chain": chain,
        "CDL_Dictionary": str(identity.get("dictionary", "")),
        "CDL_DictionarySHA256": str(identity.get("dictionary_sha256", "")),
        "CDL_Network": str(identity.get("network", "")),
        "CDL_NetworkSHA256": str(identity.get("network_sha256", "")),
        "CDL_Solver": str(identity.get("solver", "")),
    }


def describe_source(kind: str, identity: dict, pixels: np.ndarray) -> str:
    """What an image of ``kind`` is made from, for its comment: the CDL-Λ images name the dictionary and network,
    the zero-filled image says it is the plain inverse FFT of the measured lines, the Λ maps how many filters."""
    if kind == "zero_filled":
        return "coil-combined inverse FFT of the measured lines, no CDL-Lambda"
    if kind == "lambda":
        count = pixels.shape[0] if pixels.ndim == 3 else 1
        return f"{count} sparsity maps, one per filter of {identity.get('dictionary', '?')}"
    return f"{identity.get('dictionary', '?')}, {identity.get('network', '?')}"


# ------------------------------------------------------------------------------------------------------ images
def build_image(pixels: np.ndarray, reference, *, kind: str, image_index: int, series_index: int,
                field_of_view: tuple, identity: dict, chain: str, partition: int = 0, partitions: int = 1,
                slice_thickness: float = 0.0, extra_meta: dict | None = None, note: str = "") -> ismrmrd.Image:
    """An image of ``kind`` ("image", "zero_filled" or "lambda") from ``pixels`` (float32 or complex64); ``note``
    (e.g. a CPU fallback) is appended to the image comment."""
    if pixels.dtype not in (np.float32, np.complex64):
        raise TypeError(f"pixels must be float32 or complex64, got {pixels.dtype}")
    array = pixels[:, None] if pixels.ndim == 3 else pixels  # (channels, 1, ny, nx) or (ny, nx)
    image_type = ismrmrd.IMTYPE_COMPLEX if np.iscomplexobj(pixels) else ismrmrd.IMTYPE_MAGNITUDE
    source = reference if reference is not None else ismrmrd.AcquisitionHeader()
    image = ismrmrd.Image.from_array(np.ascontiguousarray(array), acquisition=source, transpose=False,
                                     image_type=image_type, image_index=image_index,
                                     image_series_index=series_index,
                                     field_of_view=tuple(float(v) for v in field_of_view))
    if partitions > 1:  # a partition of a 3-D volume: its own position along the slice direction
        offset = (partition - partitions // 2) * slice_thickness
        image.position = tuple(float(p) + offset * float(d) for p, d in zip(image.position, image.slice_dir))
        image.slice = partition
    image.meta = image_meta(pixels, image, kind=kind, identity=identity, chain=chain, image_index=image_index,
                            extra_meta=extra_meta, note=note)
    return image


def image_meta(pixels: np.ndarray, header, *, kind: str, identity: dict, chain: str, image_index: int,
               extra_meta: dict | None = None, note: str = "") -> ismrmrd.Meta:
    """The meta of an image of ``kind`` with ``pixels`` (any shape: the window covers them all) and ``header``
    (its read/phase directions): Gadgetron, MRD/FIRE and ``CDL_*`` keys, then ``extra_meta``."""
    centre, width = window(pixels)
    description = DESCRIPTIONS[kind]
    comment = f"{description} ({describe_source(kind, identity, pixels)})"
    if note:
        comment += f" [{note}]"
    meta = ismrmrd.Meta({
        "GADGETRON_DataRole": "Image" if kind != "lambda" else "Parametric",
        "GADGETRON_ImageComment": comment,
        "GADGETRON_SeqDescription": f"_{description.replace(' ', '_')}",
        "GADGETRON_WindowCenter": f"{centre:.6g}",
        "GADGETRON_WindowWidth": f"{width:.6g}",
        "GADGETRON_ImageProcessingHistory": ["PYTHON", "CDL-LAMBDA"],
        "GADGETRON_ImageNumber": str(image_index),
        "DataRole": "Image" if kind != "lambda" else "Quantitative",
        "ImageComments": comment,
        "SeriesDescriptionAdditional": description,
        "WindowCenter": f"{centre:.6g}",
        "WindowWidth": f"{width:.6g}",
        "ImageRowDir": _directions(header.read_dir),
        "ImageColumnDir": _directions(header.phase_dir),
        **identity_meta(identity, chain),
    })
    if extra_meta:
        meta.update({k: v if isinstance(v, list) else str(v) for k, v in extra_meta.items()})
    return meta


def slice_meta(params, outcome, one, kind: str = "image") -> dict:
    """The per-slice ``CDL_*`` keys: iterations, device, readouts, the noise level and (CDL-Λ images only) the
    data residual."""
    meta = {"CDL_Iterations": str(params.iterations), "CDL_Device": outcome.device, "CDL_Readouts": str(one.readouts),
            "CDL_Parameters": parameters_text(params), **noise_meta(outcome)}
    if kind in ("zero_filled", "lambda"):
        meta.pop("CDL_ResidualToNoise", None)  # a property of the CDL-Λ fit, not of these images
    return meta


def status_meta(assessment: Assessment | None) -> dict:
    """``CDL_Status`` (ok, incomplete) and, unless ok, ``CDL_StatusReason``."""
    assessment = assessment or Assessment()
    meta = {"CDL_Status": assessment.status}
    if assessment.status != OK:
        meta["CDL_StatusReason"] = assessment.reason
    return meta


def output_pixels(image: np.ndarray, params) -> np.ndarray:
    """The CDL-Λ image as sent: complex64 (``output=complex``) or its magnitude as float32."""
    return image.astype(np.complex64) if params.output == "complex" else np.abs(image).astype(np.float32)


def slice_note(outcome, assessment: Assessment | None = None) -> str:
    """What the image comment adds for a slice: why it is incomplete, a CPU fallback."""
    reasons = [f"{INCOMPLETE}: {assessment.reason}"] if assessment and assessment.status != OK else []
    return "; ".join(n for n in (*reasons, getattr(outcome, "note", "")) if n)


def noise_meta(outcome) -> dict:
    """The noise level the slice was reconstructed in the units of, where it came from, and the final data residual
    relative to it (≈ 1 when the fit stops at the noise; well above 1 means over-regularisation); the solver's
    iterations; the scale the dictionary's filters were resampled to; for a network with a background weight,
    whether it was applied, withdrawn in part (its factor kept where the data agree) or withdrawn, the share of
    it kept and the data's disagreement with it (recon.background)."""
    meta = {}
    if getattr(outcome, "noise_source", ""):
        meta["CDL_NoiseSource"] = outcome.noise_source
    if getattr(outcome, "noise_std", None) is not None:
        meta["CDL_NoiseStd"] = f"{outcome.noise_std:.6g}"
    if getattr(outcome, "residual_to_noise", None) is not None:
        meta["CDL_ResidualToNoise"] = f"{outcome.residual_to_noise:.4f}"
    if getattr(outcome, "iterations_used", None) is not None:  # the solver's stopping rule
        meta["CDL_IterationsUsed"] = str(int(outcome.iterations_used))
        meta["CDL_FinalRelativeChange"] = f"{outcome.final_relative_change:.3g}"
    scale = getattr(outcome, "dictionary_scale", None)
    if scale is not None:  # the grid the dictionary's filters were resampled onto (recon.model): 1 = as learned
        meta["CDL_DictionaryScale"] = f"{scale:g}"
    if getattr(outcome, "background_disagreement", None) is not None:  # recon.background: the weight's check
        kept = getattr(outcome, "background_kept", None)
        meta["CDL_BackgroundWeight"] = ("applied" if not outcome.background_withdrawn
                                        else "withdrawn-in-part" if kept else "withdrawn")
        meta["CDL_BackgroundDisagreement"] = f"{outcome.background_disagreement:.2f}"
        if kept is not None:
            meta["CDL_BackgroundWeightKept"] = f"{kept:.2f}"
    return meta


def slice_images(one, outcome, params, *, identity: dict, chain: str, encoding, numbers: ImageNumbers,
                 assessment: Assessment | None = None) -> list:
    """The images of one reconstructed slice ``one`` (a :class:`gadgets.slices.SliceImage`) from its
    ``outcome`` (a :class:`recon.pipeline.SliceOutcome`): the CDL-Λ image (in the series of incomplete images when
    ``assessment`` says so), then, as ``params`` asks, the zero-filled image and the Λ maps, each in its own series;
    every one carries ``CDL_Status``."""
    fov = field_of_view(encoding, one.partitions)
    common = dict(field_of_view=fov, identity=identity, chain=chain, partition=one.partition,
                  partitions=one.partitions, slice_thickness=fov[2] if one.partitions > 1 else 0.0,
                  note=slice_note(outcome, assessment))
    incomplete = assessment is not None and assessment.status != OK
    outputs = [("incomplete" if incomplete else "image", outcome.image)]
    if params.send_zero_filled:
        outputs.append(("zero_filled", outcome.zero_filled))
    if params.send_lambda_maps and outcome.lambda_maps is not None:
        outputs.append(("lambda", np.ascontiguousarray(outcome.lambda_maps, dtype=np.float32)))
    images = []
    for kind, pixels in outputs:
        if kind != "lambda":
            pixels = output_pixels(pixels, params)
        series = params.series_index + SERIES_OFFSETS[kind]
        images.append(build_image(pixels, one.reference, kind=kind, image_index=numbers.next(series),
                                  series_index=series, extra_meta={**slice_meta(params, outcome, one, kind),
                                                                   **status_meta(assessment)}, **common))
    return images


NOT_RECONSTRUCTED = "NOT RECONSTRUCTED"


def placeholder_images(reference, key, reason: str, *, shape: tuple, partitions: int, params, identity: dict,
                       chain: str, encoding, numbers: ImageNumbers, only: int | None = None) -> list:
    """Images (zeros ``shape`` ``(ny, nx)``, one per partition, or partition ``only``) standing in the series for
    a slice that could not be reconstructed: counters from ``key`` (a :class:`gadgets.buffer.GroupKey`), image comment
    ``NOT RECONSTRUCTED: reason`` and meta ``CDL_NotReconstructed`` = reason."""
    fov = field_of_view(encoding, partitions)
    images = []
    for z in range(partitions) if only is None else [only]:
        pixels = np.zeros(shape, np.complex64 if params.output == "complex" else np.float32)
        image = build_image(pixels, reference, kind="image", image_index=numbers.next(params.series_index),
                            series_index=params.series_index, field_of_view=fov, identity=identity, chain=chain,
                            partition=z, partitions=partitions, slice_thickness=fov[2] if partitions > 1 else 0.0)
        mark_not_reconstructed(image.meta, reason)
        image.meta["CDL_Parameters"] = parameters_text(params)
        for name, value in key._asdict().items():
            setattr(image, name, value)
        if partitions > 1:
            image.slice = z
        images.append(image)
    return images


def mark_not_reconstructed(meta, reason: str) -> None:
    """Comment keys of ``meta`` say the image was not reconstructed, and why."""
    comment = f"CDL-Lambda: {NOT_RECONSTRUCTED}: {reason}"
    meta["GADGETRON_ImageComment"] = meta["ImageComments"] = comment
    meta["CDL_NotReconstructed"] = meta["CDL_StatusReason"] = reason
    meta["CDL_Status"] = STATUS_NOT_RECONSTRUCTED


# ------------------------------------------------------------------------------------------------- ImageArray
def image_array(shape: tuple, inputs: list, outcomes: dict, params, *, identity: dict, chain: str, encoding,
                numbers: ImageNumbers, failed: dict | None = None, assessments: dict | None = None) -> ImageArray:
    """The ImageArray answering a ReconBit whose buffer has ``shape`` ``[RO, E1, E2, CHA, N, S, LOC]``, from its
    ``inputs`` (SliceImages with ``array_index``) and ``outcomes`` ``{id(input): SliceOutcome}`` of those that
    were reconstructed. An image none of whose partitions was reconstructed is zeros marked
    :data:`NOT_RECONSTRUCTED` with the reason (the first of its inputs' ``errors``, or ``failed[index]``).

    Each (n, s, loc) is one image, a volume of E2 partitions for a 3-D scan, with the raw path's header and meta
    (:func:`build_image`, :func:`image_meta`); pixels are the raw path's (magnitude unless ``output=complex``)
    stored complex64, the one type an ImageArray carries; Gadgetron's ExtractGadget then takes the magnitude."""
    _, _, E2, _, N, S, LOC = shape
    ny, nx = inputs[0].shape
    data = np.zeros((nx, ny, E2, 1, N, S, LOC), np.complex64)
    headers = np.empty((N, S, LOC), dtype=object)
    metas = np.empty((N, S, LOC), dtype=object)
    fov = field_of_view(encoding, 1)
    by_image: dict = {}
    for one in inputs:
        by_image.setdefault(one.array_index, []).append(one)
    for (n, s, loc), parts in sorted(by_image.items(), key=lambda item: item[0][::-1]):
        done = [(one, outcomes[id(one)]) for one in parts if id(one) in outcomes]
        for one, outcome in done:
            data[:, :, one.partition, 0, n, s, loc] = output_pixels(outcome.image, params).T
        one, outcome = done[0] if done else (parts[0], None)
        volume = np.ascontiguousarray(data[:, :, :, 0, n, s, loc].transpose(2, 1, 0))  # (E2, ny, nx)
        pixels = volume[0] if E2 == 1 else volume
        if params.output != "complex":
            pixels = pixels.real.astype(np.float32)
        index = numbers.next(params.series_index)
        assessment = (assessments or {}).get((n, s, loc))
        image = build_image(pixels, one.reference, kind="image", image_index=index, series_index=params.series_index,
                            field_of_view=fov, identity=identity, chain=chain,
                            extra_meta={**slice_meta(params, outcome, one), **status_meta(assessment)} if outcome
                            else {}, note=slice_note(outcome, assessment) if outcome else "")
        if outcome is None:
            reason = (one.errors or [(failed or {}).get((n, s, loc), "failed")])[0]
            mark_not_reconstructed(image.meta, reason)
        header = image.getHead()
        header.data_type = ismrmrd.DATATYPE_CXFLOAT
        header.image_type = ismrmrd.IMTYPE_COMPLEX if params.output == "complex" else ismrmrd.IMTYPE_MAGNITUDE
        header.matrix_size[:] = (nx, ny, E2)
        header.channels = 1
        headers[n, s, loc] = header
        metas[n, s, loc] = image.meta.serialize()
    meta = [metas[n, s, loc] or "" for loc in range(LOC) for s in range(S) for n in range(N)]
    return ImageArray(data=data, headers=headers, meta=meta, waveform=None, acq_headers=None)
