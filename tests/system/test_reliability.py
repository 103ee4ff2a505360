"""A gadget on a scanner must never hang the console, crash the chain, or drop a patient's images silently.

Bad input (table-driven, over the socket of a warm server): each case ends with an ERROR message naming what was
wrong, the other slices' images, and a server that serves the next scan. Faults: a peer that vanishes mid-scan or
goes silent, a reconstruction that raises or runs out of GPU memory (the slice is redone on the CPU), two peers at
once, a native crash of the server process (the supervisor restarts it). Load (short): scans in a row leak no file
descriptors or threads. Files: truncated and corrupt ISMRMRD recordings. Weights: tampering refused at start-up.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import ismrmrd
import numpy as np
import pytest
import torch
import yaml

from support import FAST_REGISTRY, free_port, read_file
from support import run_scan as play_scan
from cdl_lambda.gadgets import cli
from cdl_lambda.gadgets.errors import ProtocolError
from cdl_lambda.gadgets.scan import ScanSession
from cdl_lambda.gadgets.settings import Parameters, ReconstructorCache
from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE, encode_item
from cdl_lambda.gadgets.client import Peer
from cdl_lambda.gadgets.replay import replay
from cdl_lambda.gadgets.server import Server
from support import acquisition, header, header_xml

ROOT = Path(__file__).resolve().parents[2]
SLICES, NY, NX, COILS = 3, 16, 32, 2


# -------------------------------------------------------------------------------------------- a small scan
def scan_acquisitions(slices=SLICES, ny=NY, nx=NX, coils=COILS, seed=0):
    """``slices`` sequential 2-D slices of a smooth random object, each closed by ACQ_LAST_IN_SLICE."""
    rng = np.random.default_rng(seed)
    items = []
    for s in range(slices):
        image = np.zeros((ny, nx), np.complex64)
        image[4:12, 8:24] = 1 + s
        image += 0.05 * rng.standard_normal((ny, nx))
        maps = np.linspace(0.5, 1.0, coils)[:, None, None]
        kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image * maps, axes=(-2, -1))), axes=(-2, -1))
        for e1 in range(ny):
            acq = acquisition(e1, samples=nx, coils=coils, slice_=s,
                              flags=(ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == ny - 1 else ())
            acq.data[:] = kspace[:, e1].astype(np.complex64)
            acq.scan_counter = s * ny + e1
            items.append(acq)
    return items


def converse(port: int, header: bytes | str, items, config="cdl-lambda", close=True, raw_after=None):
    """Send a scan (items: acquisitions or raw bytes) and collect the replies: (images, errors)."""
    peer = Peer.connect("127.0.0.1", port)
    peer.send_config_name(config)
    peer.send_header(header)
    for item in items:
        peer.send_raw(item if isinstance(item, bytes) else encode_item(item))
    if close:
        peer.send_close()
    else:
        peer.socket.socket.shutdown(socket.SHUT_WR)
    replies = list(peer.replies())
    peer.close()
    return [i for m, i in replies if m == MSG_IMAGE], [i for m, i in replies if m == MSG_ERROR]


@pytest.fixture(scope="module")
def warm(cache, registry):
    server = Server("127.0.0.1", 0, cache=cache, registry=registry, idle_timeout=20)
    thread = server.start()
    assert_alive(server)  # warm: weights loaded, kernels compiled (memory figures below are about the input)
    yield server
    server.stop()
    thread.join(timeout=30)


def assert_alive(server):
    images, errors = converse(server.port, header_xml(slices=SLICES), scan_acquisitions())
    assert [im.slice for im in images] == [0, 1, 2] and not errors


# ---------------------------------------------------------------------------- bad readouts: the others survive
def _set(acq, channel, sample, value):
    acq.data[channel, sample] = value
    return acq


def _replace(acq, **changes):
    """A copy of ``acq`` with other channel/sample counts or trajectory (ismrmrd sizes are fixed at creation)."""
    coils = changes.get("coils", acq.active_channels)
    samples = changes.get("samples", acq.number_of_samples)
    trajectory = changes.get("trajectory", 0)
    new = ismrmrd.Acquisition.from_array(np.ones((coils, samples), np.complex64),
                                         np.zeros((samples, trajectory), np.float32) if trajectory else None)
    head = acq.getHead()
    head.active_channels, head.number_of_samples, head.trajectory_dimensions = coils, samples, trajectory
    head.available_channels = coils
    head.center_sample = samples // 2
    new.setHead(head)
    return new


BAD_READOUTS = {  # name: (change to one readout of slice 1, text the ERROR must contain)
    "NaN sample": (lambda a: _set(a, 0, 3, np.nan), "NaN"),
    "Inf sample": (lambda a: _set(a, 1, 0, np.inf), "NaN/Inf"),
    "channels disagree with the other readouts": (lambda a: _replace(a, coils=3), "3 channels"),
    "samples exceed the header's readout": (lambda a: _replace(a, samples=2 * NX), "do not fit"),
    "discard beyond the samples": (lambda a: setattr(a, "discard_pre", NX + 1) or a, "do not fit"),
    "kspace_encode_step_1 beyond the encoding": (lambda a: setattr(a.idx, "kspace_encode_step_1", 40) or a,
                                                 "kspace_encode_step_1 40"),
    "non-Cartesian readout (trajectory)": (lambda a: _replace(a, trajectory=2), "Cartesian"),
}


@pytest.mark.parametrize("case", list(BAD_READOUTS))
def test_bad_readout_refused_named_and_other_slices_returned(case, warm):
    change, text = BAD_READOUTS[case]
    items = scan_acquisitions()
    position = NY + 5  # slice 1, row 5
    items[position] = change(items[position])
    images, errors = converse(warm.port, header_xml(slices=SLICES), items)
    assert [im.slice for im in images] == [0, 2]
    assert len(errors) == 1 and text in errors[0] and "slice 1" in errors[0], errors
    assert "2 image(s) were sent" in errors[0]


def test_counter_beyond_encoding_limits_is_refused_alone(warm):
    items = scan_acquisitions()
    stray = acquisition(3, samples=NX, coils=COILS, slice_=7)
    images, errors = converse(warm.port, header_xml(slices=SLICES), items[:NY] + [stray] + items[NY:])
    assert [im.slice for im in images] == [0, 1, 2]
    assert len(errors) == 1 and "slice counter 7 is beyond the header's maximum 2" in errors[0]


def test_header_channel_count_disagreeing_is_a_warning_not_a_loss(warm, caplog):
    xml = header_xml(slices=SLICES).replace(
        "<encoding>", "<acquisitionSystemInformation><receiverChannels>8</receiverChannels>"
                      "</acquisitionSystemInformation><encoding>")
    images, errors = converse(warm.port, xml, scan_acquisitions())
    assert len(images) == SLICES and not errors
    assert "header says 8 receiver channels, readouts carry 2" in caplog.text


# ------------------------------------------------------------------------ bad headers and bad framing: refused
BAD_STREAMS = {  # name: (header text, raw bytes after the header, text the ERROR must contain)
    "header is not XML": ("this is not < xml", b"", "not valid XML"),
    "header lacks encoding limits": (header_xml(limits=False), b"", "encodingLimits"),
    "header lacks the encoding": ('<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><experimentalConditions>'
                                  '<H1resonanceFrequency_Hz>1</H1resonanceFrequency_Hz></experimentalConditions>'
                                  '</ismrmrdHeader>', b"", "encoding"),
    "radial trajectory": (header_xml(trajectory="radial"), b"", "only Cartesian"),
    "spiral trajectory": (header_xml(trajectory="spiral"), b"", "only Cartesian"),
    "EPI trajectory": (header_xml(trajectory="epi"), b"", "only Cartesian"),
    "absurd matrix": (header_xml(nx=65535, ny=65535), b"", "larger than"),
    "entity expansion": ('<?xml version="1.0"?><!DOCTYPE h [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
                         '<ismrmrdHeader>&b;</ismrmrdHeader>', b"", "DOCTYPE"),
    "external entity": ('<?xml version="1.0"?><!DOCTYPE h [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                        '<ismrmrdHeader>&x;</ismrmrdHeader>', b"", "DOCTYPE"),
    "unknown message id": (header_xml(), struct.pack("<H", 4242), "unknown message id 4242"),
    "acquisition claiming gigabytes": (header_xml(), b"claims", "over the limit"),
    "image claiming gigabytes": (header_xml(), b"image", "over the limit"),
    "text claiming gigabytes": (header_xml(), struct.pack("<HI", 5, 0xFFFFFFF0), "over the limit"),
    "peer error message": (header_xml(), struct.pack("<HQ", 8, 5) + b"boom!", "boom!"),
    "truncated mid-message": (header_xml(), b"truncated", "in the middle of a message"),
}


def _raw(marker: bytes) -> bytes:
    if marker == b"claims":
        acq = acquisition(0, samples=NX, coils=COILS)
        head = acq.getHead()
        head.number_of_samples, head.active_channels = 65535, 65535
        return struct.pack("<H", 1008) + bytes(head)
    if marker == b"image":
        head = ismrmrd.ImageHeader()
        head.data_type, head.channels, head.matrix_size = ismrmrd.DATATYPE_CXDOUBLE, 1024, (4096, 4096, 64)
        return struct.pack("<H", 1022) + bytes(head)
    if marker == b"truncated":
        return encode_item(acquisition(0, samples=NX, coils=COILS))[:300]
    return marker


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_stream_refused_with_a_named_error(case, warm):
    import tracemalloc
    xml, raw, text = BAD_STREAMS[case]
    header_ok = xml == header_xml()
    items = scan_acquisitions()[:NY] + [_raw(raw)] if header_ok else []  # slice 0 finishes before the fault
    tracemalloc.start()
    try:  # a refused header: no CLOSE either (the server has hung up; only FIN, never data into a closed socket)
        images, errors = converse(warm.port, xml, items, close=header_ok and raw != b"truncated")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert errors and text in errors[0], errors
    assert peak < 64 * 2**20  # nothing near the claimed gigabytes was allocated
    assert [im.slice for im in images] == ([0] if header_ok else [])
    if case == "truncated mid-message":
        assert "1 image(s) had been sent" in errors[0]


def test_server_alive_after_all_bad_input(warm):
    assert_alive(warm)


# ------------------------------------------------------------------------------------------- recordings
def test_recordings_not_hdf5_missing_dataset_truncated_corrupt(tmp_path, accelerated_file, caplog, warm):
    """Each bad file: exit status 1 with a message naming the file and the problem; a record that is corrupt in
    the middle of a file still gives the images completed before it."""
    not_hdf5 = tmp_path / "random.h5"
    not_hdf5.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.create_group("something")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(accelerated_file.read_bytes()[: accelerated_file.stat().st_size * 9 // 10])
    for path, text in ((not_hdf5, "not a readable HDF5 file"), (empty, "no ISMRMRD dataset"),
                       (truncated, "not a readable HDF5 file")):
        caplog.clear()
        assert cli.main(["replay", str(path), "--out", str(tmp_path / "o.h5"), "--no-progress"]) == 1
        assert text in caplog.text and path.name in caplog.text

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(accelerated_file.read_bytes())
    with h5py.File(corrupt, "r+") as f:
        data = f["dataset/data"]
        record = data[100]  # repetition 2 or 3 of 4 (1 noise + 4 × ~40 readouts)
        record["head"]["number_of_samples"] = 7
        data[100] = record
    result = replay(corrupt, config="cdl-lambda", local_server=warm)
    assert any("holds" in e and "its header says" in e for e in result.errors), result.errors
    assert len(result.images) >= 2  # the repetitions completed before the corrupt record
    assert any("stream ended without a CLOSE" in e for e in result.errors)  # the partial one: reported, not sent


# --------------------------------------------------------------------------------------------------- faults
def test_peer_vanishing_mid_scan_then_next_scan_served(warm):
    items = scan_acquisitions()
    for abrupt in (False, True):
        sock = socket.create_connection(("127.0.0.1", warm.port))
        peer = Peer(sock)
        peer.send_config_name("cdl-lambda")
        peer.send_header(header_xml(slices=SLICES))
        for acq in items[: NY + 5]:
            peer.send(acq)
        peer.send_raw(encode_item(items[NY + 5])[:100])  # half a message
        if abrupt:  # RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert_alive(warm)


def test_silent_peer_is_dropped_after_the_idle_timeout(cache, registry):
    server = Server("127.0.0.1", 0, cache=cache, registry=registry, idle_timeout=0.5, max_concurrent=1)
    thread = server.start()
    try:
        peer = Peer.connect("127.0.0.1", server.port)
        peer.send_config_name("cdl-lambda")
        peer.send_header(header_xml(slices=SLICES))  # … then nothing
        start = time.monotonic()
        errors = [i for m, i in peer.replies() if m == MSG_ERROR]
        assert errors and "no data from the peer for 0.5 s" in errors[0] and time.monotonic() - start < 10
        assert_alive(server)  # the only slot was released
    finally:
        server.stop()
        thread.join(timeout=30)


class FakeReconstructor:
    """Zero-filled coil combination; raises ``error`` for the slices whose mean magnitude is in ``fail_levels``.
    A stand-in "GPU" keeps its data on the CPU (``data_device``)."""

    data_device = torch.device("cpu")

    def __init__(self, device="cpu", error=None, fail_levels=(), batch_size=1):
        self.device = torch.device("cpu") if device == "cpu" else _FakeCuda()
        self.batch_size = batch_size
        self.error, self.fail_levels = error, set(fail_levels)
        self.identity = {"dictionary": "fake", "network": "fake"}
        self.calls = 0

    def solve(self, kspace, mask, coil_maps, noise_std):
        self.calls += 1
        kspace = kspace.numpy()
        image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1))), axes=(-2, -1))
        combined = np.sqrt((np.abs(image) ** 2).sum(axis=1)).astype(np.complex64)
        norm = np.sqrt((np.linspace(0.5, 1.0, kspace.shape[1]) ** 2).sum())  # the coil weights in the scan
        if self.error is not None and (not self.fail_levels or any(
                round(float(np.abs(c[4:12, 8:24]).mean() / norm)) in self.fail_levels for c in combined)):
            raise self.error
        combined = torch.from_numpy(combined)
        return SimpleNamespace(image=combined, zero_filled=combined, lambda_maps=None, residual_to_noise=None)


class _FakeCuda:
    type = "cuda"

    def __str__(self):
        return "cuda:0"


def run_scan(reconstructor, cpu=None, batch=1):
    sent = []
    reconstructor.batch_size = batch
    scan = ScanSession(header(slices=SLICES), Parameters(iterations=2, batch_slices=batch), reconstructor, "test",
                       sent.append, cpu_fallback=(lambda: cpu) if cpu else None)
    for acq in scan_acquisitions():
        scan.on_item(acq)
    scan.finish()
    return sent, scan


def test_reconstruction_that_raises_loses_only_its_slice():
    failing = FakeReconstructor(error=RuntimeError("solver diverged"), fail_levels={2})  # slice 1 has level 2
    sent, scan = run_scan(failing)
    assert [im.slice for im in sent] == [0, 2]
    assert len(scan.failures) == 1 and "slice 1" in scan.failures[0] and "solver diverged" in scan.failures[0]
    for unexpected in (IndexError("bug"), AssertionError("bug"), MemoryError()):
        sent, scan = run_scan(FakeReconstructor(error=unexpected, fail_levels={2}), batch=3)
        assert [im.slice for im in sent] == [0, 2] and len(scan.failures) == 1


def test_gpu_out_of_memory_redoes_the_slice_on_the_cpu(caplog):
    gpu = FakeReconstructor(device="cuda", error=torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                              "allocate 2.00 GiB"), fail_levels={2})
    cpu = FakeReconstructor()
    sent, scan = run_scan(gpu, cpu=cpu, batch=3)
    assert scan.failures == []
    assert [im.slice for im in sent] == [0, 1, 2]
    comments = [im.meta["GADGETRON_ImageComment"] for im in sent]
    assert "reconstructed on the CPU after GPU out of memory" in comments[1]
    assert "CPU" not in comments[0] and "CPU" not in comments[2]
    assert sent[1].meta["ImageComments"] == comments[1]
    assert [im.meta["CDL_Device"] for im in sent] == ["cuda:0", "cpu", "cuda:0"]
    assert cpu.calls == 1 and "GPU out of memory" in caplog.text
    # a slice that fails on the CPU as well is reported, the others still come back
    sent, scan = run_scan(gpu, cpu=FakeReconstructor(error=RuntimeError("no memory either"), fail_levels={2}))
    assert [im.slice for im in sent] == [0, 2] and "on the CPU as well" in scan.failures[0]


def test_gpu_fallback_wired_through_the_cache_and_server(registry):
    built = []

    def factory(dictionary, network, iterations, device, batch_size, dictionary_scale):
        built.append(device)
        return FakeReconstructor() if device == "cpu" else FakeReconstructor(
            device="cuda", error=torch.cuda.OutOfMemoryError("CUDA out of memory"))

    server = Server("127.0.0.1", 0, cache=ReconstructorCache(factory), registry=registry)
    thread = server.start()
    try:
        images, errors = converse(server.port, header_xml(slices=SLICES), scan_acquisitions())
    finally:
        server.stop()
        thread.join(timeout=30)
    assert not errors and len(images) == SLICES and built == ["auto", "cpu"]
    assert all("reconstructed on the CPU after GPU out of memory" in im.meta["ImageComments"] for im in images)


def test_two_peers_at_once_get_their_own_images(warm):
    items = scan_acquisitions()
    alone = converse(warm.port, header_xml(slices=SLICES), items)[0]
    results = {}

    def one(name, seed):
        results[name] = converse(warm.port, header_xml(slices=SLICES), scan_acquisitions(seed=seed))

    threads = [threading.Thread(target=one, args=(n, s)) for n, s in (("a", 0), ("b", 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for name in "ab":
        images, errors = results[name]
        assert [im.slice for im in images] == [0, 1, 2] and not errors
    for a, b in zip(alone, results["a"][0]):  # same input, same images, whoever else was being served
        assert np.allclose(a.data, b.data, rtol=1e-5, atol=1e-6 * np.abs(a.data).max())
    assert not np.allclose(results["a"][0][0].data, results["b"][0][0].data)


def _quiet_state() -> tuple[int, int]:
    """(open file descriptors, threads) once no scan thread is running."""
    deadline = time.monotonic() + 10
    while any(t.name.startswith("scan-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(os.listdir("/proc/self/fd")), threading.active_count()


def test_scans_in_a_row_leak_no_descriptors_or_threads(warm):
    assert_alive(warm)  # warm up (compiled kernels, caches)
    before = _quiet_state()
    for _ in range(8):
        assert_alive(warm)
    assert _quiet_state() == before


def test_count_in_equals_count_reconstructed(warm):
    items = scan_acquisitions()
    images, errors = converse(warm.port, header_xml(slices=SLICES), items)
    assert not errors and sum(int(im.meta["CDL_Readouts"]) for im in images) == len(items)


# --------------------------------------------------------------------------------- weights at start-up
def _weights_dir(tmp_path: Path, tamper: str | None) -> Path:
    from cdl_lambda.recon.dictionary import dct_dictionary
    folder = tmp_path / "weights"
    (folder / "dictionaries").mkdir(parents=True)
    sha = dct_dictionary(5).save(folder / "dictionaries" / "dct5.pt")
    manifest = {"default": {"dictionary": "dct5"},
                "dictionaries": [{"name": "dct5", "file": "dictionaries/dct5.pt", "sha256": sha}]}
    path = folder / "dictionaries" / "dct5.pt"
    if tamper == "tampered":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif tamper == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif tamper == "missing":
        path.unlink()
    elif tamper == "wrong sha":
        manifest["dictionaries"][0]["sha256"] = "0" * 64
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return folder


@pytest.mark.parametrize("tamper", ["tampered", "truncated", "missing", "wrong sha"])
def test_serve_refuses_to_start_with_bad_weights(tamper, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CDL_LAMBDA_WEIGHTS", str(_weights_dir(tmp_path, tamper)))
    assert cli.main(["serve", "--port", "0", "--no-supervisor"]) == 2
    assert "refusing to start" in caplog.text and "dct5" in caplog.text
    assert ("is missing" if tamper == "missing" else "does not match the manifest's sha256") in caplog.text


def test_startup_check_passes_with_good_weights(tmp_path, monkeypatch):
    from cdl_lambda.gadgets.serve import check_startup
    monkeypatch.setenv("CDL_LAMBDA_WEIGHTS", str(_weights_dir(tmp_path, None)))
    assert check_startup(None).default


# ------------------------------------------------------------------------------ native crash: supervisor
def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(t) for t in text]


def _full_scan(port: int, header: bytes, acquisitions) -> tuple[list, list]:
    peer = Peer.connect("127.0.0.1", port, timeout=120)  # waits in the backlog while a worker starts
    replies = play_scan(peer, header, acquisitions, name="cdl-lambda")
    return [i for m, i in replies if m == MSG_IMAGE], [i for m, i in replies if m == MSG_ERROR]


def test_native_crash_of_the_worker_is_survived(tmp_path, accelerated_file):
    chains = tmp_path / "chains"
    chains.mkdir()
    (chains / "registry.yaml").write_text(yaml.safe_dump(FAST_REGISTRY))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CDL_LAMBDA_CHAINS=str(chains), OMP_NUM_THREADS="1",
               CDL_LAMBDA_WEIGHTS=str(_weights_dir(tmp_path, None)), TORCHDYNAMO_DISABLE="1")
    supervisor = subprocess.Popen([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--port", str(port),
                                   "--idle-timeout", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    header, acquisitions = read_file(accelerated_file)
    try:
        deadline = time.monotonic() + 120
        while True:  # the supervisor binds once the weights are verified
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except ConnectionRefusedError:
                assert supervisor.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        images, errors = _full_scan(port, header, acquisitions)  # the worker is up and warm
        assert len(images) == 4 and not errors
        (worker,) = _children(supervisor.pid)
        peer = Peer.connect("127.0.0.1", port, timeout=60)
        peer.send_config_name("cdl-lambda")
        peer.send_header(header)
        for acq in acquisitions[:50]:
            peer.send(acq)
        time.sleep(0.5)
        os.kill(worker, 11)  # SIGSEGV: what a native crash does
        start = time.monotonic()
        replies = []
        try:  # the connection drops at once, no hang: a clean end, or a reset when the dead worker left input unread
            replies = [m for m, _ in peer.replies()]
        except ProtocolError as error:
            assert "reset" in str(error)
        assert MSG_ERROR not in replies
        assert time.monotonic() - start < 10
        peer.close()
        images, errors = _full_scan(port, header, acquisitions)  # the restarted worker serves the next scan
        assert len(images) == 4 and not errors
        assert _children(supervisor.pid) not in ([], [worker])
    finally:
        supervisor.terminate()
        _, stderr = supervisor.communicate(timeout=60)
    assert b"died from SIGSEGV" in stderr and b"restarting" in stderr, stderr[-3000:]
    assert supervisor.returncode == 0


@pytest.mark.slow
def test_soak_concurrent_clients_with_bad_peers(tmp_path):
    """A small run of bench/soak.py (a few minutes): 4 clients at once, two sizes, two bad peers; every good scan
    brings back its images, equal to a single client's, and the corrupt peer gets an ERROR."""
    sys.path.insert(0, str(ROOT / "bench"))
    import soak
    out = tmp_path / "soak.md"
    assert soak.main(["--scans", "16", "--clients", "4", "--mix", "64x2:3,64x4:1", "--bad", "2", "--warmup", "4",
                      "--param", "iterations=4", "--out", str(out), "--plot", str(tmp_path / "soak.png")]) == 0
    text = out.read_text()
    assert "0 scan(s) lost or failed" in text and "corrupt peers answered with an ERROR | 1 / 1" in text
    assert (tmp_path / "soak.png").stat().st_size > 0
