"""lab.evaluation.multicoil: scans, tuning, every method and the report section, on a tiny problem."""

import re
import shutil

import numpy as np
import pytest
import torch

from cdl_lambda.lab.evaluation import multicoil as MC
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import CDLLambda
from support import phantom, random_dictionary


@pytest.fixture(scope="module")
def evaluated():
    torch.manual_seed(0)
    mp = pytest.MonkeyPatch()
    mp.setattr(MC, "ACCELERATIONS", (1, 2))
    mp.setattr(MC, "SNRS", (20,))
    mp.setattr(MC, "CALIBRATION_LINES", 12)
    mp.setitem(MC.GRIDS, "bart_l1", [0.01])
    mp.setitem(MC.GRIDS, "bart_tv", [0.03])
    mp.setitem(MC.GRIDS, "cdl_scalar", [(1.0, 1.0), (2.0, 3.0)])
    brain = phantom(48, 48).abs().numpy()
    images = {"val": {"v": brain[None]}, "test": {"t": np.rot90(brain)[None].copy()},
              "ood": {"o": brain[::-1][None].copy()}}
    dictionary = random_dictionary(8, 5)
    v3 = CDLLambda(LambdaNetV3(base_channels=4), iterations=16).eval()
    results, tuned, scans = MC.run(images, v3, [dictionary], [random_dictionary(8, 5, seed=3)], dictionary, {},
                                   {"val": 1, "test": 1, "ood": 1}, with_bart=shutil.which("bart") is not None)
    yield results, tuned, scans
    mp.undo()


def test_scans_are_prewhitened_and_the_reference_matches_the_truth(evaluated):
    _, _, scans = evaluated
    assert {s.setting for s in scans} == {(1, 20), (2, 20)} and {s.split for s in scans} == {"test", "ood"}
    full = next(s for s in scans if s.acceleration == 1)
    # white unit noise after prewhitening: the readout-detail estimate reads about 1
    from cdl_lambda.recon.noise import estimate_noise_std
    assert 0.9 < float(estimate_noise_std(full.kspace, full.mask)) < 1.25  # a sharp phantom reads high (recon.noise)
    sense1 = np.abs(MC.sense1(full))
    assert MC.score(sense1, full.reference)["nrmse"] < 0.2  # SNR 20 at full sampling


def test_every_method_scored_and_tuned_values_come_from_the_grids(evaluated):
    results, tuned, _ = evaluated
    for method_id in ("sense1", "cg_sense", "cdl_scalar", "cdl_lambda_v3", "cdl_lambda_v3_heldout"):
        values = results[method_id].mean("test", (2, 20))
        assert 0 < values["ssim"] <= 1 and 0 < values["nrmse"] < 1.5 and values["psnr"] > 5
    for method_id, per_setting in tuned.items():
        assert set(per_setting) == {(1, 20), (2, 20)}
        assert all(value in MC.GRIDS[method_id] for value in per_setting.values())
    if "bart_tv" in results:  # BART's output is in the units of the data, like every other method's
        assert results["bart_tv"].mean("test", (1, 20))["nrmse"] < 0.2


def test_section_tables_and_targets_carry_the_numbers(evaluated):
    results, tuned, _ = evaluated
    text = MC.render_section(results, tuned, None, "", "tiny")
    row = next(line for line in text.splitlines() if line.startswith("| CDL-Λ V3 |"))
    cells = re.findall(r"(\d\.\d{3}) / (\d\.\d{3}) / (\d+\.\d)", row)
    assert len(cells) == 2
    assert float(cells[1][0]) == pytest.approx(results["cdl_lambda_v3"].mean("test", (2, 20))["ssim"], abs=6e-4)
    targets = MC.check_targets(results)
    assert any("zero-filled SENSE-1" in line for line in targets)
    assert all(line.endswith(("MET", "MISSED")) for line in targets)
