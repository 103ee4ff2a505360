"""MRD version 2 (the yardl-based format of ``mrd-python``) ↔ ISMRMRD 1, so that the rest of the product keeps
streaming ``ismrmrd`` objects.

- Header: the two headers are the same schema in two spellings (``fieldOfView_mm`` / ``field_of_view_mm``,
  ``H1resonanceFrequency_Hz`` / ``h1resonance_frequency_hz``, ``TR`` / ``t_r``); :func:`convert` walks the target
  type's annotations and matches fields by name without case or underscores, enums by member name, dates and times
  through their text form. Every field is mapped both ways (a test round-trips a full header).
- Acquisitions: flags keep their bit positions (MRD 2's ``AcquisitionFlags`` are ISMRMRD's flag n at bit n − 1:
  noise scans, calibration lines, last-in-slice … pass unchanged); counters (``idx``), time stamps, channel order
  (↔ ``channel_mask``, active/available channels), discard, centre sample, directions, positions, user values
  copied; an MRD 2 counter that is absent becomes 0, as ISMRMRD 1 has no "absent". Data ``(coils, samples)``
  complex64 in both; the trajectory is ``(dims, samples)`` in MRD 2 and ``(samples, dims)`` in ISMRMRD 1.
- Images: header fields (``col_dir``/``line_dir`` = ``read_dir``/``phase_dir``), data ``(channels, z, y, x)`` in
  both, meta as string/int/float lists.

Reading: :func:`read_mrd2` gives what :func:`gadgets.recording.read_recording` gives (header XML, count or None,
iterator of ``ismrmrd.Acquisition``), from a ``.mrd`` file or ``-`` (stdin), without reading it all first.
"""

from __future__ import annotations

import datetime as _datetime
import enum
import logging
import sys
import types
import typing
from pathlib import Path

import ismrmrd
import numpy as np

log = logging.getLogger(__name__)

MRD2_SUFFIXES = (".mrd", ".mrd2", ".bin2")


def is_mrd2_path(path) -> bool:
    """Whether ``path`` names an MRD 2 stream: ``-`` (stdin) or a ``.mrd`` file."""
    return str(path) == "-" or Path(str(path)).suffix.lower() in MRD2_SUFFIXES


# ------------------------------------------------------------------------------------------------------ header
def _norm(name: str) -> str:
    return name.replace("_", "").lower()


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return getattr(cls, "__annotations__", {})


def _unwrap_optional(kind):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def convert(value, kind):
    """``value`` (an MRD 2 or ISMRMRD 1 header object or part of one) as an instance of ``kind``."""
    kind = _unwrap_optional(kind)
    if value is None:
        return None
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind) or (object,)
        values = value if isinstance(value, (list, tuple)) else [value]
        return [convert(v, item) for v in values]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        name = value.name if isinstance(value, enum.Enum) else str(value)
        for member in kind:
            if _norm(member.name) == _norm(name) or str(member.value) == str(getattr(value, "value", value)):
                return member
        raise ValueError(f"{name!r} is not a {kind.__name__}")
    if isinstance(kind, type) and kind.__module__.startswith(("mrd", "ismrmrd")) and _hints(kind):
        fields = _hints(kind)
        sources = {_norm(n): n for n in _source_fields(value)}
        arguments = {}
        for name, field_kind in fields.items():
            source = sources.get(_norm(name))
            if source is None:
                continue
            converted = convert(getattr(value, source), field_kind)
            if converted is not None and converted != []:
                arguments[name] = converted
        return kind(**arguments)
    return _scalar(value, kind)


def _source_fields(value) -> list[str]:
    names = list(_hints(type(value)))
    return names or [n for n in vars(value) if not n.startswith("_")]


def _scalar(value, kind):
    from xsdata.models.datatype import XmlDate, XmlTime
    if kind is XmlDate:
        return XmlDate.from_string(str(value))
    if kind is XmlTime:
        return XmlTime.from_string(_time_text(value))
    if kind is _datetime.date:
        return _datetime.date.fromisoformat(str(value))
    if getattr(kind, "__name__", "") == "Time" and kind.__module__.startswith("mrd"):
        return kind.parse(_time_text(value))
    if kind is bytes:
        return value if isinstance(value, bytes) else str(value).encode()
    if kind is str:
        if isinstance(value, enum.Enum):  # e.g. MRD 2's PatientGender enum, a plain string in ISMRMRD 1
            return value.name
        return value.decode() if isinstance(value, bytes) else str(value)
    if kind in (int, float, bool):
        return kind(value)
    return value


