"""Device choice and the CPU allocator setting."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from cdl_lambda.recon.device import choose_device, keep_freed_memory_for_reuse
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.sampling import equispaced_line_mask


def test_auto_picks_cuda_only_when_present_and_explicit_cuda_without_it_is_refused():
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reconstruction_reuses_freed_buffers_instead_of_faulting_pages_in():
    """16 FISTA iterations at 160², 8 coils, K = 32 allocate and free 6.5 MB code buffers many times; with glibc's
    default trimming each would be faulted in afresh (about 27 000 page faults), kept for reuse a few thousand."""
    assert keep_freed_memory_for_reuse()
    shape = (160, 160)
    generator = torch.Generator().manual_seed(0)
    filters = torch.randn(32, 9, 9, generator=generator)
    dictionary = Dictionary(filters / filters.flatten(1).norm(dim=1)[:, None, None])
    model = CDLLambda(None, iterations=16).eval()
    maps = torch.randn(1, 8, *shape, dtype=torch.complex64, generator=generator)
    maps = maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()
    mask = equispaced_line_mask(shape, 4, 24)
    kspace = mask * fft2c(maps * torch.randn(1, 1, *shape, dtype=torch.complex64, generator=generator))
    with torch.inference_mode():
        model(kspace, mask, dictionary, coil_maps=maps)  # grow the heap once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(kspace, mask, dictionary, coil_maps=maps)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    code_buffer_pages = 32 * 160 * 160 * 8 // resource.getpagesize()
    assert faults < 8 * code_buffer_pages, faults  # untuned: about 17 × code_buffer_pages
