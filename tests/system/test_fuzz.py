"""Property-based fuzzing of the two places that take untrusted input first: the stream reader (random bytes and
mutated valid streams must end cleanly or with ProtocolError/PeerError, never hang or raise anything else) and the
acquisition buffer (random counters, flags and sizes: it never raises, stays within its memory bounds, and accounts
for every readout — filed into an image or refused with a message)."""

from __future__ import annotations

import ismrmrd
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdl_lambda.gadgets.buffer import IGNORED_FLAGS, AcquisitionBuffer, read_encoding
from cdl_lambda.gadgets.wire import MSG_HEADER, encode_close, encode_config_file, encode_error, encode_item, encode_text
from cdl_lambda.gadgets.errors import PeerError, ProtocolError
from cdl_lambda.gadgets.connection import RobustConnection
from support import acquisition, header, header_xml

STREAM_EXAMPLES = 400
BUFFER_EXAMPLES = 250
FAST = dict(deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class BytesSocket:
    """The part of a socket :class:`RobustConnection` uses, over fixed bytes (recv returns b"" at the end)."""

    def __init__(self, data: bytes, chunk: int = 7):
        self.data, self.position, self.chunk, self.sent = data, 0, chunk, bytearray()

    def recv(self, n: int) -> bytes:
        part = self.data[self.position:self.position + min(n, self.chunk)]
        self.position += len(part)
        return part

    def settimeout(self, _):
        pass

    def sendall(self, data):
        self.sent += data

    def shutdown(self, _):
        pass

    def close(self):
        pass


def valid_stream() -> bytes:
    """Config name, JSON text, header, acquisitions, a waveform, an image, a text, close."""
    parts = [encode_config_file("cdl-lambda"), encode_text(5, '{"parameters": {"iterations": "2"}}'),
             encode_text(MSG_HEADER, header_xml(nx=16, ny=8))]
    for e1 in range(4):
        parts.append(encode_item(acquisition(e1, samples=16, coils=2, value=0.5 + e1)))
    parts.append(encode_item(ismrmrd.Waveform.from_array(np.arange(6, dtype=np.uint32).reshape(1, 6))))
    image = ismrmrd.Image.from_array(np.ones((4, 4), np.float32))
    image.meta = ismrmrd.Meta({"k": "v"})
    parts += [encode_item(image), encode_text(5, "note"), encode_close()]
    return b"".join(parts)


VALID = valid_stream()


def consume(data: bytes, chunk: int = 7) -> int:
    """Handshake and read every item; the number of items read. Only the documented errors may escape."""
    try:
        connection = RobustConnection(BytesSocket(data, chunk))
        return sum(1 for _ in connection)
    except (ProtocolError, PeerError):
        return -1


def test_valid_stream_reads_whole():
    assert consume(VALID) == 6  # 4 acquisitions, a waveform, an image (the text is skipped)
    assert consume(VALID[:-2]) == 6  # no CLOSE: a clean end all the same


@settings(max_examples=STREAM_EXAMPLES // 4, **FAST)
@given(st.binary(max_size=4096), st.integers(1, 64))
def test_random_bytes(data, chunk):
    consume(data, chunk)


@settings(max_examples=STREAM_EXAMPLES // 4, **FAST)
@given(st.binary(max_size=600))
def test_random_bytes_after_a_valid_handshake(tail):
    handshake = VALID[:VALID.index(encode_item(acquisition(0, samples=16, coils=2, value=0.5)))]
    consume(handshake + tail)


@settings(max_examples=STREAM_EXAMPLES // 2, **FAST)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)), st.sampled_from(["flip", "truncate", "insert", "error"]))
def test_mutated_valid_streams(flips, cut, how):
    data = bytearray(VALID)
    if how == "flip":
        for position, value in flips:
            data[position] = value
    elif how == "truncate":
        data = data[:cut]
    elif how == "insert":
        data[cut:cut] = bytes(value for _, value in flips)
    else:  # the peer's own ERROR message somewhere in the items
        data[cut:cut] = encode_error("scanner says no")
    consume(bytes(data))


# --------------------------------------------------------------------------------------------- the buffer
FLAGS = [ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_MEASUREMENT, ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
         ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
         ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_DUMMYSCAN_DATA, ismrmrd.ACQ_FIRST_IN_SLICE]

readouts = st.lists(st.fixed_dictionaries({
    "e1": st.integers(0, 20), "e2": st.integers(0, 5), "slice_": st.integers(0, 5), "repetition": st.integers(0, 3),
    "samples": st.integers(0, 40), "coils": st.integers(1, 3), "center": st.integers(0, 45),
    "discard": st.tuples(st.integers(0, 8), st.integers(0, 8)), "trajectory": st.sampled_from([0, 0, 0, 2]),
    "flags": st.lists(st.sampled_from(FLAGS), max_size=2, unique=True),
    "value": st.sampled_from([1.0, 1.0, 1.0, np.nan, np.inf, 1e30]),
}), max_size=60)


def _make(r) -> ismrmrd.Acquisition:
    data = np.full((r["coils"], r["samples"]), r["value"], np.complex64)
    acq = ismrmrd.Acquisition.from_array(data, np.zeros((r["samples"], r["trajectory"]), np.float32)
                                         if r["trajectory"] else None)
    acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2 = r["e1"], r["e2"]
    acq.idx.slice, acq.idx.repetition = r["slice_"], r["repetition"]
    acq.center_sample = r["center"]
    acq.discard_pre, acq.discard_post = r["discard"]
    for flag in r["flags"]:
        acq.set_flag(flag)
    return acq


@settings(max_examples=BUFFER_EXAMPLES, **FAST)
@given(readouts, st.integers(8, 24), st.integers(4, 16), st.sampled_from([1, 1, 4]), st.integers(1, 4),
       st.booleans(), st.integers(1, 4))
def test_buffer_accounts_for_every_readout(items, nx, ny, nz, slices, limits, max_open):
    enc = read_encoding(header(nx=nx, ny=ny, nz=nz, slices=slices, limits=True))
    if not limits:
        enc.limits = {}
    buffer = AcquisitionBuffer(enc, max_open_groups=max_open, max_open_bytes=4 * max_open * nz * ny * nx * 9)
    done, ignored = [], 0
    for r in items:
        acq = _make(r)
        if any(acq.is_flag_set(flag) for flag in IGNORED_FLAGS):
            ignored += 1
        done += buffer.add(acq)
        assert len(buffer.groups) <= max_open
    done += buffer.flush()
    assert buffer.groups == {}
    for group in done:
        assert group.kspace.shape[1:] == (nz, ny, nx) and group.mask.shape == (nz, ny, nx)
        assert group.kspace.dtype == np.complex64 and np.isfinite(group.kspace).all()
        assert group.readouts or group.errors
    filed = sum(g.readouts + len(g.errors) for g in done) + buffer.calibration_only_readouts
    assert ignored + len(buffer.noise_chunks) + len(buffer.errors) + filed == len(items)
