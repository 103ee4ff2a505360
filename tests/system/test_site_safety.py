"""What a site meets in its first week: a scan cut off mid-acquisition never comes back as a normal image."""

from __future__ import annotations

import ismrmrd
import pytest

from cdl_lambda.gadgets import cli
from support import make_shepp_logan, read_file, write_registry


@pytest.fixture(scope="module")
def cut_off_file(tmp_path_factory):
    """A 2-repetition Shepp-Logan scan (64², 4 coils, R = 2, 32 calibration lines, noise scan) whose acquisitions
    stop in repetition 1 before its k-space centre line: the issue's cut-off file, smaller."""
    folder = tmp_path_factory.mktemp("cut")
    full = make_shepp_logan(folder / "full.h5", matrix=64, coils=4, repetitions=1, acceleration=2, calibration=32)
    header, acquisitions = read_file(full)
    assert {a.idx.repetition for a in acquisitions} == {0, 1}
    stop = next(i for i, a in enumerate(acquisitions) if a.idx.repetition == 1 and a.idx.kspace_encode_step_1 >= 31)
    path = folder / "aborted.h5"
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dataset:
        dataset.write_xml_header(header)
        for acq in acquisitions[:stop]:
            dataset.append_acquisition(acq)
    return path


def _images(path):
    with ismrmrd.Dataset(str(path), "dataset", mode="r") as dataset:
        return {name: [dataset.read_image(name, i) for i in range(dataset.number_of_images(name))]
                for name in dataset.list() if name.startswith("image_")}


def test_a_cut_off_scan_is_withheld_and_the_replay_fails_naming_it(cut_off_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CDL_LAMBDA_CHAINS", str(write_registry(tmp_path / "chains")))  # shipped defaults, fail
    out = tmp_path / "o.h5"
    code = cli.main(["replay", str(cut_off_file), "--out", str(out), "--param", "iterations=8", "--no-progress"])
    assert code == 1
    assert "repetition 1" in caplog.text and "not sent (slice_errors=fail)" in caplog.text
    assert "misses its k-space centre" in caplog.text and "ended before its last line" in caplog.text
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "incomplete" in r.getMessage()]
    assert warnings
    images = _images(out)
    assert list(images) == ["image_1"] and len(images["image_1"]) == 1
    good = images["image_1"][0]
    assert good.repetition == 0 and good.meta["CDL_Status"] == "ok" and "CDL_StatusReason" not in good.meta


def test_with_slice_errors_report_the_cut_off_image_goes_to_its_own_series(cut_off_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CDL_LAMBDA_CHAINS", str(write_registry(tmp_path / "chains")))
    out = tmp_path / "o.h5"
    code = cli.main(["replay", str(cut_off_file), "--out", str(out), "--param", "iterations=8",
                     "--param", "slice_errors=report", "--param", "send_zero_filled=true", "--no-progress"])
    assert code == 0
    images = _images(out)
    assert sorted(images) == ["image_1", "image_2", "image_4"]
    (good,), (bad,) = images["image_1"], images["image_4"]
    assert good.repetition == 0 and good.meta["CDL_Status"] == "ok"
    assert bad.repetition == 1 and bad.meta["CDL_Status"] == "incomplete"
    assert bad.meta["GADGETRON_ImageComment"].startswith("CDL-Lambda INCOMPLETE")
    assert "misses its k-space centre" in bad.meta["CDL_StatusReason"] in bad.meta["ImageComments"]
    zero_filled = images["image_2"]
    assert [z.meta["CDL_Status"] for z in zero_filled] == ["ok", "incomplete"]
    for z in zero_filled:
        assert "CDL_ResidualToNoise" not in z.meta and "no CDL-Lambda" in z.meta["ImageComments"]
