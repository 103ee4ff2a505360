"""The quality gate: the product's SSIM and NRMSE on one small fixed multi-coil scan against the thresholds recorded
in tests/fixtures/quality_gate.json from a tuned BART run (lab.evaluation.quality_gate says how and why)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cdl_lambda.lab.evaluation import mc_methods, protocol, quality_gate

RECORD = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "quality_gate.json").read_text())


@pytest.fixture(scope="module")
def gate_scans():
    torch.set_num_threads(2)
    return {f"R{r}": quality_gate.gate_scan(r) for r in quality_gate.ACCELERATIONS}


def test_the_record_matches_the_scan_the_test_builds():
    scan = RECORD["scan"]
    assert (scan["size"], scan["snr"], scan["seed"]) == (quality_gate.SIZE, quality_gate.SNR, quality_gate.SEED)
    assert set(RECORD["settings"]) == {f"R{r}" for r in quality_gate.ACCELERATIONS}
    for setting in RECORD["settings"].values():
        bart_best, product, thresholds = setting["bart"], setting["product"], setting["thresholds"]
        assert thresholds == quality_gate.thresholds(bart_best, product)


@pytest.mark.parametrize("setting", [f"R{r}" for r in quality_gate.ACCELERATIONS])
def test_the_product_meets_the_recorded_thresholds(gate_scans, setting):
    scan = gate_scans[setting]
    scores = protocol.score(quality_gate.product_image(scan), scan.reference)
    thresholds = RECORD["settings"][setting]["thresholds"]
    assert scores["ssim"] >= thresholds["ssim_min"], (setting, scores["ssim"], thresholds)
    assert scores["nrmse"] <= thresholds["nrmse_max"], (setting, scores["nrmse"], thresholds)


@pytest.mark.skipif(shutil.which("bart") is None, reason="BART is not installed (apt-get install bart)")
@pytest.mark.parametrize("setting", [f"R{r}" for r in quality_gate.ACCELERATIONS])
def test_bart_still_reaches_its_recorded_figures(gate_scans, setting):
    """BART at its recorded parameters: within 0.01 SSIM / 5 % NRMSE of the record (another BART build, another
    machine: pics' random wavelet shifts and its thread count change the last digits)."""
    scan = gate_scans[setting]
    methods = mc_methods.classical_methods(None, with_bart=True)
    for metric, tolerance in (("ssim", 0.01), ("nrmse", 0.05)):
        best = RECORD["settings"][setting]["bart"][metric]
        value = protocol.score(methods[best["method"]].run(scan, best["params"]), scan.reference)[metric]
        if metric == "ssim":
            assert value == pytest.approx(best["value"], abs=tolerance)
        else:
            assert value == pytest.approx(best["value"], rel=tolerance)
