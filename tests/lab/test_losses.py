"""Training losses (lab.losses) against the evaluation's metrics."""

import numpy as np
import pytest
import torch

from cdl_lambda.lab import losses, metrics


def noisy_pair(seed=0, noise=0.3):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 32, 40, dtype=torch.complex64, generator=generator)
    image = target + noise * torch.randn(3, 32, 40, dtype=torch.complex64, generator=generator)
    return image, target


@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_ssim_is_the_evaluations_ssim(noise):
    """Per image the same number as lab.metrics.ssim (skimage), to float32 rounding."""
    image, target = noisy_pair(noise=noise)
    expected = np.mean([metrics.ssim(target[i].abs(), image[i].abs()) for i in range(3)])
    assert float(losses.ssim(image, target)) == pytest.approx(expected, abs=1e-5)


def test_ssim_term_has_a_finite_gradient_and_is_zero_at_the_target():
    image, target = noisy_pair()
    image = image.clone().requires_grad_(True)
    loss = losses.image_loss(image, target, ssim_weight=0.1)
    loss.backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    exact = target.clone()
    exact[:, :4] = 0  # zero pixels: the magnitude's gradient must stay finite there
    assert float(losses.image_loss(exact, exact, ssim_weight=0.1)) == pytest.approx(0.0, abs=1e-6)


def test_weight_zero_is_the_relative_squared_error():
    image, target = noisy_pair()
    expected = ((image - target).abs() ** 2).sum((-2, -1)) / (target.abs() ** 2).sum((-2, -1))
    assert float(losses.image_loss(image, target)) == pytest.approx(float(expected.mean()), rel=1e-5)
    assert float(losses.image_loss(image, target, 0.5)) > float(losses.image_loss(image, target))


def test_background_target_spares_the_object_and_its_margin():
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    disk = ((yy - 24) ** 2 + (xx - 24) ** 2 < 12 ** 2).to(torch.complex64) * 3
    target = losses.background_target(disk[None])[0]
    distance = ((yy - 24) ** 2 + (xx - 24) ** 2).sqrt() - 12
    assert (target[distance < losses.BACKGROUND_MARGIN - 1] == 0).all()   # ±1: the disk is drawn on pixels
    assert (target[distance > losses.BACKGROUND_MARGIN + 1] == 1).all()


def test_background_loss_is_lower_for_the_right_map():
    disk = torch.zeros(1, 32, 32, dtype=torch.complex64)
    disk[:, 8:24, 8:24] = 1
    right = losses.background_target(disk).clamp(0.05, 0.95)
    assert losses.background_loss(right, disk) < 0.1 < losses.background_loss(1 - right, disk)
