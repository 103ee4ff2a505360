"""Adjoint identities ⟨A x, y⟩ = ⟨x, Aᴴ y⟩ in float64 for every linear operator, and FFT conventions."""

import pytest
import torch

from support import complex_randn, random_dictionary
from cdl_lambda.recon import fft
from cdl_lambda.recon.lowpass import laplacian_eigenvalues, tikhonov_lowpass
from cdl_lambda.recon.operators import MultiCoilOperator, SingleCoilOperator
from cdl_lambda.recon.sampling import central_window_mask, equispaced_line_mask, random_line_mask

SHAPE = (20, 24)


def inner(a, b):
    return torch.vdot(a.flatten(), b.flatten())


def assert_adjoint(forward, adjoint, x, y):
    lhs, rhs = inner(forward(x), y), inner(x, adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


@pytest.mark.parametrize("centred", [True, False])
def test_single_coil_adjoint(centred):
    mask = random_line_mask(SHAPE, 3, 4, seed=1).double()
    op = SingleCoilOperator(mask, centred=centred)
    x, y = complex_randn(2, *SHAPE, seed=1), complex_randn(2, *SHAPE, seed=2)
    assert_adjoint(op.forward, op.adjoint, x, y)
    assert torch.allclose(op.normal(x), op.adjoint(op.forward(x)))


@pytest.mark.parametrize("centred", [True, False])
def test_multi_coil_adjoint_and_norm_bound(centred):
    maps = complex_randn(2, 4, *SHAPE, seed=3)
    maps = maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()  # Σ|c|² = 1
    op = MultiCoilOperator(equispaced_line_mask(SHAPE, 2, 4).double(), maps, centred=centred)
    x, y = complex_randn(2, *SHAPE, seed=4), complex_randn(2, 4, *SHAPE, seed=5)
    assert_adjoint(op.forward, op.adjoint, x, y)
    # ‖A‖ ≤ 1: power iteration on AᴴA
    v = x
    for _ in range(50):
        v = op.normal(v)
        v = v / v.norm()
    assert inner(v, op.normal(v)).real <= 1 + 1e-9
    # normal_fourier is F AᴴA Fᴴ
    forward = fft.fft2c if centred else fft.fft2
    assert torch.allclose(op.normal_fourier(forward(x)), forward(op.normal(x)), atol=1e-10)


def test_single_coil_normal_fourier_is_mask():
    mask = central_window_mask(SHAPE, (10, 12)).double()
    op = SingleCoilOperator(mask, centred=True)
    x = complex_randn(*SHAPE, seed=6)
    assert torch.allclose(op.normal_fourier(fft.fft2c(x)), fft.fft2c(op.normal(x)), atol=1e-12)


def test_dictionary_adjoint():
    dictionary = random_dictionary(6, 5, seed=2, dtype=torch.float64)
    s, x = complex_randn(3, 6, *SHAPE, seed=7), complex_randn(3, *SHAPE, seed=8)
    assert_adjoint(dictionary.synthesize, dictionary.analyze, s, x)


def test_centred_fft_is_orthonormal_and_centred():
    x = complex_randn(*SHAPE, seed=9)
    k = fft.fft2c(x)
    assert abs(k.norm() - x.norm()) / x.norm() < 1e-12
    assert torch.allclose(fft.ifft2c(k), x, atol=1e-12)
    constant = torch.ones(SHAPE, dtype=torch.complex128)
    peak = fft.fft2c(constant).abs().argmax()
    assert divmod(int(peak), SHAPE[1]) == (SHAPE[0] // 2, SHAPE[1] // 2)


def test_tikhonov_lowpass_solves_normal_equation():
    """(I + β∇ᴴ∇) x_L = x₀ with explicit circular forward differences."""
    x0, beta = complex_randn(*SHAPE, seed=10), 0.7
    x_low = tikhonov_lowpass(x0, beta)

    def grad(u):
        return torch.roll(u, -1, 0) - u, torch.roll(u, -1, 1) - u

    def grad_adjoint(gy, gx):
        return (torch.roll(gy, 1, 0) - gy) + (torch.roll(gx, 1, 1) - gx)

    assert torch.allclose(x_low + beta * grad_adjoint(*grad(x_low)), x0, atol=1e-10)
    assert laplacian_eigenvalues(SHAPE).max() <= 8


def test_masks():
    window = central_window_mask((320, 320), (160, 160))
    assert window.sum() == 160 * 160 and window[160, 160] == 1 and window[79, 160] == 0
    lines = random_line_mask((128, 96), 4, 16, seed=3)
    assert lines.sum(dim=1).unique().tolist() == [0, 96]  # whole readout lines
    assert lines[56:72].all() and int(lines[:, 0].sum()) == 32
    assert torch.equal(lines, random_line_mask((128, 96), 4, 16, seed=3))
    equi = equispaced_line_mask((128, 96), 4, 0)
    assert int(equi[:, 0].sum()) == 32 and equi[64, 0] == 1
    with pytest.raises(ValueError, match="window"):
        central_window_mask((32, 32), (40, 8))


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("kind", ["full", "lines", "2d"])
def test_multi_coil_normal_shortcuts_equal_the_full_operator(kind, centred):
    """AᴴA by its shortcut (no FFT at S = 1; 1-D FFTs along the phase encoding for line masks) equals Aᴴ(A x), to
    float64 rounding, for one mask and for a batch of masks."""
    ny, nx = 24, 20
    generator = torch.Generator().manual_seed(3)
    lines = equispaced_line_mask((ny, nx), 3, 6).double()
    masks = {"full": torch.ones(ny, nx, dtype=torch.float64),
             "lines": torch.stack([lines, lines.roll(1, 0)]),
             "2d": (torch.rand(ny, nx, generator=generator) > 0.4).double()}
    maps = complex_randn(2, 4, ny, nx, seed=5)
    x = complex_randn(2, ny, nx, seed=6)
    op = MultiCoilOperator(masks[kind], maps, centred=centred)
    assert op._normal_kind == kind
    expected = op.adjoint(op.forward(x))
    torch.testing.assert_close(op.normal(x), expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
