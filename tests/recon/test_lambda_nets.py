"""NET_Θ: V3 is exactly permutation-equivariant and takes any dictionary; V1 and V2 are not."""

import pytest
import torch

from support import phantom, random_dictionary
from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.lambda_nets import LambdaNetV1, LambdaNetV2, LambdaNetV3, build_lambda_net
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.sampling import central_window_mask

SHAPE = (32, 32)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    mask = central_window_mask(SHAPE, (16, 16))
    x = phantom(*SHAPE).unsqueeze(0)
    noise = 0.05 * torch.randn(1, *SHAPE, dtype=torch.complex64)
    return (fft2c(x) + noise) * mask, mask


def _randomise(net):
    """Untrained nets output ≈ constant maps; perturb the weights so the test sees a real spatial dependence."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def reconstruct(net, kspace, mask, dictionary):
    model = CDLLambda(net, iterations=30)
    with torch.no_grad():
        return model(kspace, mask, dictionary)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_v3_permutation_leaves_image_unchanged(data):
    kspace, mask = data
    dictionary = random_dictionary(12, 5, seed=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    net = _randomise(LambdaNetV3(base_channels=8))
    out = reconstruct(net, kspace, mask, dictionary)
    permuted = reconstruct(net, kspace, mask, dictionary.permuted(order))
    assert relative(permuted.image, out.image) < 1e-5
    assert torch.allclose(permuted.lambda_maps, out.lambda_maps[:, order], atol=1e-6)  # Λ(πD) = πΛ(D)
    assert out.lambda_maps.std() > 1e-3  # the maps are not trivially constant


def test_v3_with_filter_context_stays_equivariant_and_sees_the_image(data):
    """The context channels (x0 and the filters' mean response) are the same for every filter: Λ(πD) = πΛ(D) still,
    for any K; and a filter's Λ now depends on the image beyond its own response."""
    kspace, mask = data
    dictionary = random_dictionary(12, 5, seed=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    net = _randomise(LambdaNetV3(base_channels=8, context=True))
    out = reconstruct(net, kspace, mask, dictionary)
    permuted = reconstruct(net, kspace, mask, dictionary.permuted(order))
    assert relative(permuted.image, out.image) < 1e-5
    assert torch.allclose(permuted.lambda_maps, out.lambda_maps[:, order], atol=1e-6)
    assert out.lambda_maps.std() > 1e-3
    assert reconstruct(net, kspace, mask, random_dictionary(20, 7, seed=5)).lambda_maps.shape == (1, 20, *SHAPE)
    # the first filter's Λ with the other eleven filters replaced: its own response is unchanged, the context not
    others = random_dictionary(12, 5, seed=9).filters
    swapped = type(dictionary)(torch.cat([dictionary.filters[:1], others[1:]]))
    x0 = torch.randn(1, *SHAPE, dtype=torch.complex64)
    with torch.no_grad():
        first, second = net(x0, dictionary)[:, 0], net(x0, swapped)[:, 0]
        plain = _randomise(LambdaNetV3(base_channels=8))
        assert torch.equal(plain(x0, dictionary)[:, 0], plain(x0, swapped)[:, 0])  # without context: its own alone
    assert relative(second, first) > 1e-3


@pytest.mark.parametrize("net_class", [LambdaNetV1, LambdaNetV2])
def test_v1_v2_are_not_permutation_invariant(data, net_class):
    kspace, mask = data
    dictionary = random_dictionary(12, 5, seed=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    net = _randomise(net_class(12, base_channels=8))
    out = reconstruct(net, kspace, mask, dictionary)
    permuted = reconstruct(net, kspace, mask, dictionary.permuted(order))
    assert relative(permuted.image, out.image) > 1e-3


@pytest.mark.parametrize("num_filters, kernel_size", [(8, 5), (24, 7), (64, 11)])
def test_v3_accepts_any_dictionary(data, num_filters, kernel_size):
    kspace, mask = data
    net = LambdaNetV3(base_channels=8)
    out = reconstruct(net, kspace, mask, random_dictionary(num_filters, kernel_size, seed=num_filters))
    assert out.lambda_maps.shape == (1, num_filters, *SHAPE)
    assert torch.isfinite(out.image).all()
    assert (out.lambda_maps >= 0).all() and (out.lambda_maps <= net.upper_bound).all()


def test_v1_refuses_a_dictionary_of_another_size(data):
    kspace, mask = data
    with pytest.raises(ValueError, match="K=12"):
        reconstruct(LambdaNetV1(12, base_channels=8), kspace, mask, random_dictionary(8, 5))


def test_networks_rebuild_from_their_config():
    for net in (LambdaNetV1(8, base_channels=8), LambdaNetV2(8, base_channels=8), LambdaNetV3(base_channels=8),
                LambdaNetV3(base_channels=8, context=True)):
        rebuilt = build_lambda_net(net.config())
        assert type(rebuilt) is type(net)
        rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="unknown"):
        build_lambda_net({"version": "v9"})


def test_v3_in_cpu_sized_chunks_equals_one_pass(monkeypatch):
    """Cutting the filter maps into cache-sized chunks on the CPU changes nothing but the speed."""
    from cdl_lambda.recon import lambda_nets

    torch.manual_seed(0)
    net = lambda_nets.LambdaNetV3(base_channels=4, stages=2, upper_bound=2.0).eval()
    dictionary = random_dictionary(6, 5)
    x0 = torch.randn(2, 40, 36, dtype=torch.complex64)
    passes = []
    net.unet.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
    with torch.no_grad():
        monkeypatch.setattr(lambda_nets, "CPU_CHUNK_PIXELS", 40 * 36 * 3)  # 3 maps a pass: 12 maps in 4 chunks
        chunked = net(x0, dictionary)
        monkeypatch.setattr(lambda_nets, "CPU_CHUNK_PIXELS", 10 ** 9)     # all 12 maps in one pass
        whole = net(x0, dictionary)
    assert passes == [3, 3, 3, 3, 12]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_a_wider_unet_started_from_a_narrower_one_computes_the_same(stages):
    """UNet.load_narrower: twice the channels and three more inputs, the same output (the new ones unread at first);
    the zero weights from the new channels into the old ones receive gradients, so training starts reading them."""
    from cdl_lambda.recon.lambda_nets import UNet

    torch.manual_seed(stages)
    narrow, wide = UNet(2, 1, 4, stages), UNet(5, 1, 8, stages)
    wide.load_narrower(narrow.state_dict(), 4)
    x = torch.randn(3, 5, 37, 30)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), narrow(x[:, :2]), rtol=0, atol=1e-6)
        assert (wide(x * torch.tensor([1, 1, 2, 2, 2]).view(1, 5, 1, 1)) == wide(x)).all()  # the new inputs unread
    wide(x).square().sum().backward()
    assert wide.down[0][0].weight.grad[:4, 2:].abs().sum() > 0  # from the new inputs
    assert wide.down[0][2].weight.grad[:4, 4:].abs().sum() > 0  # from the new channels
    with pytest.raises(ValueError, match="not narrower"):
        UNet(2, 1, 4, stages).load_narrower(wide.state_dict(), 8)
