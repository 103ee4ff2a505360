"""lab.bart: the .cfl/.hdr format BART reads, its FFT convention against recon.fft, and ``pics`` on data it must
reconstruct."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdl_lambda.lab import bart
from cdl_lambda.recon import fft

needs_bart = pytest.mark.skipif(not bart.available(),
                                reason="the `bart` command (Debian package bart) is not installed")


def test_cfl_files_are_column_major_complex64(tmp_path):
    array = (np.arange(24).reshape(2, 3, 4) + 1j * np.arange(24).reshape(2, 3, 4) / 10).astype(np.complex64)
    bart.write_cfl(tmp_path / "a", array)
    assert (tmp_path / "a.hdr").read_text() == "# Dimensions\n2 3 4\n"
    raw = np.fromfile(tmp_path / "a.cfl", dtype=np.float32)
    # first dimension fastest, real and imaginary interleaved
    np.testing.assert_array_equal(raw[:6], np.float32([0, 0, 12, 1.2, 4, 0.4]))
    np.testing.assert_array_equal(bart.read_cfl(tmp_path / "a"), array)


def test_pics_without_bart_names_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not bart.available()
    with pytest.raises(RuntimeError, match="apt-get install bart"):
        bart.pics(np.zeros((1, 8, 8), dtype=np.complex64))


@needs_bart
def test_bart_fft_matches_the_centred_orthonormal_fft():
    rng = np.random.default_rng(0)
    k = (rng.normal(size=(12, 16)) + 1j * rng.normal(size=(12, 16))).astype(np.complex64)
    expected = fft.ifft2c(torch.from_numpy(k)).numpy()
    np.testing.assert_allclose(bart.ifft(k), expected, atol=1e-5)


@needs_bart
def test_pics_reconstructs_fully_sampled_data_and_fills_a_window():
    y, x = np.mgrid[:32, :32]
    image = ((np.hypot(y - 16, x - 15) < 10) * 1.0 + (np.hypot(y - 12, x - 18) < 3) * 0.5).astype(np.complex64)
    k = fft.fft2c(torch.from_numpy(image)).numpy()
    full = bart.pics(np.stack([k, 2 * k]), regularization=1e-4)
    assert full.shape == (2, 32, 32) and full.dtype == np.complex64
    error = np.linalg.norm(full[0] - image) / np.linalg.norm(image)
    assert error < 0.02
    np.testing.assert_allclose(full[1], 2 * full[0], atol=0.05 * np.abs(full[1]).max())  # -S: units of the data
    window = np.zeros_like(k)
    window[8:24, 8:24] = k[8:24, 8:24]
    zero_filled = fft.ifft2c(torch.from_numpy(window)).numpy()
    cs = bart.pics(window[None], regularization=0.01)[0]
    assert np.linalg.norm(cs - image) < np.linalg.norm(zero_filled - image)
