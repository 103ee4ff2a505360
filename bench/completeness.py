"""The measurements behind the completeness thresholds (gadgets/completeness.py): data residual over the noise and
the share of missing lines on complete scans and on scans cut off part-way, and what a cut does to the image.

Scans: Debian's ``ismrmrd_generate_cartesian_shepp_logan`` (128², 4 coils, 2× readout oversampling, noise scan),
fully sampled (``-a 1``, 2 repetitions) and R = 2 with 24 calibration lines (``-a 2 -w 24``: two repetitions with
interleaved lines, the layout of the bundled example and of the issue's cut-off file), at several noise levels
(``-n``). Image SNR = mean magnitude inside the phantom over the noise std there, from the two fully sampled
repetitions' zero-filled images (difference / √2). A cut scan keeps the acquisitions up to a share of repetition
1's lines. Each scan goes through the gadget's scan session (slice_errors=report) with the shipped network and
dictionary; "error" is ‖|x_cut| − |x_full|‖ / ‖|x_full|‖ of repetition 1 against the complete scan's. Writes
docs/bench_completeness.md.

    python bench/completeness.py --iterations 64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish  # noqa: E402 - after the path set-up
from cdl_lambda.gadgets.recording import read_recording  # noqa: E402 - after the path set-up
from cdl_lambda.gadgets.scan import ScanSession  # noqa: E402 - after the path set-up
from cdl_lambda.gadgets.settings import Parameters, ReconstructorCache  # noqa: E402 - after the path set-up


def generate(folder: Path, noise: float, acceleration: int) -> Path:
    path = folder / f"sl_n{noise}_a{acceleration}.h5"
    extra = ["-a", "2", "-w", "24"] if acceleration == 2 else ["-a", "1", "-r", "2"]
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "128", "-c", "4", "-O", "2", "-n", str(noise),
                    "-C", "-o", str(path), *extra], check=True, capture_output=True, cwd=folder)
    return path


def run(header, acquisitions, cache, iterations: int, noise_scan: bool = True):
    import ismrmrd
    params = Parameters.from_sources({"iterations": iterations, "slice_errors": "report", "send_zero_filled": True})
    sent = []
    xml = ismrmrd.xsd.CreateFromDocument(header)
    scan = ScanSession(xml, params, cache.get(params), "bench", sent.append)
    for acq in acquisitions:
        if noise_scan or not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            scan.on_item(acq)
    scan.finish()
    cdl = [im for im in sent if int(im.image_series_index) in (1, 4)]
    zero = [im for im in sent if int(im.image_series_index) == 2]
    return cdl, zero


def snr(zero_filled) -> float:
    a, b = (np.abs(im.data[0, 0]) for im in zero_filled[:2])
    mean = (a + b) / 2
    inside = mean > 0.3 * mean.max()
    return float(mean[inside].mean() / ((a - b)[inside].std() / np.sqrt(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=64)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.25, 0.45, 0.6, 0.8, 0.9, 0.97])
    parser.add_argument("--out", default="docs/bench_completeness.md")
    args = parser.parse_args()
    cache = ReconstructorCache()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for noise in args.noise:
            for acceleration in (1, 2):
                path = generate(Path(tmp), noise, acceleration)
                header, _, acquisitions = read_recording(path)
                acquisitions = list(acquisitions)
                cdl, zero = run(header, acquisitions, cache, args.iterations)
                full = np.abs(cdl[1].data[0, 0])
                if acceleration == 1:
                    level = snr(zero)  # the R = 2 scan of the same noise level has the same SNR per line
                for label, noise_scan in (("complete", True), ("complete, no noise scan", False)):
                    images = cdl if noise_scan else run(header, acquisitions, cache, args.iterations, False)[0]
                    for im in images:
                        rows.append((noise, level, acceleration, label, im.meta.get("CDL_ResidualToNoise"),
                                     im.meta.get("CDL_Status"), "0", "0.000", im.meta.get("CDL_StatusReason", "")))
                rep1 = [i for i, a in enumerate(acquisitions) if a.idx.repetition == 1]
                for cut in args.cuts:
                    keep = rep1[0] + int(round(cut * len(rep1)))
                    images = run(header, acquisitions[:keep], cache, args.iterations)[0]
                    im = images[-1]
                    error = np.linalg.norm(np.abs(im.data[0, 0]) - full) / np.linalg.norm(full)
                    rows.append((noise, level, acceleration, f"cut at {cut:.0%} of rep. 1", im.meta.get(
                        "CDL_ResidualToNoise"), im.meta.get("CDL_Status"), f"{1 - cut:.0%}", f"{error:.3f}",
                        im.meta.get("CDL_StatusReason", "")))
                print(rows[-1], flush=True)
    lines = ["# Completeness thresholds: measurements", "",
             f"`python bench/completeness.py --iterations {args.iterations}` (shared, loaded 2-core CPU; Debian "
             "Shepp-Logan 128², 4 coils; see the script's docstring). SNR: image SNR of the fully sampled scan at "
             "that noise level.", "",
             "| -n | SNR | R | scan | residual / noise | status | lines cut | error vs complete | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for noise, level, acc, label, residual, status, cut, error, reason in rows:
        lines.append(f"| {noise} | {level:.0f} | {acc} | {label} | {residual} | {status} | {cut} | {error} | "
                     f"{reason} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
