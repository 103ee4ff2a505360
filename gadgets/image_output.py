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

from gadgets.wire import ImageArray

SERIES_OFFSETS = {"image": 0, "zero_filled": 1, "lambda": 2}
DESCRIPTIONS = {"image": "CDL-Lambda", "zero_filled": "zero-filled", "lambda": "Lambda maps"}


# ------------------------------------------------------------------------------------------------------ window
def window_limits(magnitude: np.ndarray) -> tuple[float, float]:
    """(low, high): the 0.5th and 99.5th percentiles of ``magnitude`` ((0, 1) when empty)."""
    if magnitude.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(magnitude, [0.5, 99.5])
    return low, high


def window(pixels: np.ndarray) -> tuple[float, float]:
    """(centre, width) covering the 0.5th–99.5th percentile of the magnitude."""
    magnitude = np.abs(pixels)
    if magnitude.size == 0:
        return 0.0, 1.0
    low, high = window_limits(magnitude)
    width = float(max(high - low, 1e-12))
    return float(low + width / 2), width


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``pixels`` ``(ny, nx)``: magnitude, the display window (0.5–99.5 percentile)
    mapped to 0–255."""
    magnitude = np.abs(np.asarray(pixels, dtype=np.complex64 if np.iscomplexobj(pixels) else np.float32))
    low, high = window_limits(magnitude)
    scaled = np.clip((magnitude - low) / max(high - low, 1e-12), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((scaled * 255 + 0.5).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- numbering
class ImageNumbers:
    """1-based image index per series, in the order images are built."""

    def __init__(self):
        self.last: dict[int, int] = {}

    def next(self, series: int) -> int:
        self.last[series] = self.last.get(series, 0) + 1
        return self.last[series]


def field_of_view(encoding, partitions: int) -> tuple:
    """(x, y, z) mm of one image: recon x, encoded y, the recon slab divided among a 3-D volume's partitions."""
    efov, rfov = encoding.encoded_fov, encoding.recon_fov
    z = rfov[2] / partitions if partitions > 1 else rfov[2]
    return (rfov[0], efov[1], z)


# -------------------------------------------------------------------------------------------------------- meta
def _directions(values) -> list[str]:
    return [f"{float(v):.18f}" for v in values]


def identity_meta(identity: dict, chain: str) -> dict:
    """The ``CDL_*`` keys: chain and the dictionary's and network's names and sha256."""
    return {
        "CDL_Chain": chain,
        "CDL_Dictionary": str(identity.get("dictionary", "")),
        "CDL_DictionarySHA256": str(identity.get("dictionary_sha256", "")),
        "CDL_Network": str(identity.get("network", "")),
        "CDL_NetworkSHA256": str(identity.get("network_sha256", "")),
    }


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
    centre, width = window(pixels)
    description = DESCRIPTIONS[kind]
    comment = f"{description} ({identity.get('dictionary', '?')}, {identity.get('network', '?')})"
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
        "ImageRowDir": _directions(image.read_dir),
        "ImageColumnDir": _directions(image.phase_dir),
        **identity_meta(identity, chain),
    })
    if extra_meta:
        meta.update({k: v if isinstance(v, list) else str(v) for k, v in extra_meta.items()})
    image.meta = meta
    return image


RESIDUAL_WARNING = 1.5  # data residual / noise above which the image comment warns of over-regularisation


def residual_note(outcome) -> str:
    """A warning for the image comment when the final data residual is well above the noise (the discrepancy
    principle: a fit that stops far above the noise level has regularised away measured signal)."""
    ratio = getattr(outcome, "residual_to_noise", None)
    if ratio is None or not ratio > RESIDUAL_WARNING:
        return ""
    return f"data residual {ratio:.2f}x the noise: over-regularised?"


def noise_meta(outcome) -> dict:
    """The noise level the slice was reconstructed in the units of, where it came from, and the final data
    residual relative to it (≈ 1 when the fit stops at the noise; well above 1 means over-regularisation)."""
    meta = {}
    if getattr(outcome, "noise_source", ""):
        meta["CDL_NoiseSource"] = outcome.noise_source
    if getattr(outcome, "noise_std", None) is not None:
        meta["CDL_NoiseStd"] = f"{outcome.noise_std:.6g}"
    if getattr(outcome, "residual_to_noise", None) is not None:
        meta["CDL_ResidualToNoise"] = f"{outcome.residual_to_noise:.4f}"
    return meta


