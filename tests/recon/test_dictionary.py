"""Dictionary: convolution convention, exact Lipschitz bound, validated I/O."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from support import complex_randn, random_dictionary
from cdl_lambda.recon.dictionary import Dictionary, DictionaryError, dct_dictionary


def test_synthesis_is_true_circular_convolution():
    dictionary = random_dictionary(3, 5, seed=4, dtype=torch.float64)
    codes = torch.randn(1, 3, 16, 18, dtype=torch.float64)
    # circular convolution = cross-correlation with the 180°-flipped filter, centre tap at the origin
    padded = F.pad(codes, (2, 2, 2, 2), mode="circular")
    expected = F.conv2d(padded, dictionary.filters.double().flip(-1, -2).unsqueeze(0))[:, 0]
    assert torch.allclose(dictionary.synthesize(codes).real, expected, atol=1e-12)


def test_lipschitz_bound_matches_power_iteration():
    dictionary = random_dictionary(12, 7, seed=5, dtype=torch.float64)
    shape = (32, 32)
    v = complex_randn(12, *shape, seed=1)
    for _ in range(200):
        v = dictionary.analyze(dictionary.synthesize(v))
        v = v / v.norm()
    power = torch.vdot(v.flatten(), dictionary.analyze(dictionary.synthesize(v)).flatten()).real.item()
    exact = dictionary.lipschitz(shape)
    assert abs(power - exact) / exact < 1e-3


def test_spectra_are_cached_per_size():
    dictionary = random_dictionary()
    assert dictionary.spectra((16, 16)) is dictionary.spectra((16, 16))
    assert dictionary.spectra((16, 20)).shape == (8, 16, 20)


def test_dct_dictionary_is_valid():
    dictionary = dct_dictionary(5)
    assert dictionary.num_filters == 24 and dictionary.kernel_size == 5
    assert torch.allclose(dictionary.filters.sum(dim=(1, 2)), torch.zeros(24), atol=1e-5)  # no DC atom


def test_save_load_roundtrip_and_checksum(tmp_path):
    dictionary = random_dictionary(4, 5)
    path = tmp_path / "d.pt"
    digest = dictionary.save(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = Dictionary.load(path, sha256=digest)
    assert torch.equal(loaded.filters, dictionary.filters) and loaded.name == dictionary.name
    with pytest.raises(DictionaryError, match="checksum"):
        Dictionary.load(path, sha256="0" * 64)


@pytest.mark.parametrize("filters, message", [
    (torch.randn(4, 5, 6), "shape"),
    (torch.full((4, 5, 5), float("nan")), "NaN"),
    (torch.ones(4, 5, 5), "unit"),
    (torch.zeros(4, 5, 5, dtype=torch.complex64), "real"),
])
def test_bad_filters_are_refused(filters, message):
    with pytest.raises(DictionaryError, match=message):
        Dictionary(filters)


def test_bad_files_are_refused(tmp_path):
    path = tmp_path / "d.pt"
    random_dictionary().save(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DictionaryError, match="not a readable dictionary"):
        Dictionary.load(truncated)
    with pytest.raises(DictionaryError, match="cannot read"):
        Dictionary.load(tmp_path / "missing.pt")
    nofilters = tmp_path / "nofilters.pt"
    torch.save({"weights": torch.ones(3)}, nofilters)
    with pytest.raises(DictionaryError, match="no 'filters'"):
        Dictionary.load(nofilters)
