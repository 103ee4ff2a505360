"""The one door (:func:`recon.pipeline.reconstruct_slices`) without a server: typed slice groups in, one outcome per
image out; batching, failure isolation, the CPU fallback, coil maps once per image, and σ from the noise scan, from
upstream or estimated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdl_lambda.recon import fft, pipeline
from cdl_lambda.recon.coils import prewhiten
from cdl_lambda.recon.noise import NOISE_ESTIMATED, NOISE_FROM_SCAN
from cdl_lambda.recon.pipeline import Reconstructor, reconstruct_slices
from cdl_lambda.recon.sampling import equispaced_line_mask
from cdl_lambda.recon.slice_data import STATUS_INCOMPLETE, STATUS_NOT_RECONSTRUCTED, NoiseScan, SliceData
from support import phantom, synthetic_maps

N, COILS, NOISE = 32, 4, 0.02
# Batched and single passes run the same float32 operations on differently shaped tensors, so FFT and reduction
# orders may differ with the CPU: images agree to float32 rounding accumulated over the FISTA iterations (measured: bit
# for bit on a 2-core x86 CPU), far below 1e-4 of the maximum, while one iteration fewer moves them by 1.1e-2 of it.
BATCH_TOLERANCE = 1e-4


def _kspace(level: float, seed: int) -> torch.Tensor:
    """Centred 4-coil k-space ``(coils, 1, N, N)`` of a phantom scaled by ``level``, R = 2 with 12 calibration lines,
    white noise of std ``NOISE`` per complex sample."""
    image = phantom(N, N) * level
    maps = synthetic_maps(COILS, (N, N))
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    noise = torch.randn(COILS, N, N, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed)) * NOISE
    mask = equispaced_line_mask((N, N), 2, 12)
    return ((fft.fft2c(maps * image) + noise) * mask)[:, None], mask[None].bool()


def _slice(level=1.0, seed=0, noise=None, label=None) -> SliceData:
    kspace, mask = _kspace(level, seed)
    return SliceData(kspace=kspace, mask=mask, noise=noise, label=label or f"slice {seed}")


def _noise_scan(seed=99) -> NoiseScan:
    samples = torch.randn(COILS, 4096, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed)) * NOISE
    return NoiseScan(samples=samples)


@pytest.fixture(scope="module")
def reconstructor():
    return Reconstructor(network="none", iterations=8, device="cpu", batch_size=3, compiled=False)


class Counting:
    """Wraps a reconstructor: counts ``solve`` calls and raises ``error`` for a batch that ``fails(kspace)``."""

    def __init__(self, inner, error=None, fails=lambda kspace: False, device=None):
        self.inner, self.error, self.fails = inner, error, fails
        self.batch_size, self.identity = inner.batch_size, inner.identity
        self.device = device or inner.device
        self.data_device = torch.device("cpu")  # a stand-in GPU keeps its data on the CPU
        self.batches: list[int] = []

    def solve(self, kspace, mask, coil_maps, noise_std):
        self.batches.append(kspace.shape[0])
        if self.error is not None and self.fails(kspace):
            raise self.error
        return self.inner.solve(kspace, mask, coil_maps, noise_std)


class FakeCuda:
    type = "cuda"

    def __str__(self):
        return "cuda:0"


@pytest.fixture
def espirit_calls(monkeypatch):
    calls = []
    original = pipeline._coils.estimate_coil_maps

    def counting(kspace, calibration_mask, noise_std=None):
        calls.append(kspace.shape)
        return original(kspace, calibration_mask, noise_std)

    monkeypatch.setattr(pipeline._coils, "estimate_coil_maps", counting)
    return calls


def _images(outcomes) -> dict:
    return {o.source.label: o.image for o in outcomes if o.error is None}


def test_a_batch_gives_the_images_of_one_by_one(reconstructor):
    slices = [_slice(level, seed, _noise_scan()) for seed, level in enumerate((1.0, 2.0, 0.5))]
    batched = Counting(reconstructor)
    together = list(reconstruct_slices(batched, slices))
    one_by_one = Counting(reconstructor)
    one_by_one.batch_size = 1
    alone = list(reconstruct_slices(one_by_one, slices))
    assert batched.batches == [3] and one_by_one.batches == [1, 1, 1]
    assert [o.source for o in together] == slices and all(o.error is None for o in together)
    for a, b in zip(together, alone):
        assert a.image.shape == (N, N) and a.zero_filled.shape == (N, N) and a.lambda_maps.shape[-2:] == (N, N)
        assert np.abs(a.image - b.image).max() <= BATCH_TOLERANCE * np.abs(b.image).max()
        assert a.residual_to_noise == pytest.approx(b.residual_to_noise, rel=1e-4)
        assert a.status == "ok" and a.device == "cpu" and a.noise_std == 1.0


def test_a_bad_slice_fails_alone(reconstructor):
    good = [_slice(1.0, 0, _noise_scan()), _slice(2.0, 2, _noise_scan())]
    nan_kspace, mask = _kspace(1.0, 1)
    nan_kspace[0, 0, N // 2, 3] = float("nan")
    bad = SliceData(kspace=nan_kspace, mask=mask, noise=_noise_scan(), label="slice 1", status=STATUS_INCOMPLETE)
    outcomes = list(reconstruct_slices(reconstructor, [good[0], bad, good[1]]))
    assert len(outcomes) == 3
    (failed,) = [o for o in outcomes if o.error is not None]
    assert failed.source is bad and "NaN" in str(failed.error) and failed.status == STATUS_NOT_RECONSTRUCTED
    assert failed.image is None
    reference = _images(reconstruct_slices(reconstructor, good))
    for label, image in _images(outcomes).items():
        assert np.abs(image - reference[label]).max() <= BATCH_TOLERANCE * np.abs(reference[label]).max()
    # a solver failure inside a batch: the batch is redone slice by slice and only the culprit is lost
    bright = _slice(1000.0, 1, _noise_scan(), label="bright")
    flaky = Counting(reconstructor, RuntimeError("solver diverged"), fails=lambda k: k.abs().amax() > 1000)
    outcomes = list(reconstruct_slices(flaky, [good[0], bright, good[1]]))
    assert flaky.batches == [3, 1, 1, 1]
    assert [o.error is None for o in outcomes] == [True, False, True] and "diverged" in str(outcomes[1].error)


def test_a_slice_that_fails_on_the_gpu_is_redone_on_the_cpu_with_its_maps(reconstructor, espirit_calls):
    slices = [_slice(1.0, 0, _noise_scan()), _slice(1000.0, 1, _noise_scan()), _slice(2.0, 2, _noise_scan())]
    gpu = Counting(reconstructor, torch.cuda.OutOfMemoryError("CUDA out of memory"),
                   fails=lambda k: k.abs().amax() > 1000, device=FakeCuda())
    cpu = Counting(reconstructor)
    outcomes = list(reconstruct_slices(gpu, slices, cpu_fallback=lambda: cpu))
    assert all(o.error is None for o in outcomes)
    assert [o.device for o in outcomes] == ["cuda:0", "cpu", "cuda:0"]
    assert "reconstructed on the CPU after GPU out of memory" in outcomes[1].note and not outcomes[0].note
    assert gpu.batches == [3, 1, 1, 1] and cpu.batches == [1]
    assert len(espirit_calls) == 3  # one ESPIRiT per slice: the retries and the CPU reuse the maps
    # without a fallback the slice fails alone; bad input is never retried on the CPU
    outcomes = list(reconstruct_slices(gpu, slices))
    assert [o.error is None for o in outcomes] == [True, False, True]
    bad = Counting(reconstructor, ValueError("bad input"), fails=lambda k: True, device=FakeCuda())
    cpu.batches.clear()
    assert all(o.error is not None for o in reconstruct_slices(bad, slices[:1], cpu_fallback=lambda: cpu))
    assert cpu.batches == []


def test_preparation_that_fails_on_the_gpu_moves_to_the_cpu(reconstructor, monkeypatch):
    original, tries = pipeline.prepare, []

    def failing_once(data, device):
        tries.append(data.label)
        if len(tries) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory in ESPIRiT")
        return original(data, device)

    monkeypatch.setattr(pipeline, "prepare", failing_once)
    gpu, cpu = Counting(reconstructor, device=FakeCuda()), Counting(reconstructor)
    outcomes = list(reconstruct_slices(gpu, [_slice(1.0, 0), _slice(1.0, 1)], cpu_fallback=lambda: cpu))
    assert tries == ["slice 0", "slice 0", "slice 1"] and all(o.error is None for o in outcomes)
    by_label = {o.source.label: o for o in outcomes}
    assert by_label["slice 0"].device == "cpu" and "GPU out of memory" in by_label["slice 0"].note
    assert by_label["slice 1"].device == "cuda:0" and gpu.batches == [1] and cpu.batches == [1]


def test_noise_level_from_the_noise_scan_from_upstream_or_estimated(reconstructor):
    data = _slice(1.0, 0)
    with_scan, estimated = (next(reconstruct_slices(reconstructor, [SliceData(**{**vars(data), "noise": noise})]))
                            for noise in (_noise_scan(), None))
    assert with_scan.noise_std == 1.0 and with_scan.noise_source == NOISE_FROM_SCAN
    assert 0.8 < with_scan.residual_to_noise < 1.3  # the fit stops near the noise the scan measured (8 iterations)
    assert estimated.noise_source == NOISE_ESTIMATED
    assert NOISE < estimated.noise_std < 2 * NOISE  # reads high on a sharp phantom at SNR 50 (recon.noise)
    # the same data prewhitened upstream with a scale (as Gadgetron's NoiseAdjustGadget does), σ stated there: the
    # same image as prewhitening here, in the upstream's units
    whitening = 1.26 * _noise_scan().whitening(0.0, torch.device("cpu"))
    upstream = next(reconstruct_slices(reconstructor, [SliceData(**{
        **vars(data), "kspace": prewhiten(data.kspace, whitening, coil_dim=0),
        "noise": NoiseScan.prewhitened_upstream(1.26, "the scanner")})]))
    assert upstream.noise_std == pytest.approx(1.26) and upstream.noise_source == "prewhitened by the scanner"
    assert np.abs(upstream.image - 1.26 * with_scan.image).max() <= BATCH_TOLERANCE * np.abs(upstream.image).max()
    # a statement the data contradict (not prewhitened after all) gives way to the estimate, and says so
    wrong = next(reconstruct_slices(reconstructor, [SliceData(**{
        **vars(data), "noise": NoiseScan.prewhitened_upstream(50 * NOISE, "the scanner")})]))
    assert wrong.noise_std == pytest.approx(estimated.noise_std) and "disagree" in wrong.noise_source


def test_noise_scan_dwell_time_scales_the_whitening():
    """Noise power grows with the bandwidth: a noise scan sampled at half the data's dwell time has √2 the noise."""
    fast = NoiseScan(samples=_noise_scan().samples * 2 ** 0.5, sample_time_us=5.0)
    same = NoiseScan(samples=_noise_scan().samples, sample_time_us=10.0)
    cpu = torch.device("cpu")
    torch.testing.assert_close(fast.whitening(10.0, cpu), same.whitening(10.0, cpu), rtol=1e-5, atol=0)
    assert fast.whitening(10.0, cpu) is fast.whitening(10.0, cpu)  # computed once per dwell time and device


