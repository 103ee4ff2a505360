"""lab.evaluation: a small end-to-end run (volumes → methods → report and figure) and the targets keyed by method
ids."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdl_lambda.lab.evaluation import methods as E
from cdl_lambda.lab.evaluation import report, run, targets
from cdl_lambda.recon.dictionary import dct_dictionary
from cdl_lambda.recon.lambda_nets import build_lambda_net
from cdl_lambda.recon.model import CDLLambda

FIXTURE = Path(__file__).parent.parent / "fixtures" / "colin27_axial_128.npz"
N = 32


def small_images() -> dict:
    slices = torch.from_numpy(np.load(FIXTURE)["images"].astype(np.float32))
    small = torch.nn.functional.interpolate(slices[:, None], size=(N, N), mode="bilinear", antialias=True)[:, 0]
    return {"test": {"head": small[:3]}, "ood": {"flipped": small[1:3].flip(-1).transpose(-2, -1)}}


def table_rows(text: str, heading: str) -> dict[str, list[float]]:
    """The rows of the metrics table under ``heading``: {method: [SSIM mask, SSIM, PSNR, NMSE, blur, s/slice]}."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"-?[0-9.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    volumes = run.build_volumes(small_images(), per_source=3, noise_levels=(0.2,))
    dictionary = dct_dictionary(5)
    network = build_lambda_net({"version": "v3", "base_channels": 4, "stages": 1})
    methods = [E.Method("zero_filled", E.zero_filled),
               E.Method("cdl_scalar", E.scalar_cdl(dictionary, lam=0.75, beta=1.0, iterations=20)),
               E.Method("cdl_lambda_v3_default", E.model_method(CDLLambda(network, iterations=8).eval(), dictionary))]
    run.evaluate_all(methods, volumes)
    out = tmp_path_factory.mktemp("evaluation")
    info = {"command": "test", "targets": [t.line() for t in targets.check_targets({m.id: m for m in methods})]}
    text = report.write_report(out, "smoke", methods, methods, volumes, info, figure_ood="flipped",
                               dictionary=dictionary)
    return out, text, methods, volumes


def test_volumes_hold_every_source_and_an_anatomy_mask(evaluated):
    _, _, _, volumes = evaluated
    assert [(v.split, v.source, v.batch.target.shape) for v in volumes] == [
        ("test", "head", (3, N, N)), ("ood", "flipped", (2, N, N))]
    for v in volumes:
        fraction = v.mask.mean()
        assert v.mask.shape == (v.batch.target.shape[0], N, N) and 0.2 < fraction < 0.95


def test_report_tables_carry_the_measured_numbers(evaluated):
    out, text, methods, _ = evaluated
    assert (out / "smoke.md").read_text() == text
    for split, heading in (("test", "## In distribution"), ("ood", "## Out of distribution")):
        rows = table_rows(text, heading)
        assert set(rows) == {"zero-filled", "CDL, scalar λ (best on validation)", "CDL-Λ V3"}
        for method in methods:
            ssim_mask, ssim, psnr, nmse, blur, seconds = rows[report.display_name(method)]
            assert 0.05 < ssim_mask <= 1 and 0.05 < ssim <= 1 and 8 < psnr < 60 and 0 < nmse < 1 and 0 <= blur <= 1
            assert seconds >= 0
            expected = method.summary(split, 0.2)
            assert ssim_mask == pytest.approx(expected["ssim_mask"], abs=5e-4)
            assert psnr == pytest.approx(expected["psnr"], abs=5e-3)
    # at σ² = 0.2 zero-filled keeps all the noise; the sparse prior removes part of it
    zf, cdl = (table_rows(text, "## In distribution")[k] for k in ("zero-filled", "CDL, scalar λ (best on validation)"))
    assert cdl[0] > zf[0] and cdl[2] > zf[2] + 1.0 and cdl[3] < zf[3]
    assert "## Robustness" in text and "## Targets" in text and "MISSED" in text


def test_figure_shows_the_targets_and_reconstructions(evaluated):
    out, text, methods, volumes = evaluated
    assert "![reconstructions](figures/smoke.png)" in text
    with Image.open(out / "figures" / "smoke.png") as image:
        pixels = np.asarray(image)
    rows, cols, gap, scale = 3, 1 + len(methods), 2, 2  # in and out of distribution, then the Λ maps
    assert pixels.shape == ((rows * (N + gap) - gap) * scale, (cols * (N + gap) - gap) * scale)
    target = volumes[0].batch.target[1].abs().numpy()  # the middle of three slices
    expected = (np.clip(target / target.max(), 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(pixels[:N * scale:scale, :N * scale:scale], expected)
    panel = pixels[(N + gap) * scale:(2 * N + gap) * scale:scale, :N * scale:scale]  # the ood row's target
    assert panel.max() == 255 and panel.std() > 20
    with Image.open(out / "figures" / "smoke-dictionary.png") as image:
        assert image.size[0] > 0 and np.asarray(image).std() > 10


def test_targets_are_keyed_by_method_ids():
    def method(method_id, test, ood=None):
        m = E.Method(method_id)
        m.results[("test", 0.2)] = [(2, {"ssim_mask": test, "ssim": test})]
        if ood is not None:
            m.results[("ood", 0.2)] = [(2, {"ssim_mask": ood, "ssim": ood})]
        return m

    by_id = {m.id: m for m in (method("cdl_lambda_v3", 0.8, 0.85), method("zero_filled", 0.55),
                               method("cdl_scalar", 0.81), method("unrolled", 0.9, 0.8))}
    checked = targets.check_targets(by_id, noise_levels=(0.2,))
    lines = {t.statement.split(" (")[0]: t for t in checked}
    assert lines["CDL-Λ ≥ zero-filled + 0.2 SSIM in distribution, σ²=0.2"].met
    assert not lines["CDL-Λ above the best scalar λ, σ²=0.2"].met
    drop = [t for t in checked if "unrolled (MoDL-style black box)" in t.statement]
    assert len(drop) == 1 and drop[0].met  # V3 gains 0.05 out of distribution, the unrolled net loses 0.1
    ablation = [t for t in checked if "ablation: U-Net" in t.statement]
    assert len(ablation) == 1 and not ablation[0].met and "nan" in ablation[0].statement  # not run: MISSED
    assert math.isnan(by_id["cdl_lambda_v3"].summary("val", 0.2).get("ssim_mask", float("nan")))


def test_the_product_scans_quality_is_averaged_per_group_in_order_of_appearance():
    from cdl_lambda.lab.evaluation.product import ScanResult, mean_quality

    def result(contrast, size, ssim, nrmse):
        return ScanResult(contrast, 2, size, ssim, nrmse, iterations_used=32, residual_to_noise=1.0, seconds=0.1)

    results = [result("t2", 256, 0.8, 0.10), result("t1", 128, 0.9, 0.05), result("t2", 256, 0.6, 0.20),
               result("t1", 256, 0.7, 0.30)]
    by_size = mean_quality(results, lambda r: r.size)
    assert list(by_size) == [256, 128]
    assert by_size[256] == pytest.approx((0.7, 0.2)) and by_size[128] == pytest.approx((0.9, 0.05))
    assert mean_quality(results, lambda r: r.contrast)["t1"] == pytest.approx((0.8, 0.175))
