"""Returned images: the PNG preview shows the image through the same display window the meta announces."""

from __future__ import annotations

import io

import ismrmrd
import numpy as np
from PIL import Image

from cdl_lambda.gadgets.image_output import build_image, png_bytes, window
from support import phantom


def _image(seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.abs(phantom(96, 80).numpy()) * 1000.0 + rng.normal(0, 20, (96, 80))
    pixels[3, 5] = 1e6  # one hot pixel: the window must not be stretched by it
    return np.abs(pixels).astype(np.float32)  # a magnitude image


def test_preview_png_reads_back_as_the_windowed_image():
    pixels = _image()
    preview = np.asarray(Image.open(io.BytesIO(png_bytes(pixels))))
    assert preview.dtype == np.uint8 and preview.shape == pixels.shape
    low, high = np.percentile(pixels, [0.5, 99.5])
    expected = np.clip((pixels - low) / (high - low), 0, 1) * 255
    assert np.corrcoef(preview.ravel().astype(float), expected.ravel())[0, 1] > 0.999
    assert np.abs(preview - expected).max() <= 0.5 + 1e-3  # rounded to the nearest grey level
    assert preview[3, 5] == 255 and preview.min() == 0
    # the hot pixel alone would have left the object black without a window
    assert np.corrcoef(preview.ravel().astype(float), pixels.ravel())[0, 1] < 0.5


def test_meta_window_is_the_preview_window():
    pixels = _image(1)
    image = build_image(pixels, ismrmrd.AcquisitionHeader(), kind="image", image_index=1, series_index=1,
                        field_of_view=(240.0, 200.0, 5.0), identity={"dictionary": "d", "network": "n"}, chain="c")
    centre, width = float(image.meta["WindowCenter"]), float(image.meta["WindowWidth"])
    assert np.isclose(centre, window(pixels)[0], rtol=1e-5) and np.isclose(width, window(pixels)[1], rtol=1e-5)
    preview = np.asarray(Image.open(io.BytesIO(png_bytes(image.data[0, 0])))).astype(float)
    displayed = np.clip((image.data[0, 0] - (centre - width / 2)) / width, 0, 1) * 255
    assert np.corrcoef(preview.ravel(), displayed.ravel())[0, 1] > 0.999


def test_residual_far_from_the_noise_marks_the_slice_incomplete_when_the_noise_was_measured():
    from types import SimpleNamespace

    from cdl_lambda.gadgets.completeness import RESIDUAL_BAND, residual_reason
    from cdl_lambda.gadgets.image_output import noise_meta

    fitted = SimpleNamespace(residual_to_noise=0.98, noise_std=1.0, noise_source="noise scan (prewhitened)")
    assert residual_reason(fitted.residual_to_noise) == ""
    assert noise_meta(fitted) == {"CDL_NoiseSource": "noise scan (prewhitened)", "CDL_NoiseStd": "1",
                                  "CDL_ResidualToNoise": "0.9800"}
    assert "2.90x the noise" in residual_reason(2.9) and "do not fit" in residual_reason(2.9)
    assert "follows the noise" in residual_reason(RESIDUAL_BAND[0] - 0.05)
    assert residual_reason(float("nan")) and residual_reason(2.9, noise_measured=False) == ""
    # a solve stopped before it could reach the noise is not judged on its residual; a converged one is
    assert residual_reason(1.31, iterations=2) == "" and "do not fit" in residual_reason(1.31, iterations=8)


def test_display_window_serves_soft_tissue_not_the_bright_ring():
    from cdl_lambda.gadgets.image_output import window_limits
    from support import FIXTURES

    y, x = np.mgrid[-64:64, -64:64] / 64.0
    r = np.hypot(y / 0.9, x / 0.7)
    image = np.where(r < 0.92, 1.0, 0.0) + np.where((r >= 0.92) & (r < 1.0), 5.0, 0.0)  # soft tissue 1, ring 5
    image += 0.02 * np.random.default_rng(0).standard_normal(image.shape)
    low, high = window_limits(np.abs(image))
    assert 1.5 < high < 3.0   # soft tissue at mid-grey (was the ring's 5: tissue at a dark fifth of the range)
    brain = np.abs(np.load(FIXTURES / "colin27_axial_128.npz")["images"][1].astype(np.float32))
    low, high = window_limits(brain)
    inside = brain[brain > 0.1 * np.percentile(brain, 99.5)]
    assert (inside > high).mean() < 0.03  # a T1 head without a dominant ring keeps nearly all its range


def test_a_preview_of_several_channels_shows_them_all_in_one_window():
    """Λ maps (one channel per filter) side by side, 5 → a 2 × 3 grid with one-pixel gaps; one channel as is."""
    from cdl_lambda.gadgets.image_output import preview_pixels

    levels = np.arange(1, 6, dtype=np.float32)
    data = levels[:, None, None, None] * np.ones((5, 1, 4, 6), np.float32)
    grid = preview_pixels(data)
    assert grid.shape == (2 * 5 - 1, 3 * 7 - 1)
    assert grid[0, 0] == 1 and grid[0, 7] == 2 and grid[0, 14] == 3 and grid[5, 0] == 4 and grid[5, 7] == 5
    assert grid[4, 0] == 1 and grid[0, 6] == 1 and grid[5, 14] == 1  # gaps and the empty cell: the darkest value
    preview = np.asarray(Image.open(io.BytesIO(png_bytes(grid))))
    assert preview[0, 14] > preview[0, 7] > preview[0, 0]  # one window: the levels compare
    single = _image()[None, None]
    assert np.array_equal(preview_pixels(single), single[0, 0])
