"""``cdl-lambda replay --dicom DIR`` on a real multi-coil reconstruction: every file passes ``dciodvfy``, the pixels
are the replayed images', and a scan with a bad readout gives an INCOMPLETE, DERIVED series."""

from __future__ import annotations

import shutil
import subprocess

import h5py
import ismrmrd
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")


def _dciodvfy_errors(path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_replay_writes_valid_dicom_series(accelerated_file, tmp_path):
    from cdl_lambda.gadgets.cli import main
    out, dicom = tmp_path / "images.h5", tmp_path / "dicom"
    status = main(["replay", str(accelerated_file), "--out", str(out), "--no-previews", "--no-progress",
                   "--param", "iterations=4", "--param", "send_zero_filled=true", "--dicom", str(dicom)])
    assert status == 0
    assert sorted(p.name for p in dicom.iterdir()) == ["series_001", "series_002"]
    with ismrmrd.Dataset(str(out), "dataset", create_if_needed=False) as dataset:
        images = [dataset.read_image("image_1", i) for i in range(dataset.number_of_images("image_1"))]
    files = sorted((dicom / "series_001").glob("*.dcm"))
    assert len(files) == len(images) == 4
    peak = max(np.abs(im.data).max() for im in images)
    for path, image in zip(files, images):
        ds = pydicom.dcmread(path)
        assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"] and int(ds.AcquisitionNumber) == image.repetition + 1
        # rounding to the nearest integer (0.5), plus the exporter's float32 scaling (4095 · 2⁻²³ ≈ 5e-4 per step)
        assert np.abs(ds.pixel_array.astype(float) - np.abs(image.data[0, 0]) * 4095 / peak).max() <= 0.5 + 1e-3
    zero = pydicom.dcmread(sorted((dicom / "series_002").glob("*.dcm"))[0])
    assert list(zero.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    for path in sorted(dicom.rglob("*.dcm")):
        assert _dciodvfy_errors(path) == [], path


def test_replay_with_a_bad_readout_gives_an_incomplete_derived_series(accelerated_file, tmp_path):
    from cdl_lambda.gadgets.cli import main
    scan = tmp_path / "bad.h5"
    shutil.copy(accelerated_file, scan)
    with h5py.File(scan, "r+") as f:
        heads = f["dataset/data"]["head"]
        noise = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
        index = next(i for i, h in enumerate(heads) if not int(h["flags"]) & noise and int(h["idx"]["repetition"]) == 2
                     and int(h["idx"]["kspace_encode_step_1"]) == 32)
        record = f["dataset/data"][index]
        record["data"][:] = np.nan
        f["dataset/data"][index] = record
    dicom = tmp_path / "dicom"
    status = main(["replay", str(scan), "--out", str(tmp_path / "images.h5"), "--no-previews", "--no-progress",
                   "--param", "iterations=4", "--param", "slice_errors=report", "--dicom", str(dicom)])
    assert status == 0
    series = [pydicom.dcmread(p) for p in sorted((dicom / "series_001").glob("*.dcm"))]
    assert len(series) == 4
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in series)
    assert series[0].SeriesDescription == "CDL-Lambda INCOMPLETE (1 of 4 not reconstructed)"
    marked = [ds for ds in series if "NOT RECONSTRUCTED" in ds.ImageComments]
    assert len(marked) == 1 and int(marked[0].AcquisitionNumber) == 3 and not marked[0].pixel_array.any()
