"""CDL-Λ against BART on the same prewhitened multi-coil slice: seconds per slice and image quality.

A 256², 8-coil scan as lab.evaluation.multicoil simulates it (birdcage array, correlated channel noise and a noise
pre-scan, prewhitened; R = 2 outside 16 calibration lines; image SNR 20) is reconstructed by
recon.pipeline.Reconstructor with the shipped default network (T = 64) — timed as a whole and in its parts (ESPIRiT
coil maps; CDL-Λ given the maps: CG low-pass part, NET_Θ, FISTA) — and by BART's ``ecalib`` + ``pics`` with
ℓ1-wavelets and with total variation, λ as tuned on the validation split by ``cdl-lambda evaluate``
(docs/evaluation.md; ``--bart-l1`` / ``--bart-tv`` override), with OMP_NUM_THREADS = the torch threads. Quality:
SSIM / NRMSE / PSNR against the true image (lab.evaluation.multicoil.score, no rescaling). Writes
docs/bench_bart.md.

    python bench/bart_compare.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish
from cdl_lambda.lab import bart
from cdl_lambda.lab.evaluation import multicoil as MC
from cdl_lambda.lab.images import load_split
from cdl_lambda.recon import coils
from cdl_lambda.recon.pipeline import Reconstructor, default_calibration_mask


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--bart-l1", type=float, default=0.01, help="λ of pics -l1 (tuned: docs/evaluation.md)")
    parser.add_argument("--bart-tv", type=float, default=0.03, help="λ of pics -R T (tuned: docs/evaluation.md)")
    parser.add_argument("--out", default="docs/bench_bart.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    magnitude = next(iter(load_split("test", (args.size, args.size)).values()))
    scan = MC.simulate_scan(magnitude[len(magnitude) // 2], 2, 20, seed=0)
    kspace, mask = scan.kspace[None].numpy(), scan.mask.numpy()
    reconstructor = Reconstructor(iterations=64, device="cpu", batch_size=1)
    calibration = default_calibration_mask(scan.mask)
    maps = coils.estimate_coil_maps(scan.kspace, calibration, noise_std=1.0)[None].numpy()
    reconstructor.reconstruct(kspace, mask, coil_maps=maps, noise_std=1.0)  # warm-up (and compile)

    def whole():
        return reconstructor.reconstruct(kspace, mask).image[0]

    images = {"CDL-Λ (whole slice: noise level, ESPIRiT maps, CG low-pass, NET_Θ, 64 FISTA iterations)": whole}
    if bart.available():
        images[f"BART ecalib + pics ℓ1-wavelet (λ {args.bart_l1:g})"] = (
            lambda: bart.pics_multicoil(scan.kspace.numpy(), ("-l1", "-r", str(args.bart_l1))))
        images[f"BART ecalib + pics TV (λ {args.bart_tv:g})"] = (
            lambda: bart.pics_multicoil(scan.kspace.numpy(), ("-R", f"T:3:0:{args.bart_tv}")))
    rows = []
    for name, fn in images.items():
        quality = MC.score(fn(), scan.reference)
        rows.append((name, best_of(fn, args.repeats), quality))
    parts = [("ESPIRiT coil maps", best_of(lambda: coils.estimate_coil_maps(scan.kspace, calibration, 1.0),
                                           args.repeats)),
             ("CDL-Λ given the maps", best_of(lambda: reconstructor.reconstruct(kspace, mask, coil_maps=maps,
                                                                                noise_std=1.0), args.repeats))]
    table = ["| method | seconds per slice | SSIM | NRMSE | PSNR (dB) |", "|---|---|---|---|---|"]
    table += [f"| {name} | {seconds:.2f} | {q['ssim']:.3f} | {q['nrmse']:.3f} | {q['psnr']:.1f} |"
              for name, seconds, q in rows]
    table += ["", "| part of CDL-Λ | seconds |", "|---|---|"] + [f"| {n} | {s:.2f} |" for n, s in parts]
    text = "\n".join([
        "# CDL-Λ and BART on one prewhitened multi-coil slice",
        "",
        f"`python bench/bart_compare.py --threads {args.threads} --repeats {args.repeats}` on "
        f"{platform.processor() or platform.machine()},"
        f" {args.threads} torch threads, best of {args.repeats}; {args.size}², 8 coils, R = 2, network "
        f"{reconstructor.identity['network']}, dictionary {reconstructor.identity['dictionary']}.",
        "",
        *table,
        "",
    ])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
