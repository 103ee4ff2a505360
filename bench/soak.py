"""Soak test of a warm ``cdl-lambda serve`` as shipped, under concurrent load from several clients.

Starts the server as its own process on 127.0.0.1 (``--no-supervisor``, so the measured process is the one that
reconstructs; default network, dictionary, chain and iteration count unless ``--param`` says otherwise) and talks to
it over loopback only:

1. references: one scan of each kind, one client at a time (the images a single client gets);
2. ``--scans`` scans from ``--clients`` clients at once, kinds mixed by ``--mix`` (``MATRIXxCOILS:weight``; the
   128², 4-coil kind is the bundled example ``gadgets/examples/shepp_logan_128_4coils.h5``, the others synthetic
   2-D scans, R = 2 with 16 calibration lines), with ``--bad`` bad peers among them (half disconnect half-way
   through their acquisitions, half send a corrupt message);
3. every second: the server's resident memory (VmRSS), threads and open file descriptors.

Every scan is accounted for: a good scan must bring back as many images as its reference and no ERROR, each image
equal to the reference's within ``--tolerance`` of its largest magnitude; a corrupt peer must get an ERROR; after a
peer vanished the server must go on. Writes a Markdown table (default docs/bench_soak.md) and a plot of memory,
threads and descriptors over time (default docs/figures/soak.png).

    python bench/soak.py [--scans 160] [--clients 8] [--mix 128x4:6,128x8:2,256x4:1,256x8:1] [--bad 8]
                         [--param iterations=64] [--memory-limit SIZE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ismrmrd

from cdl_lambda.gadgets.client import Peer
from cdl_lambda.gadgets.wire import (MSG_ERROR, MSG_HEADER, MSG_IMAGE, encode_close, encode_config_file, encode_item,
                                     encode_text)

EXAMPLE = ROOT / "gadgets" / "examples" / "shepp_logan_128_4coils.h5"


# ------------------------------------------------------------------------------------------------- scans
def header_xml(matrix: int, coils: int, slices: int = 1) -> str:
    return f"""<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<acquisitionSystemInformation><receiverChannels>{coils}</receiverChannels></acquisitionSystemInformation>
