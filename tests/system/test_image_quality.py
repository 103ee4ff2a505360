"""Image quality through the product's whole path (replay → prewhitening → ESPIRiT → CDL-Λ with the shipped
default network), against the phantom of Debian's ismrmrd_generate_cartesian_shepp_logan."""

from __future__ import annotations

from cdl_lambda.gadgets.replay import replay
from cdl_lambda.recon import fft
from cdl_lambda.recon.coils import remove_readout_oversampling
from support import ground_truth, make_shepp_logan, read_kspace, relative_error, true_coil_maps


def test_r3_eight_coils_is_at_least_40_percent_below_zero_filled_sense1_with_true_maps(tmp_path):
    path = make_shepp_logan(tmp_path / "r3.h5", matrix=128, coils=8, oversampling=2, repetitions=1,
                            acceleration=3, calibration=24, noise=0.05)
    reference = ground_truth(path)
    kspace, _ = read_kspace(path, repetition=0)
    kspace = remove_readout_oversampling(kspace, 2)
    sense1 = (true_coil_maps(path).conj() * fft.ifft2c(kspace)).sum(0).numpy()
    baseline = relative_error(sense1, reference)
    result = replay(path)
    assert result.errors == []
    first = next(im for im in result.images if im.repetition == 0 and im.image_series_index == 1)
    meta = first.meta
    assert meta["CDL_NoiseSource"].startswith("noise scan")
    assert 0.7 < float(meta["CDL_ResidualToNoise"]) < 1.3  # the fit stops at the noise
    error = relative_error(first.data[0, 0], reference)
    assert error <= 0.6 * baseline, (error, baseline)
