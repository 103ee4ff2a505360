"""lab.physics, lab.acquisition and lab.mrd_writer: the simulator's physics, the ISMRMRD files it writes, and the
`cdl-lambda simulate` command."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import torch

from cdl_lambda.lab import acquisition, images, mrd_writer, physics
from cdl_lambda.recon import coils, fft

FIXTURE = Path(__file__).parent.parent / "fixtures" / "colin27_axial_128.npz"
N = 48  # small matrix: fast tests


@pytest.fixture(scope="module")
def magnitudes() -> np.ndarray:
    """Two real slices on an N×N matrix."""
    slices = np.load(FIXTURE)["images"].astype(np.float32)[1:3]
    return torch.nn.functional.interpolate(torch.from_numpy(slices)[:, None], size=(N, N), mode="bilinear",
                                           antialias=True)[:, 0].numpy()


def read_all(path):
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        header = ismrmrd.xsd.CreateFromDocument(dset.read_xml_header())
        acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
    return header, acqs


def kspace_from_acquisitions(acqs, setting, slices, repetition=0):
    """Assemble (slices, coils, ny_enc, nx_enc) k-space with the readout oversampling removed."""
    wy, wx = setting.encoded
    k = np.zeros((slices, setting.coils, wy, wx), np.complex64)
    for a in acqs:
        if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) or a.idx.repetition != repetition:
            continue
        k[a.idx.slice, :, a.idx.kspace_encode_step_1] = coils.remove_readout_oversampling(
            torch.from_numpy(a.data.copy())).numpy()
    return k


def test_birdcage_maps_are_normalised_and_distinct():
    maps = physics.birdcage_maps(8, (40, 48))
    assert maps.shape == (8, 40, 48) and maps.dtype == np.complex64
    np.testing.assert_allclose((np.abs(maps) ** 2).sum(0), 1.0, atol=1e-5)
    # each coil is most sensitive on its own side: the maxima are spread around the ring
    peaks = {np.unravel_index(np.abs(m).argmax(), m.shape) for m in maps}
    assert len(peaks) == 8
    np.testing.assert_array_equal(physics.birdcage_maps(1, (4, 4)), np.ones((1, 4, 4)))


def test_correlated_noise_has_requested_covariance():
    rng = np.random.default_rng(0)
    cov = physics.channel_covariance(6, rng, correlation=0.4) * 3.0
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    assert cov[0, 1].real / np.sqrt(cov[0, 0].real * cov[1, 1].real) == pytest.approx(0.4)
    n = 20000
    noise = physics.correlated_noise(rng, cov, (n,))
    est = noise @ noise.conj().T / n
    bound = 5 * np.sqrt(np.outer(np.diag(cov).real, np.diag(cov).real) / n)  # ~5 standard errors
    assert np.all(np.abs(est - cov) < bound)


def test_oversampling_is_inverted_by_the_gadget_side_removal():
    k = torch.randn(3, 5, 24, dtype=torch.complex64)
    raw = physics.oversample_readout(k.numpy(), 2)
    assert raw.shape == (3, 5, 48)
    torch.testing.assert_close(coils.remove_readout_oversampling(torch.from_numpy(raw)), k, atol=1e-5, rtol=1e-5)
    # the image has the object in the central half of the doubled readout field of view
    profile = fft.ifft1c(torch.from_numpy(raw), dim=-1)
    assert profile[..., :12].abs().max() < 1e-5 and profile[..., -12:].abs().max() < 1e-5


def test_smooth_phase_is_smooth_and_seeded():
    a = physics.smooth_phase((64, 64), np.random.default_rng(3))
    b = physics.smooth_phase((64, 64), np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    z = np.exp(1j * a)  # neighbouring pixels differ by a small angle
    assert np.abs(np.angle(z[1:] * z[:-1].conj())).max() < 0.5
    assert np.abs(np.angle(z[:, 1:] * z[:, :-1].conj())).max() < 0.5
    assert np.ptp(a) > 1.0


def test_fully_sampled_multicoil_file_reconstructs_to_ground_truth(tmp_path, magnitudes):
    setting = acquisition.Setting(kind="lines", matrix=(N, N), coils=4, noise_level=0.0, acceleration=1.0,
                                  calib_lines=12)
    scan = acquisition.Scan(magnitudes, setting, seed=5)
    protocol = mrd_writer.Protocol(repetitions=2, noise_readouts=4, field_strength_t=0.064)
    path = mrd_writer.write_ismrmrd(tmp_path / "full.h5", scan, protocol, attrs={"source": "fixture"})
    header, acqs = read_all(path)

    enc = header.encoding[0]
    assert header.acquisitionSystemInformation.systemFieldStrength_T == pytest.approx(0.064)
    assert header.acquisitionSystemInformation.receiverChannels == 4
    assert header.experimentalConditions.H1resonanceFrequency_Hz == round(42.577478518e6 * 0.064)
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y) == (2 * N, N)
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y) == (N, N)
    assert enc.encodedSpace.fieldOfView_mm.x == pytest.approx(2 * enc.reconSpace.fieldOfView_mm.x)
    assert (enc.encodingLimits.kspace_encoding_step_1.maximum, enc.encodingLimits.kspace_encoding_step_1.center) \
        == (N - 1, N // 2)
    assert enc.encodingLimits.slice.maximum == 1 and enc.encodingLimits.repetition.maximum == 1

    assert len(acqs) == mrd_writer.count_acquisitions(scan, protocol) == 4 + 2 * 2 * N
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    image = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert acqs[:4] == noise and len(image) == 2 * 2 * N
    for a in image:
        assert a.data.shape == (4, 2 * N) and a.center_sample == N and a.sample_time_us > 0
        for d in (a.read_dir, a.phase_dir, a.slice_dir):
            assert np.linalg.norm(d) == pytest.approx(1.0)
        assert np.dot(a.read_dir, a.phase_dir) == 0 and np.allclose(np.cross(a.read_dir, a.phase_dir), a.slice_dir)
    assert [a.scan_counter for a in acqs] == list(range(1, len(acqs) + 1))
    assert len({a.position[2] for a in image}) == 2  # two slice positions
    flagged = lambda flag: [(a.idx.repetition, a.idx.slice, a.idx.kspace_encode_step_1)  # noqa: E731 - a one-line helper reads best as a lambda here
                            for a in image if a.is_flag_set(flag)]
    assert flagged(ismrmrd.ACQ_FIRST_IN_SLICE) == [(r, s, 0) for r in range(2) for s in range(2)]
    assert flagged(ismrmrd.ACQ_LAST_IN_SLICE) == [(r, s, N - 1) for r in range(2) for s in range(2)]
    assert flagged(ismrmrd.ACQ_LAST_IN_REPETITION) == [(0, 1, N - 1), (1, 1, N - 1)]
    assert flagged(ismrmrd.ACQ_LAST_IN_MEASUREMENT) == [(1, 1, N - 1)]
    calib = set(range(N // 2 - 6, N // 2 + 6))
    assert {e for r, s, e in flagged(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)} == calib

    ref = mrd_writer.read_reference(path)
    assert ref["source"] == "fixture" and ref["image"].shape == (2, N, N) and ref["coil_maps"].shape == (2, 4, N, N)
    for rep in range(2):
        k = torch.from_numpy(kspace_from_acquisitions(acqs, setting, 2, rep))
        recon = coils.combine_coils(fft.ifft2c(k), torch.from_numpy(ref["coil_maps"])).numpy()
        assert np.linalg.norm(recon - ref["image"]) / np.linalg.norm(ref["image"]) < 1e-5
    np.testing.assert_allclose(np.abs(ref["image"]), magnitudes, atol=1e-5)


def test_noise_prescan_covariance_and_noise_level(tmp_path, magnitudes):
    setting = acquisition.Setting(kind="lines", matrix=(N, N), coils=4, noise_level=0.05, correlation=0.5,
                          acceleration=2.0, calib_lines=8)
    scan = acquisition.Scan(magnitudes, setting, seed=2)
    protocol = mrd_writer.Protocol(repetitions=2, noise_readouts=64)
    header, acqs = read_all(mrd_writer.write_ismrmrd(tmp_path / "noisy.h5", scan, protocol))
    ref = mrd_writer.read_reference(tmp_path / "noisy.h5")
    cov = ref["noise_covariance"]

    noise = np.concatenate([a.data for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)], axis=1)
    n = noise.shape[1]
    assert n == 64 * 2 * N
    est = coils.noise_covariance(torch.from_numpy(noise)).numpy()
    bound = 5 * np.sqrt(np.outer(np.diag(cov).real, np.diag(cov).real) / n)
    assert np.all(np.abs(est - cov) < bound)
    corr = est[0, 1].real / np.sqrt(est[0, 0].real * est[1, 1].real)
    assert corr == pytest.approx(0.5, abs=0.05)

    # image noise relative to the noise-free measured k-space
    rows = scan.rows
    clean = np.stack([scan.clean(s) for s in range(2)])  # (slices, lines, coils, nx)
    for rep in range(2):
        k = kspace_from_acquisitions(acqs, setting, 2, rep)[:, :, rows].transpose(0, 2, 1, 3)
        ratio = np.mean(np.abs(k - clean) ** 2) / physics.kspace_variance(clean)
        assert ratio == pytest.approx(0.05, rel=0.05)
    assert ref["noise_variance"] == pytest.approx(np.trace(cov).real / 4)
    assert header.encoding[0].parallelImaging.accelerationFactor.kspace_encoding_step_1 == 2
    assert 2 * len(rows) == pytest.approx(N, abs=1)  # acceleration 2


def test_lowres_file_is_the_central_window_with_heavy_noise(tmp_path, magnitudes):
    setting = acquisition.Setting(kind="lowres", matrix=(N, N), noise_level=0.2)
    scan = acquisition.Scan(magnitudes, setting, seed=4)
    header, acqs = read_all(mrd_writer.write_ismrmrd(tmp_path / "lowres.h5", scan,
                                                     mrd_writer.Protocol(noise_readouts=2)))
    ref = mrd_writer.read_reference(tmp_path / "lowres.h5")
    enc = header.encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y) == (N, N // 2)  # 2× oversampled N/2
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y) == (N, N)
    image = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(image) == 2 * N // 2 and image[0].data.shape == (1, N)
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) for a in image)
    assert ref["mask"].sum() == (N // 2) ** 2

    window = kspace_from_acquisitions(acqs, setting, 2)[:, 0]
    truth = fft.fft2c(torch.from_numpy(ref["image"])).numpy()
    lo = N // 2 - N // 4
    truth = truth[:, lo:lo + N // 2, lo:lo + N // 2]
    ratio = np.mean(np.abs(window - truth) ** 2) / physics.kspace_variance(truth)
    assert ratio == pytest.approx(0.2, rel=0.1)


def test_simulation_is_deterministic_given_a_seed(tmp_path, magnitudes):
    setting = acquisition.Setting(kind="lines", matrix=(N, N), coils=2, noise_level=0.1, acceleration=3.0,
                                  calib_lines=8)
    paths = [mrd_writer.write_ismrmrd(tmp_path / f"{i}.h5", acquisition.Scan(magnitudes, setting, seed=s),
                                      mrd_writer.Protocol())
             for i, s in enumerate((7, 7, 8))]
    (h0, a0), (h1, a1), (_, a2) = (read_all(p) for p in paths)
    assert ismrmrd.xsd.ToXML(h0) == ismrmrd.xsd.ToXML(h1)
    assert len(a0) == len(a1) and all(x == y for x, y in zip(a0, a1))
    assert len(a0) != len(a2) or any(not np.array_equal(x.data, y.data) for x, y in zip(a0, a2))
    r0, r2 = mrd_writer.read_reference(paths[0]), mrd_writer.read_reference(paths[2])
    assert not np.allclose(r0["image"], r2["image"])  # another seed, another phase
    # raw data of one (repetition, slice) does not depend on what was generated before it
    scan = acquisition.Scan(magnitudes, setting, seed=7)
    later = scan.raw(0, 1)
    np.testing.assert_array_equal(acquisition.Scan(magnitudes, setting, seed=7).raw(0, 1), later)


def test_simulate_command_writes_files(tmp_path):
    if not images.available("brainweb"):
        pytest.skip("Debian package insighttoolkit5-examples (BrainWeb slices) is not installed")
    from cdl_lambda.gadgets import cli

    out = tmp_path / "out"
    rc = cli.main(["simulate", "--source", "brainweb", "--setting", "lines", "--matrix", "32", "--coils", "2",
                   "--acceleration", "2", "--calib-lines", "8", "--slices", "2", "--repetitions", "2",
                   "--seed", "3", "--output", str(out)])
    assert rc == 0
    (path,) = out.glob("*.h5")
    header, acqs = read_all(path)
    ref = mrd_writer.read_reference(path)
    assert ref["source"] == "brainweb" and ref["subject"] == "colin27" and ref["image"].shape == (2, 32, 32)
    assert header.acquisitionSystemInformation.receiverChannels == 2
    assert sum(not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs) == 2 * 2 * 16
