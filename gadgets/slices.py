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

from gadgets.buffer import COUNTERS, GroupKey, SliceGroup
from gadgets.errors import InputError
from recon.preprocessing import prepare_kspace


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


def _prepare(kspace, mask, whitening, oversampling):
    try:
        return prepare_kspace(kspace, mask, whitening, oversampling)
    except ValueError as error:
        raise InputError(str(error)) from None


def from_group(group: SliceGroup, whitening, oversampling: int) -> list[SliceInput]:
    """One :class:`SliceInput` per partition of a buffered ``group``, prewhitened with ``whitening`` (or None)."""
    kspace, mask = _prepare(group.kspace, group.mask, whitening, oversampling)
    calibration = calibration_mask = None
    if group.calibration is not None:
        calibration, calibration_mask = _prepare(group.calibration, group.calibration_mask, whitening, oversampling)
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
    e2 = int(limits[2].center) if buffer.data.shape[2] > 1 else None
    ro = int(limits[0].center) if limits[0].max > 0 else None
    e1 = int(limits[1].center) if limits[1].max > 0 else None
    return [e2, e1, ro]


def _one(buffer, n: int, s: int, loc: int):
    """(coils, E2, E1, RO) k-space and (E2, E1, RO) mask of image (n, s, loc), centred."""
    kspace = np.ascontiguousarray(np.asarray(buffer.data)[:, :, :, :, n, s, loc].transpose(3, 2, 1, 0),
                                  dtype=np.complex64)
    if not np.isfinite(kspace).all():
        raise InputError(f"ReconData image (n={n}, s={s}, loc={loc}) contains NaN/Inf samples")
    centres = _limits_centres(buffer)
    kspace = _centred(kspace, centres)
    return kspace, (kspace != 0).any(axis=0)


def _reference(buffer, n: int, s: int, loc: int):
    """The acquired header (version ≠ 0) nearest the E1 sampling centre of image (n, s, loc), or None."""
    headers = np.asarray(buffer.headers)
    e1_centre = int(buffer.sampling.sampling_limits[1].center)
    best, best_distance = None, None
    for e1 in range(headers.shape[0]):
        for e2 in range(headers.shape[1]):
            head = headers[e1, e2, n, s, loc]
            if head is None or not head.version:
                continue
            distance = abs(e1 - e1_centre)
            if best is None or distance < best_distance:
                best, best_distance = head, distance
    return best


def from_recon_bit(bit) -> list[SliceInput]:
    """One :class:`SliceInput` per (partition, n, s, loc) of a ReconBit, in Fortran order of [N, S, LOC]."""
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
                kspace, mask = _one(buffer, n, s, loc)
                hybrid, mask2d = _prepare(kspace, mask, None, 1)
                calibration = calibration_mask = None
                if bit.ref is not None and kspace.shape[0] > 1:
                    rshape = np.asarray(bit.ref.data).shape
                    ref_k, ref_m = _one(bit.ref, min(n, rshape[4] - 1), min(s, rshape[5] - 1), min(loc, rshape[6] - 1))
                    if ref_k.shape == kspace.shape:
                        calibration, calibration_mask = _prepare(ref_k, ref_m, None, 1)
                reference = _reference(buffer, n, s, loc)
                idx = reference.idx if reference is not None else None
                key = GroupKey(*(int(getattr(idx, f)) if idx is not None else 0 for f in COUNTERS))
                for z in range(hybrid.shape[1]):
                    inputs.append(SliceInput(key=key, partition=z, partitions=hybrid.shape[1], kspace=hybrid[:, z],
                                             mask=mask2d, reference=reference,
                                             calibration=None if calibration is None else calibration[:, z],
                                             calibration_mask=calibration_mask, array_index=(n, s, loc)))
    return inputs
