"""lab.dictionary_learning: the online CDL lowers the CSC objective and keeps filters unit-norm and k_f-sized."""

import pytest
import torch

from cdl_lambda.lab import dictionary_learning as cdl

from support import phantom


def small_images() -> torch.Tensor:
    """Three 48×48 magnitude images with edges and stripes, in [0, 1]."""
    base = phantom(48, 48).abs().float()
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    return torch.stack([base, base * (0.6 + 0.4 * torch.cos(x / 2.0)), torch.rot90(base, 1) * (y > 20)])


CONFIG = cdl.LearningConfig(num_filters=4, kernel_size=5, lambda_d=0.1, beta_d=0.5, steps=20, batch_size=4,
                            patch_size=32, csc_iterations=25, seed=0)


def circular_synthesis(filters: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Σ_k d_k ∗ s_k by explicit shifts: (d ∗ s)[p] = Σ_q d[q + c] s[p − q], c = k_f // 2 (circular)."""
    c = filters.shape[-1] // 2
    out = torch.zeros(codes.shape[0], *codes.shape[-2:], dtype=torch.float64)
    for k in range(filters.shape[0]):
        for qy in range(-c, c + 1):
            for qx in range(-c, c + 1):
                out += float(filters[k, qy + c, qx + c]) * torch.roll(codes[:, k].double(), (qy, qx), dims=(-2, -1))
    return out


def test_csc_objective_uses_true_circular_convolution():
    generator = torch.Generator().manual_seed(1)
    filters = cdl.normalise(torch.randn(3, 5, 5, generator=generator))
    codes = torch.randn(2, 3, 12, 16, generator=generator) * (torch.rand(2, 3, 12, 16, generator=generator) > 0.7)
    images = torch.randn(2, 12, 16, generator=generator)
    residual = circular_synthesis(filters, codes) - images.double()
    expected = (0.5 * residual.pow(2).sum(dim=(-2, -1)) + 0.3 * codes.abs().sum(dim=(-3, -2, -1))).mean()
    assert cdl.csc_objective(filters, codes.to(torch.complex64), images, 0.3) == pytest.approx(float(expected),
                                                                                               rel=1e-5)


def test_learning_reduces_the_csc_objective_and_keeps_constraints():
    torch.set_num_threads(1)
    images = small_images()
    high = cdl.highpass(images, CONFIG.beta_d)
    batch = cdl.random_crops(high, 32, 4, torch.Generator().manual_seed(99))
    start = cdl.initial_filters(CONFIG, high, torch.Generator().manual_seed(CONFIG.seed))

    def objective(filters):
        codes = cdl.sparse_code(filters, batch, CONFIG.lambda_d, iterations=60)
        return cdl.csc_objective(filters, codes, batch, CONFIG.lambda_d)

    dictionary, history = cdl.learn_dictionary(CONFIG, images, device="cpu", progress=False)
    assert len(history) == CONFIG.steps
    assert objective(dictionary.filters) < 0.97 * objective(start)
    assert dictionary.filters.shape == (4, 5, 5)
    assert torch.allclose(dictionary.filters.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    assert dictionary.meta["lambda_d"] == 0.1 and dictionary.meta["kernel_size"] == 5


def test_filter_step_lowers_the_fit_for_fixed_codes():
    images = cdl.highpass(small_images(), 0.5)[:, :32, :32]
    filters = cdl.initial_filters(CONFIG, images, torch.Generator().manual_seed(3))
    codes = cdl.sparse_code(filters, images, 0.1, iterations=30)

    def fit(f):
        return cdl.csc_objective(f, codes, images, 0.0)

    updated = cdl.filter_step(filters, codes, images)
    # the projected step keeps unit norms; the fit may only rise through the projection, not by much here
    assert torch.allclose(updated.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    assert fit(updated) < fit(filters)
