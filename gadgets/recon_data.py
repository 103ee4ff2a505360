"""The buffered path: Gadgetron's ReconData (from ``BucketToBufferGadget``) in, ImageArray out.

ReconData buffer ``data`` ``[RO, E1, E2, CHA, N, S, LOC]`` complex64 (already prewhitened and without readout
oversampling when Gadgetron's C++ gadgets ran first), ``headers`` ``[E1, E2, N, S, LOC]`` acquisition headers,
``sampling.sampling_limits`` (min, centre, max) per RO/E1/E2. The ImageArray answer has ``data``
``[X, Y, Z, CHA=1, N, S, LOC]`` complex64 (X along the readout), ``headers`` ``[N, S, LOC]``, and one meta string per
image in Fortran order of ``[N, S, LOC]``.
"""

from __future__ import annotations

import ismrmrd
import numpy as np

from gadgets.buffer import GroupKey, InputError
from gadgets.prepare import SliceInput, _process


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


def bit_inputs(bit) -> list[SliceInput]:
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
                hybrid, mask2d = _process(kspace, mask, None, 1)
                calibration = calibration_mask = None
                if bit.ref is not None and kspace.shape[0] > 1:
                    rshape = np.asarray(bit.ref.data).shape
                    ref_k, ref_m = _one(bit.ref, min(n, rshape[4] - 1), min(s, rshape[5] - 1), min(loc, rshape[6] - 1))
                    if ref_k.shape == kspace.shape:
                        calibration, calibration_mask = _process(ref_k, ref_m, None, 1)
                reference = _reference(buffer, n, s, loc)
                idx = reference.idx if reference is not None else None
                key = GroupKey(*(int(getattr(idx, f)) if idx is not None else 0
                                 for f in ("slice", "contrast", "phase", "repetition", "set", "average")))
                for z in range(hybrid.shape[1]):
                    one = SliceInput(key=key, partition=z, partitions=hybrid.shape[1], kspace=hybrid[:, z],
                                     mask=mask2d, reference=reference,
                                     calibration=None if calibration is None else calibration[:, z],
                                     calibration_mask=calibration_mask)
                    one.nsl = (n, s, loc)
                    inputs.append(one)
    return inputs


def image_array(bit, inputs: list[SliceInput], results: dict, scan, images_module):
    """The ImageArray for a ReconBit from ``results`` ``{id(input): (image (ny, nx) complex64, input, note)}``."""
    from gadgets.wire import ImageArray

    shape = np.asarray(bit.data.data).shape
    _, _, E2, _, N, S, LOC = shape
    first = inputs[0]
    ny, nx = first.kspace.shape[-2:]
    data = np.zeros((nx, ny, E2, 1, N, S, LOC), np.complex64)
    headers = np.empty((N, S, LOC), dtype=object)
    metas = np.empty((N, S, LOC), dtype=object)
    series = scan.params.series_index
    fov = scan._field_of_view(E2)
    for one in inputs:
        n, s, loc = one.nsl
        if id(one) in results:
            data[:, :, one.partition, 0, n, s, loc] = results[id(one)][0].T
        if headers[n, s, loc] is None:
            note = results[id(one)][2] if id(one) in results else ""
            comment = f"CDL-Lambda [{note}]" if note else "CDL-Lambda"
            index = scan._next_index(series)
            headers[n, s, loc] = images_module.image_header(
                one.reference, image_index=index, series_index=series, field_of_view=fov, matrix=(nx, ny, E2))
            metas[n, s, loc] = ismrmrd.Meta({
                "GADGETRON_DataRole": "Image", "DataRole": "Image",
                "GADGETRON_ImageComment": comment, "ImageComments": comment,
                "CDL_Chain": scan.chain_name, "CDL_Dictionary": str(scan.rec.identity.get("dictionary", "")),
                "CDL_DictionarySHA256": str(scan.rec.identity.get("dictionary_sha256", "")),
                "CDL_Network": str(scan.rec.identity.get("network", "")),
                "CDL_NetworkSHA256": str(scan.rec.identity.get("network_sha256", "")),
            }).serialize()
    meta = [metas[n, s, loc] or "" for loc in range(LOC) for s in range(S) for n in range(N)]
    return ImageArray(data=data, headers=headers, meta=meta, waveform=None, acq_headers=None)