def test_oversampled_3d_group_gives_one_outcome_per_partition(reconstructor):
    """A 3-D slab with 2× readout oversampling, on a finer image grid: the door crops the readout, transforms k2 into
    partitions and resizes, one image per partition."""
    kspace, mask = _kspace(1.0, 0)
    slab = torch.cat([kspace, kspace], dim=1)  # (coils, 2, N, N): the same k-space in both k2 planes
    raw = fft.fft1c(torch.cat([torch.zeros_like(slab), fft.ifft1c(slab, dim=-1), torch.zeros_like(slab)], -1)
                    [..., N // 2:N // 2 + 2 * N], dim=-1)  # a readout twice as long over twice the field of view
    raw_mask = mask.repeat(2, 1, 1).repeat_interleave(2, dim=-1)
    data = SliceData(kspace=raw, mask=raw_mask, oversampling=2, matrix=(N, N + 16), noise=_noise_scan(), label="slab")
    outcomes = list(reconstruct_slices(reconstructor, [data]))
    assert [(o.partition, o.image.shape) for o in outcomes] == [(0, (N, N + 16)), (1, (N, N + 16))]
    assert all(o.error is None and o.describe() == f"slab, partition {o.partition}" for o in outcomes)


def test_a_withdrawn_background_weight_is_said_on_the_outcome(monkeypatch):
    """A network whose background weight covers the whole field of view: the data disagree, the slice is
    reconstructed without the weight, its factor kept only where the data agree (a few empty pixels), and its
    outcome says so (the image comment and meta come from these fields). With a hard edge to the withdrawn region
    (FEATHER = 1): the fade would cover the few empty pixels of this small grid."""
    from types import SimpleNamespace

    from cdl_lambda.recon import background as background_module
    from cdl_lambda.recon import fft as _fft
    from cdl_lambda.recon.background import WITHDRAW_Z

    monkeypatch.setattr(background_module, "FEATHER", 1)
    reconstructor = Reconstructor(network="none", iterations=8, device="cpu", batch_size=2, compiled=False)
    weight = torch.ones(1, N, N)
    terms = SimpleNamespace(centred=weight, native=_fft.to_native(weight), lowpass_gain=torch.tensor(10.0),
                            image_gain=torch.tensor(2.0), form="penalty", step="uniform")
    monkeypatch.setattr(reconstructor.model, "background_terms", lambda x0: terms)
    (outcome,) = reconstruct_slices(reconstructor, [_slice(level=1.0, seed=5)])
    assert outcome.background_withdrawn and outcome.background_disagreement > WITHDRAW_Z
    assert "background weight withdrawn" in outcome.note and 0 < outcome.background_kept < 0.1  # the object's b
    assert f"kept where the data agree ({100 * outcome.background_kept:.0f} % of its area)" in outcome.note
    plain = Reconstructor(network="none", iterations=8, device="cpu", batch_size=2, compiled=False)
    (reference,) = reconstruct_slices(plain, [_slice(level=1.0, seed=5)])
    assert reference.background_disagreement is None and not reference.background_withdrawn
    top = np.abs(reference.image).max()
    signal = np.abs(reference.image) > 0.1 * top  # the object: its weight withdrawn, the weight-free image
    np.testing.assert_allclose(outcome.image[signal], reference.image[signal], atol=1e-5 * top)


def _slice_of_size(n: int, seed: int = 3) -> SliceData:
    """A 4-coil phantom scan of matrix n × n, R = 2 with 16 calibration lines, white noise of std ``NOISE``."""
    maps = synthetic_maps(COILS, (n, n))
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    noise = torch.randn(COILS, n, n, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed)) * NOISE
    mask = equispaced_line_mask((n, n), 2, 16)
    kspace = ((fft.fft2c(maps * phantom(n, n)) + noise) * mask)[:, None]
    return SliceData(kspace=kspace, mask=mask[None].bool(), label=f"{n}² slice")


def test_the_shipped_network_on_a_larger_matrix_uses_and_reports_its_dictionary_at_its_scale():
    """The default network was trained at 128²: on a 256² scan its dictionary is used at twice its scale (the
    filters' taps 2·(k − 1) + 1, the outcome and its meta saying 2), on a 128² scan as learned; dictionary_scale=1
    turns it off."""
    from cdl_lambda.gadgets.image_output import noise_meta
    shipped = Reconstructor(iterations=2, device="cpu", batch_size=1, compiled=False)
    as_learned = Reconstructor(iterations=2, device="cpu", batch_size=1, compiled=False, dictionary_scale=1)
    k = shipped.dictionary.kernel_size
    (outcome,) = reconstruct_slices(shipped, [_slice_of_size(256)])
    assert outcome.dictionary_scale == 2 and noise_meta(outcome)["CDL_DictionaryScale"] == "2"
    assert shipped.dictionary.resampled(2).kernel_size == 2 * (k - 1) + 1
    (plain,) = reconstruct_slices(as_learned, [_slice_of_size(256)])
    assert plain.dictionary_scale == 1 and noise_meta(plain)["CDL_DictionaryScale"] == "1"
    assert np.abs(outcome.image - plain.image).max() > 1e-3 * np.abs(plain.image).max()
    (at_128,) = reconstruct_slices(shipped, [_slice_of_size(128)])
    assert at_128.dictionary_scale == 1
