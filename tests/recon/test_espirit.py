"""ESPIRiT coil maps against the true sensitivities of Debian's ismrmrd_generate_cartesian_shepp_logan files and
against BART's ecalib."""

import shutil

import pytest
import torch

from cdl_lambda.recon import coils
from cdl_lambda.recon.noise import estimate_noise_std
from cdl_lambda.recon.operators import MultiCoilOperator
from cdl_lambda.recon.pipeline import default_calibration_mask
from support import ground_truth, make_shepp_logan, read_kspace, relative_error, true_coil_maps


@pytest.mark.parametrize("noise, calibration", [(0.05, 24), (0.2, 16)])  # image SNR about 20 and 2
def test_espirit_maps_match_true_sensitivities_and_crop_the_background(tmp_path, noise, calibration):
    path = make_shepp_logan(tmp_path / "sl.h5", matrix=128, coils=8, oversampling=1, acceleration=2,
                            calibration=calibration, noise=noise, noise_scan=False)
    kspace, mask = read_kspace(path)
    true = true_coil_maps(path)
    phantom = ground_truth(path)
    maps = coils.estimate_coil_maps(kspace, default_calibration_mask(mask))  # noise level estimated
    inside = torch.from_numpy(phantom > 0.05 * phantom.max())
    coherence = (maps.conj() * true).sum(0).abs()
    assert coherence[inside].mean() > (0.999 if noise < 0.1 else 0.995) and coherence[inside].min() > 0.98
    norm = maps.abs().pow(2).sum(0)
    assert torch.allclose(norm[norm > 0], torch.ones(()), atol=1e-4)  # Σ|c|² = 1 on the support
    assert (norm[inside] > 0).float().mean() > 0.995  # the object is kept
    assert (norm == 0).float().mean() > 0.15  # the background is cropped


@pytest.mark.parametrize("noise", [0.2, 0.3])  # image SNR about 2 and 1.3
def test_fully_sampled_low_snr_scan_keeps_the_object(tmp_path, noise):
    """A fully sampled scan calibrates on its central 24 × 24 block, not on all of k-space: the noise of the outer
    rows would lower the eigenvalues inside the object, and the crop would zero half the phantom at this SNR."""
    from cdl_lambda.recon.espirit import calibration_block

    path = make_shepp_logan(tmp_path / "sl.h5", matrix=128, coils=8, oversampling=1, acceleration=1,
                            noise=noise, noise_scan=False)
    kspace, mask = read_kspace(path)
    calibration = default_calibration_mask(mask)
    assert calibration_block(kspace, calibration).shape == (8, 24, 24)
    phantom = ground_truth(path)
    inside = torch.from_numpy(phantom > 0.05 * phantom.max())
    norm = coils.estimate_coil_maps(kspace, calibration).abs().pow(2).sum(0)
    assert (norm[inside] > 0).float().mean() > 0.995
    assert (norm == 0).float().mean() > 0.15  # the background is still cropped


def test_sense1_with_estimated_maps_within_two_percent_of_true_maps(tmp_path):
    path = make_shepp_logan(tmp_path / "sl.h5", matrix=128, coils=8, oversampling=1, acceleration=1,
                            calibration=0, noise=0.05, noise_scan=False)
    kspace, mask = read_kspace(path)
    calibration = torch.zeros_like(mask)
    calibration[64 - 12:64 + 12] = 1
    maps = coils.estimate_coil_maps(kspace, calibration)
    reference = ground_truth(path)
    estimated = relative_error(MultiCoilOperator(mask, maps).adjoint(kspace).numpy(), reference)
    with_true = relative_error(MultiCoilOperator(mask, true_coil_maps(path)).adjoint(kspace).numpy(), reference)
    assert estimated <= 1.02 * with_true, (estimated, with_true)


@pytest.mark.skipif(shutil.which("bart") is None, reason="bart (Debian package) is not installed")
def test_espirit_agrees_with_bart_ecalib(tmp_path):
    from cdl_lambda.lab import bart

    path = make_shepp_logan(tmp_path / "sl.h5", matrix=96, coils=6, oversampling=1, acceleration=2,
                            calibration=24, noise=0.05, noise_scan=False)
    kspace, mask = read_kspace(path)
    ours = coils.estimate_coil_maps(kspace, default_calibration_mask(mask))
    theirs = torch.from_numpy(bart.ecalib(kspace.numpy()))
    ours_support, their_support = ours.abs().pow(2).sum(0) > 0, theirs.abs().pow(2).sum(0) > 0
    both = ours_support & their_support
    assert ((ours.conj() * theirs).sum(0).abs()[both]).mean() > 0.995
    assert (ours_support == their_support).float().mean() > 0.9  # the same support, up to edge pixels


def test_noise_level_estimate_without_a_noise_scan(tmp_path):
    """The tool's -n is the std of each of the real and imaginary parts: σ = √2 n per complex sample."""
    for noise in (0.1, 0.4):
        path = make_shepp_logan(tmp_path / f"sl{noise}.h5", matrix=128, coils=4, oversampling=1, acceleration=1,
                                noise=noise, noise_scan=False)
        kspace, mask = read_kspace(path)
        sigma = float(estimate_noise_std(kspace, mask))
        assert abs(sigma / (noise * 2 ** 0.5) - 1) < 0.1, (noise, sigma)
        pure = torch.randn(4, 128, 128, dtype=torch.complex64) * noise * 2 ** 0.5
        assert abs(float(estimate_noise_std(pure, mask)) / (noise * 2 ** 0.5) - 1) < 0.03


def test_native_operator_and_sparse_rescaling_change_nothing():
    """W built in the native pixel layout is the centred one shifted, and rescaling the power iterate every 4 steps
    gives the eigenvector of rescaling every step (the same direction), to float64 rounding."""
    from cdl_lambda.recon import fft
    from cdl_lambda.recon.espirit import dominant_eigenvector, espirit_operator

    generator = torch.Generator().manual_seed(1)
    kernels = torch.randn(5, 4, 6, 6, dtype=torch.complex128, generator=generator)
    kernels = kernels / kernels.flatten(1).norm(dim=1)[:, None, None, None]
    for shape in ((24, 20), (21, 19)):
        centred = espirit_operator(kernels, shape)
        native = espirit_operator(kernels, shape, centred=False)
        torch.testing.assert_close(fft.from_native(native.permute(2, 3, 0, 1)).permute(2, 3, 0, 1), centred,
                                   rtol=0, atol=1e-12)
        every, sparse = dominant_eigenvector(centred, 16, 1), dominant_eigenvector(centred, 16, 4)
        torch.testing.assert_close(sparse[0], every[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(sparse[1], every[1], rtol=0, atol=1e-10)
