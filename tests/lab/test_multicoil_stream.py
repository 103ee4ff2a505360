"""lab.multicoil: the scan mixes draw what they say."""

import numpy as np
import pytest

from cdl_lambda.lab import multicoil
from support import phantom


def heads(n=48):
    base = phantom(n, n).abs().numpy().astype(np.float32)
    return np.stack([base, base[::-1]])


def draws(mix: str, count: int = 10) -> list[tuple[int, float]]:
    """(coils, sampled fraction of the lines) of ``count`` batches of the stream."""
    stream = multicoil.TrainingStream(heads(), 2, seed=3, mix=mix)
    out = []
    for _ in range(count):
        batch = next(stream)
        coils = 1 if batch.coil_maps is None else batch.coil_maps.shape[1]
        out.append((coils, float(batch.mask.float().mean())))
    return out


def test_the_site_mix_draws_head_arrays_undersampled_and_the_broad_mix_more():
    """"site": 8-16 coils and never a fully sampled scan (R 2-4); "broad", from the same seed, also smaller arrays
    or a single coil; an unknown mix is refused."""
    site, broad = draws("site"), draws("broad")
    assert all(coils >= 8 for coils, _ in site)
    assert all(fraction < 0.9 for _, fraction in site)
    assert any(coils < 8 for coils, _ in broad)
    with pytest.raises(ValueError, match="unknown scan mix"):
        multicoil.TrainingStream(heads(), 2, mix="clinic")
