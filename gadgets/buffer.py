"""Acquisition bookkeeping (numpy only, no torch): noise scans, calibration lines and k-space grouped per image.

A scanner streams readouts one by one. :class:`AcquisitionBuffer` files each into the k-space of its group, keyed by
the ISMRMRD counters (slice, contrast, phase, repetition, set, average), and hands a group out as soon as the readout
flagged ``ACQ_LAST_IN_SLICE`` arrives (all open groups at ``ACQ_LAST_IN_MEASUREMENT`` or the end of the stream), so
memory holds only the groups still being acquired.

Layout of a finished :class:`SliceGroup`: ``kspace`` ``(coils, nz, ny, nx_raw)`` complex64, centred (the k-space centre
line ``E1 = center`` at row ``ny // 2``, partition ``E2 = center`` at ``nz // 2``, the readout's ``center_sample`` at
column ``nx_raw // 2``), zeros where nothing was measured; ``mask`` ``(nz, ny, nx_raw)`` bool of measured samples;
readout still oversampled and not prewhitened (the handler does both with ``recon.coils``). nz = 1 for 2-D scans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import numpy as np

from cdl_lambda.gadgets.errors import InputError

log = logging.getLogger(__name__)

IGNORED_FLAGS = {
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator", ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan", ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "HP feedback",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "RT feedback", ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA: "surface coil scan",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation reference",
}
COUNTERS = ("slice", "contrast", "phase", "repetition", "set", "average")
MAX_MATRIX_VALUES = 2**27          # encoded voxels (x·y·z) one image may have
MAX_OPEN_BYTES = 8 * 2**30         # k-space held in open groups before new ones are refused


class GroupKey(NamedTuple):
    slice: int
    contrast: int
    phase: int
    repetition: int
    set: int
    average: int

    def describe(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in zip(self._fields, self))


def _value(obj, *path, default=None):
    for name in path:
        obj = getattr(obj, name, None) if obj is not None else None
    return default if obj is None else obj


@dataclass
class Encoding:
    """What the buffer needs from the ISMRMRD header's first encoding (sizes in samples, fields of view in mm)."""

    nx_raw: int            # encoded readout samples (with oversampling)
    ny: int                # phase-encoding rows (E1)
    nz: int                # partitions (E2); 1 for 2-D
    recon_matrix: tuple    # (x, y, z)
    oversampling: int      # readout oversampling factor (encoded/recon field of view)
    e1_center: int
    e2_center: int
    encoded_fov: tuple     # (x, y, z) mm
    recon_fov: tuple       # (x, y, z) mm
    limits: dict           # counter name → maximum (only those present in the header)
    calibration_mode: str  # "embedded", "interleaved", "separate", ... or "" when absent
    receiver_channels: int | None
    image_matrix: tuple = (0, 0)        # (y, x) k-space grid the images are reconstructed on
    image_fov: tuple = (0.0, 0.0, 0.0)  # (x, y, z) mm of that grid (the recon space when the FOVs agree)

    @property
    def is_3d(self) -> bool:
        return self.nz > 1


def readout_oversampling(nx_raw: int, recon_x: int, encoded_fov_x: float, recon_fov_x: float) -> int:
    """The readout oversampling factor, decided as Gadgetron's ``RemoveROOversamplingGadget`` does: from the fields
    of view, encoded FOV / recon FOV along x (1 when they agree), whatever the matrix sizes; from the matrices
    (raw samples / recon x, when the raw readout is longer) only when the header gives no fields of view.
    InputError when the factor is not an integer or does not divide the readout."""
    if encoded_fov_x > 0 and recon_fov_x > 0:
        ratio = encoded_fov_x / recon_fov_x
    elif recon_x and nx_raw > recon_x:
        ratio = nx_raw / recon_x
    else:
        return 1
    factor = max(1, int(round(ratio)))
    if ratio < 1 - 1e-3 or abs(ratio - factor) > 0.01 * factor:
        raise InputError(f"encoded readout field of view {encoded_fov_x} mm is not an integer multiple of the recon "
                         f"field of view {recon_fov_x} mm")
    if nx_raw % factor:
        raise InputError(f"readout of {nx_raw} samples is not divisible by the oversampling factor {factor}")
    return factor


