"""CDL-Λ against BART's ℓ1-wavelet compressed sensing on the same 256², 8-coil, R = 4 acquisition.

Both get the same prewhitened k-space and the same coil maps (Walsh maps from the 24 calibration lines), and the
same number of threads (``OMP_NUM_THREADS`` for BART, ``torch.set_num_threads`` for CDL-Λ). BART runs
``pics -l1 -r 0.01 -i 100`` (and, for fairness, two neighbouring -r values). Per-slice wall time (CDL-Λ warm: weights loaded, kernels compiled), SSIM / PSNR /
NMSE against the ground truth (each magnitude image least-squares scaled to the target first, so the different
intensity conventions do not count). Writes docs/bench_bart.md.

    python bench/bart_compare.py [--slices 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import publish  # noqa: E402

from bench.first_image import magnitudes  # noqa: E402
from lab import bart, metrics, physics  # noqa: E402
from lab.acquisition import Scan, Setting  # noqa: E402
from recon import coils  # noqa: E402
from recon.fft import fft2c  # noqa: E402
from recon.pipeline import Reconstructor, default_calibration_mask  # noqa: E402


def acquisition(slices: int, size: int = 256, num_coils: int = 8, seed: int = 0):
    setting = Setting(kind="lines", matrix=(size, size), coils=num_coils, noise_level=0.05,
                               acceleration=4, calib_lines=24)
    scan = Scan(magnitudes(slices, size), setting, seed=seed)
    clean = fft2c(torch.from_numpy(scan.coil_maps * scan.image[:, None])).numpy()
    rng = np.random.default_rng(seed)
    noise = physics.correlated_noise(rng, scan.covariance, (slices, size, size))  # (coils, slices, ny, nx)
    kspace = (clean + noise.transpose(1, 0, 2, 3)) * scan.mask
    whitening = coils.prewhitening_matrix(torch.from_numpy(scan.covariance))
    kspace = coils.prewhiten(torch.from_numpy(kspace.astype(np.complex64)), whitening).numpy()
    return scan, kspace, scan.mask.astype(np.float32)


def bart_pics(kspace: np.ndarray, maps: np.ndarray, threads: int, regularization: float) -> tuple[np.ndarray, float]:
    """BART pics per slice; ``kspace``/``maps`` ``(slices, coils, ny, nx)``. Returns images and s / slice."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out, seconds = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k, s in zip(kspace, maps):
            bart.write_cfl(tmp / "k", k.transpose(1, 2, 0)[:, :, None, :])  # [ny, nx, 1, coils]
            bart.write_cfl(tmp / "s", s.transpose(1, 2, 0)[:, :, None, :])
            start = time.perf_counter()
            subprocess.run(["bart", "pics", "-S", "-l1", "-r", str(regularization), "-i", "100", str(tmp / "k"), str(tmp / "s"),
                            str(tmp / "x")], check=True, env=env, capture_output=True)
            seconds += time.perf_counter() - start
            out.append(bart.read_cfl(tmp / "x").reshape(k.shape[-2:]))
    return np.stack(out), seconds / len(kspace)


def scaled_metrics(target: np.ndarray, image: np.ndarray, mask: np.ndarray) -> dict:
    target, image = np.abs(target), np.abs(image)
    scale = (target * image).sum() / max((image * image).sum(), 1e-30)
    return metrics.all_metrics(target, scale * image, mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench_bart.md")
    parser.add_argument("--bart-lambdas", default="0.01,0.003,0.03",
                        help="BART -r values to run (the first is the reference setting)")
    args = parser.parse_args(argv)
    if not bart.available():
        print("bart is not installed (apt-get install bart)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    scan, kspace, mask = acquisition(args.slices)
    maps = coils.estimate_coil_maps(torch.from_numpy(kspace), default_calibration_mask(torch.from_numpy(mask))).numpy()

    rec = Reconstructor()
    rec.reconstruct(kspace[:1], mask, coil_maps=maps[:1])  # warm-up: compile
    start = time.perf_counter()
    result = rec.reconstruct(kspace, mask, coil_maps=maps)
    cdl_seconds = (time.perf_counter() - start) / args.slices
    methods = [("zero-filled", result.zero_filled, float("nan")),
               (f"CDL-Λ ({rec.identity['network']}, {rec.identity['dictionary']})", result.image, cdl_seconds)]
    for regularization in (float(v) for v in args.bart_lambdas.split(",")):
        images, seconds = bart_pics(kspace, maps, args.threads, regularization)
        methods.append((f"BART pics -l1 -r {regularization:g} -i 100", images, seconds))

    rows = ["| method | s / slice | SSIM | PSNR (dB) | NMSE |", "|---|---|---|---|---|"]
    for name, images, seconds in methods:
        scores = [scaled_metrics(t, x, metrics.foreground_mask(np.abs(t))) for t, x in zip(scan.image, images)]
        mean = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
        rows.append(f"| {name} | {seconds:.2f} | {mean['ssim']:.3f} | {mean['psnr']:.2f} | {mean['nmse']:.4f} |")
    text = (f"# CDL-Λ against BART ℓ1-wavelet CS\n\n{args.slices} slices, 256², 8 coils, R = 4 (24 calibration "
            f"lines), noise level 0.05, {args.threads} threads, brain-masked metrics.\nCommand: `python "
            f"bench/bart_compare.py --slices {args.slices} --threads {args.threads}`\n\n" + "\n".join(rows) + "\n")
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
