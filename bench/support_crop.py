"""What the coil maps' support does to the image and to its scores: the ESPIRiT crop swept on held-out scans.

ESPIRiT sets the maps to 0 where the eigenvalue of its calibration operator is below ``crop`` (recon.espirit), and
the product's image is 0 there. A higher crop removes more of the background, where a reconstruction can only
show noise or a halo; it can also remove tissue of low calibration energy, which no score should be allowed to
hide. For each crop this reports, per split, the mean whole-image SSIM, SSIM inside and outside the anatomy and
NRMSE of the shipped network (lab.evaluation.protocol.score), and the tissue removed: the largest fraction of the
reference's energy outside the support over the scans, and the brightest reference pixel there relative to the
image maximum.

Scans: lab.evaluation.scans (8-coil birdcage, correlated noise prewhitened, 16 calibration lines), R = 1, 2, 4,
SNR 10 and 20, 128²; validation (two slices of each source), test, its T2-weighted contrast and out of distribution
(one slice of each). One ESPIRiT run per scan; the crops are applied to its eigenvalue map.

    python bench/support_crop.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish
from cdl_lambda.lab.evaluation import mc_methods, mc_report, scans as S
from cdl_lambda.lab.evaluation.protocol import score
from cdl_lambda.recon.espirit import espirit
from cdl_lambda.recon.pipeline import default_calibration_mask

CROPS = (0.8, 0.9, 0.95)          # 0.8: the product's; 0.95: the cropped choice of BART's maps in the evaluation
SPLITS = {"val": 2, "test": 1, "t2": 1, "ood": 1}
SETTINGS = ((1, 2, 4), (10, 20))


def sweep(size: int, crops=CROPS) -> dict:
    """{(split, crop): [score dict with the tissue removed, one per scan]}."""
    _, model, train, *_ = mc_report.load_models()
    run = mc_methods.network(model, train[0])
    images = mc_report.load_images(size)
    rows: dict = {}
    for split, per_source in SPLITS.items():
        for scan in S.scans_of(images[split], split, per_source, *SETTINGS):
            maps, eigenvalue = espirit(scan.kspace, default_calibration_mask(scan.mask), 1.0, crop=0.0)
            reference = scan.reference.astype(np.float64)
            for crop in crops:
                outside = (eigenvalue < crop).numpy()
                scan.maps = maps * (eigenvalue >= crop)
                scores = score(run(scan), scan.reference)
                scores["energy_removed"] = float((reference[outside] ** 2).sum() / (reference ** 2).sum())
                scores["brightest_removed"] = float(reference[outside].max() / reference.max()) if outside.any() \
                    else 0.0
                rows.setdefault((split, crop), []).append(scores)
    return rows


def table(rows: dict, size: int) -> str:
    lines = [f"# ESPIRiT crop: scores and tissue removed ({size}², shipped network)", "",
             "Mean over R = 1, 2, 4 and SNR 10, 20; tissue removed: the worst scan of the split. "
             "Regenerate with `python bench/support_crop.py`.", "",
             "| split | crop | SSIM | SSIM inside the anatomy | SSIM outside it | NRMSE | reference energy removed "
             "(worst) | brightest pixel removed (worst) |", "|---|---|---|---|---|---|---|---|"]
    for (split, crop), scores in rows.items():
        mean = {k: np.mean([s[k] for s in scores]) for k in ("ssim", "ssim_anatomy", "ssim_background", "nrmse")}
        lines.append(f"| {split} | {crop:g} | {mean['ssim']:.3f} | {mean['ssim_anatomy']:.3f} | "
                     f"{mean['ssim_background']:.3f} | {mean['nrmse']:.3f} | "
                     f"{max(s['energy_removed'] for s in scores):.1e} | "
                     f"{max(s['brightest_removed'] for s in scores):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="docs/bench_support_crop.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    publish(table(sweep(args.size), args.size), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
