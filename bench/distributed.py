"""Throughput of ``chains/cdl_lambda_distributed.xml`` against the number of workers, and what it costs per slice
and per scan over the single-machine chain, inside the real Gadgetron 4.7.2 (``CDL_GADGETRON_HOME``).

On one machine every worker Gadgetron and the one warm ``cdl-lambda serve`` behind them share the same cores, so
more workers cannot add compute. With the server reconstructing one connection at a time (``--concurrency 1``) the
distributed chain does the same work one slice after another, and the difference to the single-machine chain is
the distributed node's overhead; with 2 (this machine's cores) the per-slice connections also run side by side.
Each configuration runs a ``--small`` and a ``--slices`` scan (same matrix); T(S) = a + b·S fitted on the two gives
the per-slice time b and the per-scan time a. Bytes per slice are read from the streams.

    python bench/distributed.py [--matrix 64] [--coils 4] [--slices 8] [--small 2] [--iterations 16] [--repeats 2]
        [--concurrency 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the Gadgetron tests' scan builders and runner

from bench.report import publish

import gadgetron_support as gs

CHAIN = ROOT / "chains" / "cdl_lambda_distributed.xml"


CPP_RECON = """<stream>
  <gadget><name>RemoveROOversampling</name><dll>gadgetron_mricore</dll><classname>RemoveROOversamplingGadget</classname></gadget>
  <gadget><name>AccTrig</name><dll>gadgetron_mricore</dll><classname>AcquisitionAccumulateTriggerGadget</classname>
    <property name="trigger_dimension" value="repetition"/><property name="sorting_dimension" value="slice"/></gadget>
  <gadget><name>Buff</name><dll>gadgetron_mricore</dll><classname>BucketToBufferGadget</classname>
    <property name="N_dimension" value=""/><property name="S_dimension" value=""/>
    <property name="split_slices" value="true"/></gadget>
  <gadget><name>SimpleRecon</name><dll>gadgetron_mricore</dll><classname>SimpleReconGadget</classname></gadget>
  <gadget><name>ImageArraySplit</name><dll>gadgetron_mricore</dll><classname>ImageArraySplitGadget</classname></gadget>
</stream>"""


def chain_text(serve_port: int | None, inline: bool) -> str:
    """The shipped chain (``serve_port``: the warm server's), or with ``serve_port`` None the same chain with
    Gadgetron's C++ FFT reconstruction (``SimpleReconGadget``) inside the ``<distributed>`` node in place of the
    product's gadget: the hop alone, with next to no compute."""
    root = ET.fromstring(CHAIN.read_bytes())
    stream = root.find("stream")
    distributed = stream.find("distributed")
    if serve_port is None:
        distributed.remove(distributed.find("stream"))
        distributed.append(ET.fromstring(CPP_RECON))
    else:
        distributed.find("stream/external/connect").set("port", str(serve_port))
    if inline:
        gs.inline_distributed(stream)
    return ET.tostring(root, encoding="unicode")


def start(command: list, log: Path, port: int) -> subprocess.Popen:
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=gs.environment(), cwd=log.parent)
    gs.wait_for_port(port, process, log, timeout=180)
    return process


def timed_run(text: str, scan: gs.Scan, folder: Path, expected: int, **env) -> float:
    start_time = time.perf_counter()
    run = gs.run_chain(text, scan.stream, folder, **env)
    seconds = time.perf_counter() - start_time
    if run.rc != 0 or len(run.images) != expected:
        raise SystemExit(f"run failed (rc {run.rc}, {len(run.images)} of {expected} images): {run.log[-2000:]}")
    return seconds


def measure(args, folder: Path, scans: dict, serve_port: int | None, worker_ports: list, counts: list,
            slices: tuple | None = None) -> list:
    """Rows (configuration, T(slices), slices/s, per slice, per scan): the inline chain, then 1…N workers."""
    small, large = slices or (args.small, args.slices)
    inline = chain_text(serve_port, inline=True)
    distributed = chain_text(serve_port, inline=False)
    timed_run(inline, scans[large], folder, large)  # warm-up: weights, kernels
    configurations = [("single machine (inline chain)", inline, {})]
    for w in counts:
        script = folder / f"workers{w}.sh"
        script.write_text(f"#!/bin/sh\necho '{json.dumps([f'127.0.0.1:{p}' for p in worker_ports[:w]])}'\n")
        script.chmod(0o755)
        configurations.append((f"distributed, {w} worker(s)", distributed,
                               {"GADGETRON_REMOTE_WORKER_COMMAND": str(script)}))
    rows = []
    for name, text, env in configurations:
        times = {s: min(timed_run(text, scans[s], folder, s, **env) for _ in range(args.repeats))
                 for s in (small, large)}
        per_slice = (times[large] - times[small]) / (large - small)
        per_scan = times[small] - small * per_slice
        rows.append((name, times[large], large / times[large], per_slice, per_scan))
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- model
CLINICAL = dict(readout=512, lines=128 + 16, coils=8, image=256 * 256 * 4 + 2048)  # 256², 2× oversampled, R = 2
LINKS = {"1 Gb/s": 117e6, "10 Gb/s": 1170e6}  # bytes/s a TCP stream carries
GPU_SLICE_SECONDS = (0.25, 1.0)  # assumed per-slice GPU times (not measured: no GPU here)
WORKERS = (1, 2, 4, 8, 16, 32)


