"""Building the ``ismrmrd.Image`` s a scanner expects: header from the acquisition, field of view from the XML
header, 1-based image index per series, and meta for Gadgetron and for MRD/FIRE/Open Recon.

Pixel layout: ``pixels`` ``(ny, nx)`` (rows = phase encoding E1, columns = readout) or ``(channels, ny, nx)``;
ISMRMRD stores ``(channels, z, y, x)`` with x along ``read_dir``, so ``matrix_size = (nx, ny, 1)``.
"""

from __future__ import annotations

import ismrmrd
import numpy as np

SERIES_OFFSETS = {"image": 0, "zero_filled": 1, "lambda": 2}
DESCRIPTIONS = {"image": "CDL-Lambda", "zero_filled": "zero-filled", "lambda": "Lambda maps"}


def window(pixels: np.ndarray) -> tuple[float, float]:
    """(centre, width) covering the 0.5th–99.5th percentile of the magnitude."""
    magnitude = np.abs(pixels)
    if magnitude.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(magnitude, [0.5, 99.5])
    width = float(max(high - low, 1e-12))
    return float(low + width / 2), width


def _directions(values) -> list[str]:
    return [f"{float(v):.18f}" for v in values]


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
        "CDL_Chain": chain,
        "CDL_Dictionary": str(identity.get("dictionary", "")),
        "CDL_DictionarySHA256": str(identity.get("dictionary_sha256", "")),
        "CDL_Network": str(identity.get("network", "")),
        "CDL_NetworkSHA256": str(identity.get("network_sha256", "")),
    })
    if extra_meta:
        meta.update({k: v if isinstance(v, list) else str(v) for k, v in extra_meta.items()})
    image.meta = meta
    return image


def image_header(reference, *, image_index: int, series_index: int, field_of_view: tuple, matrix: tuple,
                 channels: int = 1) -> ismrmrd.ImageHeader:
    """An ImageHeader for ImageArray output (complex64, matrix ``(x, y, z)``)."""
    source = reference if reference is not None else ismrmrd.AcquisitionHeader()
    return ismrmrd.ImageHeader.from_acquisition(
        source, version=1, data_type=ismrmrd.DATATYPE_CXFLOAT, channels=channels, matrix_size=tuple(matrix),
        field_of_view=tuple(float(v) for v in field_of_view), image_type=ismrmrd.IMTYPE_COMPLEX,
        image_index=image_index, image_series_index=series_index)