def image_grid(encoded: tuple, recon: tuple, encoded_fov: tuple, recon_fov: tuple) -> tuple[tuple, tuple]:
    """(matrix (y, x), field of view (x, y, z) mm) the images are reconstructed on: along y and x (``encoded``
    (y, x) samples over ``encoded_fov`` (y, x) mm, oversampling removed), the recon matrix when the encoded and
    recon fields of view agree (k-space zero-padded or cropped around its centre: Gadgetron's zero-filling to the
    recon space), else the encoded grid as it is."""
    matrix, fov = [], []
    for axis, (n, r, efov, rfov) in enumerate(zip(encoded, recon, encoded_fov, (recon_fov[1], recon_fov[0]))):
        agree = r > 0 and (efov <= 0 or rfov <= 0 or abs(efov - rfov) <= 0.01 * rfov)
        matrix.append(r if agree else n)
        fov.append(rfov if agree and rfov > 0 else efov)
    return (matrix[0], matrix[1]), (fov[1], fov[0], recon_fov[2])


def read_encoding(header) -> Encoding:
    """Parse ``header`` (``ismrmrd.xsd.ismrmrdHeader``); InputError naming the missing or unsupported field."""
    encodings = _value(header, "encoding") or []
    if not encodings:
        raise InputError("ISMRMRD header has no <encoding> section")
    enc = encodings[0]
    trajectory = _value(enc, "trajectory")
    trajectory = getattr(trajectory, "value", trajectory)
    if trajectory is not None and str(trajectory).lower() != "cartesian":
        raise InputError(f"trajectory {trajectory!r} is not supported: only Cartesian sampling can be reconstructed")
    size = _value(enc, "encodedSpace", "matrixSize")
    rsize = _value(enc, "reconSpace", "matrixSize")
    if size is None or not size.x or not size.y:
        raise InputError("ISMRMRD header lacks encodedSpace/matrixSize (x and y)")
    rsize = rsize if rsize is not None and rsize.x and rsize.y else size
    efov = _value(enc, "encodedSpace", "fieldOfView_mm")
    rfov = _value(enc, "reconSpace", "fieldOfView_mm") or efov
    encoded_fov = (float(efov.x), float(efov.y), float(efov.z)) if efov is not None else (0.0, 0.0, 0.0)
    recon_fov = (float(rfov.x), float(rfov.y), float(rfov.z)) if rfov is not None else encoded_fov
    nx_raw, ny, nz = int(size.x), int(size.y), max(int(size.z or 1), 1)
    if nx_raw * ny * nz > MAX_MATRIX_VALUES:
        raise InputError(f"encoded matrix {nx_raw}×{ny}×{nz} is larger than the {MAX_MATRIX_VALUES} samples supported")
    oversampling = readout_oversampling(nx_raw, int(rsize.x), encoded_fov[0], recon_fov[0])
    image_matrix, image_fov = image_grid((ny, nx_raw // oversampling), (int(rsize.y), int(rsize.x)),
                                         (encoded_fov[1], encoded_fov[0] / oversampling), recon_fov)
    limits_node = _value(enc, "encodingLimits")
    limits = {}
    e1_center, e2_center = ny // 2, nz // 2
    if limits_node is None:
        log.warning("ISMRMRD header lacks encodingLimits: assuming the k-space centre at row %d", e1_center)
    else:
        e1 = _value(limits_node, "kspace_encoding_step_1")
        e2 = _value(limits_node, "kspace_encoding_step_2")
        if e1 is not None and e1.center is not None:
            e1_center = int(e1.center)
        if e2 is not None and e2.center is not None and nz > 1:
            e2_center = int(e2.center)
        for name in COUNTERS:
            limit = _value(limits_node, name)
            if limit is not None and limit.maximum is not None:
                limits[name] = int(limit.maximum)
    mode = _value(enc, "parallelImaging", "calibrationMode")
    mode = str(getattr(mode, "value", mode) or "")
    channels = _value(header, "acquisitionSystemInformation", "receiverChannels")
    return Encoding(nx_raw=nx_raw, ny=ny, nz=nz, recon_matrix=(int(rsize.x), int(rsize.y), max(int(rsize.z or 1), 1)),
                    oversampling=oversampling, image_matrix=image_matrix, image_fov=image_fov, e1_center=e1_center,
                    e2_center=e2_center, encoded_fov=encoded_fov,
                    recon_fov=recon_fov, limits=limits, calibration_mode=mode,
                    receiver_channels=int(channels) if channels else None)


@dataclass
class SliceGroup:
    """The k-space of one image (or one 3-D volume) as acquired; see the module docstring for the layout.

    ``calibration``/``calibration_mask``: the calibration lines for coil maps (same layout), from this group or the
    latest earlier group of the same slice; None for a single coil or when none were sent. ``reference``: the header of
    the readout nearest the k-space centre (position, directions, counters, time stamps for the image)."""

    key: GroupKey
    kspace: np.ndarray
    mask: np.ndarray
    reference: ismrmrd.AcquisitionHeader | None = None
    reference_distance: int = 1 << 30
    calibration: np.ndarray | None = None
    calibration_mask: np.ndarray | None = None
    sample_time_us: float = 0.0
    imaging_lines: int = 0
    readouts: int = 0      # readouts filed into this group (imaging and calibration)
    errors: list = field(default_factory=list)


class AcquisitionBuffer:
    """Files acquisitions into :class:`SliceGroup` s; :meth:`add` returns the groups a readout completes.

    Noise readouts (``ACQ_IS_NOISE_MEASUREMENT``) are kept for prewhitening (:attr:`noise`, ``(coils, samples)``).
    Calibration-only readouts (``ACQ_IS_PARALLEL_CALIBRATION``) go to the coil-map data and, unless the header says
    the calibration was acquired separately, into the image's k-space too (they were measured in the same scan).
    A readout that cannot be used (wrong channel count, NaN/Inf, counter out of range, readout too long, a
    non-Cartesian trajectory) is refused with a message in the group's ``errors`` (or :attr:`errors` when it belongs
    to no group); other groups go on. Memory is bounded: at most ``max_open_groups`` groups and, beyond the first,
    ``max_open_bytes`` of k-space are open at once.
    """

    def __init__(self, encoding: Encoding, max_open_groups: int = 256, calibration_in_data: bool | None = None,
                 max_open_bytes: int = MAX_OPEN_BYTES):
        self.enc = encoding
        self.max_open_groups = max_open_groups
        self.max_open_bytes = max_open_bytes
        self.calibration_in_data = (encoding.calibration_mode.lower() != "separate"
                                    if calibration_in_data is None else calibration_in_data)
        self.groups: dict[GroupKey, SliceGroup] = {}
        self.calibration_by_slice: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.noise_chunks: list[np.ndarray] = []
        self.noise_sample_time_us = 0.0
        self.coils: int | None = None
        self.errors: list[str] = []
        self.count = 0
        self.calibration_only_readouts = 0  # readouts of groups kept for coil maps only (no image of their own)
        self._ignored: set[str] = set()

    # ------------------------------------------------------------------------------------------------------ noise
    @property
    def noise(self) -> np.ndarray | None:
        """All noise samples so far, ``(coils, samples)`` complex64, or None."""
        return np.concatenate(self.noise_chunks, axis=1) if self.noise_chunks else None

    # ------------------------------------------------------------------------------------------------------- add
    def add(self, acq: ismrmrd.Acquisition) -> list[SliceGroup]:
        self.count += 1
        for flag, name in IGNORED_FLAGS.items():
            if acq.is_flag_set(flag):
                if name not in self._ignored:
                    self._ignored.add(name)
                    log.info("ignoring %s readouts", name)
                return []
        where = f"readout #{self.count} (scan counter {acq.scan_counter})"
        data = acq.data
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            if not np.isfinite(data).all():
                self.errors.append(f"{where}: noise readout contains NaN/Inf samples; ignored")
                return []
            if self.coils is not None and data.shape[0] != self.coils:
                self.errors.append(f"{where}: noise readout has {data.shape[0]} channels, "
                                   f"expected {self.coils}; ignored")
                return []
            self.coils = data.shape[0]
            self.noise_chunks.append(np.array(data, dtype=np.complex64))
            self.noise_sample_time_us = float(acq.sample_time_us)
            return []

        try:
            key = self._key(acq, where)
        except InputError as error:
            self.errors.append(str(error))
            return self._flush_if_last(acq)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= self.max_open_groups:
                self.errors.append(f"{where} ({key.describe()}): more than {self.max_open_groups} images open at once "
                                   "(are ACQ_LAST_IN_SLICE flags missing?); refused")
                return self._flush_if_last(acq)
            if self.groups and self._open_bytes() + self._group_bytes() > self.max_open_bytes:
                self.errors.append(f"{where} ({key.describe()}): opening another image would hold more than "
                                   f"{self.max_open_bytes / 2**30:.1f} GiB of k-space; refused")
                return self._flush_if_last(acq)
            group = self.groups[key] = self._new_group(key)
        try:
            self._file(group, acq, where)
        except InputError as error:
            group.errors.append(str(error))
        return self._flush_if_last(acq, key)

    def _key(self, acq, where: str) -> GroupKey:
        idx = acq.idx
        key = GroupKey(*(int(getattr(idx, name)) for name in COUNTERS))
        for name, value in zip(COUNTERS, key):
            limit = self.enc.limits.get(name)
            if limit is not None and value > limit:
                raise InputError(f"{where}: {name} counter {value} is beyond the header's maximum {limit}; refused")
        return key

    def _group_bytes(self) -> int:
        return (self.coils or 1) * self.enc.nz * self.enc.ny * self.enc.nx_raw * 9  # complex64 + bool mask

    def _open_bytes(self) -> int:
        return sum(g.kspace.nbytes + g.mask.nbytes + (0 if g.calibration is None else g.calibration.nbytes)
                   for g in self.groups.values())

    def _new_group(self, key: GroupKey) -> SliceGroup:
        coils = self.coils or 1
        shape = (self.enc.nz, self.enc.ny, self.enc.nx_raw)
        return SliceGroup(key=key, kspace=np.zeros((coils, *shape), np.complex64), mask=np.zeros(shape, bool))

    def _file(self, group: SliceGroup, acq, where: str) -> None:
        enc = self.enc
        data = acq.data
        channels, samples = data.shape
        if self.coils is None:
            self.coils = channels
            if enc.receiver_channels and enc.receiver_channels != channels:
                log.warning("header says %d receiver channels, readouts carry %d", enc.receiver_channels, channels)
        if channels != self.coils:
            raise InputError(f"{where}: {channels} channels, but this scan's readouts have {self.coils}; refused")
        if group.kspace.shape[0] != channels:
            group.kspace = np.zeros((channels, *group.mask.shape), np.complex64)
        if int(acq.trajectory_dimensions) > 0:
            raise InputError(f"{where}: carries a {acq.trajectory_dimensions}-D k-space trajectory; only Cartesian "
                             "readouts can be reconstructed")
        if not np.isfinite(data).all():
            raise InputError(f"{where} ({group.key.describe()}): contains NaN/Inf samples")
        row = int(acq.idx.kspace_encode_step_1) - enc.e1_center + enc.ny // 2
        plane = (int(acq.idx.kspace_encode_step_2) - enc.e2_center + enc.nz // 2) if enc.is_3d else 0
        if not 0 <= row < enc.ny:
            raise InputError(f"{where}: kspace_encode_step_1 {acq.idx.kspace_encode_step_1} is outside the "
                             f"{enc.ny}-row encoding (centre {enc.e1_center})")
        if not 0 <= plane < enc.nz:
            raise InputError(f"{where}: kspace_encode_step_2 {acq.idx.kspace_encode_step_2} is outside the "
                             f"{enc.nz}-partition encoding")
        first, last = int(acq.discard_pre), samples - int(acq.discard_post)
        center = int(acq.center_sample) if samples != enc.nx_raw or acq.center_sample else samples // 2
        start = enc.nx_raw // 2 - center + first
        stop = start + (last - first)
        if last <= first or start < 0 or stop > enc.nx_raw:
            raise InputError(f"{where}: {samples} samples with centre {acq.center_sample} do not fit the "
                             f"{enc.nx_raw}-sample encoded readout")
        line = data[:, first:last]
        calibration = (acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                       or acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))
        imaging = not acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) or self.calibration_in_data
        group.readouts += 1
        if calibration and channels > 1:
            if group.calibration is None:
                group.calibration = np.zeros_like(group.kspace)
                group.calibration_mask = np.zeros_like(group.mask)
            group.calibration[:, plane, row, start:stop] = line
            group.calibration_mask[plane, row, start:stop] = True
        if imaging:
            group.kspace[:, plane, row, start:stop] = line
            group.mask[plane, row, start:stop] = True
            group.imaging_lines += 1
            distance = abs(row - enc.ny // 2) + abs(plane - enc.nz // 2)
            if distance < group.reference_distance:
                group.reference, group.reference_distance = acq.getHead(), distance
                group.sample_time_us = float(acq.sample_time_us)

    # ------------------------------------------------------------------------------------------------ completion
    def _flush_if_last(self, acq, key: GroupKey | None = None) -> list[SliceGroup]:
        if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            return self.flush()
        if key is not None and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            return self._finish([self.groups.pop(key)])
        return []

    def flush(self) -> list[SliceGroup]:
        """Hand out every open group (end of the measurement or of the stream)."""
        groups = list(self.groups.values())
        self.groups.clear()
        if groups:
            log.info("end of stream: %d image(s) still open", len(groups))
        return self._finish(groups)

    def _finish(self, groups: list[SliceGroup]) -> list[SliceGroup]:
        finished = []
        for group in groups:
            slice_index = group.key.slice
            if group.calibration is not None:
                self.calibration_by_slice[slice_index] = (group.calibration, group.calibration_mask)
            elif slice_index in self.calibration_by_slice:
                group.calibration, group.calibration_mask = self.calibration_by_slice[slice_index]
            if group.imaging_lines == 0 and not group.errors:
                log.info("%s: calibration data only, kept for coil maps", group.key.describe())
                self.calibration_only_readouts += group.readouts
                continue
            finished.append(group)
        return finished
