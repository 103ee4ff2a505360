"""Per-slice latency of one CDL-Λ reconstruction (the default V3 network, its deployed cap) and its ratio to the FFT
floor, per solver.

For each case and solver: ms per slice (network + split + T iterations), ms per iteration, and that iteration time
divided by the time of the FFTs one iteration must do, measured in the same run with the same torch FFT calls:
FISTA 2K + 2 2-D FFTs of the image size and 2C 1-D FFTs along the phase encoding (the multi-coil normal operator
of a line mask, recon.operators; C = 1 and a 2-D pair for a single coil); ADMM 2K + 2 plus those 2C per CG step,
with the mean CG steps of that solve (none for a single coil). The iteration count is fixed here (no stopping rule)
so that the per-iteration cost is what is measured; docs/bench_convergence.md has how many iterations the rule
takes. Writes a Markdown table (default docs/bench_latency.md).

    python bench/latency.py [--device auto|cpu|cuda] [--threads N] [--repeats 3] [--batch 1]
        [--cases 160x1 256x8] [--solvers fista admm] [--out docs/bench_latency.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish

from cdl_lambda.recon.device import choose_device, keep_freed_memory_for_reuse
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.sampling import central_window_mask, equispaced_line_mask
from cdl_lambda.recon.weights import WeightsRegistry

CASES = {  # name, image size, coils, K, k_f
    "160x1": ("160² single coil, K=32, 9×9", 160, 1, 32, 9),
    "128x8": ("128² 8 coils, K=32, 9×9", 128, 8, 32, 9),
    "256x8": ("256² 8 coils, K=32, 9×9", 256, 8, 32, 9),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_dictionary(num_filters: int, kernel_size: int) -> Dictionary:
    filters = torch.randn(num_filters, kernel_size, kernel_size, generator=torch.Generator().manual_seed(0))
    return Dictionary(filters / filters.flatten(1).norm(dim=1)[:, None, None], name="bench")


def run_case(size, coils, num_filters, kernel_size, device, repeats, iterations=64, batch=1, compiled=True,
             solver="fista"):
    torch.manual_seed(0)
    shape = (size, size)
    dictionary = random_dictionary(num_filters, kernel_size)
    loaded = WeightsRegistry().network("default")
    network = loaded.network if loaded is not None else LambdaNetV3(base_channels=8)
    model = CDLLambda(network, iterations=iterations, compiled=compiled, solver=solver,
                      tolerance=0.0).to(device).eval()
    image = torch.randn(batch, *shape, dtype=torch.complex64, device=device)
    if coils == 1:
        mask = central_window_mask(shape, (size // 2, size // 2)).to(device)
        kspace, maps = mask * fft2c(image), None
    else:
        mask = equispaced_line_mask(shape, 4, 24).to(device)
        maps = torch.randn(batch, coils, *shape, dtype=torch.complex64, device=device)
        maps = maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()
        kspace = mask * fft2c(maps * image.unsqueeze(1))

    def reconstruct(t):
        with torch.inference_mode():
            model(kspace, mask, dictionary, coil_maps=maps, iterations=t)

    total = timed(lambda: reconstruct(iterations), device, repeats)
    cg_steps = list(model.admm.cg_steps)  # of the last full solve (the next call, with no iterations, resets them)
    without_loop = timed(lambda: reconstruct(0), device, repeats)
    per_iteration = (total - without_loop) / iterations

    mean_cg = sum(cg_steps) / len(cg_steps) if solver == "admm" and cg_steps else 0.0
    codes = torch.randn(batch, num_filters, *shape, dtype=torch.complex64, device=device)
    coil_images = torch.randn(batch, max(coils, 1), *shape, dtype=torch.complex64, device=device)
    one = torch.randn(batch, *shape, dtype=torch.complex64, device=device)

    def fft_floor(fn):
        def repeated():
            with torch.inference_mode():
                for _ in range(8):
                    fn()
        return timed(repeated, device, repeats) / 8

    codes_and_image = fft_floor(lambda: (torch.fft.fft2(codes, norm="ortho"), torch.fft.ifft2(codes, norm="ortho"),
                                         torch.fft.fft2(one, norm="ortho"), torch.fft.ifft2(one, norm="ortho")))
    if coils > 1:  # the normal operator of a line mask: 1-D FFTs along the phase encoding (recon.operators)
        coil_pair = fft_floor(lambda: (torch.fft.fft(coil_images, dim=-2, norm="ortho"),
                                       torch.fft.ifft(coil_images, dim=-2, norm="ortho")))
    else:
        coil_pair = fft_floor(lambda: (torch.fft.fft2(coil_images, norm="ortho"),
                                       torch.fft.ifft2(coil_images, norm="ortho")))
    if solver == "admm":
        floor = codes_and_image + (mean_cg * coil_pair if coils > 1 else 0.0)
    else:
        floor = codes_and_image + coil_pair
    return total / batch, per_iteration / batch, floor / batch, mean_cg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="slices per forward pass")
    parser.add_argument("--out", default="docs/bench_latency.md")
    parser.add_argument("--no-compile", action="store_true", help="run FISTA's element-wise work uncompiled")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["160x1", "256x8"])
    parser.add_argument("--solvers", nargs="+", choices=("fista", "admm"), default=["fista", "admm"])
    parser.add_argument("--iterations", type=int, default=0, help="the cap T (0: the default network's own)")
    args = parser.parse_args(argv)
    loaded = WeightsRegistry().network("default")
    iterations = args.iterations or (loaded.solver_settings()["iterations"] if loaded is not None else 64)
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()  # as recon.pipeline.Reconstructor does on the CPU
    device = choose_device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or 'CPU'}, {args.threads} threads")
    rows = [f"| case | solver | batch | ms / slice (T = {iterations}) | ms / iteration | CG steps / iteration | "
            "FFT floor ms / iteration | ratio |", "|---|---|---|---|---|---|---|---|"]
    for case in args.cases:
        name, size, coils, k, kf = CASES[case]
        for solver in args.solvers:
            per_slice, per_iteration, floor, mean_cg = run_case(size, coils, k, kf, device, args.repeats,
                                                                iterations=iterations, batch=args.batch,
                                                                compiled=not args.no_compile, solver=solver)
            cg = f"{mean_cg:.2f}" if solver == "admm" and coils > 1 else "—"
            rows.append(f"| {name} | {solver} | {args.batch} | {per_slice * 1e3:.1f} | {per_iteration * 1e3:.2f} | "
                        f"{cg} | {floor * 1e3:.2f} | {per_iteration / floor:.2f} |")
            print(rows[-1], file=sys.stderr)
    load = os.getloadavg()[0]
    text = (f"# CDL-Λ latency (the default V3 network, T = {iterations} iterations)\n\nDevice: {where}; torch "
            f"{torch.__version__}; load average "
            f"{load:.1f} at the end (a shared machine: compare rows of one run).\n"
            f"Command: `python bench/latency.py --device {args.device} --threads {args.threads} "
            f"--batch {args.batch} --cases {' '.join(args.cases)} --solvers {' '.join(args.solvers)} "
            f"--iterations {iterations}"
            f"{' --no-compile' if args.no_compile else ''}`\n\n" + "\n".join(rows)
            + "\n\nThe FFT floor is the time of the FFTs one iteration must do, measured in the same run: FISTA "
            "2K + 2 of the image size and 2C 1-D ones along the phase encoding (a single coil: 2K + 4 2-D), ADMM "
            "2K + 2 plus the 2C per CG step of its x-update (the mean over the solve).\n")
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
