"""Coil preprocessing: prewhitening, oversampling removal, coil maps, combination."""

import pytest
import torch

from support import complex_randn, phantom, synthetic_maps
from cdl_lambda.recon import coils
from cdl_lambda.recon.fft import fft1c, fft2c, ifft1c
from cdl_lambda.recon.sampling import equispaced_line_mask


def test_prewhitening_gives_identity_noise_covariance():
    torch.manual_seed(0)
    mixing = complex_randn(6, 6, seed=1) + 3 * torch.eye(6)
    noise = mixing @ complex_randn(6, 40000, seed=2)
    whitening = coils.prewhitening_matrix(coils.noise_covariance(noise))
    whitened = coils.prewhiten(noise.to(torch.complex64), whitening, coil_dim=0)
    covariance = coils.noise_covariance(whitened)
    # sampling error of a covariance estimate from N samples is ~1/√N ≈ 0.005
    assert (covariance - torch.eye(6)).abs().max() < 0.03


def test_prewhitening_refuses_singular_covariance():
    noise = complex_randn(1, 1000, seed=3).repeat(3, 1)  # three copies of one channel
    with pytest.raises(ValueError, match="positive definite"):
        coils.prewhitening_matrix(coils.noise_covariance(noise))


def test_remove_readout_oversampling_keeps_the_object():
    image = torch.zeros(4, 128, dtype=torch.complex64)
    image[:, 40:88] = phantom(4, 48)  # object inside the central half of the readout FOV
    kspace = fft1c(image, dim=-1)
    cropped = coils.remove_readout_oversampling(kspace, factor=2, dim=-1)
    assert cropped.shape == (4, 64)
    assert torch.allclose(ifft1c(cropped, dim=-1), image[:, 32:96], atol=1e-5)


def test_coil_maps_recover_known_sensitivities_inside_a_cropped_support():
    shape = (64, 64)
    true_maps = synthetic_maps(8, shape)
    true_maps = true_maps / true_maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()
    image = phantom(*shape)
    kspace = fft2c(true_maps * image)
    calibration = equispaced_line_mask(shape, 64, 24)  # 24 central lines
    maps = coils.estimate_coil_maps(kspace, calibration)
    inside = image.abs() > 0.3
    norm = maps.abs().pow(2).sum(dim=0)
    assert (norm[inside] > 0).all()  # the object is inside the maps' support ...
    assert torch.allclose(norm[norm > 0], torch.ones(()), atol=1e-4)  # ... where Σ|c|² = 1
    assert (norm[image.abs() == 0] == 0).float().mean() > 0.3  # and much of the empty background is cropped
    # agreement up to one global phase per pixel: |⟨ĉ, c⟩| = 1 for identical unit vectors
    agreement = (maps.conj() * true_maps).sum(dim=0).abs()
    assert agreement[inside].mean() > 0.99 and agreement[inside].min() > 0.95
    combined = coils.combine_coils(torch.fft.ifft2(torch.fft.fft2(true_maps * image)), maps)
    assert torch.allclose(combined.abs()[inside], image.abs()[inside], rtol=0.05, atol=0.02)
