"""DICOM out: ISMRMRD images → one DICOM series per image series (``cdl-lambda export-dicom IMAGES.h5 DIR``,
``cdl-lambda replay … --dicom DIR``).

**MR Image Storage** (classic single-frame, 1.2.840.10008.5.1.4.1.1.4), one file per 2-D image: every PACS, viewer
and converter (dcm2niix) reads it; Enhanced MR (multi-frame) would require acquisition attributes (contrast,
pulse-sequence and per-frame functional groups) that a reconstruction from an ISMRMRD stream cannot fill truthfully,
and many PACS still store or show it poorly. Written with **pydicom** (small, pure Python; the data sets are built
attribute by attribute, checked by ``dciodvfy`` in the tests); highdicom builds derived objects (segmentations,
parametric maps, SR) and legacy-converted enhanced images, not classic MR images from scratch.

Series: the CDL-Λ images are ``ORIGINAL\\PRIMARY``; the zero-filled images, the Λ maps (one instance per filter) and
any series holding an image marked NOT RECONSTRUCTED (meta ``CDL_NotReconstructed``) are ``DERIVED\\SECONDARY``
with their own series description. Geometry from the ISMRMRD image header, in the patient coordinate system (LPS, as
DICOM): rows run along ``phase_dir``, columns along ``read_dir``; the image centre ``position`` is the centre of pixel
``(ny // 2, nx // 2)`` (centred FFT grid), so ImagePositionPatient (centre of the first pixel) is
``position − (nx // 2)·Δx·read_dir − (ny // 2)·Δy·phase_dir`` with Δx = FOVx / nx, Δy = FOVy / ny; PixelSpacing
``[Δy, Δx]`` (row spacing first); SliceThickness = FOVz. Pixels: magnitude scaled to 12-bit unsigned integers
(0…4095 for the series' largest value; the factor is in ImageComments), the window from the image meta scaled the
same way.

UIDs are ``2.25.<uuid5>`` derived from the input: the study from the header's studyInstanceUID when it has one, else
from its measurementID or the header text, else from the image headers; series and instances from the study key, the
series index and the image index. The same input gives the same UIDs and the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import numpy as np

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_NAMESPACE = uuid.UUID("6f1c2a52-4a8e-5b0e-9d7e-2c1a3c8d9e10")  # this product's namespace for uuid5
MAX_PIXEL = 4095
BITS_STORED = 12
PATIENT_POSITIONS = {"HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS", "LFP", "LFS", "RFP", "RFS", "AFDR",
                     "AFDL", "PFDR", "PFDL"}


def uid_from(*parts) -> str:
    """A UID under 2.25 from a UUID5 of ``parts`` (deterministic)."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


@dataclass
class SeriesKind:
    image_type: list
    description: str


def series_kind(images: list) -> SeriesKind:
    """ORIGINAL/PRIMARY for CDL-Λ images; DERIVED/SECONDARY for zero-filled, Λ maps and incomplete series."""
    metas = [_meta(image) for image in images]
    described = metas[0].get("SeriesDescriptionAdditional", "") or "CDL-Lambda"
    missing = sum(1 for meta in metas if meta.get("CDL_NotReconstructed"))
    if described == "CDL-Lambda" and not missing:
        return SeriesKind(["ORIGINAL", "PRIMARY", "OTHER"], "CDL-Lambda")
    if missing:
        return SeriesKind(["DERIVED", "SECONDARY", "OTHER"],
                          f"{described} INCOMPLETE ({missing} of {len(images)} not reconstructed)")
    return SeriesKind(["DERIVED", "SECONDARY", "OTHER"], f"{described} (derived)")


def _meta(image) -> dict:
    text = image.attribute_string
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return dict(ismrmrd.Meta.deserialize(text)) if text and text.strip() else {}


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _float(value, default=None):
    try:
        return float(_first(value))
    except (TypeError, ValueError):
        return default


def _ds_number(value: float) -> str:
    """A DS value (at most 16 characters)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


def study_key(header, images: list) -> str:
    """What the study's UIDs derive from (see the module docstring)."""
    study = getattr(header, "studyInformation", None) if header is not None else None
    if study is not None and study.studyInstanceUID:
        return f"study-uid:{study.studyInstanceUID}"
    measurement = getattr(header, "measurementInformation", None) if header is not None else None
    if measurement is not None and measurement.measurementID:
        return f"measurement:{measurement.measurementID}"
    if header is not None:
        return "header:" + hashlib.sha256(ismrmrd.xsd.ToXML(header).encode()).hexdigest()
    digest = hashlib.sha256()
    for image in images:
        head = image.getHead()
        digest.update(bytes(head))
    return "images:" + digest.hexdigest()


