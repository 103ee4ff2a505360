"""Truncated back-propagation: gradients reach the network and β; graph memory grows with T − T′, not T."""

import torch

from support import phantom, random_dictionary
from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.sampling import central_window_mask

SHAPE = (24, 24)


def _setup():
    torch.manual_seed(0)
    mask = central_window_mask(SHAPE, (12, 12))
    target = phantom(*SHAPE).unsqueeze(0)
    kspace = (fft2c(target) + 0.05 * torch.randn(1, *SHAPE, dtype=torch.complex64)) * mask
    return CDLLambda(LambdaNetV3(base_channels=4)), kspace, mask, target, random_dictionary(8, 5)


def saved_bytes(model, kspace, mask, dictionary, iterations, grad_iterations):
    """Bytes of all tensors autograd saves for the backward pass (the training memory that depends on T)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(kspace, mask, dictionary, iterations=iterations, grad_iterations=grad_iterations)
    return total


def test_gradients_reach_network_weights_and_beta():
    model, kspace, mask, target, dictionary = _setup()
    out = model(kspace, mask, dictionary, iterations=12, grad_iterations=4)
    loss = (out.image - target).abs().pow(2).mean()
    loss.backward()
    head = model.lambda_net.unet.head.weight.grad
    first = model.lambda_net.unet.down[0][0].weight.grad
    assert head is not None and head.abs().sum() > 0
    assert first is not None and first.abs().sum() > 0
    assert model.split.raw_beta.grad is not None and model.split.raw_beta.grad.abs() > 0


def test_graph_memory_scales_with_differentiated_iterations_only():
    model, kspace, mask, _, dictionary = _setup()
    short = saved_bytes(model, kspace, mask, dictionary, iterations=10, grad_iterations=4)
    long = saved_bytes(model, kspace, mask, dictionary, iterations=40, grad_iterations=4)
    deeper = saved_bytes(model, kspace, mask, dictionary, iterations=40, grad_iterations=12)
    assert long == short  # T grew 4×, T − T′ fixed: same graph
    per_iteration = (deeper - long) / 8
    assert per_iteration > 0
    assert deeper > 1.5 * long  # the unrolled iterations dominate the graph
