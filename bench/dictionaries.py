"""Which dictionary the default network should run with: every shipped dictionary, the default network and its
deployed solver, on the product's held-out scans.

Scans: lab.evaluation.scans.product_scans (8-coil birdcage, correlated noise prewhitened, 16 calibration lines,
ESPIRiT maps; R = 2, 3, 4, SNR 10 and 20; ``--per-contrast`` slices of a split's person in T1 and in a T2-weighted
contrast) of the validation person and of the test head, at 128² (the network's trained matrix) and at each
``--size``. Per dictionary and set: mean SSIM / NRMSE against the truth (no rescaling), the held-out score that
training keeps its best checkpoint by (lab.evaluation.product.held_out_score: mean NRMSE² + w · (1 − mean SSIM),
w the network's own training weight of SSIM, 0.1 for the shipped one; lower is better) and the median seconds per
slice.

The rule the default dictionary is chosen by: the lowest validation score at 128² among the dictionaries of the
training split (a held-out dictionary stays held out). The test columns are reported, never chosen on.

    python bench/dictionaries.py --threads 2 [--size 256]
"""

from __future__ import annotations

import argparse
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

CHOSEN_AT = ("val", 128)


def measure(model, dictionary, items, ssim_weight: float) -> dict:
    """Mean SSIM / NRMSE, the held-out score and the median seconds of ``model`` with ``dictionary`` on ``items``."""
    results = product.reconstruct_and_score(model, items, dictionary)
    return {"ssim": float(np.mean([r.ssim for r in results])), "nrmse": float(np.mean([r.nrmse for r in results])),
            "score": product.held_out_score(results, ssim_weight),
            "seconds": float(np.median([r.seconds for r in results]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, action="append", default=[], help="also at this matrix (repeatable)")
    parser.add_argument("--per-contrast", type=int, default=1, help="slices per contrast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/bench_dictionaries.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = WeightsRegistry()
    loaded = registry.network("default")
    model = CDLLambda.deployed(loaded).eval()
    ssim_weight = float(registry.networks[loaded.name]["training"]["ssim_weight"])  # its training loss's weight
    sets = [(split, size) for size in [128, *args.size] for split in ("val", "test")]
    items = {key: S.product_scans(key[0], args.per_contrast, key[1]) for key in sets}
    rows = {}
    for name in sorted(registry.dictionaries):
        dictionary = registry.dictionary(name)
        product.reconstruct_and_score(model, items[sets[0]][:1], dictionary)  # warm-up: spectra, allocations
        rows[name] = {key: measure(model, dictionary, items[key], ssim_weight) for key in sets}
        print(f"done {name}", file=sys.stderr, flush=True)
    splits = {name: registry.dictionaries[name].get("split", "") for name in rows}
    chosen = min((name for name in rows if splits[name] == "train"), key=lambda n: rows[n][CHOSEN_AT]["score"])
    default = registry.defaults.get("dictionary")
    columns = [f"{split} {size}²: SSIM / NRMSE / score / s" for split, size in sets]
    header = "| dictionary | split | " + " | ".join(columns) + " |"
    table = [header, "|---|---|" + "---|" * len(sets)]
    for name, cells in rows.items():
        mark = " (chosen by the rule" + (", the default)" if name == default else ")") if name == chosen \
            else " (the default)" if name == default else ""
        table.append(f"| {name}{mark} | {splits[name]} | " + " | ".join(
            f"{c['ssim']:.4f} / {c['nrmse']:.4f} / {c['score']:.5f} / {c['seconds']:.2f}" for c in
            (cells[key] for key in sets)) + " |")
    text = "\n".join([
        "# Dictionaries with the default network, on held-out scans",
        "",
        f"`python bench/dictionaries.py {' '.join(argv if argv is not None else sys.argv[1:])}`: network "
        f"{loaded.name} with its deployed solver (the dictionary's scale its own: recon.model), "
        f"{len(items[sets[0]])} scans per set (8 coils, SNR {' and '.join(map(str, S.SNRS))}, "
        f"R = {', '.join(map(str, S.PRODUCT_ACCELERATIONS))}; {args.per_contrast} slice(s) of the split's person in T1 "
        "and T2 weighting), SSIM / NRMSE against the truth, no rescaling; score: mean NRMSE² + "
        f"{ssim_weight:g} · (1 − mean SSIM) "
        "(lab.train's held-out score, lower is better); s: median seconds per slice "
        f"({args.threads} thread(s), load average {os.getloadavg()[0]:.1f}). The rule: the lowest validation score at "
        f"128² among the training split's dictionaries chooses the default; it chooses **{chosen}**, and the "
        f"manifest's default is **{default}**.",
        "",
        *table,
        "",
    ])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
