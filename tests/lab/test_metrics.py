"""lab.metrics: what the layer adds over scikit-image (volume data range, masks, slice averaging, magnitudes, the
anatomy mask), checked against direct formulas, plus values computed with scikit-image 0.26 for fixed inputs."""

import numpy as np
import pytest
import torch
from skimage.measure import blur_effect as skimage_blur_effect

from cdl_lambda.lab import metrics


def pattern():
    i, j = np.meshgrid(np.arange(32), np.arange(40), indexing="ij")
    x = np.sin(i / 3.0) * np.cos(j / 5.0) + 0.1 * ((i * 7 + j * 3) % 11) / 11
    return x, x + 0.05 * np.cos(i * j / 7.0)


def direct_ssim(x, y, data_range, w=7):
    """SSIM by explicit loops over every 7×7 window that fits (sample covariance), averaged."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for r in range(x.shape[0] - w + 1):
        for c in range(x.shape[1] - w + 1):
            a, b = x[r:r + w, c:c + w].ravel(), y[r:r + w, c:c + w].ravel()
            ma, mb = a.mean(), b.mean()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - ma) * (b - mb)).sum() / (a.size - 1)
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_of_image_with_itself_is_one():
    x, _ = pattern()
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.ssim(x, x, mask=np.ones_like(x)) == pytest.approx(1.0)


def test_ssim_matches_direct_formula_and_reference():
    x, y = pattern()
    assert metrics.ssim(x, y) == pytest.approx(direct_ssim(x, y, x.max()), abs=1e-10)
    assert metrics.ssim(x, y) == pytest.approx(0.9928126698946592, abs=1e-9)  # skimage structural_similarity


def test_ssim_uses_the_volume_maximum():
    x, y = pattern()
    volume_t, volume_i = np.stack([x, 0.5 * x]), np.stack([y, 0.5 * y])
    expected = np.mean([direct_ssim(x, y, x.max()), direct_ssim(0.5 * x, 0.5 * y, x.max())])
    assert metrics.ssim(volume_t, volume_i) == pytest.approx(expected, abs=1e-10)


def test_psnr_and_nmse_formulas():
    x, y = pattern()
    mse = ((x - y) ** 2).mean()
    assert metrics.psnr(x, y) == pytest.approx(10 * np.log10(x.max() ** 2 / mse))
    assert metrics.nmse(x, y) == pytest.approx(((x - y) ** 2).sum() / (x ** 2).sum())
    mask = np.zeros_like(x, dtype=bool)
    mask[5:20, 5:30] = True
    assert metrics.nmse(x, y, mask) == pytest.approx(((x - y)[mask] ** 2).sum() / (x[mask] ** 2).sum())


def test_complex_inputs_use_the_magnitude():
    x, y = pattern()
    assert metrics.ssim(x * np.exp(1j * 0.3), y * np.exp(-1j)) == pytest.approx(metrics.ssim(abs(x), abs(y)))


def test_blur_effect_matches_reference_and_rises_with_blur():
    x, y = pattern()
    assert metrics.blur_effect(x) == pytest.approx(0.7334616335415142, abs=1e-9)  # skimage.measure.blur_effect
    assert metrics.blur_effect(y) == pytest.approx(0.7199938530373643, abs=1e-9)
    rng = np.random.default_rng(0)
    sharp = (rng.random((48, 48)) > 0.5).astype(float)
    kernel = np.ones(5) / 5
    blurred = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 0, sharp)
    blurred = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, blurred)
    assert metrics.blur_effect(blurred) > metrics.blur_effect(sharp) + 0.1


def test_foreground_mask_fills_holes_but_not_open_bays():
    image = np.zeros((40, 40))
    image[8:32, 8:32] = 1.0
    image[11:17, 11:17] = 0.0  # a dark "ventricle", enclosed
    image[20:30, 20:32] = 0.0  # a dark bay, 10 pixels wide, open to the background
    mask = metrics.foreground_mask(image)[0]
    assert mask[13, 13] and mask[9, 9] and not mask[2, 2]
    assert not mask[25, 28]  # connected to the background: not a hole
    assert mask.sum() == (image > 0).sum() + 6 * 6


def test_foreground_mask_closes_narrow_gaps_only_and_ignores_scale():
    image = np.zeros((2, 48, 48))
    image[:, 10:38, 10:20] = 1.0
    image[0, 10:38, 23:38] = 1.0  # a 3-pixel gap: closed by the 7 × 7 window
    image[1, 10:38, 30:38] = 1.0  # a 10-pixel gap: stays open
    mask = metrics.foreground_mask(image)
    assert mask[0, 20, 21] and not mask[1, 20, 25]
    assert not mask[0, 5, 21]  # closing does not spread past the anatomy's outline
    np.testing.assert_array_equal(metrics.foreground_mask(7.5 * image), mask)
    dim = image.copy()
    dim[1, 10:38, 30:38] = 0.05  # below 10 % of the 99th percentile: not anatomy
    assert not metrics.foreground_mask(dim)[1, 20, 34]


def test_masked_ssim_ignores_differences_outside_the_mask():
    x, y = pattern()
    mask = np.zeros_like(x, dtype=bool)
    mask[:, :16] = True
    changed = x.copy()
    changed[:, 26:] += 0.5  # ≥ 3 pixels (half a window) beyond the mask
    assert metrics.ssim(x, changed, mask) == pytest.approx(1.0)
    assert metrics.ssim(x, changed) < 0.95
    assert metrics.psnr(x, changed, mask) > 200 and metrics.nmse(x, changed, mask) == 0.0


def test_masked_ssim_averages_per_slice_and_skips_empty_slices():
    x, y = pattern()
    full = np.ones_like(x)
    empty = np.zeros_like(x)
    volume_t, volume_i = np.stack([x, x]), np.stack([y, x])
    # the second slice is perfect but has no mask pixels: only the first slice counts
    assert metrics.ssim(volume_t, volume_i, np.stack([full, empty])) == pytest.approx(metrics.ssim_map(
        x, y, float(x.max())).mean())


def test_blur_effect_with_a_mask_measures_the_bounding_box():
    rng = np.random.default_rng(1)
    image = np.zeros((48, 56))
    image[10:30, 12:44] = rng.random((20, 32))
    mask = np.zeros_like(image, dtype=bool)
    mask[10:30, 12:44] = True
    mask[15:20, 20:25] = False  # holes do not change the bounding box
    assert metrics.blur_effect(image, mask) == pytest.approx(skimage_blur_effect(image[10:30, 12:44], h_size=11))
    assert metrics.blur_effect(image, mask) != pytest.approx(metrics.blur_effect(image))
    volume = np.stack([image, image[::-1]])
    expected = np.mean([skimage_blur_effect(v, h_size=11) for v in volume])
    assert metrics.blur_effect(volume) == pytest.approx(expected)


def test_torch_inputs_are_accepted():
    x, y = (np.abs(a) for a in pattern())
    tx, ty = torch.from_numpy(x).to(torch.complex64) * 1j, torch.from_numpy(y).float()
    values = metrics.all_metrics(tx, ty)
    assert values["ssim"] == pytest.approx(metrics.ssim(x, y), abs=1e-6)
    assert values["psnr"] == pytest.approx(metrics.psnr(x, y), rel=1e-5)
