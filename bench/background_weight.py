"""The background weight (recon.background) judged on held-out scans: does it clean the background without touching
the object?

For each network (the shipped default and each ``--candidate``, a shipped name or a training checkpoint, with
``@SCALE`` its dictionary's scale: recon.model.CDLLambda.dictionary_scale_for) this
reports, per split, the mean whole-image SSIM, SSIM inside and outside the anatomy and NRMSE
(lab.evaluation.protocol.score); what each image keeps of the tissue: the 1st percentile of |x| / reference over the
pixels brighter than 5 % of the maximum (worst scan of the split; darkened tissue lowers it); and for a network with
a background weight b where it lies: the share of the object (every pixel above 1 % of the 99th percentile, the
training's definition) under b > ½, and the brightest reference pixel there relative to the maximum (worst scans).
A figure shows the test head and the out-of-distribution knee: the reference, each network's image, the tuned BART TV
image (validation-tuned λ of the evaluation, BART's cropped maps) and b (where the check withdrew it, the part of it
whose factor the image kept where the data agree).

Scans: lab.evaluation.scans (8-coil birdcage, correlated noise prewhitened, 16 calibration lines), R = 1, 2, 4,
SNR 10 and 20, 128² (``--size``: another matrix); validation (two slices of each source), test, its T2-weighted
contrast and out of distribution (one slice of each); every network runs FISTA at its own deployed cap (a shipped
network's manifest entry, a checkpoint's validation cap).

    python bench/background_weight.py --candidate runs/background.ckpt --threads 2
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.codesign import deployed_cap, model_of, with_scale
from bench.report import publish
from cdl_lambda.lab import bart, metrics
from cdl_lambda.lab.losses import OBJECT_FRACTION
from cdl_lambda.lab.evaluation import mc_methods, mc_report, scans as S
from cdl_lambda.lab.evaluation.protocol import score
from cdl_lambda.recon.weights import WeightsRegistry

SPLITS = {"val": 2, "test": 1, "t2": 1, "ood": 1}
SETTINGS = ((1, 2, 4), (10, 20))
TISSUE = 0.05            # of the maximum: the tissue whose intensity is checked
TV_LAMBDA = 0.03          # BART TV's SSIM-best λ on the validation split at R ≥ 2 (docs/evaluation.md)
FIGURE_SCANS = (("test", "itk-head", 2, 20.0), ("ood", "knee", 1, 10.0))  # the knee: dim tissue at the edges


def run(model, dictionary, scan, with_background: bool = True):
    """``image``, ``b`` as inferred, the weight ``applied`` (b, or where the weight was withdrawn what it kept),
    the data ``check`` (computed on the weighted image, so the weight's own value also where it withdrew it), whether
    it was ``withdrawn`` and the share ``kept`` (each None without a weight) of ``model`` on ``scan``;
    ``with_background=False``: the weight-free solve, before a withdrawn slice's image gets the weight's factor back
    where the data agree."""
    with torch.no_grad():
        out = model(scan.kspace[None], scan.mask, dictionary, coil_maps=S.espirit_maps(scan)[None], noise_std=1.0,
                    with_background=with_background)
    background = None if out.background is None else out.background[0].numpy()
    applied = None if out.background_applied is None else out.background_applied[0].numpy()
    check = None if out.background_disagreement is None else float(out.background_disagreement[0])
    withdrawn = out.background_withdrawn is not None and bool(out.background_withdrawn[0])
    kept = None if out.background_kept is None else float(out.background_kept[0])
    return SimpleNamespace(image=out.image[0].numpy(), b=background, applied=applied, check=check,
                           withdrawn=withdrawn, kept=kept)


def sweep(networks: dict, dictionary, size: int = 128) -> tuple[dict, dict]:
    """({(split, label): [scores]}, {figure key: {label: (image, b)}, "reference": …})."""
    images = mc_report.load_images(size)
    rows, figure = {}, {}
    for split, per_source in SPLITS.items():
        for scan in S.scans_of(images[split], split, per_source, *SETTINGS):
            key = (split, scan.source, scan.acceleration, float(scan.snr))
            first_of_split = key in FIGURE_SCANS and key not in figure
            reference = scan.reference.astype(np.float64)
            tissue = reference > TISSUE * reference.max()
            obj = metrics.foreground_mask(reference, fraction=OBJECT_FRACTION)[0]
            for label, model in networks.items():
                result = run(model, dictionary, scan)
                image, b, withdrawn, kept = result.image, result.b, result.withdrawn, result.kept
                scores = score(image, scan.reference)
                scores["tissue_kept"] = float(np.percentile(np.abs(image)[tissue] / reference[tissue], 1))
                if b is not None:
                    scores["withdrawn"], scores["check"], scores["kept"] = withdrawn, result.check, kept
                    scores["as_withdrawn"] = score(run(model, dictionary, scan, with_background=False).image,
                                                   scan.reference)
                    under = b > 0.5
                    scores["object_under_weight"] = float((obj & under).sum() / obj.sum())
                    scores["brightest_under_weight"] = float(reference[under].max() / reference.max()) \
                        if under.any() else 0.0
                rows.setdefault((split, label), []).append(scores)
                if split == "ood":  # sources far apart: each on its own row too
                    rows.setdefault((f"ood: {scan.source}", label), []).append(scores)
                if first_of_split:
                    title = (label if not withdrawn else f"{label}\n(weight withdrawn, {100 * kept:.0f} % kept)"
                             if kept else f"{label} (weight withdrawn)")
                    figure.setdefault(key, {})[title] = (image, result.applied if withdrawn else b)
            if first_of_split:
                figure[key]["reference"] = (scan.reference, None)
                if bart.available():
                    figure[key]["BART TV"] = (mc_methods.bart_tv_image(scan, {"lam": TV_LAMBDA, "maps": "cropped"}),
                                              None)
    return rows, figure


def table(rows: dict, size: int, command: str) -> str:
    lines = [f"# The background weight on held-out scans ({size}²)", "",
             "Mean over R = 1, 2, 4 and SNR 10, 20. Tissue kept: the 1st percentile of |x| / reference over pixels "
             "brighter than 5 % of the maximum (worst scan). Under the weight (b > ½): the share of the object "
             "(above 1 % of the 99th percentile) and the brightest reference pixel relative to the maximum (worst "
             "scans; b as inferred, before the check against the data). Check: least – largest value of the data check "
             "(recon.background.data_disagreement). Withdrawn: scans where it exceeded its threshold and the image "
             "was reconstructed without the weight; in part: the weight's factor then kept where the data agree "
             "(recon.background.kept_where_data_agree), with the share of b > ½ kept. Without the weight: SSIM / "
             "NRMSE of every scan solved without the weight and shown without its factor (what a withdrawn slice "
             "got before the factor was kept where the data agree). Regenerate with "
             f"`{command}`.", "",
             "| split | network | SSIM | inside the anatomy | outside it | NRMSE | tissue kept (worst) | "
             "object under b > ½ (worst) | brightest pixel under b > ½ (worst) | check | withdrawn | "
             "without the weight: SSIM / NRMSE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(split for split, _ in rows))  # splits as first seen, each split's networks together
    for (split, label), scores in sorted(rows.items(), key=lambda item: order.index(item[0][0])):
        mean = {k: np.mean([s[k] for s in scores]) for k in ("ssim", "ssim_anatomy", "ssim_background", "nrmse")}
        under = [s["object_under_weight"] for s in scores if "object_under_weight" in s]
        bright = [s["brightest_under_weight"] for s in scores if "brightest_under_weight" in s]
        flags = [s["withdrawn"] for s in scores if "withdrawn" in s]
        in_part = [s["kept"] for s in scores if s.get("withdrawn") and s.get("kept")]
        withdrawn = f"{sum(flags)} of {len(flags)}" if flags else "–"
        if in_part:
            share = (f"{100 * min(in_part):.0f}" if round(100 * min(in_part)) == round(100 * max(in_part))
                     else f"{100 * min(in_part):.0f}–{100 * max(in_part):.0f}")
            withdrawn += f" ({len(in_part)} in part, {share} % kept)"
        checks = [s["check"] for s in scores if "check" in s]
        check = f"{min(checks):.2f} – {max(checks):.2f}" if checks else "–"
        plain = [s["as_withdrawn"] for s in scores if "as_withdrawn" in s]
        without = (f"{np.mean([q['ssim'] for q in plain]):.3f} / {np.mean([q['nrmse'] for q in plain]):.3f}"
                   if plain else "–")
        lines.append(f"| {split} | {label} | {mean['ssim']:.3f} | {mean['ssim_anatomy']:.3f} | "
                     f"{mean['ssim_background']:.3f} | {mean['nrmse']:.3f} | "
                     f"{min(s['tissue_kept'] for s in scores):.2f} | {(f'{max(under):.3f}' if under else '–')} | "
                     f"{(f'{max(bright):.2f}' if bright else '–')} | {check} | {withdrawn} | {without} |")
    return "\n".join(lines) + "\n"


def draw(figure: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(figure)
    columns = max(len(figure[k]) + sum(v[1] is not None for v in figure[k].values()) for k in keys)
    fig, axes = plt.subplots(len(keys), columns, figsize=(2.6 * columns, 3.0 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        labels = ["reference"] + [k for k in figure[key] if k != "reference"]
        maps = [k for k in labels if figure[key][k][1] is not None]
        top = np.abs(figure[key]["reference"][0]).max()
        for ax, label in zip(row, labels):
            image = np.abs(figure[key][label][0])
            ax.imshow(image, cmap="gray", vmin=0, vmax=0.25 * top)  # a window that shows the background
            ax.set_title(f"{label}\n{key[1]} R={key[2]} SNR {key[3]:g}", fontsize=7)
        for ax, label in zip(row[len(labels):], maps):
            ax.imshow(figure[key][label][1], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{'weight kept' if 'withdrawn' in label else 'b'} of {label}", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.suptitle("window 0–25 % of the maximum, to show the background", fontsize=8)
    fig.tight_layout(h_pad=2.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", default=[],
                        help="NAME[@SCALE]: a shipped network or a checkpoint, and the dictionary's scale (default: "
                             "the network's own; @1: the filters as learned)")
    parser.add_argument("--baseline", default=None, help="the network to compare against (default: the default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--size", type=int, default=128, help="image matrix n (n × n)")
    parser.add_argument("--dictionary", default=None, help="the dictionary (default: the manifest's default)")
    parser.add_argument("--out", default="docs/bench_background_weight.md")
    parser.add_argument("--figure", default="docs/figures/background-weight.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = WeightsRegistry()
    shipped = registry.network(args.baseline or "default")
    networks = {}
    for spec in [shipped.name, *args.candidate]:
        name, scale = with_scale(spec)
        cap = deployed_cap(name, registry)
        label = f"{Path(name).name}, T = {cap}" + (f", filters at scale {scale:g}" if scale != "auto" else "")
        networks[label] = model_of(name, "fista", cap, 0.0, scale)
    rows, figure = sweep(networks, registry.dictionary(args.dictionary), args.size)
    command = " ".join(["python bench/background_weight.py", *(argv if argv is not None else sys.argv[1:])])
    publish(table(rows, args.size, command), args.out)
    draw(figure, Path(args.figure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
