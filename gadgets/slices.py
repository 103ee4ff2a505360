"""The one input the reconstruction gets: a :class:`SliceInput` per 2-D image, from buffered acquisitions or from
Gadgetron's ReconData.

A SliceInput: ``kspace`` ``(coils, ny, nx)`` complex64 centred, prewhitened, readout oversampling removed, zeros
where not measured; ``mask`` ``(ny, nx)`` float32; ``calibration``/``calibration_mask`` likewise or None;
``reference`` the acquisition header the image header is built from. A 3-D group gives one SliceInput per partition
(``recon.preprocessing.prepare_kspace`` transforms along k2).

ReconData buffer ``data`` ``[RO, E1, E2, CHA, N, S, LOC]`` complex64 (already prewhitened and without readout
oversampling when Gadgetron's C++ gadgets ran first), ``headers`` ``[E1, E2, N, S, LOC]`` acquisition headers,
``sampling.sampling_limits`` (min, centre, max) per RO/E1/E2; its SliceInputs carry ``array_index`` (n, s, loc).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cdl_lambda.gadgets.buffer import COUNTERS, GroupKey, SliceGroup
from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.recon.preprocessing import prepare_kspace


@dataclass
class SliceInput:
    key: GroupKey
    partition: int
    partitions: int
    kspace: np.ndarray
    mask: np.ndarray
    reference: object
    calibration: np.ndarray | None = None
    calibration_mask: np.ndarray | None = None
    errors: list = field(default_factory=list)
    readouts: int = 0      # readouts of the acquisition group this slice comes from
    array_index: tuple | None = None  # (n, s, loc) in a ReconData buffer
    noise_std: float | None = None  # σ per complex sample: 1.0 once prewhitened with a noise scan; None: unknown

    def describe(self) -> str:
        where = self.key.describe()
        return f"{where}, partition {self.partition}" if self.partitions > 1 else where


def _prepare(kspace, mask, whitening, oversampling, matrix=None):
    try:
        return prepare_kspace(kspace, mask, whitening, oversampling, matrix)
    except ValueError as error:
        raise InputError(str(error)) from None


def from_group(group: SliceGroup, whitening, oversampling: int, matrix=None) -> list[SliceInput]:
    """One :class:`SliceInput` per partition of a buffered ``group``, prewhitened with ``whitening`` (or None), on
    the k-space grid ``matrix`` (ny, nx) when given (``gadgets.buffer.Encoding.image_matrix``)."""
    kspace, mask = _prepare(group.kspace, group.mask, whitening, oversampling, matrix)
    calibration = calibration_mask = None
    if group.calibration is not None:
        calibration, calibration_mask = _prepare(group.calibration, group.calibration_mask, whitening, oversampling,
                                                 matrix)
    partitions = kspace.shape[1]
    return [SliceInput(key=group.key, partition=z, partitions=partitions, kspace=kspace[:, z], mask=mask,
                       reference=group.reference,
                       calibration=None if calibration is None else calibration[:, z],
                       calibration_mask=calibration_mask, errors=list(group.errors),
                       readouts=group.readouts, noise_std=None if whitening is None else 1.0)
            for z in range(partitions)]


# ------------------------------------------------------------------------------------------------------ ReconData
def _centred(array: np.ndarray, centres: list[int | None]) -> np.ndarray:
    """Roll ``array`` ``(..., E2, E1, RO)`` so each sampling centre lands at n // 2."""
    for axis, centre in zip((-3, -2, -1), centres):
        n = array.shape[axis]
        if centre is not None and n > 1 and 0 <= centre < n and centre != n // 2:
            array = np.roll(array, n // 2 - centre, axis=axis)
    return array


def _limits_centres(buffer) -> list[int | None]:
    limits = buffer.sampling.sampling_limits
    e2 = int(limits[2].center) if np.asarray(buffer.data).shape[2] > 1 else None
    ro = int(limits[0].center) if limits[0].max > 0 else None
    e1 = int(limits[1].center) if limits[1].max > 0 else None
    return [e2, e1, ro]


def acquired_slots(buffer, n: int, s: int, loc: int) -> np.ndarray:
    """``(E1, E2)`` bool: the slots of image (n, s, loc) that hold a measured line.

    BucketToBufferGadget fills the slots of lines that were not acquired with zeros and a blank header whose
    ``version`` is 1, so the sampling (a line with any non-zero sample) decides, not the header."""
    data = np.asarray(buffer.data)[:, :, :, :, n, s, loc]          # RO, E1, E2, CHA
    return (data != 0).any(axis=(0, 3))


def _slot_kspace(buffer, n: int, s: int, loc: int) -> np.ndarray:
    """(coils, E2, E1, RO) k-space of image (n, s, loc) as stored (not centred); InputError on NaN/Inf."""
    kspace = np.array(np.asarray(buffer.data)[:, :, :, :, n, s, loc].transpose(3, 2, 1, 0), dtype=np.complex64,
                      order="C", copy=True)  # a copy: gadgetron's reader hands out read-only arrays
    if not np.isfinite(kspace).all():
        raise InputError(f"ReconData image (n={n}, s={s}, loc={loc}) contains NaN/Inf samples")
    return kspace


def _line_mask(buffer, slots: np.ndarray, readout: int) -> np.ndarray:
    """(E2, E1, RO) mask: the acquired slots over the readout's sampling limits."""
    ro = buffer.sampling.sampling_limits[0]
    lo, hi = (int(ro.min), int(ro.max)) if ro.max > 0 else (0, readout - 1)
    columns = np.zeros(readout, bool)
    columns[max(lo, 0):min(hi, readout - 1) + 1] = True
    return slots.T[:, :, None] & columns[None, None, :]


def _merge_calibration(kspace, slots, headers, bit, n, s, loc):
    """Calibration lines of ``bit.ref`` (measured k-space: not ``calibrationMode=separate``) filed into the
    slots of the data that are still empty, by their own E1/E2 counters; returns the merged slots and headers
    ``{(e1, e2): header}`` of every line now in the data."""
    ref = bit.ref
    rshape = np.asarray(ref.data).shape
    n, s, loc = min(n, rshape[4] - 1), min(s, rshape[5] - 1), min(loc, rshape[6] - 1)
    ref_k = _slot_kspace(ref, n, s, loc)
    ref_slots = acquired_slots(ref, n, s, loc)
    ref_headers = np.asarray(ref.headers)
    same_grid = ref_k.shape == kspace.shape
    _, E2, E1, RO = kspace.shape
    for e1, e2 in zip(*np.nonzero(ref_slots)):
        head = ref_headers[e1, e2, n, s, loc]
        if same_grid:
            row, plane = e1, e2
        else:  # a calibration buffer of its own size: place the line by its counters
            row, plane = int(head.idx.kspace_encode_step_1), int(head.idx.kspace_encode_step_2) if E2 > 1 else 0
            if ref_k.shape[-1] != RO or not (0 <= row < E1 and 0 <= plane < E2):
                continue
        if not slots[row, plane]:
            kspace[:, plane, row, :] = ref_k[:, e2, e1, :]
            slots[row, plane] = True
            headers[(row, plane)] = head
    return slots, headers


def _reference(headers: dict, e1_centre: int, e2_centre: int | None):
    """The header nearest the k-space centre (|ΔE1| + |ΔE2|, the earliest scan counter on a tie), as the raw
    path picks it; None when nothing was acquired."""
    def distance(item):
        (e1, e2), head = item
        return (abs(e1 - e1_centre) + (abs(e2 - e2_centre) if e2_centre is not None else 0), int(head.scan_counter))
    return min(headers.items(), key=distance)[1] if headers else None


def from_recon_bit(bit, calibration_in_data: bool = True) -> list[SliceInput]:
    """One :class:`SliceInput` per (partition, n, s, loc) of a ReconBit, in Fortran order of [N, S, LOC].

    Only acquired slots count (:func:`acquired_slots`); calibration lines from ``bit.ref`` are coil-map data and,
    when ``calibration_in_data``, also filled into the data slots they measured (as the raw path does). An image
    that cannot be used (NaN/Inf samples, no line) gives one SliceInput with ``errors`` set and zero k-space."""
    buffer = bit.data
    shape = np.asarray(buffer.data).shape
    if len(shape) != 7:
        raise InputError(f"ReconData buffer must be [RO, E1, E2, CHA, N, S, LOC], got shape {shape}")
    if buffer.trajectory is not None and np.asarray(buffer.trajectory).size:
        raise InputError("ReconData with a trajectory (non-Cartesian) is not supported")
    _, _, _, _, N, S, LOC = shape
    inputs = []
    for loc in range(LOC):
        for s in range(S):
            for n in range(N):
                inputs.extend(_image_inputs(bit, n, s, loc, calibration_in_data))
    return inputs


def _image_inputs(bit, n: int, s: int, loc: int, calibration_in_data: bool) -> list[SliceInput]:
    buffer = bit.data
    RO, E1, E2, CHA = np.asarray(buffer.data).shape[:4]
    centres = _limits_centres(buffer)
    limits = buffer.sampling.sampling_limits
    e1_centre = int(limits[1].center) if limits[1].max > 0 else E1 // 2
    e2_centre = (int(limits[2].center) if limits[2].max > 0 else E2 // 2) if E2 > 1 else None
    data_headers = np.asarray(buffer.headers)
    slots = acquired_slots(buffer, n, s, loc)
    headers = {(int(e1), int(e2)): data_headers[e1, e2, n, s, loc] for e1, e2 in zip(*np.nonzero(slots))}
    try:
        kspace = _slot_kspace(buffer, n, s, loc)
        calibration = calibration_mask = None
        if bit.ref is not None and CHA > 1:
            ref_index = [min(i, d - 1) for i, d in zip((n, s, loc), np.asarray(bit.ref.data).shape[4:])]
            ref_k = _slot_kspace(bit.ref, *ref_index)
            if ref_k.shape == kspace.shape:
                ref_mask = _line_mask(bit.ref, acquired_slots(bit.ref, *ref_index), RO)
                calibration, calibration_mask = _prepare(_centred(ref_k, centres), _centred(ref_mask, centres), None, 1)
            if calibration_in_data:
                slots, headers = _merge_calibration(kspace, slots, headers, bit, n, s, loc)
        if not slots.any():
            raise InputError(f"ReconData image (n={n}, s={s}, loc={loc}) holds no acquired line")
        mask = _line_mask(buffer, slots, RO)
        hybrid, mask2d = _prepare(_centred(kspace * mask[None], centres), _centred(mask, centres), None, 1)
    except InputError as error:
        reference = _reference(headers, e1_centre, e2_centre)
        key = GroupKey(*(int(getattr(reference.idx, f)) if reference is not None else 0 for f in COUNTERS))
        return [SliceInput(key=key, partition=0, partitions=E2, kspace=np.zeros((CHA, E1, RO), np.complex64),
                           mask=np.zeros((E1, RO), np.float32), reference=reference, errors=[str(error)],
                           array_index=(n, s, loc))]
    reference = _reference(headers, e1_centre, e2_centre)
    key = GroupKey(*(int(getattr(reference.idx, f)) for f in COUNTERS))
    return [SliceInput(key=key, partition=z, partitions=hybrid.shape[1], kspace=hybrid[:, z], mask=mask2d,
                       reference=reference, calibration=None if calibration is None else calibration[:, z],
                       calibration_mask=calibration_mask, array_index=(n, s, loc), readouts=int(slots.sum()))
            for z in range(hybrid.shape[1])]
