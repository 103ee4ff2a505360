"""``chains/cdl_lambda_distributed.xml`` inside the real Gadgetron 4.7.2: three worker Gadgetron servers on
127.0.0.1 ports, found through ``GADGETRON_REMOTE_WORKER_COMMAND`` (a script in the test's folder printing their
addresses as JSON), a warm ``cdl-lambda serve`` behind their ``<connect>`` node, a four-slice scan with the slices
7.5 mm apart.

- Every slice comes back once, in order, numbered 1…4 in series 1, at its own position, with the pixels of the
  same chain run on one machine (the ``<distributed>`` node replaced by its inner stream) and an error against the
  phantom below the zero-filled root-sum-of-squares; every worker served a part.
- A worker killed (SIGKILL) while it receives its slice: the other three slices still arrive, in order and
  correct; the lost slice comes in its place as a zero image marked NOT RECONSTRUCTED at its (interpolated)
  position (``gadgets.merge``), and the client is told (Gadgetron's error text naming the Distributed node).

Small and fast for CI's two cores: 48², 4 coils, 8 FISTA iterations (set on the warm server: Gadgetron 4.7.2
drops an ``<external>`` node's properties on the way to a worker), no ``torch.compile`` (``TORCHDYNAMO_DISABLE``).
Skips when the build is absent (see ``gadgetron_support``).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import uuid
import xml.etree.ElementTree as ET

import h5py
import ismrmrd
import numpy as np
import pytest

import gadgetron_support as gs
from support import relative_error

CHAIN = gs.ROOT / "chains" / "cdl_lambda_distributed.xml"
SLICES, MATRIX, GAP_MM = 4, 48, 7.5
EAGER = {"TORCHDYNAMO_DISABLE": "1"}
# Each slice is reconstructed by the same warm server process from the same prewhitened acquisitions, whether a
# worker or the single-machine chain forwards them: only the order of float32 sums in torch's threaded kernels may
# differ between runs (≈1e-7 relative per operation over a few hundred operations per FISTA iteration).
PIXEL_TOLERANCE = 1e-4


def _start(command: list, log, port: int, **env) -> subprocess.Popen:
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=gs.environment(**env),
                                   cwd=log.parent)
    gs.wait_for_port(port, process, log)
    return process


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_worker(home, folder, name: str) -> tuple[subprocess.Popen, int]:
    port = gs.free_port()
    log = folder / f"{name}.log"
    return _start([str(home / "bin" / "gadgetron"), "-p", str(port), "--disable_storage", "true"], log, port), port


def discovery_command(folder, addresses: list[str]):
    """The script Gadgetron runs to find its workers: it prints their addresses as a JSON list."""
    script = folder / f"workers_{uuid.uuid4().hex[:6]}.sh"
    script.write_text(f"#!/bin/sh\necho '{json.dumps(addresses)}'\n")
    script.chmod(0o755)
    return script


def positioned_scan(scan: gs.Scan, folder, keep_noise: bool) -> gs.Scan:
    """``scan`` with slice s at z = s · GAP_MM (and without its noise scan unless ``keep_noise``)."""
    path = folder / f"positioned_{'noise' if keep_noise else 'nonoise'}.h5"
    path.unlink(missing_ok=True)
    source = ismrmrd.Dataset(str(scan.h5), "dataset", create_if_needed=False)
    target = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    target.write_xml_header(source.read_xml_header())
    for i in range(source.number_of_acquisitions()):
        acq = source.read_acquisition(i)
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and not keep_noise:
            continue
        acq.position[:] = (0.0, 0.0, GAP_MM * acq.idx.slice)
        target.append_acquisition(acq)
    target.close()
    source.close()
    return gs.Scan(path, scan.truth, scan.rss, scan.matrix, scan.fov, scan.directions)


def chain_text(serve_port: int, inline: bool = False) -> str:
    """The shipped chain with the workers' ``<connect>`` port set to the warm server's; ``inline``: the
    single-machine form, the ``<distributed>`` node replaced by its inner stream."""
    root = ET.fromstring(CHAIN.read_bytes())
    stream = root.find("stream")
    distributed = stream.find("distributed")
    distributed.find("stream/external/connect").set("port", str(serve_port))
    if inline:
        gs.inline_distributed(stream)
    return ET.tostring(root, encoding="unicode")


@pytest.fixture(scope="module")
def build():
    return gs.gadgetron_home()


@pytest.fixture(scope="module")
def folder(build, tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def scan(folder):
    return gs.synthetic_scan(folder, slices=SLICES, matrix=MATRIX, coils=4)


@pytest.fixture(scope="module")
def warm_server(folder):
    port = gs.free_port()
    process = _start([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--port", str(port), "--no-supervisor",
                      "--param", "slice_errors=report", "--param", "iterations=8"], folder / "serve.log", port,
                     **EAGER)
    yield port
    _stop(process)


@pytest.fixture(scope="module")
def workers(build, folder, warm_server):
    started = [start_worker(build, folder, f"worker{i}") for i in range(3)]
    yield started
    for process, _ in started:
        _stop(process)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.data, np.float64).reshape(MATRIX, MATRIX)


def _check_images(images, scan: gs.Scan, slices: list[int], lost: tuple = ()) -> None:
    assert [im.slice for im in images] == slices  # each once, sorted
    assert [im.image_index for im in images] == list(range(1, len(slices) + 1))
    for image in images:
        if image.slice in lost:
            continue
        assert image.image_series_index == 1 and (image.contrast, image.repetition) == (0, 0)
        assert np.allclose(image.position, (0.0, 0.0, GAP_MM * image.slice)), (image.slice, image.position[:])
        assert np.allclose(image.slice_dir, scan.directions[2])
        assert tuple(image.matrix_size) == (MATRIX, MATRIX, 1)
        assert image.meta["CDL_Iterations"] == "8" and "NOT RECONSTRUCTED" not in image.meta["GADGETRON_ImageComment"]
        key = (image.slice, 0, 0, 0)
        assert relative_error(_pixels(image), scan.truth[key]) < relative_error(scan.rss[key], scan.truth[key])


def test_every_slice_comes_back_once_with_the_single_machine_pixels(folder, scan, warm_server, workers):
    noisy = positioned_scan(scan, folder, keep_noise=True)
    discovery = discovery_command(folder, [f"127.0.0.1:{port}" for _, port in workers])
    distributed = gs.run_chain(chain_text(warm_server), noisy.stream, folder,
                               GADGETRON_REMOTE_WORKER_COMMAND=discovery)
    assert distributed.rc == 0 and distributed.closed, distributed.log[-3000:]
    assert distributed.log.count("Connecting to peer: 127.0.0.1:") == SLICES
    single = gs.run_chain(chain_text(warm_server, inline=True), noisy.stream, folder)
    assert single.rc == 0 and single.closed, single.log[-3000:]

    _check_images(distributed.images, noisy, list(range(SLICES)))
    _check_images(single.images, noisy, list(range(SLICES)))
    for got, reference in zip(distributed.images, single.images):
        difference = np.linalg.norm(_pixels(got) - _pixels(reference)) / np.linalg.norm(_pixels(reference))
        assert difference < PIXEL_TOLERANCE, (got.slice, difference)
        assert got.meta["WindowCenter"] == reference.meta["WindowCenter"]
    for process, port in workers:  # round robin: every worker got a part of the scan, and is still up
        assert process.poll() is None
        assert "Connection state: [STREAM]" in (folder / f"worker{workers.index((process, port))}.log").read_text()


class KillingProxy:
    """Stands between the main node and one worker: forwards the main node's bytes and, once ``after`` bytes went
    through (the worker is then in the middle of receiving its slice), kills the worker with SIGKILL."""

    def __init__(self, worker: subprocess.Popen, worker_port: int, after: int):
        self.worker, self.worker_port, self.after = worker, worker_port, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.killed_after = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        main, _ = self.listener.accept()
        worker = socket.create_connection(("127.0.0.1", self.worker_port))
        forwarded = 0
        with main, worker:
            while forwarded <= self.after:
                data = main.recv(4096)
                if not data:
                    return
                worker.sendall(data)
                forwarded += len(data)
            self.worker.send_signal(signal.SIGKILL)
            self.worker.wait()
            self.killed_after = forwarded
        self.listener.close()


def test_a_worker_killed_mid_scan_loses_only_its_slice(build, folder, scan, warm_server, workers):
    """Server mode, as at a site (in stream mode Gadgetron aborts the whole run on any error). Without a storage
    server the main node's NoiseAdjustGadget cannot store a noise scan, so this scan has none."""
    clean = positioned_scan(scan, folder, keep_noise=False)
    victim, victim_port = start_worker(build, folder, "victim")
    proxy = KillingProxy(victim, victim_port, after=20_000)  # config + header ≈ 5 kB, one slice ≈ 55 kB
    (first, first_port), (_, third_port) = workers[0], workers[2]
    discovery = discovery_command(folder, [f"127.0.0.1:{first_port}", f"127.0.0.1:{proxy.port}",
                                           f"127.0.0.1:{third_port}"])  # slices 0, 1, 2, 3 → first, proxy, third, first
    main_port = gs.free_port()
    main = _start([str(build / "bin" / "gadgetron"), "-p", str(main_port), "--disable_storage", "true"],
                  folder / "main.log", main_port, GADGETRON_REMOTE_WORKER_COMMAND=discovery)
    name = f"cdl_test_{uuid.uuid4().hex[:8]}.xml"
    config = build / "share" / "gadgetron" / "config" / name
    config.write_text(chain_text(warm_server))
    out = folder / "killed.h5"
    try:
        done = subprocess.run([gs.tool("gadgetron_ismrmrd_client"), "-f", str(clean.h5), "-c", name, "-a",
                               "127.0.0.1", "-p", str(main_port), "-o", str(out), "-G", "scan"], capture_output=True,
                              text=True, timeout=300, env=gs.environment())
    finally:
        config.unlink(missing_ok=True)
        _stop(main)
    report = done.stdout + done.stderr
    assert proxy.killed_after is not None and victim.returncode == -signal.SIGKILL
    assert done.returncode == 0, report
    assert "[Connection Main Thread/Stream/Distributed/Distributed] ERROR" in report  # the client is told
    with h5py.File(out, "r") as f:
        assert list(f["scan"]) == ["image_1"]
        data, headers = f["scan/image_1/data"][:], f["scan/image_1/header"][:]
        attributes = [a.decode() if isinstance(a, bytes) else a for a in f["scan/image_1/attributes"][:]]
    images = []
    for pixels, head, meta in zip(data, headers, attributes):
        image = ismrmrd.Image.from_array(pixels[0, 0].astype(np.float32))
        for field in ("slice", "contrast", "repetition", "image_index", "image_series_index"):
            setattr(image, field, int(head[field]))
        image.position[:], image.slice_dir[:] = head["position"], head["slice_dir"]
        image.meta = ismrmrd.Meta.deserialize(meta)
        images.append(image)
    _check_images(images, clean, [0, 1, 2, 3], lost=(1,))
    (marked,) = [im for im in images if im.slice == 1]
    assert "NOT RECONSTRUCTED: no image came back for slice 1 from its worker" in marked.meta["GADGETRON_ImageComment"]
    assert "interpolated from slices 0 and 2" in marked.meta["CDL_NotReconstructed"]
    assert np.allclose(marked.position, (0.0, 0.0, GAP_MM)) and not np.asarray(marked.data).any()
    assert "CDL_ResidualToNoise" not in marked.meta and marked.image_series_index == 1
    assert first.poll() is None  # the surviving workers are untouched


def test_serve_refuses_a_bad_worker_setting():
    """The workers' settings live on their warm servers (``serve --param``): a bad one stops the start, exit 2."""
    done = subprocess.run([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--port", "0", "--no-supervisor",
                           "--param", "slice_errors=report", "--param", "colour=red"], capture_output=True,
                          text=True, timeout=120, cwd=gs.ROOT, env=gs.environment())
    assert done.returncode == 2 and "unknown gadget property 'colour'" in done.stderr, done.stderr
