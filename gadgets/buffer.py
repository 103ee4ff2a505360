"""Acquisition bookkeeping (numpy only, no torch): noise scans, calibration lines and k-space grouped per image.

A scanner streams readouts one by one. :class:`AcquisitionBuffer` files each into the k-space of its group, keyed by
the ISMRMRD counters (slice, contrast, phase, repetition, set, average), and hands a group out as soon as the readout
flagged ``ACQ_LAST_IN_SLICE`` arrives (all open groups at ``ACQ_LAST_IN_MEASUREMENT`` or the end of the stream), so
memory holds only the groups still being acquired.

Layout of a finished :class:`SliceGroup`: ``kspace`` ``(coils, nz, ny, nx_raw)`` complex64, centred (the k-space centre
line ``E1 = center`` at row ``ny // 2``, partition ``E2 = center`` at ``nz // 2``, the readout's ``center_sample`` at
column ``nx_raw // 2``), zeros where nothing was measured; ``mask`` ``(nz, ny, nx_raw)`` bool of measured samples;
readout still oversampled and not prewhitened (``recon.pipeline`` does both). nz = 1 for 2-D scans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import numpy as np

from cdl_lambda.gadgets.completeness import (ENDED_BY_FLAG, ENDED_BY_MEASUREMENT, ENDED_BY_STREAM, Assessment,
                                  assess_group)
from cdl_lambda.gadgets.encoding import COUNTERS, MAX_MATRIX_VALUES, Encoding, read_encoding, readout_oversampling  # noqa: F401 - re-exported: the buffer's callers read the header through it
from cdl_lambda.gadgets.errors import InputError

log = logging.getLogger(__name__)

IGNORED_FLAGS = {
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator", ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan", ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "HP feedback",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "RT feedback", ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA: "surface coil scan",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation reference",
}
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
    calibration_rows: np.ndarray | None = None  # (nz, ny) bool: lines this group measured as calibration
    ended: str = ""        # how the buffer handed it out: gadgets.completeness.ENDED_BY_*
    completeness: Assessment | None = None      # set when handed out (gadgets.completeness.assess_group)


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
        self.slice_flags_in_use = False     # a readout flagged ACQ_LAST_IN_SLICE was seen
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
        if calibration:
            if group.calibration_rows is None:
                group.calibration_rows = np.zeros(group.mask.shape[:2], bool)
            group.calibration_rows[plane, row] = True
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
        last_in_slice = acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
        self.slice_flags_in_use |= last_in_slice
        if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            if key is not None and last_in_slice and key in self.groups:
                self.groups[key].ended = ENDED_BY_FLAG
            return self.flush(ENDED_BY_MEASUREMENT)
        if key is not None and last_in_slice:
            group = self.groups.pop(key)
            group.ended = ENDED_BY_FLAG
            return self._finish([group])
        return []

    def flush(self, ended: str = ENDED_BY_STREAM) -> list[SliceGroup]:
        """Hand out every open group (``ended``: at the end of the measurement or of the stream)."""
        groups = list(self.groups.values())
        self.groups.clear()
        for group in groups:
            group.ended = group.ended or ended
        if groups:
            log.info("%s: %d image(s) still open", ended.replace("-", " "), len(groups))
        return self._finish(groups)

    def _finish(self, groups: list[SliceGroup]) -> list[SliceGroup]:
        finished = []
        for group in groups:
            slice_index = group.key.slice
            group.completeness = assess_group(group.mask, group.calibration_rows, self.enc, group.ended,
                                              self.slice_flags_in_use, self.calibration_in_data)
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
