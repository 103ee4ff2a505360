"""Noise calibration: the reconstruction works in units of the noise, so Λ follows the noise level and the fit
stops at the noise, whatever the SNR (the shipped default network)."""

import numpy as np
import pytest
import torch

from cdl_lambda.recon import fft
from cdl_lambda.recon.pipeline import Reconstructor
from cdl_lambda.recon.sampling import equispaced_line_mask
from support import FIXTURES, synthetic_maps


@pytest.fixture(scope="module")
def scan():
    image = torch.from_numpy(np.load(FIXTURES / "colin27_axial_128.npz")["images"][1].astype(np.float32))
    image = image / image.max()
    maps = synthetic_maps(8, image.shape)
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    mask = equispaced_line_mask(image.shape, 2, 16)
    return image, mask, fft.fft2c(maps * image.to(torch.complex64))


@pytest.fixture(scope="module")
def reconstructor():
    return Reconstructor(device="cpu", batch_size=1, iterations=32)


def _reconstruct(reconstructor, scan, snr, scale=1.0, seed=0):
    image, mask, clean = scan
    sigma = float(image[image > 0.1].mean() / snr)
    noise = torch.randn(clean.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed)) * sigma
    kspace = (scale * mask * (clean + noise))[None].numpy()
    return reconstructor.reconstruct(kspace, mask.numpy(), noise_std=scale * sigma)


def test_lambda_follows_the_noise_and_the_fit_stops_at_it(reconstructor, scan):
    image = scan[0].numpy()
    background = image < 0.02
    low, high = _reconstruct(reconstructor, scan, 10), _reconstruct(reconstructor, scan, 20)
    # where there is no signal Λ is the same in noise units, i.e. in proportion to the noise in data units
    lam_low, lam_high = (r.lambda_maps[0].mean(0)[background].mean() for r in (low, high))
    assert abs(lam_low / lam_high - 1) < 0.15, (lam_low, lam_high)
    for result in (low, high):
        assert 0.85 < float(result.residual_to_noise[0]) < 1.15


def test_scaling_data_and_noise_together_changes_nothing_but_the_units(reconstructor, scan):
    one = _reconstruct(reconstructor, scan, 20)
    scaled = _reconstruct(reconstructor, scan, 20, scale=1000.0)
    assert np.allclose(scaled.lambda_maps, one.lambda_maps, rtol=1e-3, atol=1e-4)
    assert np.linalg.norm(scaled.image - 1000 * one.image) < 1e-3 * np.linalg.norm(1000 * one.image)
