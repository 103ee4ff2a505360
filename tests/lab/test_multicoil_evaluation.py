"""The multi-coil evaluation (lab.evaluation.scans, mc_methods, protocol, mc_report) on a tiny problem."""

import re
import shutil

import numpy as np
import pytest
import torch

from cdl_lambda.lab.evaluation import mc_methods, mc_report, protocol, scans
from cdl_lambda.lab.evaluation.mc_methods import Grid, Method
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import CDLLambda
from support import phantom, random_dictionary

SIZE = 48


@pytest.fixture(scope="module")
def outcome():
    torch.manual_seed(0)
    mp = pytest.MonkeyPatch()
    mp.setattr(scans, "CALIBRATION_LINES", 12)
    mp.setattr(mc_methods, "starting_grids", lambda: {
        "cg_sense": Grid({"lam": [0.0, 0.03, 0.3]}, {"lam": 0.0}),
        "bart_l1": Grid({"lam": [0.0, 0.01, 0.1]}, {"lam": 0.0}, {"maps": ["cropped"]}),
        "bart_tv": Grid({"lam": [0.0, 0.03, 0.3]}, {"lam": 0.0}, {"maps": ["cropped"]}),
        "cdl_scalar": Grid({"lam": [0.5, 1.0, 2.0]}, choices={"beta": [1.0]}),
    })
    brain = phantom(SIZE, SIZE).abs().numpy()
    images = {"val": {"v": brain[None]}, "test": {"t": np.rot90(brain)[None].copy()},
              "ood": {"o": brain[::-1][None].copy()}}
    plan = mc_report.Plan("tiny", {SIZE: {"val": 1, "test": 1, "ood": 1}}, {SIZE: ((1, 2), (20,))},
                          (SIZE,))
    dictionary = random_dictionary(8, 5)
    v3 = CDLLambda(LambdaNetV3(base_channels=4), iterations=16).eval()
    result, tests = mc_report.run_size(SIZE, plan, v3, [dictionary], [random_dictionary(8, 5, seed=3)], dictionary,
                                       {}, with_bart=shutil.which("bart") is not None, images=images,
                                       reference_dictionaries=[random_dictionary(8, 5, seed=4)])
    yield result, tests
    mp.undo()


def test_scans_are_prewhitened_and_the_reference_matches_the_truth(outcome):
    _, tests = outcome
    assert {s.setting for s in tests} == {(SIZE, 1, 20), (SIZE, 2, 20)}
    assert {s.split for s in tests} == {"test", "ood"}
    full = next(s for s in tests if s.acceleration == 1)
    from cdl_lambda.recon.noise import estimate_noise_std
    assert 0.9 < float(estimate_noise_std(full.kspace, full.mask)) < 1.25  # a sharp phantom reads high (recon.noise)
    assert protocol.score(mc_methods.sense1_image(full), full.reference)["nrmse"] < 0.2  # SNR 20, fully sampled


def test_every_method_scored_the_same_way_and_tuned_inside_its_grid(outcome):
    result, _ = outcome
    for method_id in ("sense1", "cg_sense", "cdl_scalar", "cdl_lambda_v3", "cdl_lambda_v3_training",
                      "cdl_lambda_v3_heldout"):
        values = result.results[method_id].mean("test", (SIZE, 2, 20))
        assert 0 < values["ssim"] <= 1 and 0 < values["nrmse"] < 1.5 and values["psnr"] > 5
        assert 0.5 < values["ls_scale"] < 2  # recorded, not applied
    for method_id, per_setting in result.tunings.items():
        assert set(per_setting) == {(SIZE, 1, 20), (SIZE, 2, 20)}
        for tuning in per_setting.values():
            for metric in protocol.METRICS:
                for axis, values in tuning.grid.numeric.items():
                    index = values.index(tuning.best[metric][axis])
                    # bracketed: an interior value, or the lower bound λ = 0
                    assert 0 < index < len(values) - 1 or values[index] == tuning.grid.lower_bounds.get(axis)
    if "bart_tv" in result.results:  # BART's output is in the units of the data, like every other method's
        assert result.results["bart_tv"].mean("test", (SIZE, 1, 20))["nrmse"] < 0.2
    assert any("R=1" in line and line.endswith("(ok)") for line in result.checks)
    # the held-out dictionaries are judged against the training dictionaries' mean, with the numbers it says
    (line,) = [line for line in mc_report.check_targets(result) if line.startswith("held-out dictionaries")]
    settings = [(SIZE, 1, 20), (SIZE, 2, 20)]
    gap = np.mean([result.results["cdl_lambda_v3_heldout"].mean("test", s)["ssim"]
                   - result.results["cdl_lambda_v3_training"].mean("test", s)["ssim"] for s in settings])
    assert "the training ones' mean" in line and f"{gap:+.4f}" in line


