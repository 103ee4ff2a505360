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


def test_resampled_filters_keep_their_extent_on_a_finer_grid():
    """A smooth filter sampled at pixel spacing h on 9 taps, resampled to a grid twice as fine, is the same function
    sampled at h/2 on 17 taps (unit norm): bicubic interpolation of a profile sampled at 1.6 taps per standard
    deviation is accurate to a few per cent of its peak (2 % here, measured). Its old taps stay where they were;
    the name is kept, the scale recorded."""
    def gaussian_derivative(taps: int, spacing: float) -> torch.Tensor:
        t = (torch.arange(taps, dtype=torch.float64) - taps // 2) * spacing
        profile = t * torch.exp(-t ** 2 / (2 * 1.6 ** 2))
        filt = profile[:, None] * torch.exp(-t ** 2 / (2 * 2.0 ** 2))[None, :]
        return filt / filt.norm()

    dictionary = Dictionary(torch.stack([gaussian_derivative(9, 1.0), gaussian_derivative(9, 1.0).T]).float(),
                            name="smooth")
    fine = dictionary.resampled(2)
    assert fine.kernel_size == 17 and fine.scale == 2 and fine.name == "smooth"
    expected = gaussian_derivative(17, 0.5)
    assert (fine.filters[0].double() - expected).abs().max() < 0.03 * expected.abs().max()
    assert torch.allclose(fine.filters.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)
    ratio = fine.filters[:, ::2, ::2] / dictionary.filters  # old taps in place, up to the common norm
    assert torch.allclose(ratio[dictionary.filters.abs() > 1e-3], ratio[0, 2, 4], rtol=1e-4)
    assert dictionary.resampled(1) is dictionary and dictionary.resampled(2) is fine  # cached
    assert dictionary.resampled(1.5).kernel_size == 13 and dictionary.resampled(1.5).scale == 1.5
    with pytest.raises(DictionaryError, match="scale"):
        dictionary.resampled(0)
