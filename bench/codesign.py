"""Network and solver judged together on held-out scans: is the image the pair makes better, and do more iterations
ever make it worse?

Scans (lab.evaluation.multicoil.simulate_scan, 128², 8-coil birdcage array, correlated channel noise prewhitened
with its noise scan, 16 calibration lines, image SNR 20, R = 2, 3, 4): slices of a held-out person (the ``test``
split, itk-head, T1) and of a T2-weighted-like contrast (the second stack of the ``mni152`` source: a population
average, no training subject). ESPIRiT maps from the calibration lines; SSIM / NRMSE of the magnitude against the
truth, no rescaling (lab.evaluation.multicoil.score).

Configurations: a network (a shipped name or a training checkpoint) with a solver, its iteration cap and tolerance.
Results of a configuration are cached in ``--cache`` (JSON) by its label, so a later call with a new checkpoint
only runs that. Writes a Markdown table.

    python bench/codesign.py --candidate runs/finetune-admm.ckpt --out docs/bench_codesign.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish
from cdl_lambda.lab.evaluation import multicoil as MC
from cdl_lambda.lab.images import load_source, load_split
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.weights import WeightsRegistry

ACCELERATIONS = (2, 3, 4)
SIZE = 128


def held_out_slices(per_contrast: int) -> dict[str, np.ndarray]:
    """``{contrast: (n, SIZE, SIZE)}``: evenly spread slices of the held-out person and of the T2-like contrast."""
    person = next(iter(load_split("test", (SIZE, SIZE)).values()))
    mni = load_source("mni152", (SIZE, SIZE))
    t2 = mni[len(mni) // 2:]  # load_source stacks the T1 template, then the T2-like contrast
    pick = lambda stack: stack[np.linspace(0.3 * len(stack), 0.7 * len(stack), per_contrast).round().astype(int)]  # noqa: E731 - a one-line helper
    return {"held-out person (T1)": pick(person), "T2-like (MNI152)": pick(t2)}


def scans(per_contrast: int) -> list[tuple[str, int, MC.Scan]]:
    out = []
    for c_index, (contrast, stack) in enumerate(held_out_slices(per_contrast).items()):
        for i, magnitude in enumerate(stack):
            for acceleration in ACCELERATIONS:
                scan = MC.simulate_scan(magnitude, acceleration, 20, seed=[7, c_index, i, acceleration])
                MC.espirit_maps(scan)
                out.append((contrast, acceleration, scan))
    return out


def model_of(network: str, solver: str, iterations: int, tolerance: float) -> CDLLambda:
    """The named shipped network, or the network of a training checkpoint, with the given solver settings."""
    if Path(network).suffix == ".ckpt":
        from cdl_lambda.lab.train import load_trained
        trained, _ = load_trained(network)
        lambda_net, beta = trained.lambda_net, float(trained.split.beta.detach())
    else:
        loaded = WeightsRegistry().network(network)
        lambda_net, beta = loaded.network, loaded.beta
    return CDLLambda(lambda_net, beta=beta, iterations=iterations, solver=solver, tolerance=tolerance).eval()


def evaluate(model: CDLLambda, dictionary, items) -> dict:
    rows, seconds, used = {}, 0.0, []
    for contrast, acceleration, scan in items:
        start = time.perf_counter()
        with torch.no_grad():
            out = model(scan.kspace[None], scan.mask, dictionary, coil_maps=scan.maps[None], noise_std=1.0)
        seconds += time.perf_counter() - start
        used.append(int(out.iterations_used[0]))
        q = MC.score(out.image[0].numpy(), scan.reference)
        rows.setdefault(f"{contrast}|{acceleration}", []).append((q["ssim"], q["nrmse"]))
    means = {k: [float(np.mean([r[0] for r in v])), float(np.mean([r[1] for r in v]))] for k, v in rows.items()}
    return {"means": means, "seconds": seconds / len(items), "iterations": float(np.mean(used))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", help="the fine-tuned network: a checkpoint or a shipped name")
    parser.add_argument("--baseline", default="cdl-lambda-v3-mc-b8", help="the network it must beat")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the candidate's stopping rule")
    parser.add_argument("--cap", type=int, default=64, help="the candidate's iteration cap")
    parser.add_argument("--per-contrast", type=int, default=2, help="slices per contrast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="runs/codesign.json")
    parser.add_argument("--out", default="docs/bench_codesign.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dictionary = WeightsRegistry().dictionary()
    configs = [(f"{args.baseline} + FISTA, T = 64 (shipped)", args.baseline, "fista", 64, 0.0),
               (f"{args.baseline} + FISTA, T = 256", args.baseline, "fista", 256, 0.0),
               (f"{args.baseline} + ADMM, tol {args.tolerance:g}, cap {args.cap}", args.baseline, "admm", args.cap,
                args.tolerance)]
    if args.candidate:
        name = Path(args.candidate).name
        configs += [(f"{name} + ADMM, tol {args.tolerance:g}, cap {args.cap}", args.candidate, "admm", args.cap,
                     args.tolerance),
                    (f"{name} + ADMM, tol {args.tolerance / 4:g}, cap {2 * args.cap}", args.candidate, "admm",
                     2 * args.cap, args.tolerance / 4)]
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    items = scans(args.per_contrast)
    for label, network, solver, cap, tolerance in configs:
        key = f"{label}|{network}|{os.path.getmtime(network) if Path(network).exists() else ''}|{len(items)}"
        if key not in cache:
            cache[key] = evaluate(model_of(network, solver, cap, tolerance), dictionary, items)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"done {label}", file=sys.stderr, flush=True)
        cache[label] = cache[key]
    columns = sorted({k for label, *_ in configs for k in cache[label]["means"]})
    header = "| network + solver | " + " | ".join(c.replace("|", ", R = ") for c in columns) + \
             " | mean SSIM / NRMSE | iterations | s / slice |"
    rows = [header, "|" + "---|" * (len(columns) + 4)]
    for label, *_ in configs:
        result = cache[label]
        cells = [f"{result['means'][c][0]:.4f} / {result['means'][c][1]:.4f}" for c in columns]
        mean_ssim = np.mean([result["means"][c][0] for c in columns])
        mean_nrmse = np.mean([result["means"][c][1] for c in columns])
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {mean_ssim:.4f} / {mean_nrmse:.4f} | "
                    f"{result['iterations']:.1f} | {result['seconds']:.2f} |")
    text = "\n".join([
        "# Network and solver together, on held-out scans",
        "",
        f"`python bench/codesign.py {' '.join(argv if argv is not None else sys.argv[1:])}`: {len(items)} scans "
        f"(128², 8 coils, SNR 20, R = {', '.join(map(str, ACCELERATIONS))}; {args.per_contrast} slices each of a "
        "held-out person and of a T2-like contrast), SSIM / NRMSE against the truth, no rescaling; dictionary "
        f"{dictionary.name}; {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} (shared machine).",
        "",
        *rows,
        "",
    ])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
