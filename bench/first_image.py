"""Time to first image: warm server against a cold active-mode start (``--slices 1``: a one-slice scan).

* reconstruction alone: :meth:`recon.pipeline.Reconstructor.reconstruct` of one slice, warm (weights loaded,
  kernels compiled);
* warm: ``cdl-lambda serve`` already running (one earlier scan done); time from connecting to the first image;
* cold: what Gadgetron's ``<execute>`` node does per scan: listen, start ``python -m gadgetron PORT
  gadgets.handler CDLLambdaGadget``, stream; time from the process start to the first image (process start,
  torch import, weights load, loading the compiled kernels from the persistent cache that the warm server filled,
  see ``recon.solvers.compile_cache_dir``).

Writes a Markdown table (default docs/bench_first_image.md).

    python bench/first_image.py [--size 160] [--coils 4] [--slices 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import publish

from cdl_lambda.gadgets.client import Peer
from cdl_lambda.gadgets.recording import read_recording, stream
from cdl_lambda.lab.acquisition import Scan, Setting
from cdl_lambda.lab.images import load_source, SourceUnavailable
from cdl_lambda.lab.mrd_writer import write_ismrmrd
from cdl_lambda.recon.solvers import compile_cache_dir


def magnitudes(slices: int, size: int) -> np.ndarray:
    try:
        images = load_source("colin27", (size, size))
        return images[np.linspace(0, len(images) - 1, slices).astype(int)]
    except SourceUnavailable:
        fixture = np.load(ROOT / "tests" / "fixtures" / "colin27_axial_128.npz")
        images = next(iter(fixture.values()))
        import torch
        resized = torch.nn.functional.interpolate(torch.from_numpy(images[:, None]).float(), size=(size, size),
                                                  mode="bilinear")[:, 0].numpy()
        return resized[np.arange(slices) % len(resized)]


def make_scan(path: Path, slices: int, size: int, coils: int) -> Scan:
    setting = Setting(kind="lines", matrix=(size, size), coils=coils, noise_level=0.05, acceleration=3)
    scan = Scan(magnitudes(slices, size), setting, seed=0)
    write_ismrmrd(path, scan)
    return scan


def wait_for_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_first_image(path: Path, env: dict) -> float:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        times = []
        for _ in range(2):  # the first scan warms the server (loads, compiles); the second is measured
            header, _, acquisitions = read_recording(path)
            result = stream(Peer.connect("127.0.0.1", port, timeout=600), header, acquisitions, "cdl_lambda.xml")
            if result.errors or result.first_image_seconds is None:
                raise RuntimeError(f"warm scan failed: {result.errors}")
            times.append(result.first_image_seconds)
        return times[-1]
    finally:
        server.terminate()
        server.wait(30)


# Gadgetron sends an active <external> node its <configuration> as XML text (id 2), never a file name
ACTIVE_CONFIG = '<?xml version="1.0"?>\n<configuration><property name="chain" value="cdl-lambda"/></configuration>\n'


def cold_first_image(path: Path, env: dict) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "cdl_lambda.gadgets.handler",
                                "CDLLambdaGadget"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listener.settimeout(600)
        sock, _ = listener.accept()
        header, _, acquisitions = read_recording(path)
        streaming = time.perf_counter()
        result = stream(Peer(sock), header, acquisitions, ACTIVE_CONFIG)
        if result.errors or result.first_image_seconds is None:
            raise RuntimeError(f"cold scan failed: {result.errors}")
        return (streaming - start) + result.first_image_seconds
    finally:
        process.wait(120)
        listener.close()


def reconstruction_alone(scan: Scan) -> float:
    import torch
    from cdl_lambda.recon.pipeline import Reconstructor
    from cdl_lambda.recon.fft import fft2c
    rec = Reconstructor()
    clean = fft2c(torch.from_numpy(scan.coil_maps[:1] * scan.image[:1, None])).numpy()
    kspace = (clean * scan.mask).astype(np.complex64)
    rec.reconstruct(kspace, scan.mask)  # warm-up (compile)
    start = time.perf_counter()
    rec.reconstruct(kspace, scan.mask)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--coils", type=int, default=4)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench_first_image.md")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.h5"
        scan = make_scan(path, args.slices, args.size, args.coils)
        alone = reconstruction_alone(scan)
        warm = warm_first_image(path, env)
        cold = cold_first_image(path, env)
    rows = ["| path | time to first image (s) | × reconstruction alone |", "|---|---|---|",
            f"| reconstruction alone (one slice, warm) | {alone:.2f} | 1.00 |",
            f"| warm server (`cdl-lambda serve`) | {warm:.2f} | {warm / alone:.2f} |",
            f"| cold active mode (`python -m gadgetron …`) | {cold:.2f} | {cold / alone:.2f} |"]
    text = (f"# Time to first image\n\n{args.slices}-slice scan, {args.size}², {args.coils} coils, acceleration 3, "
            f"{args.threads} threads, torch {torch.__version__}.\nCommand: `python bench/first_image.py --size "
            f"{args.size} --coils {args.coils} --slices {args.slices} --threads {args.threads}`\n"
            f"Compile cache: {compile_cache_dir()}; load average {os.getloadavg()[0]:.1f} at the end (shared "
            "machine).\n\n"
            + "\n".join(rows) + "\n")
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
