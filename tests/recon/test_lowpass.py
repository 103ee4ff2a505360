"""(PH): the paper's exact single-coil split, and the data-consistent multi-coil generalisation by CG."""

import torch

from cdl_lambda.recon import fft
from cdl_lambda.recon.lowpass import data_consistent_lowpass, gradient_normal, laplacian_eigenvalues, tikhonov_lowpass
from cdl_lambda.recon.operators import MultiCoilOperator, SingleCoilOperator
from cdl_lambda.recon.sampling import equispaced_line_mask
from support import complex_randn, phantom, synthetic_maps

SHAPE = (48, 48)


def test_gradient_normal_has_the_laplacian_eigenvalues():
    x = complex_randn(*SHAPE, seed=3)
    via_fourier = torch.fft.ifft2(torch.fft.fft2(x) * laplacian_eigenvalues(SHAPE).double())
    assert torch.allclose(gradient_normal(x), via_fourier, atol=1e-5)  # float32 eigenvalues


def test_single_coil_split_solves_the_data_consistent_problem_exactly():
    """For A = S F, (AᴴA + β∇ᴴ∇) x_L = Aᴴy is the paper's (I + β∇ᴴ∇) x_L = x₀ on what is measured."""
    mask = equispaced_line_mask(SHAPE, 2, 8).double()
    op = SingleCoilOperator(mask)
    y = mask * fft.fft2c(phantom(*SHAPE, dtype=torch.complex128) + 0.1 * complex_randn(*SHAPE))
    x_low = tikhonov_lowpass(op.adjoint(y), 0.7)
    residual = op.normal(x_low) + 0.7 * gradient_normal(x_low) - op.adjoint(y)
    assert residual.norm() < 1e-6 * op.adjoint(y).norm()  # float32 eigenvalues


def test_multi_coil_lowpass_is_data_consistent_on_undersampled_data():
    maps = synthetic_maps(6, SHAPE).to(torch.complex128)
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    mask = equispaced_line_mask(SHAPE, 3, 8).double()
    op = MultiCoilOperator(mask, maps)
    truth = phantom(*SHAPE, dtype=torch.complex128)
    y = op.forward(truth) + 0.01 * mask * complex_randn(6, *SHAPE, seed=1)
    x0 = op.adjoint(y)[None]
    beta = 0.05
    x_low = data_consistent_lowpass(op, x0, beta, iterations=60)
    normal_residual = op.normal(x_low) + beta * gradient_normal(x_low) - x0
    assert normal_residual.norm() < 1e-4 * x0.norm()
    # the paper's filter of x₀ keeps the aliasing of R = 3; the CG solution fits the data far better
    filtered = tikhonov_lowpass(x0, beta)
    assert (op.forward(x_low) - y).norm() < 0.7 * (op.forward(filtered) - y).norm()
    assert (x_low - truth).norm() < 0.75 * (filtered - truth).norm()


def test_on_a_grid_twice_as_fine_the_split_keeps_its_cut_off_in_the_anatomy():
    """The same field of view sampled on 64² (the 32² k-space zero-padded): the split at scale 2 (β · 4) is the 32²
    split of that image, zero-padded, up to the discrete Laplacian's departure from ω² at the 32² grid's higher
    frequencies (0.5 % here, measured); at scale 1 the 64² split keeps far more of the image (16 %)."""
    from cdl_lambda.recon.lowpass import LowPassSplit
    small = phantom(32, 32).to(torch.complex128)
    big = fft.ifft2c(torch.nn.functional.pad(fft.fft2c(small), (16, 16, 16, 16))) * 2  # same amplitudes
    split = LowPassSplit(beta=3.0).double()
    with torch.no_grad():
        coarse = fft.ifft2c(torch.nn.functional.pad(fft.fft2c(split(small)), (16, 16, 16, 16))) * 2
        scaled, unscaled = split(big, scale=2.0), split(big)
    assert (scaled - coarse).norm() / coarse.norm() < 0.03
    assert (unscaled - coarse).norm() / coarse.norm() > 0.1