def _time_text(value) -> str:
    text = str(value)
    if hasattr(value, "numpy_value"):  # mrd Time
        nanoseconds = int(value.numpy_value / np.timedelta64(1, "ns"))
        seconds, nanoseconds = divmod(nanoseconds, 1_000_000_000)
        text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if nanoseconds:
            text += f".{nanoseconds:09d}".rstrip("0")
    return text


def header_to_xml(header) -> bytes:
    """An MRD 2 ``mrd.Header`` as ISMRMRD 1 XML."""
    return ismrmrd.xsd.ToXML(convert(header, ismrmrd.xsd.ismrmrdHeader)).encode()


def header_from_xml(xml: bytes | str):
    """ISMRMRD 1 XML as an MRD 2 ``mrd.Header``."""
    import mrd
    from cdl_lambda.gadgets.wire import parse_ismrmrd_header
    return convert(parse_ismrmrd_header(xml), mrd.Header)


# ------------------------------------------------------------------------------------------------ acquisitions
COUNTERS = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast", "phase", "repetition",
            "set", "segment")


def _fixed(values, size: int, dtype) -> np.ndarray:
    out = np.zeros(size, dtype)
    values = list(values or [])[:size]
    out[:len(values)] = values
    return out


def acquisition_to_ismrmrd(acq) -> ismrmrd.Acquisition:
    """An MRD 2 ``mrd.Acquisition`` as ``ismrmrd.Acquisition``."""
    head = acq.head
    data = np.asarray(acq.data, dtype=np.complex64)
    coils, samples = data.shape
    trajectory = np.asarray(acq.trajectory, dtype=np.float32)
    dims = trajectory.shape[0] if trajectory.size else 0
    out = ismrmrd.AcquisitionHeader()
    out.version = 1
    out.flags = int(head.flags)
    out.measurement_uid = int(head.measurement_uid or 0)
    out.scan_counter = int(head.scan_counter or 0)
    out.acquisition_time_stamp = int(head.acquisition_time_stamp or 0)
    out.physiology_time_stamp[:] = _fixed(head.physiology_time_stamp, 3, np.uint32)
    out.number_of_samples = samples
    out.available_channels = coils
    out.active_channels = coils
    mask = 0
    for channel in head.channel_order or []:  # no channel order: no mask (as ISMRMRD 1 files without one)
        mask |= 1 << int(channel)
    out.channel_mask[:] = [(mask >> (64 * i)) & (2**64 - 1) for i in range(16)]
    out.discard_pre = int(head.discard_pre or 0)
    out.discard_post = int(head.discard_post or 0)
    out.center_sample = int(head.center_sample or 0)
    out.encoding_space_ref = int(head.encoding_space_ref or 0)
    out.trajectory_dimensions = dims
    out.sample_time_us = float(head.sample_time_us or 0.0)
    for name in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
        getattr(out, name)[:] = np.asarray(getattr(head, name), dtype=np.float32)
    for name in COUNTERS:
        setattr(out.idx, name, int(getattr(head.idx, name) or 0))
    out.idx.user[:] = _fixed(head.idx.user, 8, np.uint16)
    out.user_int[:] = _fixed(head.user_int, 8, np.int32)
    out.user_float[:] = _fixed(head.user_float, 8, np.float32)
    result = ismrmrd.Acquisition(out)
    result.data[:] = data
    if dims:
        result.traj[:] = trajectory.T
    return result


def acquisition_from_ismrmrd(acq: ismrmrd.Acquisition):
    """An ``ismrmrd.Acquisition`` as MRD 2 ``mrd.Acquisition``."""
    import mrd
    head = acq.getHead()
    mask = sum(int(word) << (64 * i) for i, word in enumerate(head.channel_mask))
    order = [c for c in range(mask.bit_length()) if mask >> c & 1][:head.active_channels]
    idx = mrd.EncodingCounters(**{name: int(getattr(head.idx, name)) for name in COUNTERS},
                               user=[int(v) for v in head.idx.user])
    out = mrd.AcquisitionHeader(
        flags=mrd.AcquisitionFlags(int(head.flags)), idx=idx, measurement_uid=int(head.measurement_uid),
        scan_counter=int(head.scan_counter), acquisition_time_stamp=int(head.acquisition_time_stamp),
        physiology_time_stamp=[int(v) for v in head.physiology_time_stamp], channel_order=order,
        discard_pre=int(head.discard_pre), discard_post=int(head.discard_post), center_sample=int(head.center_sample),
        encoding_space_ref=int(head.encoding_space_ref), sample_time_us=float(head.sample_time_us),
        position=np.array(head.position, np.float32), read_dir=np.array(head.read_dir, np.float32),
        phase_dir=np.array(head.phase_dir, np.float32), slice_dir=np.array(head.slice_dir, np.float32),
        patient_table_position=np.array(head.patient_table_position, np.float32),
        user_int=[int(v) for v in head.user_int], user_float=[float(v) for v in head.user_float])
    trajectory = np.ascontiguousarray(np.asarray(acq.traj, np.float32).T) if head.trajectory_dimensions else None
    return mrd.Acquisition(head=out, data=np.array(acq.data, np.complex64), trajectory=trajectory)


