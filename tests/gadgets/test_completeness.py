"""gadgets.completeness: what a slice group lacks against its header and its own sampling pattern."""

from __future__ import annotations

import ismrmrd
import numpy as np

from cdl_lambda.gadgets.buffer import AcquisitionBuffer
from cdl_lambda.gadgets.completeness import (ENDED_BY_FLAG, ENDED_BY_MEASUREMENT, ENDED_BY_STREAM, INCOMPLETE,
                                  MAX_MISSING_FRACTION, OK, assess_group, check_lines)
from cdl_lambda.gadgets.encoding import read_encoding
from support import acquisition, header


def _rows(ny, rows):
    measured = np.zeros(ny, bool)
    measured[list(rows)] = True
    return measured


def test_regular_pattern_with_calibration_is_complete_and_a_cut_one_is_not():
    ny = 64
    calibration = _rows(ny, range(26, 38))
    full = _rows(ny, range(1, ny, 2)) | calibration          # R = 2, odd lines, 12 calibration lines
    check = check_lines(full, calibration, (0, ny - 1), ny // 2)
    assert (check.expected, check.missing, check.centre_missed) == (32 + 6, 0, False)
    cut = full.copy()
    cut[30:] = False                                          # stopped before the centre
    check = check_lines(cut, calibration & cut, (0, ny - 1), ny // 2)
    assert check.centre_missed and check.missing > MAX_MISSING_FRACTION * check.expected
    one_lost = full.copy()
    one_lost[61] = False                                      # a single outer line: 1 of 38 < 5 %
    check = check_lines(one_lost, calibration, (0, ny - 1), ny // 2)
    assert check.missing == 1 and not check.centre_missed


def test_partial_fourier_limits_and_random_sampling_are_not_flagged():
    ny = 64
    partial = _rows(ny, range(0, 40))                         # encoding limits 0…39, centre 32: all measured
    check = check_lines(partial, None, (0, 39), 32)
    assert check.missing == 0 and check.expected == 40
    rng = np.random.default_rng(0)
    random_rows = _rows(ny, set(rng.choice(ny, ny // 3, replace=False)) | set(range(28, 36)))
    check = check_lines(random_rows, None, (0, ny - 1), ny // 2, header_step=3)
    assert check.missing == 0                                 # irregular: expected = lines / the header's R


def _buffer_with(lines):
    """A buffer fed (e1, repetition, last-in-slice) readouts; (buffer, the groups it handed out)."""
    buffer = AcquisitionBuffer(read_encoding(header(nx=32, ny=16)))
    done = []
    for e1, repetition, last in lines:
        flags = (ismrmrd.ACQ_LAST_IN_SLICE,) if last else ()
        done += buffer.add(acquisition(e1, samples=32, coils=2, repetition=repetition, flags=flags))
    return buffer, done


def test_buffer_assesses_each_group_it_hands_out():
    first = [(e1, 0, e1 == 15) for e1 in range(16)]
    buffer, done = _buffer_with(first)
    assert len(done) == 1 and done[0].ended == ENDED_BY_FLAG and done[0].completeness.status == OK
    # a scan that marks its slices, cut at row 5 of its second repetition: handed out at the end of the stream
    buffer, done = _buffer_with(first + [(e1, 1, False) for e1 in range(6)])
    done = buffer.flush()
    assessment = done[0].completeness
    assert done[0].ended == ENDED_BY_STREAM and assessment.status == INCOMPLETE
    assert "ended before its last line" in assessment.reason and "centre" in assessment.reason
    assert "misses 10 of its 16 expected E1 lines" in assessment.reason
    # no slice flags at all, every line measured: complete at the end of the measurement
    enc = read_encoding(header(nx=32, ny=16))
    assert assess_group(np.ones((1, 16, 32), bool), None, enc, ENDED_BY_MEASUREMENT, False).status == OK