def slice_images(one, outcome, params, *, identity: dict, chain: str, encoding, numbers: ImageNumbers) -> list:
    """The images of one reconstructed slice ``one`` (a :class:`gadgets.slices.SliceInput`) from its
    ``outcome`` (a :class:`recon.pipeline.SliceOutcome`): the CDL-Λ image, then, as ``params`` asks, the
    zero-filled image and the Λ maps, each in its own series."""
    fov = field_of_view(encoding, one.partitions)
    common = dict(field_of_view=fov, identity=identity, chain=chain, partition=one.partition,
                  partitions=one.partitions, slice_thickness=fov[2] if one.partitions > 1 else 0.0,
                  note="; ".join(n for n in (outcome.note, residual_note(outcome)) if n),
                  extra_meta={"CDL_Iterations": str(params.iterations), "CDL_Device": outcome.device,
                              "CDL_Readouts": str(one.readouts), **noise_meta(outcome)})
    outputs = [("image", outcome.image)]
    if params.send_zero_filled:
        outputs.append(("zero_filled", outcome.zero_filled))
    if params.send_lambda_maps and outcome.lambda_maps is not None:
        outputs.append(("lambda", np.ascontiguousarray(outcome.lambda_maps, dtype=np.float32)))
    images = []
    for kind, pixels in outputs:
        if kind != "lambda":
            pixels = pixels.astype(np.complex64) if params.output == "complex" else np.abs(pixels).astype(np.float32)
        series = params.series_index + SERIES_OFFSETS[kind]
        images.append(build_image(pixels, one.reference, kind=kind, image_index=numbers.next(series),
                                  series_index=series, **common))
    return images


# ------------------------------------------------------------------------------------------------- ImageArray
def image_header(reference, *, image_index: int, series_index: int, field_of_view: tuple, matrix: tuple,
                 channels: int = 1) -> ismrmrd.ImageHeader:
    """An ImageHeader for ImageArray output (complex64, matrix ``(x, y, z)``)."""
    source = reference if reference is not None else ismrmrd.AcquisitionHeader()
    return ismrmrd.ImageHeader.from_acquisition(
        source, version=1, data_type=ismrmrd.DATATYPE_CXFLOAT, channels=channels, matrix_size=tuple(matrix),
        field_of_view=tuple(float(v) for v in field_of_view), image_type=ismrmrd.IMTYPE_COMPLEX,
        image_index=image_index, image_series_index=series_index)


def image_array(shape: tuple, inputs: list, outcomes: dict, *, series_index: int, identity: dict, chain: str,
                encoding, numbers: ImageNumbers) -> ImageArray:
    """The ImageArray answering a ReconBit whose buffer has ``shape`` ``[RO, E1, E2, CHA, N, S, LOC]``, from its
    ``inputs`` (SliceInputs with ``array_index``) and ``outcomes`` ``{id(input): SliceOutcome}`` of those that
    were reconstructed."""
    _, _, E2, _, N, S, LOC = shape
    ny, nx = inputs[0].kspace.shape[-2:]
    data = np.zeros((nx, ny, E2, 1, N, S, LOC), np.complex64)
    headers = np.empty((N, S, LOC), dtype=object)
    metas = np.empty((N, S, LOC), dtype=object)
    fov = field_of_view(encoding, E2)
    for one in inputs:
        n, s, loc = one.array_index
        outcome = outcomes.get(id(one))
        if outcome is not None:
            data[:, :, one.partition, 0, n, s, loc] = outcome.image.T
        if headers[n, s, loc] is None:
            note = outcome.note if outcome is not None else ""
            comment = f"CDL-Lambda [{note}]" if note else "CDL-Lambda"
            headers[n, s, loc] = image_header(one.reference, image_index=numbers.next(series_index),
                                              series_index=series_index, field_of_view=fov, matrix=(nx, ny, E2))
            metas[n, s, loc] = ismrmrd.Meta({
                "GADGETRON_DataRole": "Image", "DataRole": "Image",
                "GADGETRON_ImageComment": comment, "ImageComments": comment,
                **identity_meta(identity, chain),
            }).serialize()
    meta = [metas[n, s, loc] or "" for loc in range(LOC) for s in range(S) for n in range(N)]
    return ImageArray(data=data, headers=headers, meta=meta, waveform=None, acq_headers=None)