# ------------------------------------------------------------------------------------------------------ images
IMAGE_COUNTERS = ("average", "slice", "contrast", "phase", "repetition", "set")


def image_from_ismrmrd(image: ismrmrd.Image):
    """An ``ismrmrd.Image`` as MRD 2 ``mrd.Image`` (float32 → ImageFloat, complex64 → ImageComplexFloat …)."""
    import mrd
    head = image.getHead()
    out = mrd.ImageHeader(
        flags=mrd.ImageFlags(int(head.flags)), measurement_uid=int(head.measurement_uid),
        field_of_view=np.array(head.field_of_view, np.float32), position=np.array(head.position, np.float32),
        col_dir=np.array(head.read_dir, np.float32), line_dir=np.array(head.phase_dir, np.float32),
        slice_dir=np.array(head.slice_dir, np.float32),
        patient_table_position=np.array(head.patient_table_position, np.float32),
        **{name: int(getattr(head, name)) for name in IMAGE_COUNTERS},
        acquisition_time_stamp=int(head.acquisition_time_stamp),
        physiology_time_stamp=[int(v) for v in head.physiology_time_stamp],
        image_type=mrd.ImageType(int(head.image_type) or 1), image_index=int(head.image_index),
        image_series_index=int(head.image_series_index), user_int=[int(v) for v in head.user_int],
        user_float=[float(v) for v in head.user_float])
    text = image.attribute_string
    meta = ismrmrd.Meta.deserialize(text.decode() if isinstance(text, bytes) else text) if text else {}
    mrd_meta = {str(k): [mrd.ImageMetaValue.String(str(v)) for v in (vs if isinstance(vs, list) else [vs])]
                for k, vs in dict(meta).items()}
    data = np.array(image.data)
    return mrd.Image[data.dtype.type](head=out, data=data, meta=mrd_meta)


def image_to_ismrmrd(image) -> ismrmrd.Image:
    """An MRD 2 ``mrd.Image`` as ``ismrmrd.Image``."""
    head = image.head
    data = np.ascontiguousarray(image.data)
    out = ismrmrd.Image.from_array(data, transpose=False)
    out.field_of_view = tuple(float(v) for v in head.field_of_view)
    out.position = tuple(float(v) for v in head.position)
    out.read_dir = tuple(float(v) for v in head.col_dir)
    out.phase_dir = tuple(float(v) for v in head.line_dir)
    out.slice_dir = tuple(float(v) for v in head.slice_dir)
    out.patient_table_position = tuple(float(v) for v in head.patient_table_position)
    for name in IMAGE_COUNTERS:
        setattr(out, name, int(getattr(head, name) or 0))
    out.flags = int(head.flags)
    out.measurement_uid = int(head.measurement_uid)
    out.image_type = int(head.image_type.value)
    out.image_index = int(head.image_index or 0)
    out.image_series_index = int(head.image_series_index or 0)
    meta = ismrmrd.Meta()
    for key, values in image.meta.items():
        texts = [str(v.value) for v in values]
        meta[key] = texts if len(texts) > 1 else texts[0]
    out.attribute_string = meta.serialize()
    return out


def stream_item(image):
    """The ``mrd.StreamItem`` case for an MRD 2 image by its pixel type."""
    import mrd
    cases = {np.float32: mrd.StreamItem.ImageFloat, np.complex64: mrd.StreamItem.ImageComplexFloat,
             np.uint16: mrd.StreamItem.ImageUint16, np.int16: mrd.StreamItem.ImageInt16,
             np.float64: mrd.StreamItem.ImageDouble, np.int32: mrd.StreamItem.ImageInt32,
             np.uint32: mrd.StreamItem.ImageUint32, np.complex128: mrd.StreamItem.ImageComplexDouble}
    return cases[image.data.dtype.type](image)