def throughput(workers: int, compute: float, overhead: float, data: float, bandwidth: float) -> float:
    """Slices/s of N workers: each slice costs its worker compute + overhead + data/B, and all data crosses the
    main node's link: X(N) = min(N / (t_g + t_o + d/B), B / d)."""
    return min(workers / (compute + overhead + data / bandwidth), bandwidth / data)


def model(rows: list, hop_rows: list, hop_bytes: float, args) -> list:
    """The Markdown section modelling N machines with one GPU each from the measured overheads."""
    deltas = [r[3] - hop_rows[0][3] for r in hop_rows[1:]]
    overhead = max(sum(deltas) / len(deltas), 0.0)  # the mean measured hop cost per slice
    per_scan = max(max(r[4] - hop_rows[0][4] for r in hop_rows[1:]), 0.0)
    clinical = (CLINICAL["readout"] * CLINICAL["coils"] * 8 + 188) * CLINICAL["lines"] + CLINICAL["image"]
    overhead *= clinical / hop_bytes  # scaled to a clinical slice's bytes
    lines = [
        "## Model: N machines with one GPU each", "",
        f"Measured here: the product's slice costs {rows[0][3]:.3f} s at {args.matrix}² on the single-machine chain "
        f"(server one scan at a time), and the distributed node adds "
        + ", ".join(f"{d:+.3f}" for d in deltas)
        + f" s per slice with 1…{len(deltas)} workers for the hop alone ({hop_bytes / 1e6:.2f} MB per slice on "
        f"loopback: the main node's serialisation, the worker Gadgetron, the copies), and up to {per_scan:.2f} s per "
        f"scan (a connection per slice). The model takes their mean (at least 0), scaled to a clinical slice's "
        f"bytes, as t_o = {overhead:.3f} s. A clinical slice (256², 8 coils, 2× readout oversampling, R = 2 with 16 "
        f"calibration lines) moves d = {clinical / 1e6:.1f} MB (acquisitions out, image back), all of it through "
        "the main node's link.", "",
        "Throughput of N workers, each slice costing its worker t_g + t_o + d/B and every byte crossing the main "
        "node's link of B bytes/s:", "",
        "    X(N) = min( N / (t_g + t_o + d/B),  B / d ),   at most S workers busy on an S-slice scan", "",
        "It stops scaling at N* = (t_g + t_o + d/B) · B/d, where the main node's link is full; before that, at "
        "N = S, when every slice of a scan has its own worker (a scan's latency then stays a + t_g + t_o + S·d/B); "
        "and the merge holds the images to the end of the scan, so the first image comes with the last. t_g (GPU "
        "time per clinical slice) was not measured (no GPU on this machine): the table assumes "
        + " and ".join(f"{g} s" for g in GPU_SLICE_SECONDS)
        + " (the CPU takes 4.1 s, README).", "",
        "| t_g (s) | link | " + " | ".join(f"N={n}" for n in WORKERS) + " | N* (link full) |",
        "|---|---|" + "---|" * (len(WORKERS) + 1),
    ]
    for compute in GPU_SLICE_SECONDS:
        for link, bandwidth in LINKS.items():
            rates = [throughput(n, compute, overhead, clinical, bandwidth) for n in WORKERS]
            saturation = (compute + overhead + clinical / bandwidth) * bandwidth / clinical
            lines.append(f"| {compute} | {link} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {saturation:.0f} |")
    lines += ["", "Slices per second; a 20-slice scan uses at most 20 workers whatever N is. A third limit, the main "
              "node's own work per slice (NoiseAdjust's prewhitening of every acquisition, serialisation, the merge), "
              "is inside t_o here and was not measured apart; with several workers it is done once per slice on one "
              "CPU, so it caps X at 1 / (that time) as the link does.", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=64)
    parser.add_argument("--coils", type=int, default=4)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--small", type=int, default=2, help="slices of the small scan (per-scan cost)")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", default="1,2", help="the warm server's --max-concurrent values to run")
    parser.add_argument("--hop", default="256,8,4,16", metavar="MATRIX,COILS,SMALL,SLICES",
                        help="the hop alone (C++ FFT inside the distributed node) on scans of this size")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_distributed.md"))
    args = parser.parse_args(argv)
    try:
        home = gs.gadgetron_home()
    except BaseException as error:  # noqa: BLE001 - pytest's Skipped carries the reason the build is unusable
        raise SystemExit(f"no usable Gadgetron build: {error}") from None
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="cdl-bench-distributed-"))
    scans = {s: gs.synthetic_scan(folder, slices=s, matrix=args.matrix, coils=args.coils)
             for s in (args.small, args.slices)}
    sizes = {s: scans[s].stream.stat().st_size for s in scans}
    bytes_in = (sizes[args.slices] - sizes[args.small]) / (args.slices - args.small)
    hop_matrix, hop_coils, hop_small, hop_slices = (int(v) for v in args.hop.split(","))
    hop_folder = folder / "hop"
    hop_folder.mkdir()
    hop_scans = {s: gs.synthetic_scan(hop_folder, slices=s, matrix=hop_matrix, coils=hop_coils)
                 for s in (hop_small, hop_slices)}
    hop_sizes = {s: hop_scans[s].stream.stat().st_size for s in hop_scans}
    hop_bytes = (hop_sizes[hop_slices] - hop_sizes[hop_small]) / (hop_slices - hop_small) + hop_matrix ** 2 * 8

    processes, worker_ports = [], []
    counts = [int(w) for w in args.workers.split(",")]
    tables = {}
    try:
        for i in range(max(counts)):
            port = gs.free_port()
            processes.append(start([str(home / "bin" / "gadgetron"), "-p", str(port), "--disable_storage", "true"],
                                   folder / f"worker{i}.log", port))
            worker_ports.append(port)
        hop_rows = measure(args, hop_folder, hop_scans, None, worker_ports, counts, (hop_small, hop_slices))
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            serve_port = gs.free_port()
            server = start([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--port", str(serve_port),
                            "--no-supervisor",
                            "--max-concurrent", str(concurrency), "--param", "slice_errors=report",
                            "--param", f"iterations={args.iterations}"], folder / f"serve{concurrency}.log", serve_port)
            try:
                tables[concurrency] = measure(args, folder, scans, serve_port, worker_ports, counts)
            finally:
                server.terminate()
                server.wait(timeout=30)
        image_bytes = args.matrix * args.matrix * 4 + 2 * 1024  # float32 pixels + header and meta (≈ 2 kB)
        load = os.getloadavg()[0]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)

    lines = [
        "# Distributed chain on one machine: overhead per slice and per scan",
        "",
        f"Scan: {args.matrix}², {args.coils} coils, R = 2 with 16 calibration lines, noise scan; {args.slices} slices "
        f"(and {args.small} for the per-scan cost), {args.iterations} FISTA iterations; every worker a Gadgetron 4.7.2 "
        "server on 127.0.0.1, all behind one warm `cdl-lambda serve`; "
        f"{os.cpu_count()} CPU cores, shared; load average {load:.1f} at the end. Best of {args.repeats} runs.",
        f"Command: `python bench/distributed.py --matrix {args.matrix} --coils {args.coils} --slices {args.slices} "
        f"--small {args.small} --iterations {args.iterations} --repeats {args.repeats} "
        f"--concurrency {args.concurrency}`",
        "",
        f"| server `--max-concurrent` | configuration | {args.slices}-slice scan (s) | slices/s | per slice (s) | "
        "per scan (s) | Δ per slice vs one machine (s) | Δ per scan (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for concurrency, rows in tables.items():
        base = rows[0]
        for name, total, rate, per_slice, per_scan in rows:
            lines.append(f"| {concurrency} | {name} | {total:.2f} | {rate:.2f} | {per_slice:.3f} | {per_scan:.2f} | "
                         f"{per_slice - base[3]:+.3f} | {per_scan - base[4]:+.2f} |")
    lines += ["", f"Bytes per slice: {bytes_in / 1e3:.0f} kB of acquisitions to a worker, "
              f"{image_bytes / 1e3:.0f} kB of image back (T(S) = a + b·S fitted on {args.small} and {args.slices} "
              "slices: b = per slice, a = per scan).", ""]
    lines += [f"The hop alone: the same chain with Gadgetron's C++ FFT reconstruction (`SimpleReconGadget`) in place "
              f"of the product's gadget, {hop_matrix}², {hop_coils} coils, {hop_small} and {hop_slices} slices "
              f"({hop_bytes / 1e6:.2f} MB per slice: acquisitions out, complex image back).", "",
              "| configuration | " + f"{hop_slices}-slice scan (s) | slices/s | per slice (s) | per scan (s) | "
              "Δ per slice vs one machine (s) | Δ per scan (s) |", "|---|---|---|---|---|---|---|"]
    for name, total, rate, per_slice, per_scan in hop_rows:
        lines.append(f"| {name} | {total:.2f} | {rate:.2f} | {per_slice:.3f} | {per_scan:.2f} | "
                     f"{per_slice - hop_rows[0][3]:+.3f} | {per_scan - hop_rows[0][4]:+.2f} |")
    lines += [""]
    serial = tables.get(1) or next(iter(tables.values()))
    lines += model(serial, hop_rows, hop_bytes, args)
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
