"""How CDL-Λ's time grows with K, T, matrix size and coils, against the FFT cost model.

One FISTA iteration does 2K + 2C + 2 FFTs of N = n² pixels (C = 1 for one coil), so its time should grow like
(2K + 2C + 2) · N log N; the whole reconstruction like T times that plus the network. For each sweep the table
shows the measured ms per iteration and the model's prediction scaled from the sweep's first row.
Writes docs/bench_scaling.md.

    python bench/scaling.py [--threads 2] [--device auto]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish

from bench.latency import run_case
from cdl_lambda.recon.device import choose_device, keep_freed_memory_for_reuse

SWEEPS = {  # name: list of (size, coils, K, T)
    "K": [(128, 1, k, 32) for k in (8, 16, 32, 64)],
    "T": [(128, 1, 32, t) for t in (16, 32, 64, 128)],
    "matrix": [(n, 1, 32, 32) for n in (64, 128, 192, 256)],
    "coils": [(128, c, 32, 32) for c in (1, 4, 8, 16)],
}


def model_cost(size: int, coils: int, k: int) -> float:
    pixels = size * size
    return (2 * k + 2 * coils + 2) * pixels * math.log2(pixels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/bench_scaling.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()  # as recon.pipeline.Reconstructor does on the CPU
    device = choose_device(args.device)
    lines = [f"# CDL-Λ scaling against the FFT cost model\n\nDevice: {device}, {args.threads} threads, torch "
             f"{torch.__version__}, kernel size 9.\nCommand: `python bench/scaling.py --threads {args.threads}`\n"]
    for sweep, cases in SWEEPS.items():
        lines += [f"\n## {sweep}\n", "| size | coils | K | T | ms / slice | ms / iteration | model ms / iteration | "
                  "measured / model |", "|---|---|---|---|---|---|---|---|"]
        first = None
        for size, coils, k, t in cases:
            per_slice, per_iteration, _ = run_case(size, coils, k, 9, device, args.repeats, iterations=t)
            cost = model_cost(size, coils, k)
            if first is None:
                first = per_iteration / cost
            predicted = first * cost
            lines.append(f"| {size}² | {coils} | {k} | {t} | {per_slice * 1e3:.0f} | {per_iteration * 1e3:.2f} | "
                         f"{predicted * 1e3:.2f} | {per_iteration / predicted:.2f} |")
            print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
