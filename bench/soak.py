"""Soak test of a warm ``cdl-lambda serve``: many scans in a row, a sustained acquisition rate, a long stream.

Starts the server as its own process on 127.0.0.1 (``--no-supervisor``, so the measured process is the one that
reconstructs) and talks to it over loopback only, a bounded number of scans. Three checks:

1. ``--scans`` scans in a row (``--slices`` slices each): resident memory, open file descriptors and threads of the
   server after a warm-up scan and after the last one;
2. sustained rate: one stream of ``--long-slices`` slices sent as fast as the socket takes it; acquisitions per
   second from the first byte sent to the last image received, and count in = count reconstructed (the sum of the
   images' ``CDL_Readouts``, the readouts each image was reconstructed from);
3. the server's peak resident memory (VmHWM) before and after that long stream.

Prints a Markdown table and writes it with the command line to ``--out`` (default docs/bench_soak.md).

    python bench/soak.py [--scans 100] [--slices 4] [--long-slices 1000] [--matrix 48] [--coils 4] [--iterations 4]
                         [--weights shipped|builtin|DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ismrmrd

from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE, encode_item
from cdl_lambda.gadgets.client import Peer

SCANNER_RATE = 200  # readouts per second: a fast gradient echo (TR 5 ms); low-field sequences are slower


def header_xml(matrix: int, slices: int) -> str:
    return f"""<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>2730000</H1resonanceFrequency_Hz></experimentalConditions>
