"""The typed input of the reconstruction, built from the scan: one :class:`ScanSlice` (a
:class:`recon.slice_data.SliceData`) per slice group, from buffered acquisitions or from Gadgetron's ReconData.

A ScanSlice is k-space as measured (``(coils, nz, ny, nx)`` centred, readout oversampling still in, not prewhitened
unless Gadgetron did it) with what the gadget needs to answer: the group's counters (``key``), the acquisition header
the image header is built from (``geometry``, also :attr:`ScanSlice.reference`), the readouts it holds, its place in a
ReconData buffer (``array_index`` (n, s, loc)) and the ``errors`` that keep it from being reconstructed.
:mod:`recon.pipeline` does the rest; each of its outcomes is one image, :meth:`ScanSlice.image` its description.

ReconData buffer ``data`` ``[RO, E1, E2, CHA, N, S, LOC]`` complex64 (already prewhitened by ``NoiseAdjustGadget``
and without readout oversampling when Gadgetron's C++ gadgets ran first), ``headers`` ``[E1, E2, N, S, LOC]``
acquisition headers, ``sampling.sampling_limits`` (min, centre, max) per RO/E1/E2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cdl_lambda.gadgets.buffer import COUNTERS, Encoding, GroupKey, SliceGroup
from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.recon.slice_data import NoiseScan, SliceData

NOISE_ADJUST = "Gadgetron's NoiseAdjustGadget"
NOISE_ADJUST_DEFAULT_BANDWIDTH = 0.793  # NoiseAdjustGadget's relativeReceiverNoiseBandwidth when the header has none


class SliceImage(NamedTuple):
    """One image of a :class:`ScanSlice` as the image writer needs it: counters, header, partition, readouts."""

    key: GroupKey
    reference: object
    partition: int
    partitions: int
    readouts: int
    array_index: tuple | None
    errors: list
    shape: tuple  # (ny, nx) of the image

    def describe(self) -> str:
        label = self.key.describe() if self.key is not None else "image"
        return f"{label}, partition {self.partition}" if self.partitions > 1 else label


@dataclass(eq=False)
class ScanSlice(SliceData):
    key: GroupKey | None = None
    readouts: int = 0                 # readouts of the acquisition group this slice comes from
    array_index: tuple | None = None  # (n, s, loc) in a ReconData buffer
    errors: list = field(default_factory=list)

    @property
    def reference(self):
        """The acquisition header the image headers are built from."""
        return self.geometry

    def image_shape(self) -> tuple:
        """(ny, nx) of the images: the reconstruction grid, or the measured one without oversampling."""
        if self.matrix is not None and all(self.matrix):
            return tuple(self.matrix)
        return int(self.kspace.shape[-2]), int(self.kspace.shape[-1]) // max(int(self.oversampling), 1)

    def image(self, partition: int) -> SliceImage:
        return SliceImage(self.key, self.geometry, partition, self.partitions, self.readouts, self.array_index,
                          self.errors, self.image_shape())


def noise_of(buffer) -> NoiseScan | None:
    """The scan's noise readouts (``buffer.noise`` ``(coils, samples)``) as a NoiseScan, None without any."""
    noise = buffer.noise
    return None if noise is None else NoiseScan(samples=noise, sample_time_us=buffer.noise_sample_time_us)


def noise_adjusted(header, data_sample_time_us: float) -> NoiseScan:
    """The noise of data prewhitened by Gadgetron's ``NoiseAdjustGadget``: it multiplies its whitening L⁻¹
    (Ψ = L Lᴴ of the noise scan) by √(2 · bw · data dwell / noise dwell), bw the header's
    ``acquisitionSystemInformation/relativeReceiverNoiseBandwidth`` (0.793 when absent); the noise of the data,
    Ψ · noise dwell / data dwell, then has covariance 2 · bw · I: σ = √(2 · bw) per complex sample (1.26 for the
    default). Without a data dwell time it does not scale (σ = 1, if noise and data share the dwell time)."""
    info = getattr(header, "acquisitionSystemInformation", None)
    bandwidth = getattr(info, "relativeReceiverNoiseBandwidth", None) if info is not None else None
    bandwidth = float(bandwidth) if bandwidth else NOISE_ADJUST_DEFAULT_BANDWIDTH
    sigma = math.sqrt(2 * bandwidth) if data_sample_time_us > 0 else 1.0
    return NoiseScan.prewhitened_upstream(sigma, NOISE_ADJUST)


