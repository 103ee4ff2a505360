"""Acquisition bookkeeping: grouping by counters, release at ACQ_LAST_IN_SLICE, masks, and refused readouts."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from cdl_lambda.gadgets.buffer import AcquisitionBuffer, read_encoding
from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.gadgets.wire import parse_ismrmrd_header
from support import acquisition, header


def test_groups_released_at_last_in_slice_for_interleaved_slices():
    buffer = AcquisitionBuffer(read_encoding(header(slices=2)))
    done = []
    for e1 in range(16):
        for s in range(2):
            flags = (ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == 15 else ()
            done += buffer.add(acquisition(e1, slice_=s, flags=flags))
    assert [g.key.slice for g in done] == [0, 1]
    assert buffer.groups == {}  # nothing held after the slices finished
    assert done[0].kspace.shape == (2, 1, 16, 32) and done[0].mask.all()


def test_noise_calibration_and_repetitions(accelerated_file):
    from support import read_file
    raw_header, acquisitions = read_file(accelerated_file)
    buffer = AcquisitionBuffer(read_encoding(parse_ismrmrd_header(raw_header)))
    groups = [g for acq in acquisitions for g in buffer.add(acq)]
    assert buffer.noise is not None and buffer.noise.shape[0] == 4
    assert [g.key.repetition for g in groups] == [0, 1, 2, 3]
    first = groups[0]
    rows = first.mask[0].any(axis=-1)
    assert rows[24:40].all() and rows[0:24:2].all() and not rows[1:24:2].any()  # R=2 + 16 calibration lines
    assert first.calibration_mask[0].any(axis=-1).sum() == 16
    assert first.reference.idx.kspace_encode_step_1 == 32


def test_asymmetric_echo_and_partial_fourier_masks():
    enc = read_encoding(header(ny=16, e1_center=8))
    buffer = AcquisitionBuffer(enc)
    groups = []
    for e1 in range(5, 16):  # partial Fourier: rows 0-4 never measured
        groups += buffer.add(acquisition(e1, samples=24, center=8,
                                         flags=(ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == 15 else ()))
    (group,) = groups
    mask = group.mask[0]
    assert not mask[:5].any() and mask[5:].any(axis=-1).all()
    assert mask[8, 8:32].all() and not mask[8, :8].any()  # centre sample 8 lands at column 16


def test_refused_readouts_name_the_problem():
    buffer = AcquisitionBuffer(read_encoding(header(slices=1)))
    buffer.add(acquisition(0))
    buffer.add(acquisition(1, coils=3))
    buffer.add(acquisition(2, value=np.nan))
    buffer.add(acquisition(3, slice_=7))
    buffer.add(acquisition(40))
    (group,) = buffer.add(acquisition(4, flags=(ismrmrd.ACQ_LAST_IN_SLICE,)))
    text = " ".join(group.errors + buffer.errors)
    assert "3 channels" in text and "NaN" in text and "slice counter 7" in text and "kspace_encode_step_1 40" in text


def test_header_problems():
    with pytest.raises(InputError, match="radial"):
        read_encoding(header(trajectory="radial"))
    from cdl_lambda.gadgets.errors import ProtocolError
    with pytest.raises(ProtocolError, match="encodingLimits"):  # required by the schema: a clear refusal
        header(limits=False)
    assert read_encoding(header(nx=64, rx=32)).oversampling == 2
