"""lab.baselines: a fresh learned baseline starts as the identity on the data (the zero-filled image for the
ablation, the data-consistent image for the unrolled network) and works in the data's units."""

import pytest
import torch

from cdl_lambda.lab.baselines import build_baseline
from cdl_lambda.recon import fft as _fft

from support import complex_randn, phantom, synthetic_maps


def scan(acceleration: int = 1, seed: int = 0):
    image = phantom(32, 32)
    maps = synthetic_maps(4, (32, 32)).to(torch.complex64)
    maps = maps / maps.abs().pow(2).sum(0).sqrt().clamp_min(1e-12)  # Σ|c|² = 1, as ESPIRiT's
    mask = torch.zeros(32, 32)
    mask[::acceleration] = 1
    kspace = _fft.fft2c(maps * image) + 0.05 * complex_randn(4, 32, 32, seed=seed).to(torch.complex64)
    return (kspace * mask)[None], mask, maps[None]


@pytest.mark.parametrize("kind", ["ablation", "unrolled"])
def test_a_fresh_baseline_returns_the_fully_sampled_data_unchanged(kind):
    """At R = 1 with normalised maps, AᴴA = I: the identity denoiser and exact data consistency both return x₀."""
    torch.manual_seed(0)
    model = build_baseline({"kind": kind, "base_channels": 4, "stages": 1}).eval()
    kspace, mask, maps = scan()
    with torch.no_grad():
        out = model(kspace, mask, coil_maps=maps, noise_std=0.05)
    assert torch.allclose(out.image, out.zero_filled, atol=1e-4 * float(out.zero_filled.abs().max()))


@pytest.mark.parametrize("kind", ["ablation", "unrolled"])
def test_a_baseline_works_in_the_units_of_the_data(kind):
    """Trained or not, scaling the data and its noise level by a scales the image by a (noise units inside)."""
    torch.manual_seed(0)
    model = build_baseline({"kind": kind, "base_channels": 4, "stages": 1}).eval()
    with torch.no_grad():
        for parameter in model.unet.parameters():
            parameter.normal_(0, 0.1)  # away from the identity start
        kspace, mask, maps = scan(acceleration=2)
        first = model(kspace, mask, coil_maps=maps, noise_std=0.05)
        three = model(3 * kspace, mask, coil_maps=maps, noise_std=0.15).image
    one = first.image
    assert (one - first.zero_filled).abs().max() > 0.01 * one.abs().max()  # the network does act here
    assert torch.allclose(three, 3 * one, atol=1e-4 * float(three.abs().max()))
