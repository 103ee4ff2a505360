"""Network and solver judged together on held-out scans: is the image the pair makes better, and do more iterations
ever make it worse?

Scans (lab.evaluation.scans.simulate_scan, 128² or ``--size``, 8-coil birdcage array, correlated channel noise
prewhitened with its noise scan, 16 calibration lines, image SNR 10 and 20, R = 2, 3, 4) of one split's person in
T1 and in a T2-weighted contrast (lab.contrasts.t2_weighted): ``--split val`` (dipy-t1, the default: choose
networks here) or ``--split test`` (itk-head: report only). ESPIRiT maps from the calibration lines; SSIM / NRMSE
of the magnitude against the truth, no rescaling (lab.evaluation.protocol.score).

Configurations: the shipped network with FISTA at T = 32, 64 and 256, and each
``--candidate NETWORK[:SOLVER:CAP:TOL][@SCALE]`` (a shipped name or a training checkpoint; default FISTA at its
deployed cap: the manifest's, or the checkpoint's validation cap; SCALE: its dictionary's scale, default the
network's own, recon.model.CDLLambda.dictionary_scale_for).
Results are cached in ``--cache`` (JSON) by label, file time and scan set, so a later call only runs what is new.
Writes a Markdown table.

    python bench/codesign.py --candidate runs/campaign-T32.ckpt --candidate runs/campaign-T64.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish
from cdl_lambda.lab.evaluation import product, scans as S
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.weights import WeightsRegistry


def with_scale(spec: str) -> tuple[str, float | str]:
    """``NAME[@SCALE]`` → (NAME, the dictionary's scale: a number, or "auto" without one,
    recon.model.CDLLambda.dictionary_scale_for)."""
    name, _, scale = spec.partition("@")
    return name, float(scale) if scale else "auto"


def model_of(network: str, solver: str, iterations: int, tolerance: float,
             dictionary_scale: float | str = "auto") -> CDLLambda:
    """The named shipped network, or the network of a training checkpoint, with the given solver settings and
    dictionary scale."""
    if Path(network).suffix == ".ckpt":
        from cdl_lambda.lab.train import load_trained
        trained, _ = load_trained(network)
        lambda_net, beta, passes = trained.lambda_net, float(trained.split.beta.detach()), trained.lambda_passes
    else:
        loaded = WeightsRegistry().network(network)
        lambda_net, beta, passes = loaded.network, loaded.beta, 1
    return CDLLambda(lambda_net, beta=beta, iterations=iterations, solver=solver, tolerance=tolerance,
                     dictionary_scale=dictionary_scale, lambda_passes=passes).eval()


def evaluate(model: CDLLambda, dictionary, items) -> dict:
    """Per contrast and R the mean SSIM / NRMSE (lab.evaluation.product), seconds per slice, mean iterations used
    and the range of the residual relative to the noise."""
    results = product.reconstruct_and_score(model, items, dictionary)
    means = {k: list(v) for k, v in product.mean_quality(results, lambda r: f"{r.contrast}|{r.acceleration}").items()}
    residuals = [r.residual_to_noise for r in results]
    return {"means": means, "seconds": float(np.mean([r.seconds for r in results])),
            "iterations": float(np.mean([r.iterations_used for r in results])),
            "residual": [min(residuals), max(residuals)]}


def deployed_cap(network: str, registry: WeightsRegistry | None = None) -> int:
    """The FISTA cap ``network`` runs at: its manifest entry's for a shipped name; for a checkpoint the cap it was
    validated at, which its export deploys (``--val-iterations``)."""
    if Path(network).suffix == ".ckpt":
        return int(torch.load(network, map_location="cpu", weights_only=True)["config"]["val_iterations"])
    return int((registry or WeightsRegistry()).network(network).solver_settings()["iterations"])


def candidate_config(text: str) -> tuple[str, str, str, int, float, float | str]:
    """``NETWORK[:SOLVER:CAP:TOL][@SCALE]`` → (label, network, solver, cap, tolerance, dictionary scale); without
    the rest: FISTA at the network's deployed cap (:func:`deployed_cap`) and the network's own scale ("auto")."""
    text, scale = with_scale(text)
    network, *rest = text.split(":")
    solver, cap, tolerance = (rest[0], int(rest[1]), float(rest[2])) if rest else ("fista", deployed_cap(network), 0.0)
    stop = f", tol {tolerance:g}" if tolerance else ""
    filters = f", filters at scale {scale:g}" if scale != "auto" else ""
    return f"{Path(network).name} + {solver.upper()}, T = {cap}{stop}{filters}", network, solver, cap, tolerance, scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", default=[],
                        help="NETWORK[:SOLVER:CAP:TOL]: a checkpoint or shipped name (repeatable)")
    parser.add_argument("--baseline", default=None,
                        help="the shipped network it must beat (default: the manifest's default network)")
    parser.add_argument("--split", default="val", choices=("val", "test"), help="whose scans")
    parser.add_argument("--per-contrast", type=int, default=2, help="slices per contrast")
    parser.add_argument("--size", type=int, default=128, help="image matrix n (n × n)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="runs/codesign.json")
    parser.add_argument("--out", default="docs/bench_codesign.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = WeightsRegistry()
    dictionary = registry.dictionary()
    args.baseline = args.baseline or registry.defaults["network"]
    configs = [(f"{args.baseline} + FISTA, T = {t}", args.baseline, "fista", t, 0.0, "auto") for t in (32, 64, 256)]
    configs += [candidate_config(c) for c in args.candidate]
    items = S.product_scans(args.split, args.per_contrast, args.size)
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for label, network, solver, cap, tolerance, scale in configs:
        stamp = os.path.getmtime(network) if Path(network).exists() else ""
        key = f"{label}|{network}|{stamp}|{args.split}|{len(items)}" + (f"|{args.size}" if args.size != 128 else "")
        key += f"|filters {scale}"  # entries written before the dictionary's scale was chosen miss and run again
        if key not in cache:
            cache[key] = evaluate(model_of(network, solver, cap, tolerance, scale), dictionary, items)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"done {label}", file=sys.stderr, flush=True)
        cache[label] = cache[key]
    columns = sorted({k for label, *_ in configs for k in cache[label]["means"]})
    header = "| network + solver | " + " | ".join(c.replace("|", ", R = ") for c in columns) + \
             " | mean SSIM / NRMSE | iterations | residual / noise | s / slice |"
    rows = [header, "|" + "---|" * (len(columns) + 5)]
    for label, *_ in configs:
        result = cache[label]
        cells = [f"{result['means'][c][0]:.4f} / {result['means'][c][1]:.4f}" for c in columns]
        mean_ssim = np.mean([result["means"][c][0] for c in columns])
        mean_nrmse = np.mean([result["means"][c][1] for c in columns])
        low, high = result.get("residual", [float("nan")] * 2)
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {mean_ssim:.4f} / {mean_nrmse:.4f} | "
                    f"{result['iterations']:.1f} | {low:.3f}–{high:.3f} | {result['seconds']:.2f} |")
    text = "\n".join([
        "# Network and solver together, on held-out scans",
        "",
        f"`python bench/codesign.py {' '.join(argv if argv is not None else sys.argv[1:])}`: {len(items)} scans "
        f"({args.size}², 8 coils, SNR {' and '.join(map(str, S.SNRS))}, "
        f"R = {', '.join(map(str, S.PRODUCT_ACCELERATIONS))}; up to "
        f"{args.per_contrast} slices each of the {args.split} split's person in T1 and T2 weighting), SSIM / NRMSE "
        "against the truth, no rescaling; residual / noise: the range of the data residual relative to σ over the "
        "scans (CDL_ResidualToNoise: a complete scan must stay within 0.75–1.25, gadgets.completeness); dictionary "
        f"{dictionary.name}; {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} (shared machine).",
        "",
        *rows,
        "",
    ])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
