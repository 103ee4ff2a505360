"""Mistakes a user makes on the command line: each is refused at once, in one line, with exit status 2, before
anything is reconstructed and without touching a previous output; Ctrl-C ends a replay with status 130."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ismrmrd
import pytest

from cdl_lambda.gadgets import cli
from cdl_lambda.gadgets.client import Peer
from cdl_lambda.gadgets.server import Server
from support import make_shepp_logan, read_file, SHEPP_LOGAN

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _cli(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cdl_lambda.gadgets.cli", *argv], env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("argv, message", [
    (["--chain", "cdl-lamda-fats"], "unknown chain 'cdl-lamda-fats'; known chains: cdl-lambda, cdl-lambda-fast"),
    (["--chain", "nothing.xml"], "unknown chain 'nothing.xml'"),
    (["--param", "iteration=8"], "unknown gadget property 'iteration'"),
    (["--param", "iterations=abc"], "iterations='abc' is not a valid int"),
    (["--server", "localhost"], "must be HOST:PORT"),
    (["--server", "localhost:99999"], "must be HOST:PORT"),
])
def test_bad_arguments_exit_2_and_keep_the_previous_output(tmp_path, caplog, argv, message):
    out = tmp_path / "out.h5"
    out.write_bytes(b"previous good output")
    assert cli.main(["replay", "--out", str(out), "--no-progress", *argv]) == 2
    assert message in caplog.text
    assert out.read_bytes() == b"previous good output"


def test_an_output_under_a_file_is_refused_before_reconstructing(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    start = time.perf_counter()
    assert cli.main(["replay", "--out", str(tmp_path / "file" / "out.h5"), "--no-progress"]) == 2
    assert "is not a folder" in caplog.text and time.perf_counter() - start < 10


def test_a_missing_weights_folder_is_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CDL_LAMBDA_WEIGHTS", str(tmp_path / "absent"))
    assert cli.main(["replay", "--out", str(tmp_path / "o.h5"), "--no-progress"]) == 2
    assert "no weights manifest at" in caplog.text and not (tmp_path / "o.h5").exists()
    result = _cli("serve", "--port", "0", "--no-supervisor", env=dict(ENV, CDL_LAMBDA_WEIGHTS=str(tmp_path / "absent")))
    assert result.returncode == 2 and "refusing to start: no weights manifest" in result.stderr


def test_serve_refuses_a_taken_port_and_a_bad_port_in_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        start = time.perf_counter()
        result = _cli("serve", "--port", str(port))
        seconds = time.perf_counter() - start
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert seconds < 15  # nothing (weights, torch) is loaded before the bind
    result = _cli("serve", "--port", "99999")
    assert result.returncode == 2 and "is not a port number" in result.stderr and "Traceback" not in result.stderr


def test_a_successful_replay_replaces_the_output_and_its_previews(tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    out.write_bytes(b"old")
    previews = tmp_path / "out_previews"
    previews.mkdir()
    (previews / "image_1_0007.png").write_bytes(b"old preview")
    (previews / "notes.txt").write_text("not ours")
    assert cli.main(["replay", "--out", str(out), "--no-progress", "--param", "iterations=2"]) == 0
    with ismrmrd.Dataset(str(out), "dataset", mode="r") as dataset:
        assert dataset.number_of_images("image_1") == 1
    assert sorted(p.name for p in previews.iterdir()) == ["image_1_0001.png", "notes.txt"]
    assert not list(tmp_path.glob(".out.h5.*"))  # no temporary file left behind


def _as_from_a_terminal():
    """In the child before it starts: SIGINT at its default and unblocked, as a user's shell starts a command (a
    process inherits an ignored or blocked SIGINT, and Python then never turns Ctrl-C into KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_ends_a_replay_with_status_130_and_no_traceback(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "cdl_lambda.gadgets.cli", "replay", "--out",
                                str(tmp_path / "o.h5"),
                                "--no-progress", "--param", "iterations=5000"], env=ENV, stderr=subprocess.PIPE,
                               text=True, preexec_fn=_as_from_a_terminal)
    lines = []
    for line in process.stderr:  # wait until the reconstruction runs
        lines.append(line)
        if "prewhitening" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    text = "".join(lines) + rest
    assert process.returncode == 130, text
    assert "Traceback" not in text and "terminate called" not in text and "interrupted" in text
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.skipif(SHEPP_LOGAN is None, reason="ismrmrd-tools (ismrmrd_generate_cartesian_shepp_logan) missing")
def test_the_server_stops_a_scan_whose_peer_has_gone(tmp_path, caplog):
    path = make_shepp_logan(tmp_path / "six.h5", matrix=64, coils=2, repetitions=6)
    header, acquisitions = read_file(path)
    server = Server("127.0.0.1", 0)
    thread = server.start(max_connections=1)
    try:
        peer = Peer.connect("127.0.0.1", server.port)
        peer.send_config_name("cdl-lambda")
        peer.send_parameters({"iterations": "400"})
        peer.send_header(header)
        for acq in acquisitions:
            peer.send(acq)
        peer.send_close()
        next(peer.replies())  # the first image
        peer.close()  # what the kernel does for a replay killed by Ctrl-C
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        server.stop()
    # the scan ends at the next slice boundary (the reset is seen while reading or before the next slice), not
    # after reconstructing the 6 slices for nobody
    assert "the peer went away" in caplog.text or "Connection reset by peer" in caplog.text, caplog.text[-3000:]
    assert "scan done: 6 item(s)" not in caplog.text and "6 image(s) had been sent" not in caplog.text
