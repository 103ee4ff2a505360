"""CDL-Λ end to end on small problems: exactness, coil consistency, denoising, the pipeline's input checks."""

import numpy as np
import pytest
import torch

from support import phantom, random_dictionary
from cdl_lambda.recon.device import choose_device
from cdl_lambda.recon.dictionary import dct_dictionary
from cdl_lambda.recon.fft import fft2c, ifft2c
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.pipeline import Reconstructor, default_calibration_mask
from cdl_lambda.recon.sampling import equispaced_line_mask
from support import synthetic_maps

SHAPE = (48, 48)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_noiseless_full_sampling_returns_the_image():
    x = phantom(*SHAPE).unsqueeze(0)
    out = CDLLambda(None, scalar_lambda=1e-4, iterations=40)(fft2c(x), torch.ones(SHAPE), random_dictionary(8, 5))
    assert relative(out.image, x) < 1e-3
    assert relative(out.zero_filled, x) < 1e-5


def test_multi_coil_matches_single_coil_when_fully_sampled():
    """With full sampling and Σ|c|² = 1, AᴴA = I for both operators: the two paths must agree."""
    torch.manual_seed(0)
    x = phantom(*SHAPE).unsqueeze(0)
    maps = synthetic_maps(4, SHAPE)
    maps = (maps / maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()).unsqueeze(0)
    noise = 0.1 * torch.randn(1, *SHAPE, dtype=torch.complex64)
    single_k = fft2c(x + noise)
    multi_k = fft2c(maps * (x + noise).unsqueeze(1))
    model = CDLLambda(LambdaNetV3(base_channels=4), iterations=20)
    dictionary = random_dictionary(8, 5)
    with torch.no_grad():
        single = model(single_k, torch.ones(SHAPE), dictionary, noise_std=0.1)
        multi = model(multi_k, torch.ones(SHAPE), dictionary, coil_maps=maps, noise_std=0.1)
    assert relative(multi.image, single.image) < 1e-4


def test_scalar_lambda_denoises():
    torch.manual_seed(1)
    x = phantom(64, 64).unsqueeze(0)
    y = fft2c(x) + 0.15 * torch.randn(1, 64, 64, dtype=torch.complex64)
    with torch.no_grad():
        out = CDLLambda(None, scalar_lambda=1.5, iterations=64)(y, torch.ones(64, 64), dct_dictionary(7))
    assert 0.14 < float(out.noise_std) < 0.19  # estimated from the data (a sharp phantom reads high: recon.noise)
    zero_filled_error = relative(ifft2c(y), x)
    assert relative(out.image, x) < 0.75 * zero_filled_error


def test_output_units_follow_the_input():
    x = phantom(*SHAPE).unsqueeze(0)
    mask = equispaced_line_mask(SHAPE, 2, 8)
    model = CDLLambda(None, scalar_lambda=0.01, iterations=10)
    with torch.no_grad():
        small = model(fft2c(x) * mask, mask, random_dictionary(8, 5)).image
        large = model(1000 * fft2c(x) * mask, mask, random_dictionary(8, 5)).image
    assert relative(large, 1000 * small) < 1e-5


def test_pipeline_reconstructs_multi_coil_slices():
    x = phantom(*SHAPE)
    maps = synthetic_maps(4, SHAPE)
    maps = maps / maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()
    mask = equispaced_line_mask(SHAPE, 2, 16)
    kspace = (mask * fft2c(maps * x)).unsqueeze(0).repeat(3, 1, 1, 1)
    reconstructor = Reconstructor(network="none", iterations=30, device="cpu", batch_size=2, scalar_lambda=0.01)
    result = reconstructor.reconstruct(kspace.numpy(), mask.numpy())
    assert result.image.shape == (3, *SHAPE) and result.image.dtype == np.complex64
    assert result.lambda_maps.shape[:2] == (3, reconstructor.dictionary.num_filters)
    inside = x.abs().numpy() > 0.3
    error = np.abs(np.abs(result.image[1]) - np.abs(x.numpy()))[inside].mean()
    zero_filled_error = np.abs(np.abs(result.zero_filled[1]) - np.abs(x.numpy()))[inside].mean()
    assert error < zero_filled_error and error < 0.1
    assert np.allclose(result.image[0], result.image[2], rtol=1e-4, atol=1e-5)  # slices are independent