def orientation(image) -> tuple[np.ndarray, np.ndarray, bool]:
    """(read_dir, phase_dir, known): the image's unit directions, or the axial axes with ``known`` False when the raw
    data carried none (zero vectors)."""
    read = np.array(image.read_dir, dtype=np.float64)
    phase = np.array(image.phase_dir, dtype=np.float64)
    if np.linalg.norm(read) < 0.5 or np.linalg.norm(phase) < 0.5:
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), False
    return read / np.linalg.norm(read), phase / np.linalg.norm(phase), True


def geometry(image, partition: int = 0) -> dict:
    """ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, SliceLocation of an ISMRMRD
    image (``partition`` of a 3-D image of nz partitions: FOVz / nz thick, centred at ``position`` +
    (partition − nz // 2)·FOVz / nz along the slice normal)."""
    nz, ny, nx = image.data.shape[-3:]
    read, phase, _ = orientation(image)
    normal = np.cross(read, phase)
    fov = [float(v) for v in image.field_of_view]
    dx, dy, dz = fov[0] / nx, fov[1] / ny, fov[2] / nz
    centre = np.array(image.position, dtype=np.float64) + (partition - nz // 2) * dz * normal
    corner = centre - (nx // 2) * dx * read - (ny // 2) * dy * phase
    return {"ImagePositionPatient": [_ds_number(v) for v in corner],
            "ImageOrientationPatient": [_ds_number(v) for v in (*read, *phase)],
            "PixelSpacing": [_ds_number(dy), _ds_number(dx)],
            "SliceThickness": _ds_number(dz),
            "SliceLocation": _ds_number(float(np.dot(centre, normal)))}


def _header_value(header, *path, default=""):
    value = header
    for name in path:
        value = getattr(value, name, None) if value is not None else None
    if value is None:
        return default
    return getattr(value, "value", value)  # enums


def _person_name(text: str) -> str:
    return str(text or "")[:64]


def software_versions(meta: dict) -> list[str]:
    from cdl_lambda.gadgets.openrecon_label import package_version
    versions = [f"cdl-lambda {package_version()}"]
    for key, label in (("CDL_Network", "network"), ("CDL_Dictionary", "dictionary")):
        name = _first(meta.get(key))
        if name:
            sha = str(_first(meta.get(key + "SHA256")) or "")[:12]
            versions.append(f"{label} {name}" + (f" {sha}" if sha else ""))
    return [v[:64] for v in versions]


def dataset_for(image, channel: int, partition: int = 0, *, header, kind: SeriesKind, series_number: int,
                instance_number: int, study_uid: str, series_uid: str, frame_uid: str, scale: float):
    """The pydicom data set of one channel of one partition of one ISMRMRD image."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = _meta(image)
    instance_uid = uid_from(study_uid, series_uid, instance_number)
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    file_meta.MediaStorageSOPInstanceUID = instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=file_meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = instance_uid
    ds.ImageType = kind.image_type
    # patient and study (type 2: present, empty when the header has nothing)
    ds.PatientName = _person_name(_header_value(header, "subjectInformation", "patientName"))
    ds.PatientID = str(_header_value(header, "subjectInformation", "patientID"))[:64]
    birth = _header_value(header, "subjectInformation", "patientBirthdate")
    ds.PatientBirthDate = str(birth).replace("-", "")[:8] if birth else ""
    sex = str(_header_value(header, "subjectInformation", "patientGender"))
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    ds.StudyInstanceUID = study_uid
    study_date = _header_value(header, "studyInformation", "studyDate")
    ds.StudyDate = str(study_date).replace("-", "")[:8] if study_date else ""
    study_time = _header_value(header, "studyInformation", "studyTime")
    ds.StudyTime = str(study_time).replace(":", "")[:13] if study_time else ""
    ds.ReferringPhysicianName = _person_name(_header_value(header, "studyInformation", "referringPhysicianName"))
    ds.StudyID = str(_header_value(header, "studyInformation", "studyID"))[:16]
    ds.AccessionNumber = str(_header_value(header, "studyInformation", "accessionNumber"))[:16]
    # series, frame of reference, equipment
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = kind.description[:64]
    body_part = str(_header_value(header, "studyInformation", "bodyPartExamined")).upper()[:16]
    if body_part:
        ds.BodyPartExamined = body_part
    else:
        ds.Laterality = ""  # unknown (the header names no body part)
    protocol = _header_value(header, "measurementInformation", "protocolName")
    if protocol:
        ds.ProtocolName = str(protocol)[:64]
    position = str(_header_value(header, "measurementInformation", "patientPosition"))
    ds.PatientPosition = position if position in PATIENT_POSITIONS else ""
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = str(_header_value(header, "acquisitionSystemInformation", "systemVendor"))[:64]
    model = _header_value(header, "acquisitionSystemInformation", "systemModel")
    if model:
        ds.ManufacturerModelName = str(model)[:64]
    institution = _header_value(header, "acquisitionSystemInformation", "institutionName")
    if institution:
        ds.InstitutionName = str(institution)[:64]
    ds.SoftwareVersions = software_versions(meta)
    # image
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = int(image.repetition) + 1
    for name, value in geometry(image, partition).items():
        setattr(ds, name, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels = np.abs(np.asarray(image.data[channel, partition]))
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, BITS_STORED, BITS_STORED - 1, 0
    stored = np.clip(np.rint(np.nan_to_num(pixels) * scale), 0, MAX_PIXEL).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    centre, width = _float(meta.get("WindowCenter")), _float(meta.get("WindowWidth"))
    if centre is not None and width is not None and width > 0 and image.data.shape[0] == 1:
        ds.WindowCenter, ds.WindowWidth = _ds_number(centre * scale), _ds_number(max(width * scale, 1.0))
    comment = str(_first(meta.get("ImageComments")) or "")
    if not orientation(image)[2]:
        comment += " [the raw data carried no orientation: axial axes assumed]"
    if image.data.shape[0] > 1:
        comment += f" [filter {channel}]"
    if image.data.shape[1] > 1:
        comment += f" [partition {partition + 1} of {image.data.shape[1]}]"
    ds.ImageComments = f"{comment} [pixel = value x {scale:.6g}]"[:10240]
    if kind.image_type[0] == "DERIVED":
        ds.DerivationDescription = kind.description[:1024]
    # MR image module (what the header says; the sequence itself is not known to the reconstruction)
    ds.ScanningSequence = "RM"  # research mode
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D" if image.data.shape[1] > 1 or (header is not None and _encoded_z(header) > 1) else "2D"
    ds.RepetitionTime = _sequence_value(header, "TR")
    ds.EchoTime = _sequence_value(header, "TE")
    ds.EchoTrainLength = ""
    field = _header_value(header, "acquisitionSystemInformation", "systemFieldStrength_T", default=None)
    if field:
        ds.MagneticFieldStrength = _ds_number(float(field))
    frequency = _header_value(header, "experimentalConditions", "H1resonanceFrequency_Hz", default=None)
    if frequency:
        ds.ImagingFrequency = _ds_number(float(frequency) / 1e6)
    return ds


def _encoded_z(header) -> int:
    try:
        return int(header.encoding[0].encodedSpace.matrixSize.z)
    except (AttributeError, IndexError, TypeError, ValueError):
        return 1


def _sequence_value(header, name: str) -> str:
    values = _header_value(header, "sequenceParameters", name, default=None)
    value = _first(values) if isinstance(values, list) else values
    return _ds_number(float(value)) if value not in (None, "") else ""


def export(images: list, folder: str | Path, header=None) -> list[Path]:
    """Write ``images`` (ismrmrd.Image, any series) to ``folder`` as DICOM: ``<series>/<instance>.dcm``, one
    subfolder per image series; ``header``: the scan's ismrmrdHeader (None: patient/study fields stay empty).
    Returns the files written."""
    folder = Path(folder)
    groups: dict[int, list] = {}
    for image in images:
        groups.setdefault(int(image.image_series_index), []).append(image)
    key = study_key(header, images)
    explicit = getattr(getattr(header, "studyInformation", None), "studyInstanceUID", None)
    study_uid = explicit or uid_from(key, "study")
    frame = getattr(getattr(header, "measurementInformation", None), "frameOfReferenceUID", None)
    frame_uid = frame or uid_from(key, "frame-of-reference")
    written = []
    for series_index, members in sorted(groups.items()):
        members.sort(key=lambda im: (int(im.image_index), int(im.slice), int(im.repetition)))
        kind = series_kind(members)
        series_uid = uid_from(key, "series", series_index)
        peak = max(float(np.nanmax(np.abs(im.data))) if im.data.size else 0.0 for im in members)
        scale = MAX_PIXEL / peak if peak > 0 and np.isfinite(peak) else 1.0
        target = folder / f"series_{series_index:03d}"
        target.mkdir(parents=True, exist_ok=True)
        number = 0
        for image in members:
            for channel, partition in np.ndindex(*image.data.shape[:2]):
                number += 1
                ds = dataset_for(image, channel, partition, header=header, kind=kind, series_number=series_index,
                                 instance_number=number, study_uid=study_uid, series_uid=series_uid,
                                 frame_uid=frame_uid, scale=scale)
                path = target / f"{number:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                written.append(path)
        if not all(orientation(image)[2] for image in members):
            log.warning("series %d: the raw data carried no orientation; the axial axes are assumed (said in "
                        "ImageComments)", series_index)
        log.info("series %d (%s): %d DICOM file(s) in %s", series_index, kind.description, number, target)
    return written


def export_result(result, folder: str | Path) -> list[Path]:
    """:func:`export` of a :class:`gadgets.replay.ReplayResult` (its images and the header it sent)."""
    from cdl_lambda.gadgets.wire import parse_ismrmrd_header
    header = parse_ismrmrd_header(result.header) if result.header else None
    written = export(result.images, folder, header)
    log.info("%d DICOM file(s) in %s", len(written), folder)
    return written


def read_images(path: str | Path, group: str = "dataset") -> tuple[list, object]:
    """(images of every ``image_*`` series, ismrmrdHeader or None) of an ISMRMRD images file; ValueError naming the
    problem."""
    import h5py
    from cdl_lambda.gadgets.wire import parse_ismrmrd_header
    try:
        with h5py.File(path, "r") as handle:
            if group not in handle:
                raise ValueError(f"{path} has no group {group!r} (groups: {', '.join(handle) or 'none'})")
            names = [n for n in handle[group] if n.startswith("image_")]
            xml = handle[group]["xml"][0] if "xml" in handle[group] else None
    except OSError as error:
        raise ValueError(f"cannot read {path}: not a readable HDF5 file ({error})") from None
    if not names:
        raise ValueError(f"{path}: group {group!r} holds no image_<series>")
    images = []
    with ismrmrd.Dataset(str(path), group, create_if_needed=False) as dataset:
        for name in sorted(names):
            images += [dataset.read_image(name, i) for i in range(dataset.number_of_images(name))]
    header = parse_ismrmrd_header(xml) if xml is not None else None
    return images, header


# --------------------------------------------------------------------------------------------------------- CLI
def check_folder(folder: str | Path) -> None:
    """:class:`gadgets.replay.UsageError` unless ``folder`` is (or can be made) a writable folder."""
    from cdl_lambda.gadgets.replay import UsageError
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--dicom {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--dicom {folder}: cannot create it: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--dicom {folder} is not writable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", help="ISMRMRD images file (what replay or an MRD client wrote)")
    parser.add_argument("folder", help="output folder: one subfolder per series, one .dcm per image")
    parser.add_argument("--group", default="dataset", help="group holding image_<series> (and xml)")
    parser.add_argument("--header", default=None,
                        help="ISMRMRD raw file whose header gives patient, study and scanner fields "
                             "(default: the images file's own xml, if any)")


def main(args) -> int:
    """Exit status 0: written; 2: the input cannot be read."""
    try:
        check_folder(args.folder)
        images, header = read_images(args.images, args.group)
        if args.header:
            from cdl_lambda.gadgets.recording import read_recording
            from cdl_lambda.gadgets.wire import parse_ismrmrd_header
            header = parse_ismrmrd_header(read_recording(args.header)[0])
    except ValueError as error:
        log.error("%s", error)
        return 2
    written = export(images, args.folder, header)
    log.info("%d DICOM file(s) in %s", len(written), args.folder)
    return 0
