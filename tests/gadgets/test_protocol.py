"""A test peer playing Gadgetron's side over a socket: the active target (real ``python -m gadgetron``), the warm
server and the ReconData path; NUL-terminated text, config by name, unknown ids, failures as ERROR messages."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from support import SCAN_CONFIG as CONFIG, read_file, run_scan, write_registry
from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE, MSG_IMAGE_ARRAY, encode_text
from cdl_lambda.gadgets.client import Peer
from cdl_lambda.gadgets.errors import ProtocolError
from cdl_lambda.gadgets.connection import RobustConnection
from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription

ROOT = Path(__file__).resolve().parents[2]


def by_id(replies, mid):
    return [item for m, item in replies if m == mid]


def test_active_target_under_real_gadgetron_main(accelerated_file, tmp_path):
    """Gadgetron's active mode: it listens, starts ``python -m gadgetron PORT MODULE TARGET``, streams."""
    header, acquisitions = read_file(accelerated_file)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), CDL_LAMBDA_CHAINS=str(write_registry(tmp_path / "chains")),
               OMP_NUM_THREADS="1",
               GADGETRON_EXTERNAL_LOG_LEVEL="INFO")
    process = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "cdl_lambda.gadgets.handler",
                                "CDLLambdaGadget"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        listener.settimeout(120)
        sock, _ = listener.accept()
        replies = run_scan(Peer(sock), header, acquisitions)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        listener.close()
    images = by_id(replies, MSG_IMAGE)
    assert by_id(replies, MSG_ERROR) == [], stderr.decode()[-2000:]
    assert [im.repetition for im in images] == [0, 1, 2, 3]
    assert stdout == b""  # nothing on Gadgetron's stdout: logs go to stderr
    assert b"scan done" in stderr


def test_server_nul_terminated_config_and_header(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions, nul=True)
    assert len(by_id(replies, MSG_IMAGE)) == 4 and not by_id(replies, MSG_ERROR)


def test_server_config_by_name_selects_chain(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions, name="cdl_lambda_research.xml")
    images = by_id(replies, MSG_IMAGE)
    assert sorted({im.image_series_index for im in images}) == [1, 2, 3]
    assert images[0].meta["CDL_Chain"] == "cdl-lambda-research"


def test_unknown_ids_with_known_framing_are_skipped(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    waveform = ismrmrd.Waveform.from_array(np.zeros((1, 10), np.uint32))
    from cdl_lambda.gadgets.wire import encode_item
    extra = [encode_text(5, "hello from the scanner"), encode_item(waveform)]
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions, extra=extra)
    assert len(by_id(replies, MSG_IMAGE)) == 4 and not by_id(replies, MSG_ERROR)


def test_unknown_id_without_framing_is_an_error_message(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions[:5],
                       extra=[struct.pack("<H", 777)])
    errors = by_id(replies, MSG_ERROR)
    assert errors and "unknown message id 777" in errors[0]


