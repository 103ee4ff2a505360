"""Offline replay of Debian shepp-logan files through the gadget, the CLI, and replay ≡ serve."""

from __future__ import annotations

import ismrmrd
import numpy as np

from support import ground_truth, relative_error, write_registry
from cdl_lambda.gadgets import cli
from cdl_lambda.gadgets.image_output import png_bytes
from cdl_lambda.gadgets.output_files import save
from cdl_lambda.gadgets.replay import replay


def test_replay_accelerated_file_counters_geometry_quality(accelerated_file, server):
    result = replay(accelerated_file, local_server=server, config="cdl_lambda_research.xml")
    assert result.errors == []
    series = result.series()
    assert sorted(series) == [1, 2, 3]  # image, zero-filled, Λ maps
    images = series[1]
    assert [im.repetition for im in images] == [0, 1, 2, 3]  # one image per slice and repetition
    assert [im.image_index for im in images] == [1, 2, 3, 4]
    reference = ground_truth(accelerated_file)
    for image, zero_filled in zip(images, series[2]):
        assert image.slice == 0 and image.image_series_index == 1
        assert image.matrix_size == (64, 64, 1)
        assert np.allclose(image.field_of_view, (300, 300, 6))
        assert image.data.dtype == np.float32 and image.image_type == ismrmrd.IMTYPE_MAGNITUDE
        meta = image.meta
        assert meta["GADGETRON_DataRole"] == "Image" and meta["DataRole"] == "Image"
        assert meta["CDL_Dictionary"] and meta["CDL_DictionarySHA256"] and "WindowWidth" in meta
        assert meta["CDL_DictionaryScale"] == "1"  # a 64² scan: the filters as learned
        assert len(meta["ImageRowDir"]) == 3
        error = relative_error(image.data[0, 0], reference)
        assert error < 0.33, error
        assert error < relative_error(zero_filled.data[0, 0], reference) - 0.03
    assert series[3][0].data.shape[0] > 1  # Λ maps: one channel per filter


def test_cli_replay_writes_groups_and_previews(simple_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CDL_LAMBDA_CHAINS", str(write_registry(tmp_path / "chains")))  # one chain, no rules
    out = tmp_path / "out.h5"
    code = cli.main(["replay", str(simple_file), "--out", str(out), "--param", "iterations=8", "--no-progress"])
    assert code == 0
    with ismrmrd.Dataset(str(out), "dataset", mode="r") as dataset:
        assert list(dataset.list()) == ["image_1"]
        assert dataset.number_of_images("image_1") == 1
        image = dataset.read_image("image_1", 0)
        assert relative_error(image.data[0, 0], ground_truth(simple_file)) < 0.3
    previews = list((tmp_path / "out_previews").glob("*.png"))
    assert len(previews) == 1 and previews[0].read_bytes().startswith(b"\x89PNG")


def test_default_cap_is_the_networks_own_and_named_in_the_meta(simple_file, tmp_path, monkeypatch):
    """With no iteration count anywhere (the shipped defaults: 0), the images say the cap and solver the default
    network's manifest entry names, as numbers."""
    from cdl_lambda.recon.weights import WeightsRegistry

    monkeypatch.setenv("CDL_LAMBDA_CHAINS", str(write_registry(tmp_path / "chains")))  # one chain, no rules
    solver = WeightsRegistry().network("default").solver_settings()
    result = replay(simple_file)
    assert result.errors == [] and len(result.images) == 1
    meta = result.images[0].meta
    assert meta["CDL_Iterations"] == str(solver["iterations"])
    assert meta["CDL_Solver"] == f"{solver['solver']}, cap {solver['iterations']}, tolerance {solver['tolerance']:g}"
    assert "iterations=0" not in meta["CDL_Parameters"]


def test_replay_and_server_give_bit_identical_images(accelerated_file, server):
    local = replay(accelerated_file, config="cdl-lambda", parameters={"iterations": "12"})
    remote = replay(accelerated_file, server=f"127.0.0.1:{server.port}", config="cdl-lambda")
    assert len(local.images) == len(remote.images) == 4
    for a, b in zip(local.images, remote.images):
        assert np.array_equal(a.data, b.data)
        assert bytes(a.getHead()) == bytes(b.getHead())


def test_write_images_and_png(tmp_path, accelerated_file, server):
    result = replay(accelerated_file, local_server=server)
    counts = save(result.images, tmp_path / "o.h5", previews=tmp_path / "previews")
    assert counts == {1: 4} and len(list((tmp_path / "previews").glob("image_1_*.png"))) == 4
    assert png_bytes(np.zeros((3, 5), np.float32)).startswith(b"\x89PNG")


def test_bundled_default_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["replay", "--no-progress", "--param", "iterations=4"])
    assert code == 0
    assert (tmp_path / "out.h5").exists() and list((tmp_path / "out_previews").glob("*.png"))


def test_truncated_file_is_a_clear_error(tmp_path, accelerated_file):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(accelerated_file.read_bytes()[:5000])
    assert cli.main(["replay", str(broken), "--out", str(tmp_path / "x.h5"), "--no-progress"]) == 1