def test_pipeline_rejects_bad_input():
    reconstructor = Reconstructor(network="none", iterations=5, device="cpu")
    kspace = np.zeros((1, 2, 32, 32), np.complex64)
    mask = np.ones((32, 32), np.float32)
    kspace[0, 1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reconstructor.reconstruct(kspace, mask)
    with pytest.raises(ValueError, match="does not match"):
        reconstructor.reconstruct(np.zeros((1, 2, 32, 32), np.complex64), np.ones((16, 32), np.float32))
    with pytest.raises(ValueError, match="slices, coils"):
        reconstructor.reconstruct(np.zeros((32, 32), np.complex64), mask)


def test_calibration_region_is_the_central_block():
    mask = equispaced_line_mask((64, 32), 4, 12)
    calibration = default_calibration_mask(mask)
    rows = torch.nonzero(calibration[:, 0]).flatten()
    assert rows.min() == 26 and rows.max() == 37


def test_device_choice():
    assert choose_device(None).type in ("cpu", "cuda")
    assert choose_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


def test_compiled_fista_kernel_matches_eager(monkeypatch):
    from cdl_lambda.recon import compiled
    from cdl_lambda.recon.compiled import compile_available
    monkeypatch.setattr(compiled, "COMPILE_MIN_WORK", 0)  # compile even this small solve
    if not compile_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    x = phantom(*SHAPE).unsqueeze(0)
    mask = equispaced_line_mask(SHAPE, 2, 8)
    kspace = fft2c(x) * mask
    dictionary = random_dictionary(8, 5)
    with torch.no_grad():
        eager = CDLLambda(None, scalar_lambda=0.05, iterations=12)(kspace, mask, dictionary).image
        fused = CDLLambda(None, scalar_lambda=0.05, iterations=12, compiled=True)(kspace, mask, dictionary).image
    assert relative(fused, eager) < 1e-5


def test_a_larger_image_sees_the_dictionary_at_the_scale_the_network_was_trained_at():
    """dictionary_scale "auto": an image larger than the network's trained matrix m is solved with the filters
    resampled by n / m — exactly the image the resampled dictionary gives at scale 1 — and says so; at or below m,
    and without a network, the filters are used as learned; a number forces that scale."""
    from cdl_lambda.recon.lambda_nets import set_trained_matrix
    torch.manual_seed(0)
    network = LambdaNetV3(base_channels=4, stages=1)
    set_trained_matrix(network, 32)
    dictionary = random_dictionary(4, 5, seed=2)
    kspace = fft2c(phantom(64, 64))[None] * 20 + torch.randn(1, 64, 64, dtype=torch.complex64)
    mask = equispaced_line_mask((64, 64), 2, 8)
    auto = CDLLambda(network, beta=2.0, iterations=6).eval()
    assert auto.dictionary_scale_for((64, 64)) == 2 and auto.dictionary_scale_for((32, 32)) == 1
    assert auto.dictionary_scale_for((24, 48)) == 1.5
    assert CDLLambda(None).dictionary_scale_for((64, 64)) == 1
    forced = CDLLambda(network, beta=2.0, iterations=6, dictionary_scale=1).eval()
    with torch.no_grad():
        out = auto(kspace, mask, dictionary, noise_std=1.0)
        same = forced(kspace, mask, dictionary.resampled(2), noise_std=1.0)
        unscaled = forced(kspace, mask, dictionary, noise_std=1.0)
    assert out.dictionary_scale == 2 and unscaled.dictionary_scale == 1
    assert torch.allclose(out.image, same.image, atol=1e-5 * float(same.image.abs().max()))
    assert (out.image - unscaled.image).abs().max() > 1e-2 * float(same.image.abs().max())
    with pytest.raises(ValueError, match="dictionary_scale"):
        CDLLambda(network, dictionary_scale=0)


def test_lambda_passes_with_a_fixed_lambda_reach_the_same_minimiser():
    """With one scalar Λ a second pass only restarts FISTA's momentum from the codes so far: run long enough, one pass
    and two reach the same minimiser, and the iterations used add up to the cap."""
    torch.manual_seed(2)
    x = phantom(*SHAPE).unsqueeze(0)
    y = fft2c(x) + 0.1 * torch.randn(1, *SHAPE, dtype=torch.complex64)
    mask = equispaced_line_mask(SHAPE, 2, 8)
    dictionary = random_dictionary(8, 5)
    with torch.no_grad():
        one = CDLLambda(None, scalar_lambda=1.0, iterations=600)(y * mask, mask, dictionary, noise_std=0.1)
        two = CDLLambda(None, scalar_lambda=1.0, iterations=600, lambda_passes=2)(y * mask, mask, dictionary,
                                                                                 noise_std=0.1)
        short = CDLLambda(None, scalar_lambda=1.0, iterations=8, lambda_passes=2)(y * mask, mask, dictionary,
                                                                                 noise_std=0.1)
    assert relative(two.image, one.image) < 1e-3 and relative(short.image, one.image) > 10 * relative(two.image,
                                                                                                      one.image)
    assert int(two.iterations_used[0]) == 600


def test_lambda_passes_infer_lambda_again_from_the_image_so_far(monkeypatch):
    """Two passes call the network twice, first on x₀ and then on the image after the first pass (a different
    input), and give a different image from one pass; ADMM refuses them."""
    torch.manual_seed(3)
    x = phantom(*SHAPE).unsqueeze(0)
    mask = equispaced_line_mask(SHAPE, 3, 8)
    y = (fft2c(x) + 0.1 * torch.randn(1, *SHAPE, dtype=torch.complex64)) * mask
    dictionary = random_dictionary(8, 5)
    net = LambdaNetV3(base_channels=4)
    seen = []
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda x0, d: seen.append(x0.clone()) or original(x0, d))
    with torch.no_grad():
        two = CDLLambda(net, iterations=16, lambda_passes=2)(y, mask, dictionary, noise_std=0.1)
        first_only = len(seen)
        one = CDLLambda(net, iterations=16)(y, mask, dictionary, noise_std=0.1)
    assert first_only == 2 and relative(seen[1], seen[0]) > 1e-3 and torch.equal(seen[2], seen[0])
    assert relative(two.image, one.image) > 1e-3
    with pytest.raises(ValueError, match="FISTA"):
        CDLLambda(net, solver="admm", lambda_passes=2)