def test_gadget_failure_arrives_as_error(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    radial = header.replace(b"<trajectory>cartesian</trajectory>", b"<trajectory>radial</trajectory>")
    replies = run_scan(Peer.connect("127.0.0.1", server.port), radial, acquisitions)
    errors = by_id(replies, MSG_ERROR)
    assert errors and "radial" in errors[0] and not by_id(replies, MSG_IMAGE)


def test_bad_slice_reported_other_slices_reconstructed(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    for acq in acquisitions:
        if acq.idx.repetition == 2 and acq.idx.kspace_encode_step_1 == 10:
            acq.data[0, 3] = np.nan
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions)
    images = by_id(replies, MSG_IMAGE)
    assert [im.repetition for im in images] == [0, 1, 3]
    errors = by_id(replies, MSG_ERROR)
    assert len(errors) == 1 and "repetition 2" in errors[0] and "NaN" in errors[0]


def test_gigabyte_lengths_refused_without_allocating(server):
    peer = Peer.connect("127.0.0.1", server.port)
    peer.send_config_text(CONFIG)
    peer.send_raw(struct.pack("<HI", 3, 0xFFFFFFF0))
    errors = by_id(list(peer.replies()), MSG_ERROR)
    assert errors and "limit" in errors[0]


def test_doctype_refused(server):
    peer = Peer.connect("127.0.0.1", server.port)
    peer.send_config_text(CONFIG)
    peer.send_header('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><ismrmrdHeader>&a;</ismrmrdHeader>')
    errors = by_id(list(peer.replies()), MSG_ERROR)
    assert errors and "DOCTYPE" in errors[0]


def test_truncated_stream_does_not_hang():
    a, b = socket.socketpair()
    a.sendall(encode_text(2, CONFIG)[:10])
    a.close()
    with pytest.raises(ProtocolError):
        RobustConnection(b)


def _recon_data(acquisitions) -> ReconData:
    """A ReconData as BucketToBufferGadget builds it: [RO, E1, E2, CHA, N, S, LOC] + headers [E1, E2, N, S, LOC]."""
    lines = [a for a in acquisitions if a.idx.repetition == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    coils, samples = lines[0].data.shape
    data = np.zeros((samples, 64, 1, coils, 1, 1, 1), np.complex64)
    headers = np.empty((64, 1, 1, 1, 1), dtype=object)
    for e1 in range(64):
        headers[e1, 0, 0, 0, 0] = ismrmrd.AcquisitionHeader()
    for acq in lines:
        data[:, acq.idx.kspace_encode_step_1, 0, :, 0, 0, 0] = acq.data.T
        headers[acq.idx.kspace_encode_step_1, 0, 0, 0, 0] = acq.getHead()
    sampling = SamplingDescription()
    sampling.encoded_matrix[:] = (samples, 64, 1)
    sampling.recon_matrix[:] = (samples, 64, 1)
    for axis, (lo, centre, hi) in enumerate([(0, samples // 2, samples - 1), (0, 32, 63), (0, 0, 0)]):
        sampling.sampling_limits[axis].min, sampling.sampling_limits[axis].center = lo, centre
        sampling.sampling_limits[axis].max = hi
    return ReconData([ReconBit(ReconBuffer(data, None, None, headers, sampling))])


def test_recon_data_path_returns_complex64_image_array(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    peer = Peer.connect("127.0.0.1", server.port)
    peer.send_config_text(CONFIG)
    peer.send_header(header)
    peer.send(_recon_data(acquisitions))
    peer.send_close()
    replies = list(peer.replies())
    assert not by_id(replies, MSG_ERROR)
    (array,) = by_id(replies, MSG_IMAGE_ARRAY)
    assert array.data.dtype == np.complex64 and array.data.shape == (128, 64, 1, 1, 1, 1, 1)
    assert array.headers.shape == (1, 1, 1) and array.headers[0, 0, 0].image_index == 1
    assert len(array.meta) == 1 and "CDL_Dictionary" in array.meta[0]
    assert np.abs(array.data).max() > 0


REPORT_CONFIG = CONFIG.replace('</configuration>',
                               '\t<property name="slice_errors" value="report" />\n</configuration>')


def test_slice_errors_report_closes_normally_unless_nothing_was_reconstructed(accelerated_file, server):
    header, acquisitions = read_file(accelerated_file)
    for acq in acquisitions:
        if acq.idx.repetition == 2 and acq.idx.kspace_encode_step_1 == 10:
            acq.data[0, 3] = np.nan
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions, config=REPORT_CONFIG)
    images = by_id(replies, MSG_IMAGE)
    assert [im.repetition for im in images] == [0, 1, 2, 3] and not by_id(replies, MSG_ERROR)
    assert "NOT RECONSTRUCTED" in images[2].meta["GADGETRON_ImageComment"]
    # every image bad: the placeholders, then an ERROR (never an apparently successful scan)
    header, acquisitions = read_file(accelerated_file)
    for acq in acquisitions:
        if acq.idx.kspace_encode_step_1 in (10, 11):  # imaged in every repetition (R = 2, interleaved)
            acq.data[0, 3] = np.nan
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions, config=REPORT_CONFIG)
    images = by_id(replies, MSG_IMAGE)
    assert len(images) == 4 and all("NOT RECONSTRUCTED" in im.meta["ImageComments"] for im in images)
    errors = by_id(replies, MSG_ERROR)
    assert len(errors) == 1 and "4 problem(s)" in errors[0] and "0 image(s) reconstructed" in errors[0]
