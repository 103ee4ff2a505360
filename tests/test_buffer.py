"""Acquisition bookkeeping: grouping by counters, release at ACQ_LAST_IN_SLICE, masks, and refused readouts."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from gadgets.buffer import AcquisitionBuffer, InputError, read_encoding
from gadgets.protocol import parse_ismrmrd_header


def header(nx=32, ny=16, nz=1, rx=None, limits=True, trajectory="cartesian", e1_center=None, slices=1):
    return parse_ismrmrd_header(header_xml(nx, ny, nz, rx, limits, trajectory, e1_center, slices))


def header_xml(nx=32, ny=16, nz=1, rx=None, limits=True, trajectory="cartesian", e1_center=None, slices=1) -> str:
    """A minimal valid ISMRMRD header (text)."""
    rx = rx or nx
    limit_xml = (f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ny - 1}</maximum>"
                 f"<center>{ny // 2 if e1_center is None else e1_center}</center></kspace_encoding_step_1>"
                 f"<slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>0</center></slice>"
                 "</encodingLimits>") if limits else ""
    xml = f"""<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
    <experimentalConditions><H1resonanceFrequency_Hz>2100000</H1resonanceFrequency_Hz></experimentalConditions>
    <encoding>
    <encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>{nz}</z></matrixSize>
    <fieldOfView_mm><x>{2 * nx * nx / rx}</x><y>{2 * ny}</y><z>{5 * nz}</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{rx}</x><y>{ny}</y><z>{nz}</z></matrixSize>
    <fieldOfView_mm><x>{2 * nx}</x><y>{2 * ny}</y><z>{5 * nz}</z></fieldOfView_mm></reconSpace>
    {limit_xml}<trajectory>{trajectory}</trajectory></encoding></ismrmrdHeader>"""
    return xml


def acquisition(e1, samples=32, coils=2, slice_=0, repetition=0, e2=0, flags=(), center=None, value=1.0):
    data = np.full((coils, samples), value, np.complex64)
    acq = ismrmrd.Acquisition.from_array(data)
    acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2 = e1, e2
    acq.idx.slice, acq.idx.repetition = slice_, repetition
    acq.center_sample = samples // 2 if center is None else center
    for flag in flags:
        acq.set_flag(flag)
    return acq


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
    from conftest import read_file
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
    from gadgets.protocol import ProtocolError
    with pytest.raises(ProtocolError, match="encodingLimits"):  # required by the schema: a clear refusal
        header(limits=False)
    assert read_encoding(header(nx=64, rx=32)).oversampling == 2
