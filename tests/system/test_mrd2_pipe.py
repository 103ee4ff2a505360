"""MRD 2 routes end to end: ``cdl-lambda stream`` as a node of a Unix pipe between mrd-python's own tools (a
generator and an exporter the project did not write), and ``replay`` of an ISMRMRD 1 file converted to MRD 2 giving
the images of the ISMRMRD 1 path (from a file, from stdin, written as ISMRMRD 1 or MRD 2)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from support import relative_error

mrd = pytest.importorskip("mrd")

ROOT = Path(__file__).resolve().parents[2]


def read_stream(path):
    with mrd.BinaryMrdReader(str(path)) as reader:
        header = reader.read_header()
        items = list(reader.read_data())
    return header, items


def test_stream_is_a_node_between_mrd_python_tools(tmp_path):
    """phantom | cdl-lambda stream | export_png_images: every stage exits 0, the PNG is written, the header goes
    through unchanged, and the image is closer to the true object than mrd-python's own zero-filled
    root-sum-of-squares reconstruction of the same stream."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    pipeline = (f"set -o pipefail; {sys.executable} -m mrd.tools.phantom -m 64 -c 4 -n 0.05 | tee phantom.mrd "
                f"| {sys.executable} -m cdl_lambda.gadgets.cli stream --param iterations=8 2>stream.log "
                f"| tee images.mrd "
                f"| {sys.executable} -m mrd.tools.export_png_images -o png_")
    done = subprocess.run(["bash", "-c", pipeline], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "stream.log").read_text()
    assert done.returncode == 0, done.stderr + log[-3000:]
    assert (tmp_path / "png_0000.png").read_bytes().startswith(b"\x89PNG") and "1 image(s) written" in log
    phantom_header, _ = read_stream(tmp_path / "phantom.mrd")
    header, items = read_stream(tmp_path / "images.mrd")
    assert header == phantom_header
    assert len(items) == 1 and isinstance(items[0], mrd.StreamItem.ImageFloat)
    image = items[0].value
    assert image.data.shape == (1, 1, 64, 64)
    meta = {k: [v.value for v in vs] for k, vs in image.meta.items()}
    assert meta["CDL_Iterations"] == ["8"] and meta["CDL_NoiseSource"]
    subprocess.run([sys.executable, "-m", "mrd.tools.stream_recon", "-i", "phantom.mrd", "-o", "rss.mrd"],
                   cwd=tmp_path, check=True, timeout=300)
    _, rss = read_stream(tmp_path / "rss.mrd")
    from mrd.tools import simulation
    truth = np.abs(simulation.generate_shepp_logan_phantom(64)) * np.sqrt(
        (np.abs(simulation.generate_birdcage_sensitivities(64, 4, 1.5)) ** 2).sum(0))
    truth = truth[0]
    ours, theirs = relative_error(image.data[0, 0], truth), relative_error(rss[0].value.data[0, 0], truth)
    assert ours < 0.7 * theirs, (ours, theirs)


def test_stream_waits_for_the_reconstruction_thread_before_it_returns(tmp_path, monkeypatch):
    """The scan's thread may still be tidying up after its last reply; the stream returns only once it has ended,
    so the interpreter never tears down its libraries under a running reconstruction (a process abort at exit)."""
    import argparse
    import threading
    import time
    from cdl_lambda.gadgets import mrd2_stream
    from cdl_lambda.gadgets.server import Server
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "2", "-n", "0.05", "-o",
                    str(tmp_path / "phantom.mrd")], check=True, timeout=300)
    serve_connection = Server.serve_connection
    ended = threading.Event()

    def slow_to_end(self, sock, address=None):
        serve_connection(self, sock, address)
        time.sleep(1.0)  # work after the last reply: the stream must not return before this ends
        ended.set()

    monkeypatch.setattr(Server, "serve_connection", slow_to_end)
    output = open(tmp_path / "images.mrd", "wb")
    monkeypatch.setattr(mrd2_stream, "_protected_stdout", lambda: output)
    args = argparse.Namespace(chain=None, device="cpu", param=["iterations=2"], input=str(tmp_path / "phantom.mrd"))
    assert mrd2_stream.main(args) == 0
    assert ended.is_set()
    _, items = read_stream(tmp_path / "images.mrd")
    assert len(items) == 1


