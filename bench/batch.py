"""Per-slice time against batch size: slices of one scan reconstructed in one call must not cost more per slice
than one slice alone.

Each batch size B reconstructs B slices (256², 8 coils, T = 64 by default, coil maps given so that only the
CDL-Λ solve is timed) with :class:`recon.pipeline.Reconstructor` ``batch_size=B`` in one call, after a warm-up
call of the same shape; reported per slice, with the call's minor page faults and kernel (system) time from
``getrusage``. Writes a Markdown table (default docs/bench_batch.md).

    python bench/batch.py [--size 256] [--coils 8] [--iterations 64] [--batches 1 2 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import publish


def synthetic_scan(slices: int, size: int, coils: int, seed: int = 0):
    """(k-space (slices, coils, n, n) complex64, mask (n, n), coil maps (slices, coils, n, n)): smooth random
    objects, Gaussian coil profiles with Σ|c|² = 1, R = 3 random lines with 24 calibration lines."""
    import torch
    from cdl_lambda.recon.fft import fft2c
    from cdl_lambda.recon.sampling import random_line_mask
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    images = []
    for _ in range(slices):
        blobs = sum(rng.uniform(0.3, 1) * np.exp(-((x - rng.uniform(-.5, .5)) ** 2 + (y - rng.uniform(-.5, .5)) ** 2)
                                                  / rng.uniform(0.02, 0.2)) for _ in range(12))
        images.append((blobs * (x ** 2 + y ** 2 < 0.8)).astype(np.complex64))
    angles = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack([np.exp(-((x - 0.8 * np.cos(a)) ** 2 + (y - 0.8 * np.sin(a)) ** 2)) * np.exp(1j * a)
                     for a in angles]).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))
    maps = np.broadcast_to(maps, (slices, coils, size, size)).copy()
    mask = random_line_mask((size, size), 3.0, 24, seed=seed).numpy()
    kspace = fft2c(torch.from_numpy(maps * np.stack(images)[:, None])).numpy() * mask
    noise = 0.01 * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)) * mask
    return (kspace + noise).astype(np.complex64), mask.astype(np.float32), maps


def timed(call):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench_batch.md")
    args = parser.parse_args(argv)
    import torch
    from cdl_lambda.recon.pipeline import Reconstructor
    torch.set_num_threads(args.threads)
    kspace, mask, maps = synthetic_scan(max(args.batches), args.size, args.coils)
    rows = ["| batch size | s / slice | × one slice | minor page faults / slice | kernel time (s) / slice |",
            "|---|---|---|---|---|"]
    alone = None
    for batch in args.batches:
        rec = Reconstructor(iterations=args.iterations, batch_size=batch)
        run = lambda: rec.reconstruct(kspace[:batch], mask, coil_maps=maps[:batch], noise_std=[0.01 * 2 ** 0.5] * batch)  # noqa: E731 - a one-line helper reads best as a lambda here
        run()  # warm-up: compile for this shape, first touch of the heap
        seconds, faults, system = timed(run)
        per_slice = seconds / batch
        alone = alone or per_slice
        rows.append(f"| {batch} | {per_slice:.2f} | {per_slice / alone:.2f} | {faults / batch:,.0f} | "
                    f"{system / batch:.2f} |")
        print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    text = (f"# Per-slice time against batch size\n\n{args.size}², {args.coils} coils, T = {args.iterations}, coil "
            f"maps given, {args.threads} threads, torch {torch.__version__}, load average {load:.1f} at the end "
            f"(a shared machine: compare the rows, not the absolute times).\nCommand: `python bench/batch.py "
            f"--size {args.size} --coils {args.coils} --iterations {args.iterations} --batches "
            f"{' '.join(map(str, args.batches))} --threads {args.threads}`\n\n" + "\n".join(rows) + "\n")
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
