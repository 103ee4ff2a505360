"""The CI quality gate: one small fixed multi-coil scan, the product's SSIM and NRMSE against thresholds recorded
in tests/fixtures/quality_gate.json from a tuned BART run.

The scan (:func:`gate_scan`): the modified Shepp–Logan phantom (Toft's intensities, every ellipse at least 0.1
apart so that it is not a binary image) at 96², 8 coils, correlated channel noise and a noise pre-scan,
prewhitened, image SNR 20, R = 2 and 3 outside 16 calibration lines (:func:`lab.evaluation.scans.simulate_scan`,
numpy's PCG64 generator: the same numbers on every machine). The product: the shipped default network and
dictionary through ``CDLLambda.deployed(...)(kspace, mask, dictionary, coil_maps=…, noise_std=…)`` (the solver and
cap of the network's manifest entry) with the product's ESPIRiT maps. BART: ``pics`` ℓ1-wavelet and TV tuned on this
very scan under the protocol (:mod:`lab.evaluation.protocol`: per metric, grids bracketing, ecalib maps cropped or
uncropped) — an oracle tuning, the strongest BART there can be on it.

    python -m cdl_lambda.lab.evaluation.quality_gate --write tests/fixtures/quality_gate.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cdl_lambda.lab import bart
from cdl_lambda.lab.evaluation import mc_methods, protocol, scans

SIZE = 96
ACCELERATIONS = (2, 3)
SNR = 20
SEED = 20261207
# Margins below the product's recorded figures: float32 summation order across CPUs moves these figures by about
# 1e-4 (tests/fixtures/README.md); 0.01 SSIM and 5 % NRMSE are two orders above that and below a visible loss.
MARGINS = {"ssim": 0.01, "nrmse": 0.05}

# modified Shepp–Logan: (intensity, semi-axis a, b, centre x, y, angle in degrees), Toft's values
_ELLIPSES = ((1.0, 0.69, 0.92, 0.0, 0.0, 0), (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0),
             (-0.2, 0.11, 0.31, 0.22, 0.0, -18), (-0.2, 0.16, 0.41, -0.22, 0.0, 18),
             (0.1, 0.21, 0.25, 0.0, 0.35, 0), (0.1, 0.046, 0.046, 0.0, 0.1, 0), (0.1, 0.046, 0.046, 0.0, -0.1, 0),
             (0.1, 0.046, 0.023, -0.08, -0.605, 0), (0.1, 0.023, 0.023, 0.0, -0.606, 0),
             (0.1, 0.023, 0.046, 0.06, -0.605, 0))


def shepp_logan(n: int) -> np.ndarray:
    """The modified Shepp–Logan phantom ``(n, n)`` float32, maximum 1."""
    y, x = np.meshgrid(np.linspace(1, -1, n), np.linspace(-1, 1, n), indexing="ij")
    image = np.zeros((n, n))
    for value, a, b, x0, y0, angle in _ELLIPSES:
        t = np.deg2rad(angle)
        u = (x - x0) * np.cos(t) + (y - y0) * np.sin(t)
        v = -(x - x0) * np.sin(t) + (y - y0) * np.cos(t)
        image[(u / a) ** 2 + (v / b) ** 2 <= 1] += value
    return (image / image.max()).astype(np.float32)


def gate_scan(acceleration: int) -> scans.Scan:
    return scans.simulate_scan(shepp_logan(SIZE), acceleration, SNR, seed=[SEED, acceleration], split="gate",
                               source="shepp-logan")


def product_image(scan: scans.Scan, weights_dir=None) -> np.ndarray:
    """The shipped default network and dictionary with the network's deployed solver on ``scan``."""
    from cdl_lambda.recon.model import CDLLambda
    from cdl_lambda.recon.weights import WeightsRegistry
    registry = WeightsRegistry(weights_dir)
    entry = registry.network("default")
    model = CDLLambda.deployed(entry).eval()
    return mc_methods.network(model, registry.dictionary("default"))(scan)


def tuned_bart(scan: scans.Scan) -> dict:
    """BART ℓ1-wavelet and TV tuned on ``scan`` itself; per metric the best of the two, with its parameters."""
    best = {}
    for method in mc_methods.classical_methods(None, with_bart=True).values():
        if not method.id.startswith("bart"):
            continue
        tuning = protocol.tune_setting(method, [scan])
        for metric in protocol.METRICS:
            params = tuning.best[metric]
            value = next(means for p, means in tuning.table if p == params)[metric]
            if metric not in best or protocol._better(metric, value, best[metric]["value"]):
                best[metric] = {"value": round(value, 4), "method": method.id, "params": params}
    return best


def thresholds(bart_best: dict, product: dict) -> dict:
    """Tuned BART's figure where the product is ahead of it by more than the margin (the product must never fall
    behind tuned BART); otherwise the product's recorded figure less the margin (it may not lose more ground)."""
    return {"ssim_min": round(min(bart_best["ssim"]["value"], product["ssim"] - MARGINS["ssim"]), 4),
            "nrmse_max": round(max(bart_best["nrmse"]["value"], product["nrmse"] * (1 + MARGINS["nrmse"])), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", help="write the record here (JSON); without it, print it")
    args = parser.parse_args(argv)
    if not bart.available():
        raise SystemExit("the gate's thresholds come from BART: install it (apt-get install bart)")
    torch.set_num_threads(2)
    record = {"scan": {"image": "modified Shepp-Logan", "size": SIZE, "coils": scans.COILS, "snr": SNR,
                       "calibration_lines": scans.CALIBRATION_LINES, "seed": SEED},
              "made": {"command": "python -m cdl_lambda.lab.evaluation.quality_gate --write "
                                  "tests/fixtures/quality_gate.json",
                       "when": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.machine(),
                       "bart_pics_iterations": bart.PICS_ITERATIONS},
              "margins": MARGINS, "rule": thresholds.__doc__.replace("\n    ", " "), "settings": {}}
    for acceleration in ACCELERATIONS:
        scan = gate_scan(acceleration)
        scores = protocol.score(product_image(scan), scan.reference)
        product = {"ssim": round(scores["ssim"], 4), "nrmse": round(scores["nrmse"], 4)}
        best = tuned_bart(scan)
        record["settings"][f"R{acceleration}"] = {"bart": best, "product": product,
                                                  "thresholds": thresholds(best, product)}
    text = json.dumps(record, indent=1)
    if args.write:
        Path(args.write).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
