"""CDL-Λ against BART on the same prewhitened multi-coil slice: seconds per slice and image quality.

A 256², 8-coil scan as lab.evaluation.scans simulates it (birdcage array, correlated channel noise and a noise
pre-scan, prewhitened; R = 2 (``--accelerations``) outside 16 calibration lines; image SNR 20) is reconstructed by
recon.pipeline.Reconstructor with each network of ``--networks`` (``NAME[:T][@SCALE]``: a shipped network and its
cap, no T: the solver and cap its manifest entry names; SCALE: the dictionary's scale, default the network's own,
``@1``: the filters as learned, recon.model.CDLLambda.dictionary_scale_for) and each solver of ``--solvers``
(default: the network's own; ADMM with its stopping rule ``--tolerance``) — timed as a whole and in its parts
(ESPIRiT coil maps; CDL-Λ given the maps: CG low-pass part, NET_Θ, the solve) — and by BART's ``ecalib`` + ``pics``
with ℓ1-wavelets and with total variation, λ as tuned on the validation split under the protocol
(docs/evaluation.md; ``--bart-l1`` / ``--bart-tv`` override), with OMP_NUM_THREADS = the torch threads. Quality:
SSIM / NRMSE / PSNR against the true image (lab.evaluation.protocol.score, no rescaling). Writes
docs/bench_bart.md.

    python bench/bart_compare.py --threads 2 --repeats 3 [--accelerations 2 3] [--networks default default@1 OTHER:64]
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

from bench.codesign import with_scale
from bench.report import publish
from cdl_lambda.lab import bart
from cdl_lambda.lab.evaluation import scans
from cdl_lambda.lab.evaluation.protocol import score
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
    parser.add_argument("--accelerations", type=int, nargs="+", default=[2])
    parser.add_argument("--solvers", nargs="+", choices=("fista", "admm"), default=None,
                        help="solvers to time (default: the model's default only)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the ADMM stopping rule")
    parser.add_argument("--networks", nargs="+", default=["default"],
                        help="NAME[:T][@SCALE]: shipped networks, caps (no T: the network's own) and dictionary "
                             "scales (no SCALE: the network's own)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    magnitude = next(iter(load_split("test", (args.size, args.size)).values()))
    reconstructors = []
    for spec in args.networks:
        spec, scale = with_scale(spec)
        name, _, cap = spec.partition(":")
        reconstructors.append(Reconstructor(network=name, iterations=int(cap) if cap else None, device="cpu",
                                            batch_size=1, dictionary_scale=scale))
    solvers = args.solvers or sorted({r.model.solver for r in reconstructors})
    sections = []
    for acceleration in args.accelerations:
        scan = scans.simulate_scan(magnitude[len(magnitude) // 2], acceleration, 20, seed=0)
        kspace, mask = scan.kspace[None].numpy(), scan.mask.numpy()
        calibration = default_calibration_mask(scan.mask)
        maps = coils.estimate_coil_maps(scan.kspace, calibration, noise_std=1.0)[None].numpy()
        images, parts = {}, [("ESPIRiT coil maps", best_of(lambda: coils.estimate_coil_maps(scan.kspace, calibration,
                                                                                             1.0), args.repeats))]
        for reconstructor in reconstructors:
            network, cap = reconstructor.identity["network"], reconstructor.iterations
            for solver in solvers if args.solvers else [reconstructor.model.solver]:
                reconstructor.model.solver = solver
                reconstructor.model.tolerance = args.tolerance if solver == "admm" else 0.0
                reconstructor.reconstruct(kspace, mask, coil_maps=maps, noise_std=1.0)  # warm-up (and compile)
                result = reconstructor.reconstruct(kspace, mask)
                used = None if result.iterations_used is None else int(result.iterations_used[0])
                rule = f"stopping rule {args.tolerance:g}, cap {cap}" if solver == "admm" else f"{cap} iterations"
                filters = f"filters at {result.dictionary_scale:g}× their scale, " if reconstructor.model.lambda_net \
                    else ""
                name = (f"CDL-Λ {network} + {solver.upper()} (whole slice: noise level, ESPIRiT maps, CG low-pass, "
                        f"NET_Θ, {filters}{rule}{f', {used} used' if used else ''})")

                def whole(r=reconstructor):
                    return r.reconstruct(kspace, mask).image[0]

                images[name] = (whole, score(result.image[0], scan.reference), best_of(whole, args.repeats))
                parts.append((f"CDL-Λ {network} + {solver.upper()}, {filters}{cap} iterations, given the maps",
                              best_of(lambda r=reconstructor: r.reconstruct(kspace, mask, coil_maps=maps,
                                                                            noise_std=1.0), args.repeats)))
        if bart.available():
            for label, regularisation in ((f"BART ecalib + pics ℓ1-wavelet (λ {args.bart_l1:g})",
                                           ("-l1", "-r", str(args.bart_l1))),
                                          (f"BART ecalib + pics TV (λ {args.bart_tv:g})",
                                           ("-R", f"T:3:0:{args.bart_tv}"))):
                def with_bart(r=regularisation):
                    return bart.pics_multicoil(scan.kspace.numpy(), r)

                images[label] = (with_bart, score(with_bart(), scan.reference), best_of(with_bart, args.repeats))
        table = [f"### R = {acceleration}", "", "| method | seconds per slice | SSIM | NRMSE | PSNR (dB) |",
                 "|---|---|---|---|---|"]
        table += [f"| {name} | {seconds:.2f} | {q['ssim']:.3f} | {q['nrmse']:.3f} | {q['psnr']:.1f} |"
                  for name, (_, q, seconds) in images.items()]
        table += ["", "| part of CDL-Λ | seconds |", "|---|---|"] + [f"| {n} | {s:.2f} |" for n, s in parts]
        sections += table + [""]
    text = "\n".join([
        "# CDL-Λ and BART on one prewhitened multi-coil slice",
        "",
        f"`python bench/bart_compare.py --threads {args.threads} --repeats {args.repeats} --accelerations "
        f"{' '.join(map(str, args.accelerations))} --networks {' '.join(args.networks)}"
        f"{' --solvers ' + ' '.join(args.solvers) if args.solvers else ''}` on "
        f"{platform.processor() or platform.machine()},"
        f" {args.threads} torch threads and OMP_NUM_THREADS for BART, best of {args.repeats}; {args.size}², 8 coils; "
        f"dictionary {reconstructors[0].identity['dictionary']}; BART pics "
        f"with its default iterations; load average {os.getloadavg()[0]:.1f} at the end (a shared, loaded machine: "
        "compare rows of one run).",
        "",
        *sections,
    ])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