def from_group(group: SliceGroup, noise: NoiseScan | None, encoding: Encoding) -> ScanSlice:
    """The :class:`ScanSlice` of a buffered ``group``, to be prewhitened with ``noise`` (or None) and reconstructed
    on the encoding's image grid (``gadgets.buffer.Encoding.image_matrix``)."""
    return ScanSlice(kspace=group.kspace, mask=group.mask, calibration=group.calibration,
                     calibration_mask=group.calibration_mask, noise=noise, sample_time_us=group.sample_time_us,
                     oversampling=encoding.oversampling, matrix=tuple(encoding.image_matrix), geometry=group.reference,
                     label=group.key.describe(), key=group.key, readouts=group.readouts, errors=list(group.errors))


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


def from_recon_bit(bit, header=None, calibration_in_data: bool = True) -> list[ScanSlice]:
    """One :class:`ScanSlice` per image (n, s, loc) of a ReconBit (a 3-D volume of E2 partitions for a 3-D scan),
    in Fortran order of [N, S, LOC], its noise as ``NoiseAdjustGadget`` left it (:func:`noise_adjusted` with the
    ISMRMRD ``header``).

    Only acquired slots count (:func:`acquired_slots`); calibration lines from ``bit.ref`` are coil-map data and,
    when ``calibration_in_data``, also filled into the data slots they measured (as the raw path does). An image
    that cannot be used (NaN/Inf samples, no line) gives a ScanSlice with ``errors`` set and zero k-space."""
    buffer = bit.data
    shape = np.asarray(buffer.data).shape
    if len(shape) != 7:
        raise InputError(f"ReconData buffer must be [RO, E1, E2, CHA, N, S, LOC], got shape {shape}")
    if buffer.trajectory is not None and np.asarray(buffer.trajectory).size:
        raise InputError("ReconData with a trajectory (non-Cartesian) is not supported")
    _, _, _, _, N, S, LOC = shape
    return [_image_slice(bit, header, n, s, loc, calibration_in_data)
            for loc in range(LOC) for s in range(S) for n in range(N)]


def _image_slice(bit, header, n: int, s: int, loc: int, calibration_in_data: bool) -> ScanSlice:
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
                calibration, calibration_mask = _centred(ref_k, centres), _centred(ref_mask, centres)
            if calibration_in_data:
                slots, headers = _merge_calibration(kspace, slots, headers, bit, n, s, loc)
        if not slots.any():
            raise InputError(f"ReconData image (n={n}, s={s}, loc={loc}) holds no acquired line")
        mask = _line_mask(buffer, slots, RO)
    except InputError as error:
        reference = _reference(headers, e1_centre, e2_centre)
        key = GroupKey(*(int(getattr(reference.idx, f)) if reference is not None else 0 for f in COUNTERS))
        return ScanSlice(kspace=np.zeros((CHA, E2, E1, RO), np.complex64), mask=np.zeros((E2, E1, RO), bool),
                         geometry=reference, label=key.describe(), key=key, array_index=(n, s, loc),
                         errors=[str(error)])
    reference = _reference(headers, e1_centre, e2_centre)
    key = GroupKey(*(int(getattr(reference.idx, f)) for f in COUNTERS))
    return ScanSlice(kspace=_centred(kspace * mask[None], centres), mask=_centred(mask, centres),
                     calibration=calibration, calibration_mask=calibration_mask,
                     noise=noise_adjusted(header, float(reference.sample_time_us)),
                     sample_time_us=float(reference.sample_time_us), geometry=reference, label=key.describe(), key=key,
                     array_index=(n, s, loc), readouts=int(slots.sum()))