<encoding><encodedSpace><matrixSize><x>{matrix}</x><y>{matrix}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{matrix}</x><y>{matrix}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></reconSpace>
<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{matrix - 1}</maximum>
<center>{matrix // 2}</center></kspace_encoding_step_1>
<slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>0</center></slice>
</encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""


def scan_bytes(matrix: int, coils: int, slices: int, seed: int = 0) -> tuple[bytes, int]:
    """(encoded acquisitions of ``slices`` sequential slices, their count): a box phantom, smooth coils, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:matrix, :matrix] / matrix
    image = ((np.abs(x - 0.5) < 0.3) & (np.abs(y - 0.5) < 0.25)).astype(np.complex64)
    maps = np.stack([np.exp(-((x - c) ** 2 + (y - 0.5) ** 2)) for c in np.linspace(0, 1, coils)])
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image * maps, axes=(-2, -1))), axes=(-2, -1))
    parts, count = [], 0
    for s in range(slices):
        noisy = kspace + 0.5 * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
        for e1 in range(matrix):
            acq = ismrmrd.Acquisition.from_array(noisy[:, e1].astype(np.complex64))
            acq.idx.kspace_encode_step_1, acq.idx.slice = e1, s % 1024
            acq.center_sample, acq.scan_counter = matrix // 2, count
            if e1 == matrix - 1:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            parts.append(encode_item(acq))
            count += 1
    return b"".join(parts), count


def run_scan(port: int, header: str, payload: bytes, iterations: int) -> dict:
    """Send one scan (the sender in a thread), collect the replies; images, errors, readouts, seconds."""
    peer = Peer.connect("127.0.0.1", port, timeout=600)
    start = time.perf_counter()

    def send():
        peer.send_config_name("cdl-lambda")
        peer.send_parameters({"iterations": str(iterations)})
        peer.send_header(header)
        peer.send_raw(payload)
        peer.send_close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    images, errors, readouts = 0, [], 0
    identity = ""
    for mid, item in peer.replies():
        if mid == MSG_IMAGE:
            images += 1
            readouts += int(item.meta["CDL_Readouts"])
            identity = f"{item.meta['CDL_Dictionary']}, {item.meta['CDL_Network']}"
        elif mid == MSG_ERROR:
            errors.append(item)
    sender.join()
    peer.close()
    return {"images": images, "errors": errors, "readouts": readouts, "seconds": time.perf_counter() - start,
            "identity": identity}


def proc_status(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "hwm_mib": int(fields["VmHWM"].split()[0]) / 1024,
            "threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: str, port: int, workdir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if weights == "builtin":
        (workdir / "manifest.yaml").write_text("{}\n")
        env["CDL_LAMBDA_WEIGHTS"] = str(workdir)
    elif weights != "shipped":
        env["CDL_LAMBDA_WEIGHTS"] = weights
    with open(workdir / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--no-supervisor", "--port",
                                   str(port), "--idle-timeout", "120"], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 180
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=100)
    parser.add_argument("--slices", type=int, default=4, help="slices per scan in the scans-in-a-row check")
    parser.add_argument("--long-slices", type=int, default=1000, help="slices in the sustained-rate stream (≤ 1024)")
    parser.add_argument("--matrix", type=int, default=48)
    parser.add_argument("--coils", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--weights", default="shipped", help="shipped, builtin (DCT + scalar λ) or a folder")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_soak.md"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    server = start_server(args.weights, port, workdir)
    header = header_xml(args.matrix, args.slices)
    payload, per_scan = scan_bytes(args.matrix, args.coils, args.slices)
    rows = []
    try:
        warm = run_scan(port, header, payload, args.iterations)  # loads weights, compiles, fills caches
        time.sleep(0.5)
        before = proc_status(server.pid)
        lost, failed, seconds, samples = 0, 0, 0.0, [before["rss_mib"]]
        for scan in range(1, args.scans + 1):
            result = run_scan(port, header, payload, args.iterations)
            lost += per_scan - result["readouts"]
            failed += bool(result["errors"]) or result["images"] != args.slices
            seconds += result["seconds"]
            if scan % max(1, args.scans // 5) == 0:
                samples.append(proc_status(server.pid)["rss_mib"])
        time.sleep(0.5)
        after = proc_status(server.pid)
        rows += [
            (f"{args.scans} scans in a row ({args.slices} slices, {per_scan} acquisitions each)",
             f"{failed} failed, {lost} acquisitions lost, {seconds / args.scans * 1000:.0f} ms per scan"),
            ("server RSS after warm-up → after", f"{before['rss_mib']:.1f} → {after['rss_mib']:.1f} MiB "
                                                 f"({after['rss_mib'] - before['rss_mib']:+.1f})"),
            (f"server RSS every {max(1, args.scans // 5)} scans", " → ".join(f"{v:.1f}" for v in samples) + " MiB"),
            ("open file descriptors after warm-up → after", f"{before['fds']} → {after['fds']}"),
            ("threads after warm-up → after", f"{before['threads']} → {after['threads']}"),
        ]
        long_header = header_xml(args.matrix, min(args.long_slices, 1024))
        long_payload, long_count = scan_bytes(args.matrix, args.coils, args.long_slices, seed=1)
        hwm_before = proc_status(server.pid)["hwm_mib"]
        result = run_scan(port, long_header, long_payload, args.iterations)
        status = proc_status(server.pid)
        rate = long_count / result["seconds"]
        rows += [
            (f"sustained stream: {args.long_slices} slices, {long_count} acquisitions",
             f"{rate:.0f} acquisitions/s end to end ({rate / SCANNER_RATE:.0f}× a {SCANNER_RATE}/s scanner), "
             f"{result['seconds']:.1f} s"),
            ("count in = count reconstructed", f"{long_count} = {result['readouts']} "
                                               f"({'yes' if long_count == result['readouts'] else 'NO'}), "
                                               f"{result['images']} images, {len(result['errors'])} errors"),
            ("server peak RSS (VmHWM) before → after the long stream",
             f"{hwm_before:.1f} → {status['hwm_mib']:.1f} MiB"),
        ]
    finally:
        server.terminate()
        server.wait(timeout=60)

    command = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = ["| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    context = (f"Matrix {args.matrix}², {args.coils} coils, {args.iterations} FISTA iterations, weights: "
               f"{args.weights} ({warm['identity']}); server: `cdl-lambda serve --no-supervisor` on 127.0.0.1, "
               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; "
               f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, shared with other work.")
    text = "\n".join(["# Soak: a warm server under load", "", f"`{command.strip()}`", "", context, "", *table, ""])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0 if all("NO" not in b for _, b in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
