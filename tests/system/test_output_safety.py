"""Output paths, a full disk, the version, devices and parameters that do not reach the gadget: each refused or
reported in one line with the right exit status, the previous output intact."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import ismrmrd
import pytest
import torch

from cdl_lambda.gadgets import cli, output_files
from cdl_lambda.gadgets.connection import RobustConnection
from cdl_lambda.gadgets.provenance import parse_parameters, software_version

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "cdl_lambda.gadgets.cli", *argv], env=ENV, capture_output=True,
                          text=True,
                          timeout=300)


def test_a_missing_output_folder_is_refused_unless_mkdir(tmp_path, caplog):
    out = tmp_path / "absent" / "deeper" / "o.h5"
    assert cli.main(["replay", "--out", str(out), "--no-progress", "--param", "iterations=2"]) == 2
    assert "does not exist (create it, or add --mkdir)" in caplog.text and not (tmp_path / "absent").exists()
    assert cli.main(["replay", "--out", str(out), "--no-progress", "--param", "iterations=2", "--mkdir"]) == 0
    assert out.exists()


def test_an_unwritable_output_folder_is_refused_before_reconstructing(tmp_path, caplog):
    assert cli.main(["replay", "--out", "/proc/x.h5", "--no-progress"]) == 2
    assert "cannot write in /proc" in caplog.text and "prewhitening" not in caplog.text


def _previous(out: Path) -> bytes:
    out.write_bytes(b"previous good output")
    return out.read_bytes()


def test_a_write_error_is_one_line_exit_1_and_the_previous_output_stays(tmp_path, monkeypatch, caplog):
    """A simulated ENOSPC from the writer (the real full disk: the tmpfs test below)."""
    out = tmp_path / "o.h5"
    before = _previous(out)

    def full(handle, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output_files, "_write_all", full)
    assert cli.main(["replay", "--out", str(out), "--no-progress", "--param", "iterations=2"]) == 1
    assert f"cannot write {out}: No space left on device" in caplog.text
    assert out.read_bytes() == before and not list(tmp_path.glob(".o.h5.*"))


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount; else skipped: the simulated test above still runs)."""
    mount = shutil.which("mount")
    folder = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("a real full disk needs root and mount(8) for a tiny tmpfs")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_real_full_disk_is_one_line_exit_1_and_the_previous_output_stays(tiny_disk):
    out = tiny_disk / "o.h5"
    before = _previous(out)
    (tiny_disk / "filler").write_bytes(b"\0" * 40_000)  # the 128² images (~70 KB with meta) no longer fit
    result = _cli("replay", "--out", str(out), "--no-progress", "--no-previews", "--param", "iterations=2")
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert out.read_bytes() == before and sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "o.h5"]


def test_version_on_the_command_line_and_in_every_image(tmp_path):
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cdl-lambda {software_version()}"
    assert software_version()[0].isdigit()
    out = tmp_path / "o.h5"
    assert cli.main(["replay", "--out", str(out), "--no-progress", "--param", "iterations=3",
                     "--param", "send_zero_filled=true"]) == 0
    with ismrmrd.Dataset(str(out), "dataset", mode="r") as dataset:
        images = [dataset.read_image(name, 0) for name in ("image_1", "image_2")]
    for image in images:
        assert image.meta["CDL_SoftwareVersion"] == software_version() and image.meta["CDL_NetworkSHA256"]
        assert parse_parameters(image.meta["CDL_Parameters"])["iterations"] == "3"


def test_help_prints_each_default_once():
    text = _cli("replay", "--help").stdout
    assert "(default: None)" not in text and text.count("default: out.h5") == 1
    assert "(default: dataset) (default" not in text and "(default: False)" not in text


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    (["--param", "device=gpu"], "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
])
def test_bad_device_names_are_one_clear_line(argv, message):
    result = _cli("replay", "--no-progress", *argv)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and "Expected one of" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("argv, source", [(["--device", "cuda:0"], "--device"),
                                          (["--param", "device=cuda:1"], "--param device")])
def test_cuda_without_a_gpu_is_refused_naming_where_it_was_asked(tmp_path, caplog, argv, source):
    assert cli.main(["replay", "--out", str(tmp_path / "o.h5"), "--no-progress", *argv]) == 2
    assert f"{source}: device 'cuda" in caplog.text and "no CUDA GPU" in caplog.text


def test_a_server_that_drops_the_parameters_is_refused_and_nothing_written(tmp_path, monkeypatch, caplog):
    """A peer that reads the JSON text message and ignores it, as Gadgetron does: the images say the parameters
    they were made with, and the replay refuses them (exit 2) instead of writing them as if asked for."""
    from cdl_lambda.gadgets.server import Server
    monkeypatch.setattr(RobustConnection, "_parameters_from_text", lambda self, raw: None)
    server = Server("127.0.0.1", 0)
    thread = server.start(max_connections=1)
    out = tmp_path / "o.h5"
    try:
        code = cli.main(["replay", "--out", str(out), "--no-progress", "--server", f"127.0.0.1:{server.port}",
                         "--chain", "cdl-lambda-fast", "--param", "iterations=3"])
    finally:
        server.stop()
        thread.join(timeout=60)
    from cdl_lambda.gadgets.chains import ChainRegistry
    fast = ChainRegistry().chains["cdl-lambda-fast"].parameters["iterations"]  # what the chain itself sets
    assert code == 2 and not out.exists() and fast != 3
    assert f"did not apply --param iterations (the images say iterations={fast})" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--param", "dictionary=site-k12"], "--param dictionary=site-k12: unknown dictionary; known: default"),
    (["--param", "network=v9"], "--param network=v9: unknown network"),
    (["--chain", "cdl_lambda_buffered.xml"], "runs Gadgetron's own gadgets before the CDL-Lambda one"),
])
def test_unknown_weights_and_gadgetron_only_chains_are_refused_up_front(tmp_path, caplog, argv, message):
    assert cli.main(["replay", "--out", str(tmp_path / "o.h5"), "--no-progress", *argv]) == 2
    assert message in caplog.text and "prewhitening" not in caplog.text


def test_an_in_process_replay_opens_no_port_and_counts_its_slices(simple_file, accelerated_file, monkeypatch):
    import socket

    from cdl_lambda.gadgets.recording import expected_images
    from cdl_lambda.gadgets.replay import replay

    def refuse(self, *args):
        raise AssertionError("an in-process replay must not listen on a port")

    monkeypatch.setattr(socket.socket, "listen", refuse)
    result = replay(simple_file, parameters={"iterations": "2"})
    assert result.errors == [] and len(result.images) == 1 and result.images[0].meta["CDL_Status"] == "ok"
    assert expected_images(accelerated_file) == 4 and expected_images(simple_file) == 1