def test_stream_refuses_input_that_is_not_mrd2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "cdl_lambda.gadgets.cli", "stream"], input=b"\x00garbage",
                          cwd=tmp_path,
                          env=env, capture_output=True, timeout=300)
    assert done.returncode == 2 and b"not an MRD 2 stream" in done.stderr and done.stdout == b""


def _images(path):
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dataset:
        return [dataset.read_image("image_1", i) for i in range(dataset.number_of_images("image_1"))]


def test_ismrmrd1_through_mrd2_gives_the_same_images(accelerated_file, tmp_path, monkeypatch):
    """The ISMRMRD 1 file and its MRD 2 conversion read from stdin, through one warm server: the same images.
    Same inputs, same process, same loaded reconstructor: they agree to float32 rounding (1e-6 of the image's
    peak); the MRD 2 output file holds the same images as the ISMRMRD 1 output."""
    from cdl_lambda.gadgets import mrd2
    from cdl_lambda.gadgets.replay import replay, save
    from cdl_lambda.gadgets.server import Server
    converted = tmp_path / "scan.mrd"
    assert mrd2.convert_file(accelerated_file, converted) == 161
    server = Server("127.0.0.1", 0)
    thread = server.start()
    try:
        parameters = {"iterations": "4"}
        reference = replay(accelerated_file, local_server=server, parameters=parameters)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(converted.read_bytes())))
        from_stdin = replay("-", local_server=server, parameters=parameters)
    finally:
        server.stop()
        thread.join(timeout=60)
    assert not reference.errors and len(reference.images) == 4
    assert not from_stdin.errors and len(from_stdin.images) == len(reference.images)
    for ours, theirs in zip(from_stdin.images, reference.images):
        assert bytes(ours.getHead()) == bytes(theirs.getHead())
        peak = np.abs(theirs.data).max()
        assert np.abs(ours.data - theirs.data).max() <= 1e-6 * peak
    save(reference.images, tmp_path / "reference.h5", "dataset", None)
    mrd2.save_mrd2(from_stdin, tmp_path / "images.mrd", None)
    header, items = read_stream(tmp_path / "images.mrd")
    assert header is not None and header.encoding[0].recon_space.matrix_size.x == 64
    back = [mrd2.image_to_ismrmrd(item.value) for item in items]
    for ours, theirs in zip(back, _images(tmp_path / "reference.h5")):
        assert bytes(ours.getHead())[:-4] == bytes(theirs.getHead())[:-4]  # the last field: the meta's length
        assert dict(ismrmrd.Meta.deserialize(ours.attribute_string)) == dict(
            ismrmrd.Meta.deserialize(theirs.attribute_string))
        assert np.abs(ours.data - theirs.data).max() <= 1e-6 * np.abs(theirs.data).max()


def test_replay_cli_reads_and_writes_mrd2_by_extension_and_flag(simple_file, tmp_path):
    from cdl_lambda.gadgets import mrd2
    from cdl_lambda.gadgets.cli import main
    converted = tmp_path / "scan.mrd"
    mrd2.convert_file(simple_file, converted)
    assert main(["replay", str(converted), "--out", str(tmp_path / "out.mrd"), "--no-previews", "--no-progress",
                 "--param", "iterations=4"]) == 0
    assert main(["replay", str(simple_file), "--out", str(tmp_path / "flag.bin"), "--mrd2", "--no-previews",
                 "--no-progress", "--param", "iterations=4"]) == 0
    for name in ("out.mrd", "flag.bin"):
        _, items = read_stream(tmp_path / name)
        assert len(items) == 1 and isinstance(items[0], mrd.StreamItem.ImageFloat)
        assert items[0].value.data.shape == (1, 1, 64, 64)