def test_a_grid_that_never_brackets_is_refused():
    scan = scans.simulate_scan(phantom(32, 32).abs().numpy(), 1, 20, seed=0)
    # a "method" whose image only gets better with a larger parameter: the optimum is never bracketed
    method = Method("runaway", lambda s, p: s.reference * (1 - 1 / (1 + p["a"])), Grid({"a": [1.0, 2.0, 4.0]}))
    with pytest.raises(protocol.ProtocolError, match="does not bracket"):
        protocol.tune_setting(method, [scan])
    # one whose optimum sits at a = 8 is bracketed after extending 1, 2, 4 upward
    peaked = Method("peaked", lambda s, p: s.reference * (1 + 0.1 * np.log2(p["a"] / 8) ** 2),
                    Grid({"a": [1.0, 2.0, 4.0]}))
    tuning = protocol.tune_setting(peaked, [scan])
    assert tuning.best["nrmse"]["a"] == pytest.approx(8.0) and tuning.extensions["a"] == 2


def test_a_method_worse_than_its_zero_filled_image_at_r1_stops_the_report():
    scan = scans.simulate_scan(phantom(32, 32).abs().numpy(), 1, 20, seed=0, split="test")
    # a method whose λ = 0 is not its zero-filled image (here: mis-scaled by 0.7, as BART without -S would be)
    scaled = Method("scaled", lambda s, p: 0.7 * mc_methods.sense1_image(s), Grid({"lam": [0.0, 1.0]}, {"lam": 0.0}),
                    mc_methods.sense1_image)
    with pytest.raises(protocol.ProtocolError, match="λ → 0 check failed"):
        protocol.check_zero_filled(scaled, [scan], protocol.tune(scaled, [scan]))
    honest = Method("honest", lambda s, p: mc_methods.sense1_image(s), Grid({"lam": [0.0, 1.0]}, {"lam": 0.0}),
                    mc_methods.sense1_image)
    assert all(line.endswith("(ok)") for line in protocol.check_zero_filled(honest, [scan],
                                                                            protocol.tune(honest, [scan])))


def test_section_tables_and_targets_carry_the_numbers(outcome):
    result, _ = outcome
    text = mc_report.render_section(result, "tiny")
    row = next(line for line in text.splitlines() if line.startswith("| CDL-Λ V3 |"))
    cells = re.findall(r"(\d\.\d{3}) / (\d\.\d{3}) / (\d+\.\d)", row)
    assert len(cells) == 2
    assert float(cells[1][0]) == pytest.approx(result.results["cdl_lambda_v3"].mean("test", (SIZE, 2, 20))["ssim"],
                                               abs=6e-4)
    targets = mc_report.check_targets(result)
    assert any("best classical" in line for line in targets)
    assert all(line.endswith(("MET", "MISSED")) for line in targets)
    # the raw outcome survives a JSON round trip (sizes can run as separate processes)
    import json
    again = mc_report.Outcome.from_json(json.loads(json.dumps(result.to_json())))
    assert mc_report.check_targets(again) == targets
    assert mc_report.replace_section("# Doc\n\nintro\n\n" + mc_report.SECTION + "\nold\n", "NEW") == \
        "# Doc\n\nintro\n\nNEW\n"


def test_score_splits_ssim_into_the_anatomy_and_its_background():
    """Noise added only outside the anatomy leaves the anatomy's SSIM at 1 and lowers the background's (and the
    whole image's): the whole-image figure alone cannot tell the two apart."""
    reference = phantom(SIZE, SIZE).abs().numpy().astype(np.float64)
    inside = protocol.metrics.foreground_mask(reference)[0]
    noise = np.abs(np.random.default_rng(0).normal(0, 0.02, reference.shape))
    halo = protocol.score(reference + noise * ~inside, reference)
    clean = protocol.score(reference, reference)
    assert clean["ssim_background"] == pytest.approx(1.0) and clean["ssim_anatomy"] == pytest.approx(1.0)
    assert halo["ssim_background"] < 0.8 < halo["ssim"] < 0.95  # noise at 2 % of the maximum
    assert halo["ssim_anatomy"] > 0.99  # the anatomy mask has a margin: its windows hardly see the noise


def test_section_shows_ssim_inside_and_outside_the_anatomy(outcome):
    result, _ = outcome
    text = mc_report.render_section(result, "tiny")
    for where in mc_report.REGIONS.values():
        assert f"SSIM {where} (Test anatomy, T1 (in distribution)):" in text
    background = result.results["cdl_lambda_v3"].mean("test", (SIZE, 2, 20))["ssim_background"]
    assert f"{background:.3f}" in text.split("SSIM outside the anatomy")[1]