# ----------------------------------------------------------------------------------------------- reading files
def open_mrd2(path):
    """(reader, ``mrd.Header``) of an MRD 2 stream (``-``: stdin); ValueError naming the problem."""
    import mrd
    source = sys.stdin.buffer if str(path) == "-" else str(path)
    try:
        reader = mrd.BinaryMrdReader(source)
        header = reader.read_header()
    except (OSError, ValueError, EOFError, RuntimeError) as error:
        raise ValueError(f"{path}: not an MRD 2 stream ({error})") from None
    if header is None:
        raise ValueError(f"{path}: the MRD 2 stream has no header")
    return reader, header


def read_input(path, dataset: str = "dataset"):
    """:func:`read_mrd2` for an MRD 2 path (``.mrd``, ``-``), else :func:`gadgets.recording.read_recording`."""
    if is_mrd2_path(path):
        return read_mrd2(path)
    from cdl_lambda.gadgets.recording import read_recording
    return read_recording(path, dataset)


def read_mrd2(path, opened=None) -> tuple[bytes, int | None, typing.Iterator[ismrmrd.Acquisition]]:
    """(header XML, None, acquisitions as ``ismrmrd.Acquisition``) of an MRD 2 stream: ``path`` a file or ``-``
    for stdin (``opened``: what :func:`open_mrd2` returned). Acquisitions stream as they are read; other items
    (waveforms, images) are skipped with one log line per kind. ValueError when the stream does not start with an
    MRD 2 header."""
    import mrd
    reader, header = opened or open_mrd2(path)
    xml = header_to_xml(header)

    def acquisitions():
        skipped: dict[str, int] = {}
        try:
            for item in reader.read_data():
                if isinstance(item, mrd.StreamItem.Acquisition):
                    yield acquisition_to_ismrmrd(item.value)
                else:
                    name = type(item).__name__
                    if name not in skipped:
                        log.warning("%s: skipping %s items (only acquisitions are reconstructed)", path, name)
                    skipped[name] = skipped.get(name, 0) + 1
        finally:
            reader.close()

    return xml, None, acquisitions()


def save_mrd2(result, out: Path, previews: Path | None) -> dict[int, int]:
    """``cdl-lambda replay`` output as an MRD 2 stream file: written beside ``out`` and renamed over it (a failure
    leaves the old output as it was), then the PNG previews; returns the image count per series."""
    import os
    import tempfile
    from cdl_lambda.gadgets.output_files import write_previews
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        write_mrd2_images(result.images, result.header or None, Path(temporary))
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    if previews is not None:
        write_previews(result.images, previews, out)
    counts: dict[int, int] = {}
    for image in result.images:
        counts[int(image.image_series_index)] = counts.get(int(image.image_series_index), 0) + 1
    return counts


def write_mrd2_images(images: list, header_xml: bytes | None, target) -> int:
    """Write ``images`` (``ismrmrd.Image``) as an MRD 2 stream to ``target`` (a path or a binary stream) with the
    scan's header; returns the count."""
    import mrd
    header = header_from_xml(header_xml) if header_xml else None
    with mrd.BinaryMrdWriter(target if not isinstance(target, Path) else str(target)) as writer:
        writer.write_header(header)
        writer.write_data(stream_item(image_from_ismrmrd(image)) for image in images)
    return len(images)


def convert_file(source, target) -> int:
    """An ISMRMRD 1 raw file (HDF5) as an MRD 2 stream file (``-``: stdout); returns the acquisitions written."""
    import mrd
    from cdl_lambda.gadgets.recording import read_recording
    xml, _, acquisitions = read_recording(source)
    count = 0

    def items():
        nonlocal count
        for acquisition in acquisitions:
            count += 1
            yield mrd.StreamItem.Acquisition(acquisition_from_ismrmrd(acquisition))

    with mrd.BinaryMrdWriter(sys.stdout.buffer if str(target) == "-" else str(target)) as writer:
        writer.write_header(header_from_xml(xml))
        writer.write_data(items())
    return count


def main(argv: list[str] | None = None) -> int:
    """``python -m cdl_lambda.gadgets.mrd2 SCAN.h5 SCAN.mrd``: an ISMRMRD 1 raw file as an MRD 2 stream."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m cdl_lambda.gadgets.mrd2", description=main.__doc__)
    parser.add_argument("source", help="ISMRMRD 1 raw file (.h5)")
    parser.add_argument("target", help="MRD 2 stream file (.mrd), - for stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        count = convert_file(args.source, args.target)
    except ValueError as error:
        log.error("%s", error)
        return 2
    log.info("%d acquisition(s) written to %s", count, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
