"""lab.images (packaged MR images, readers, splits) and lab.datasets (on-the-fly training examples)."""

from __future__ import annotations

import gzip
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cdl_lambda.lab import datasets as data
from cdl_lambda.lab import images
from cdl_lambda.recon import fft

FIXTURE = Path(__file__).parent.parent / "fixtures" / "colin27_axial_128.npz"


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    return np.load(FIXTURE)["images"].astype(np.float32)


# ---------------------------------------------------------------------------------------------------- readers

def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, slope: float = 1.0) -> None:
    """A minimal NIfTI-1 writer (int16 data, sform), independent of the reader under test."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *volume.shape, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 4, 16)
    struct.pack_into("<8f", header, 76, 1, *np.linalg.norm(affine[:3, :3], axis=0), 1, 1, 1, 1)
    struct.pack_into("<3f", header, 108, 352, slope, 0.0)
    struct.pack_into("<2h", header, 252, 0, 1)
    struct.pack_into("<12f", header, 280, *affine[:3].ravel())
    header[344:348] = b"n+1\0"
    path.write_bytes(gzip.compress(bytes(header) + volume.astype("<i2").tobytes(order="F")))


def test_nifti_reader_and_reorientation(tmp_path):
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 3.0, -5], [0, 1.5, 0, 0], [0, 0, 0, 1]])  # LSA-ish voxel axes
    write_nifti(tmp_path / "v.nii.gz", vol, affine, slope=0.5)
    read, aff = images.read_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(read, 0.5 * vol)
    np.testing.assert_allclose(aff, affine, atol=1e-6)
    ras, spacing = images.to_ras(read, aff)
    assert ras.shape == (4, 6, 5) and spacing == (2.0, 3.0, 1.5)
    # voxel (i, j, k) sits at world (10 − 2i, −5 + 3k, 1.5j): R index = 3 − i, A index = k, S index = j
    np.testing.assert_array_equal(ras[3 - 1, 4, 2], read[1, 2, 4])


def encode_png(image: np.ndarray, filters: list[int]) -> bytes:
    """8-bit grey PNG with the given filter type per row (a small encoder for the decoder's test)."""
    h, w = image.shape
    img = image.astype(np.int32)
    rows = []
    for r in range(h):
        up = img[r - 1] if r else np.zeros(w, np.int32)
        left = np.concatenate([[0], img[r, :-1]])
        up_left = np.concatenate([[0], up[:-1]])
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        pred = {0: 0, 1: left, 2: up, 3: (left + up) // 2, 4: paeth}[filters[r]]
        rows.append(bytes([filters[r]]) + ((img[r] - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_png_reader_undoes_every_filter(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(10, 7))
    (tmp_path / "x.png").write_bytes(encode_png(image, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
    np.testing.assert_array_equal(images.read_png(tmp_path / "x.png"), image)


def test_fit_to_matrix_centres_and_keeps_aspect():
    stack = np.zeros((2, 60, 100), np.float32)
    stack[:, 5:25, 10:30] = 1.0  # a 20×20-pixel square off-centre, pixels 2 mm tall × 1 mm wide
    out = images.fit_to_matrix(stack, (64, 64), spacing=(2.0, 1.0), fill=0.5)
    rows, cols = np.nonzero(out[0] > 0.5)
    assert abs(rows.mean() - 31.5) < 1.0 and abs(cols.mean() - 31.5) < 1.0
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert height == pytest.approx(32, abs=2) and width == pytest.approx(16, abs=2)  # 40 mm × 20 mm


def test_missing_source_names_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "MRICRON", tmp_path)
    assert not images.available("colin27")
    with pytest.raises(images.SourceUnavailable, match="mricron-data"):
        images.load_source("colin27", (32, 32))
    with pytest.raises(images.SourceUnavailable, match="pip install"):
        images._python_package_file("no_such_module_here", "x.npy", "no-such-package")
    assert images.load_split("train", (32, 32), skip_missing=True).keys() <= {"brainweb", "mni152"}


# ---------------------------------------------------------------------------------------------------- splits

def test_splits_share_no_subject_and_no_source():
    for a, b in itertools.combinations(images.SPLITS, 2):
        assert not set(images.SPLITS[a]) & set(images.SPLITS[b]), (a, b)
        assert not images.subjects(a) & images.subjects(b), (a, b)
    assert images.SOURCES["brainweb"].subject == images.SOURCES["colin27"].subject  # same anatomy: same split
    for name, source in images.SOURCES.items():  # every source (a split's or a view of one) belongs to one split
        assert sum(source.subject in images.subjects(split) for split in images.SPLITS) == 1, name


@pytest.mark.parametrize("name", sorted(images.SOURCES))
def test_packaged_source_loads(name):
    if not images.available(name):
        pytest.skip(f"{name}: {images.SOURCES[name].package} is not installed")
    out = images.load_source(name, (40, 48), ("axial",), step=25)
    assert out.dtype == np.float32 and out.shape[1:] == (40, 48) and len(out) >= 1
    positive = out[out > 0]
    assert np.percentile(positive, 99.5) == pytest.approx(1.0, rel=0.05)
    # anatomy is centred: the intensity centroid of the stack lies near the middle of the matrix
    mean = out.mean(axis=0)
    cy = (mean.sum(1) * np.arange(40)).sum() / mean.sum()
    cx = (mean.sum(0) * np.arange(48)).sum() / mean.sum()
    assert abs(cy - 19.5) < 6 and abs(cx - 23.5) < 6


# ---------------------------------------------------------------------------------------------------- dataset

def test_removed_lines_scale_with_the_matrix():
    assert data.removed_lines_range(320) == (40, 119)
    assert data.removed_lines_range(160) == (20, 60)
    assert data.removed_lines_range(64) == (8, 24)


def test_training_examples(slices):
    ds = data.LowFieldDataset(slices, seed=1)
    windows, levels = set(), []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ex = ds[i]
            assert set(ex) == {"target", "kspace", "mask", "noise_level", "sigma", "scale"}
            assert ex["target"].shape == ex["kspace"].shape == ex["mask"].shape == (128, 128)
            assert ex["target"].dtype == ex["kspace"].dtype == torch.complex64
            mask = ex["mask"]
            rows, cols = int(mask.sum(1).max()), int(mask.sum(0).max())
            assert 128 - 2 * 48 <= rows <= 128 - 2 * 16 and 128 - 2 * 48 <= cols <= 128 - 2 * 16
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert ys.min() + ys.max() in (127, 128) and xs.min() + xs.max() in (127, 128)  # centred
            measured = ex["kspace"][mask > 0]
            assert float(measured.std()) == pytest.approx(1.0, rel=1e-4)
            assert float(ex["kspace"][mask == 0].abs().max()) == 0.0
            # kspace = S (F target + e) with E|e|² = σ²
            residual = (ex["kspace"] - mask * fft.fft2c(ex["target"]))[mask > 0]
            assert float(residual.abs().pow(2).mean()) == pytest.approx(float(ex["sigma"]) ** 2, rel=0.15)
            clean = fft.fft2c(ex["target"])[mask > 0]
            relative = float(ex["sigma"]) ** 2 / float((clean - clean.mean()).abs().pow(2).mean())
            assert relative == pytest.approx(float(ex["noise_level"]), rel=1e-4)
            assert 0.15 <= float(ex["noise_level"]) <= 0.30
            windows.add((rows, cols))
            levels.append(float(ex["noise_level"]))
    assert len(windows) > 6 and np.std(levels) > 0.02


def test_examples_are_deterministic_and_change_with_epoch(slices):
    a, b = data.LowFieldDataset(slices, seed=4), data.LowFieldDataset(slices, seed=4)
    for key in ("target", "kspace", "mask"):
        assert torch.equal(a[2][key], b[2][key])
    first = a[2]["kspace"]
    a.set_epoch(1)
    assert not torch.equal(a[2]["kspace"], first)
    assert not torch.equal(data.LowFieldDataset(slices, seed=5)[2]["kspace"], first)
    batch = next(iter(torch.utils.data.DataLoader(b, batch_size=4)))
    assert batch["kspace"].shape == (4, 128, 128) and batch["noise_level"].shape == (4,)


def test_augmentation_keeps_the_anatomy(slices):
    ds = data.LowFieldDataset(slices[:1], seed=0)
    mags = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        ex = ds[0]
        mags.append(ex["target"].abs() * ex["scale"])
    base = torch.from_numpy(slices[0])
    variants = [torch.rot90(f, k, (-2, -1)) for f in (base, base.flip(-1)) for k in range(4)]
    hits = {min(range(8), key=lambda j: float((m - variants[j]).abs().max())) for m in mags}
    for m in mags:
        assert min(float((m - v).abs().max()) for v in variants) < 1e-3
    assert len(hits) >= 4  # several of the eight flips/rotations occur


def test_test_mode_uses_the_papers_window_and_noise(slices):
    for level in (0.2, 0.3):
        ds = data.LowFieldDataset(slices, seed=0, train=False, test_noise=level)
        ex = ds[0]
        assert int(ex["mask"].sum()) == 64 * 64
        assert float(ex["noise_level"]) == pytest.approx(level)
        assert torch.allclose(ex["target"].abs() * ex["scale"], torch.from_numpy(slices[0]), atol=1e-3)
