"""cdl-lambda dictionary import/list: a dictionary in SPORCO's layout and convention becomes a site dictionary the
gadget can use by name, without touching the shipped manifest."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.io
import torch

from cdl_lambda.gadgets import cli
from cdl_lambda.gadgets.site_dictionary import convert, to_filters
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.weights import WeightsRegistry, default_weights_dir


def _sporco_dictionary(K=12, kf=7, seed=0):
    """Filters as SPORCO's online CDL leaves them: (k_f, k_f, K), not unit norm, top-left anchored."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((kf, kf, K)) * rng.uniform(0.2, 3.0, K)


def _top_left_synthesis(filters_kkK, codes):
    """SPORCO's true convolution: each filter zero-padded at the top-left corner, Σ_k d_k ∗ s_k by FFT."""
    K = filters_kkK.shape[-1]
    padded = np.zeros((K, *codes.shape[-2:]))
    kf = filters_kkK.shape[0]
    padded[:, :kf, :kf] = filters_kkK.transpose(2, 0, 1)
    return np.real(np.fft.ifft2((np.fft.fft2(padded) * np.fft.fft2(codes)).sum(0)))


def test_top_left_and_correlation_conventions_become_the_products_convolution():
    d = _sporco_dictionary()
    filters = to_filters(d)                                   # (K, k_f, k_f), (k_f, k_f, K) recognised
    assert filters.shape == (12, 7, 7)
    product = Dictionary(torch.from_numpy(convert(filters, "top-left")))
    codes = np.random.default_rng(1).standard_normal((12, 32, 32))
    norms = np.sqrt((d ** 2).sum(axis=(0, 1)))
    theirs = _top_left_synthesis(d / norms, codes)
    c = 7 // 2                                                # the same synthesis, codes shifted by c pixels
    ours = product.synthesize(torch.from_numpy(np.roll(codes, (c, c), axis=(-2, -1))).to(torch.complex128))
    assert np.allclose(ours.real.numpy(), theirs, atol=1e-5 * np.abs(theirs).max())
    flipped = convert(filters[:, ::-1, ::-1], "correlation")  # a cross-correlation's filters, flipped back
    assert np.allclose(flipped, convert(filters, "centred"))
    assert np.allclose(np.sqrt((flipped ** 2).sum(axis=(1, 2))), 1)


def test_import_list_and_use_a_site_dictionary(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    monkeypatch.setenv("CDL_LAMBDA_SITE_WEIGHTS", str(site))
    shipped_manifest = (default_weights_dir() / "manifest.yaml").read_bytes()
    npy, mat = tmp_path / "k12.npy", tmp_path / "k24.mat"
    np.save(npy, _sporco_dictionary(12, 13))
    scipy.io.savemat(mat, {"D": _sporco_dictionary(24, 9, seed=2)})
    assert cli.main(["dictionary", "import", str(npy), "--name", "site-k12", "--convention", "top-left"]) == 0
    assert cli.main(["dictionary", "import", str(mat), "--name", "site-k24", "--convention", "top-left"]) == 0
    assert (default_weights_dir() / "manifest.yaml").read_bytes() == shipped_manifest
    registry = WeightsRegistry()
    assert registry.site_dictionaries == ["site-k12", "site-k24"]
    entry = registry.dictionaries["site-k12"]
    assert entry["sha256"] == hashlib.sha256((site / entry["file"]).read_bytes()).hexdigest()
    loaded = registry.dictionary("site-k12")
    assert tuple(loaded.filters.shape) == (12, 13, 13)
    expected = convert(to_filters(np.load(npy)), "top-left")
    assert np.allclose(loaded.filters.numpy(), expected, atol=1e-6)
    capsys.readouterr()
    assert cli.main(["dictionary", "list"]) == 0
    listing = capsys.readouterr().err
    assert "site-k12\tsite\tK=12\tk_f=13" in listing and "\tshipped\t" in listing and "(default)" in listing
    # a shipped name cannot be taken, nor a site name twice without --force
    shipped_name = next(n for n, e in registry.dictionaries.items() if e.get("origin") != "site")
    assert cli.main(["dictionary", "import", str(npy), "--name", shipped_name]) == 2
    assert cli.main(["dictionary", "import", str(npy), "--name", "site-k12", "--convention", "top-left"]) == 2
    # a tampered site file is refused like a shipped one
    data = bytearray((site / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (site / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the manifest's sha256"):
        WeightsRegistry().dictionary("site-k12")


def test_the_gadget_reconstructs_with_a_site_dictionary(tmp_path, monkeypatch):
    import ismrmrd
    site = tmp_path / "site"
    monkeypatch.setenv("CDL_LAMBDA_SITE_WEIGHTS", str(site))
    np.save(tmp_path / "d.npy", _sporco_dictionary(12, 7))
    assert cli.main(["dictionary", "import", str(tmp_path / "d.npy"), "--name", "site-k12",
                     "--convention", "top-left"]) == 0
    out = tmp_path / "o.h5"
    assert cli.main(["replay", "--out", str(out), "--no-progress", "--no-previews", "--param", "iterations=3",
                     "--param", "dictionary=site-k12"]) == 0
    with ismrmrd.Dataset(str(out), "dataset", mode="r") as dataset:
        meta = dataset.read_image("image_1", 0).meta
    assert meta["CDL_Dictionary"] == "site-k12"
    assert meta["CDL_DictionarySHA256"] == WeightsRegistry().dictionaries["site-k12"]["sha256"]