<experimentalConditions><H1resonanceFrequency_Hz>2730000</H1resonanceFrequency_Hz></experimentalConditions>
<encoding><encodedSpace><matrixSize><x>{matrix}</x><y>{matrix}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{matrix}</x><y>{matrix}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>220</x><y>220</y><z>5</z></fieldOfView_mm></reconSpace>
<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{matrix - 1}</maximum>
<center>{matrix // 2}</center></kspace_encoding_step_1>
<slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>0</center></slice>
</encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""


def synthetic_acquisitions(matrix: int, coils: int, slices: int = 1, seed: int = 0, acceleration: int = 2,
                           calibration: int = 16) -> list[bytes]:
    """Encoded acquisitions of ``slices`` 2-D slices: an ellipse phantom with inner structure, Gaussian coil
    profiles, complex noise; every ``acceleration``-th line plus ``calibration`` central lines."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:matrix * 1j, -1:1:matrix * 1j]
    image = ((x / 0.7) ** 2 + (y / 0.9) ** 2 < 1).astype(np.complex64) * 0.8
    image += 0.6 * ((((x - 0.25) / 0.15) ** 2 + (y / 0.35) ** 2) < 1) - 0.3 * ((x + 0.2) ** 2 + y ** 2 < 0.04)
    angles = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack([np.exp(-((x - np.cos(a)) ** 2 + (y - np.sin(a)) ** 2) / 1.5) * np.exp(1j * a) for a in angles])
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image * maps, axes=(-2, -1)), norm="ortho"),
                             axes=(-2, -1))
    centre = matrix // 2
    lines = [e1 for e1 in range(matrix) if e1 % acceleration == 0 or abs(e1 - centre) < calibration // 2]
    parts, count = [], 0
    for s in range(slices):
        noisy = kspace + 0.02 * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
        for e1 in lines:
            acq = ismrmrd.Acquisition.from_array(noisy[:, e1].astype(np.complex64))
            acq.idx.kspace_encode_step_1, acq.idx.slice = e1, s
            acq.center_sample, acq.scan_counter = matrix // 2, count
            if e1 == lines[-1]:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            parts.append(encode_item(acq))
            count += 1
    return parts


def example_scan() -> tuple[str, list[bytes]]:
    from cdl_lambda.gadgets.recording import read_recording
    header, _, acquisitions = read_recording(EXAMPLE)
    return header.decode(), [encode_item(acq) for acq in acquisitions]


@dataclass
class Kind:
    name: str                   # "128x4"
    header: str
    acquisitions: list[bytes]
    reference: list[np.ndarray] = field(default_factory=list)  # images a single client gets, in (series, index) order
    seconds: list[float] = field(default_factory=list)


def make_kind(name: str) -> Kind:
    matrix, coils = (int(v) for v in name.split("x"))
    if (matrix, coils) == (128, 4):
        header, acquisitions = example_scan()
    else:
        header, acquisitions = header_xml(matrix, coils), synthetic_acquisitions(matrix, coils, seed=matrix + coils)
    return Kind(name, header, acquisitions)


# ------------------------------------------------------------------------------------------------- clients
@dataclass
class Outcome:
    kind: str
    bad: str            # "", "disconnect" or "corrupt"
    images: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    seconds: float = 0.0
    finished_at: float = 0.0


def _open(port: int, kind: Kind, parameters: dict) -> Peer:
    peer = Peer.connect("127.0.0.1", port, timeout=1800)
    peer.send_raw(encode_config_file("cdl-lambda"))
    if parameters:
        peer.send_parameters(parameters)
    peer.send_raw(encode_text(MSG_HEADER, kind.header))
    return peer


def good_scan(port: int, kind: Kind, parameters: dict) -> Outcome:
    """Send one whole scan (a sender thread) and collect the replies."""
    outcome, start = Outcome(kind.name, ""), time.perf_counter()
    peer = _open(port, kind, parameters)

    def send():
        try:
            peer.send_raw(b"".join(kind.acquisitions) + encode_close())
        except OSError as error:
            outcome.errors.append(f"sending failed: {error}")

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        for mid, item in peer.replies():
            if mid == MSG_IMAGE:
                outcome.images.append((int(item.image_series_index), int(item.image_index),
                                       np.array(item.data, copy=True)))
            elif mid == MSG_ERROR:
                outcome.errors.append(item)
    except OSError as error:
        outcome.errors.append(f"connection lost: {error}")
    sender.join()
    peer.close()
    outcome.images = [image for *_, image in sorted(outcome.images, key=lambda t: t[:2])]
    outcome.seconds = time.perf_counter() - start
    return outcome


def bad_scan(port: int, kind: Kind, parameters: dict, how: str) -> Outcome:
    """A peer that vanishes half-way through its acquisitions, or that sends a message with an unknown id."""
    outcome, start = Outcome(kind.name, how), time.perf_counter()
    peer = _open(port, kind, parameters)
    half = kind.acquisitions[:len(kind.acquisitions) // 2]
    try:
        if how == "disconnect":
            peer.send_raw(b"".join(half))
            peer.socket.socket.close()  # no CLOSE: gone mid-scan
        else:
            peer.send_raw(b"".join(half) + struct.pack("<H", 4321) + b"\xff" * 64)
            peer.socket.socket.shutdown(socket.SHUT_WR)
            for mid, item in peer.replies():
                if mid == MSG_ERROR:
                    outcome.errors.append(item)
            peer.close()
    except OSError as error:
        outcome.errors.append(f"connection lost: {error}")
    outcome.seconds = time.perf_counter() - start
    return outcome


# ------------------------------------------------------------------------------------------------- the server
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


def start_server(port: int, workdir: Path, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(workdir / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--no-supervisor", "--port",
                                   str(port), *extra], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)


class Sampler(threading.Thread):
    """(seconds, RSS MiB, threads, descriptors, scans finished) of ``pid`` every ``every`` seconds."""

    def __init__(self, pid: int, every: float, finished):
        super().__init__(daemon=True)
        self.pid, self.every, self.finished = pid, every, finished
        self.samples: list[tuple] = []
        self.start_time = time.monotonic()
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                s = proc_status(self.pid)
            except (OSError, KeyError):
                return
            self.samples.append((time.monotonic() - self.start_time, s["rss_mib"], s["threads"], s["fds"],
                                 self.finished()))
            self.stopping.wait(self.every)


# ------------------------------------------------------------------------------------------------- the plot
def plot(samples: list[tuple], marks: dict[str, float], path: Path, title: str) -> None:
    """A PNG line plot with Pillow: RSS (MiB, left axis, blue) and threads / descriptors (right axis) over time."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 1000, 460, 80, 70, 40, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    t = np.array([s[0] for s in samples])
    rss, threads, fds = (np.array([s[i] for s in samples], dtype=float) for i in (1, 2, 3))
    t_max = max(float(t.max()), 1.0)
    rss_max = float(np.ceil(rss.max() / 200) * 200)
    count_max = float(max(threads.max(), fds.max(), 10) * 1.25)
    x_of = lambda v: left + (width - left - right) * v / t_max  # noqa: E731 - one-line axis maps
    y_rss = lambda v: height - bottom - (height - top - bottom) * v / rss_max  # noqa: E731 - one-line axis maps
    y_cnt = lambda v: height - bottom - (height - top - bottom) * v / count_max  # noqa: E731 - one-line axis maps
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):
        v = rss_max * k / 5
        draw.line([left - 5, y_rss(v), left, y_rss(v)], fill="black")
        draw.text((5, y_rss(v) - 6), f"{v:.0f} MiB", fill="blue")
        c = count_max * k / 5
        draw.text((width - right + 6, y_cnt(c) - 6), f"{c:.0f}", fill="black")
    for k in range(6):
        v = t_max * k / 5
        draw.text((x_of(v) - 10, height - bottom + 6), f"{v:.0f} s", fill="black")
    for row, (name, when) in enumerate(marks.items()):
        draw.line([x_of(when), top, x_of(when), height - bottom], fill=(160, 160, 160))
        draw.text((x_of(when) + 3, top + 3 + 14 * row), name, fill=(100, 100, 100))
    for values, y_of, colour in ((rss, y_rss, "blue"), (threads, y_cnt, "green"), (fds, y_cnt, "red")):
        draw.line([(x_of(a), y_of(b)) for a, b in zip(t, values)], fill=colour, width=2)
    draw.text((left, 12), title, fill="black")
    draw.text((left, height - 25), "blue: resident memory (left axis)   green: threads   red: open file descriptors "
                                   "(right axis)   x: seconds since the server started", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------------------------------------- main
def parse_mix(text: str) -> list[tuple[str, float]]:
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition(":")
        mix.append((name.strip(), float(weight or 1)))
    return mix


def job_list(mix, scans: int, bad: int, seed: int = 0) -> list[tuple[str, str]]:
    """``scans`` (kind, bad) jobs: kinds drawn by weight, ``bad`` of them bad peers spread evenly."""
    rng = np.random.default_rng(seed)
    names, weights = zip(*mix)
    kinds = rng.choice(names, size=scans, p=np.array(weights) / sum(weights))
    jobs = [(str(k), "") for k in kinds]
    for i in range(bad):
        at = int((i + 0.5) * scans / bad)
        jobs[at] = (jobs[at][0], "disconnect" if i % 2 == 0 else "corrupt")
    return jobs


def quarters(samples: list[tuple]) -> str:
    """Median and highest RSS in each quarter of ``samples`` (time order): a trend shows as rising medians."""
    if len(samples) < 4:
        return "too few samples"
    parts = np.array_split(np.array([s[1] for s in samples]), 4)
    return ", ".join(f"{np.median(p):.0f} / {p.max():.0f}" for p in parts) + " MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=160)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mix", default="128x4:6,128x8:2,256x4:1,256x8:1")
    parser.add_argument("--bad", type=int, default=8, help="bad peers among the scans")
    parser.add_argument("--warmup", type=int, default=16, help="scans of the concurrent phase counted as warm-up")
    parser.add_argument("--param", action="append", default=[], help="NAME=VALUE sent with every scan")
    parser.add_argument("--memory-limit", default=None, help="passed to serve --memory-limit")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest |image − reference| over the reference's largest magnitude")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="hand out no new scan after this many minutes of the concurrent phase (0: no limit)")
    parser.add_argument("--title", default="Soak: a warm server under concurrent load")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_soak.md"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "figures" / "soak.png"))
    args = parser.parse_args(argv)
    parameters = dict(p.split("=", 1) for p in args.param)
    mix = parse_mix(args.mix)
    kinds = {name: make_kind(name) for name, _ in mix}
    jobs = job_list(mix, args.scans, args.bad)

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    extra = ["--idle-timeout", "600"] + (["--memory-limit", args.memory_limit] if args.memory_limit else [])
    server = start_server(port, workdir, extra)
    outcomes: list[Outcome] = []
    sampler = Sampler(server.pid, args.every, lambda: len(outcomes))
    sampler.start()
    marks = {}
    try:
        idle = proc_status(server.pid)
        for kind in kinds.values():  # one client at a time: the reference images
            reference = good_scan(port, kind, parameters)
            if reference.errors or not reference.images:
                raise SystemExit(f"reference scan {kind.name} failed: {reference.errors}")
            kind.reference = reference.images
        after_references = proc_status(server.pid)
        marks["references done"] = time.monotonic() - sampler.start_time

        todo: queue.Queue = queue.Queue()
        for job in jobs:
            todo.put(job)
        lock = threading.Lock()
        warm: dict = {}

        def client():
            while not (stop_at and time.monotonic() > stop_at):
                try:
                    name, bad = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = (bad_scan(port, kinds[name], parameters, bad) if bad
                              else good_scan(port, kinds[name], parameters))
                except OSError as error:
                    result = Outcome(name, bad, errors=[f"could not connect: {error}"])
                with lock:
                    result.finished_at = time.monotonic() - sampler.start_time
                    outcomes.append(result)
                    if len(outcomes) == args.warmup:
                        warm.update(proc_status(server.pid), at=result.finished_at)
                    print(f"{result.finished_at:7.0f} s  scan {len(outcomes):4d}  {name} {bad or 'good'}: "
                          f"{len(result.images)} image(s), {len(result.errors)} error(s), {result.seconds:.1f} s",
                          flush=True)

        start = time.monotonic()
        stop_at = start + 60 * args.minutes if args.minutes else 0.0
        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_seconds = time.monotonic() - start
        time.sleep(2 * args.every)
        end = proc_status(server.pid)
        alive = server.poll() is None
    finally:
        sampler.stopping.set()
        sampler.join()
        server.terminate()
        server.wait(timeout=120)
    marks["warm-up done"] = warm.get("at", 0.0)

    # accounting
    good = [o for o in outcomes if not o.bad]
    expected_images = sum(len(kinds[o.kind].reference) for o in good)
    received_images = sum(len(o.images) for o in good)
    lost = [o for o in good if o.errors or len(o.images) != len(kinds[o.kind].reference)]
    worst = 0.0
    for o in good:
        for image, ref in zip(o.images, kinds[o.kind].reference):
            worst = max(worst, float(np.abs(image - ref).max() / max(np.abs(ref).max(), 1e-30)))
    corrupt = [o for o in outcomes if o.bad == "corrupt"]
    corrupt_answered = sum(1 for o in corrupt if any("4321" in e or "message" in e.lower() for e in o.errors))
    disconnects = sum(1 for o in outcomes if o.bad == "disconnect")
    log_text = (workdir / "server.log").read_text(errors="replace")
    waits = sum(1 for line in log_text.splitlines() if "memory budget:" in line and line.endswith(": waiting"))

    after_warm = [s for s in sampler.samples if s[0] >= warm.get("at", 0.0)]
    rss_after = [s[1] for s in after_warm] or [end["rss_mib"]]
    per_kind = {}
    for o in good:
        per_kind.setdefault(o.kind, []).append(o.seconds)
    rows = [
        ("scans (concurrent phase)", f"{len(outcomes)} of {len(jobs)} planned"
                                     + (f" (no new scan after {args.minutes:g} min)" if len(outcomes) < len(jobs)
                                        else "") + f" from {args.clients} clients at once in "
                                     f"{concurrent_seconds:.0f} s: {len(good)} good, {disconnects} peers gone "
                                     f"mid-scan, {len(corrupt)} corrupt peers"),
        ("scans by kind (matrix × coils: count, median s per scan from connect to last image)",
         ", ".join(f"{k}: {len(v)}, {np.median(v):.1f} s" for k, v in sorted(per_kind.items()))),
        ("images received / expected (good scans)", f"{received_images} / {expected_images}; "
                                                    f"{len(lost)} scan(s) lost or failed"),
        ("largest difference from the single-client images", f"{worst:.1e} of the image's largest magnitude "
                                                             f"(tolerance {args.tolerance:g})"),
        ("corrupt peers answered with an ERROR", f"{corrupt_answered} / {len(corrupt)}"),
        ("server alive at the end", "yes" if alive else "NO"),
        ("server RSS: idle → after the references (1 client)",
         f"{idle['rss_mib']:.0f} → {after_references['rss_mib']:.0f} MiB"),
        (f"server RSS after warm-up ({args.warmup} concurrent scans) → end",
         f"{warm.get('rss_mib', float('nan')):.0f} → {end['rss_mib']:.0f} MiB "
         f"({(end['rss_mib'] / warm.get('rss_mib', end['rss_mib']) - 1) * 100:+.1f} %)"),
        ("server RSS after warm-up: lowest – highest",
         f"{min(rss_after):.0f} – {max(rss_after):.0f} MiB ({(max(rss_after) / min(rss_after) - 1) * 100:.1f} % "
         "spread)"),
        ("server RSS after warm-up, by quarter of the concurrent phase: median / highest", quarters(after_warm)),
        ("server peak RSS (VmHWM)", f"{end['hwm_mib']:.0f} MiB"),
        ("threads: idle → after warm-up → end", f"{idle['threads']} → {warm.get('threads')} → {end['threads']}"),
        ("open descriptors: idle → after warm-up → end", f"{idle['fds']} → {warm.get('fds')} → {end['fds']}"),
        ("scans that waited for the memory budget", f"{waits}"),
    ]
    ok = alive and not lost and worst <= args.tolerance and corrupt_answered == len(corrupt)
    command = "python bench/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    context = (f"Server: `cdl-lambda serve --no-supervisor` (default `--max-concurrent 2`, memory limit "
               f"{args.memory_limit or 'default'}) on 127.0.0.1, the shipped network, dictionary and chain, "
               f"parameters {json.dumps(parameters) if parameters else 'as shipped'}; torch threads "
               f"{os.environ.get('OMP_NUM_THREADS', 'default')}; {platform.machine()}, {os.cpu_count()} CPUs, shared "
               f"with other work (times are not comparable across runs).")
    table = ["| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    figure = os.path.relpath(args.plot, Path(args.out).parent)
    text = "\n".join([f"`{command.strip()}`", "", context, "", *table, "",
                      f"![memory, threads and descriptors over the run]({figure})", ""])
    print(text)
    plot(sampler.samples, marks, Path(args.plot),
         f"cdl-lambda serve: {len(outcomes)} scans from {args.clients} clients ({args.mix}), {args.bad} bad peers")
    (workdir / "samples.json").write_text(json.dumps(sampler.samples))
    print(f"samples and the server log: {workdir}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"# {args.title}\n\n" + text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
