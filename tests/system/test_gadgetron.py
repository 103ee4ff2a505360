"""Every shipped chain inside the real Gadgetron (4.7.2, stream mode): image count, counters, geometry and error
against the phantom of each image (below the zero-filled root-sum-of-squares of the same data); 2-D repetitions,
multi-slice/multi-contrast and 3-D Cartesian; the warm server behind ``<connect>``; ``gadgetron_ismrmrd_client``
against ``cdl-lambda serve``; and what Gadgetron reports when the Python gadget fails.

The chains run as shipped except for two values a site would also set in its copy: ``iterations`` (16, for CI
time) and the ``<connect>`` port (a free one). The failure tests, which check what Gadgetron reports rather than
images, run the Python node with ``TORCHDYNAMO_DISABLE=1`` (no one-off ``torch.compile`` per process: CI time).
Skips when the build is absent (see ``gadgetron_support``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import gadgetron_support as gs
from support import relative_error

CHAINS = {name: gs.ROOT / "chains" / f"{name}.xml"
          for name in ("cdl_lambda", "cdl_lambda_buffered", "cdl_lambda_connect")}
ITERATIONS = 16
EAGER = {"TORCHDYNAMO_DISABLE": "1"}


@pytest.fixture(scope="module")
def build():
    return gs.gadgetron_home()


@pytest.fixture(scope="module")
def scans(build, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gadgetron_scans")
    return {"repetitions": gs.shepp_logan(folder, matrix=64, coils=4, repetitions=1, acceleration=2),
            "slices_contrasts": gs.synthetic_scan(folder, slices=2, contrasts=2),
            "3d": gs.synthetic_scan(folder, partitions=4)}


@pytest.fixture(scope="module")
def warm_server(build, tmp_path_factory):
    """``cdl-lambda serve`` on a free port, as a site runs it (its own process, the shipped registry)."""
    port = gs.free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "cdl_lambda.gadgets.cli", "serve", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=gs.environment(), cwd=gs.ROOT)
    try:
        gs.wait_for_port(port, process, log)
        yield port, log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(build, scans, warm_server, tmp_path_factory):
    """Every chain on every scan, run once: ``{(chain, scan): Run}``."""
    folder = tmp_path_factory.mktemp("gadgetron_runs")
    port, _ = warm_server
    results = {}
    for chain, path in CHAINS.items():
        text = gs.chain_with(path, {"iterations": ITERATIONS}, port=port if chain == "cdl_lambda_connect" else None)
        for name, scan in scans.items():
            results[(chain, name)] = gs.run_chain(text, scan.stream, folder)
    return results


def _planes(image) -> list:
    """(partition, (ny, nx) pixels) of an image: one plane, or a 3-D volume's."""
    return list(enumerate(image.data[0]))


def _key(image, partition: int, is_3d: bool, volume: bool) -> tuple:
    """(slice, contrast, repetition, partition) of a plane: a 3-D volume's plane, or on the raw path a partition's
    own image (its slice counter = the partition), or a 2-D image."""
    if volume:
        return (0, image.contrast, image.repetition, partition)
    if is_3d:
        return (0, image.contrast, image.repetition, image.slice)
    return (image.slice, image.contrast, image.repetition, 0)


EXPECTED = {  # scan: (images per chain kind, counters of the images)
    "repetitions": {(0, 0, 0), (0, 0, 1)},
    "slices_contrasts": {(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)},
}


@pytest.mark.parametrize("scan_name", ["repetitions", "slices_contrasts", "3d"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain_in_gadgetron(runs, scans, chain, scan_name):
    run, scan = runs[(chain, scan_name)], scans[scan_name]
    assert run.rc == 0 and run.closed, run.log[-3000:]
    images = run.images
    is_3d = scan.matrix[2] > 1
    volume = is_3d and chain == "cdl_lambda_buffered"  # an ImageArray image is the whole 3-D volume
    if is_3d:
        expected = {(0, 0, 0)} if volume else {(z, 0, 0) for z in range(scan.matrix[2])}
    else:
        expected = EXPECTED[scan_name]
    assert sorted((im.slice, im.contrast, im.repetition) for im in images) == sorted(expected)
    assert [im.image_index for im in images] == list(range(1, len(images) + 1))
    for image in images:
        assert image.image_series_index == 1 and image.data.dtype == np.float32
        nz = scan.matrix[2] if volume else 1
        assert tuple(image.matrix_size) == (scan.matrix[0], scan.matrix[1], nz)
        fov_z = scan.fov[2] if (volume or not is_3d) else scan.fov[2] / scan.matrix[2]
        assert np.allclose(image.field_of_view, (scan.fov[0], scan.fov[1], fov_z))
        for got, wanted in zip((image.read_dir, image.phase_dir, image.slice_dir), scan.directions):
            assert np.allclose(got, wanted)
        if is_3d and not volume:  # partitions stacked along slice_dir, the centre partition at the slab centre
            assert np.isclose(image.position[2], (image.slice - scan.matrix[2] // 2) * fov_z)
        for key in ("GADGETRON_WindowCenter", "GADGETRON_WindowWidth", "WindowCenter", "GADGETRON_SeqDescription",
                    "ImageRowDir", "CDL_Readouts", "CDL_Dictionary"):
            assert key in image.meta, key
        assert image.meta["CDL_Chain"] == "cdl-lambda" and image.meta["CDL_Iterations"] == str(ITERATIONS)
        for partition, pixels in _planes(image):
            key = _key(image, partition, is_3d, volume)
            error = relative_error(pixels, scan.truth[key])
            rss_error = relative_error(scan.rss[key], scan.truth[key])
            assert error < rss_error, (chain, key, error, rss_error)


def best_scale(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (b * b).sum())


# ‖raw − buffered / 1.26‖ / ‖raw‖ per image: measured 1.6–1.8e-7 on the three scans (float32 arithmetic of Gadgetron's
# and the gadget's prewhitening and oversampling removal, carried through the solve); 1e-4 leaves room for other
# CPUs and builds and still fails by two orders of magnitude if σ were estimated again (2 % before, docs/gadgetron.md)
BUFFERED_AGREEMENT = 1e-4


@pytest.mark.parametrize("scan_name", ["repetitions", "slices_contrasts", "3d"])
def test_buffered_and_raw_chains_agree(runs, scan_name):
    """Gadgetron's C++ prewhitening and oversampling removal (buffered) against the gadget's own (raw): the same
    images, with the same meta, up to one intensity scale. NoiseAdjustGadget scales its prewhitening by
    √(2 · 0.793) for the receiver's noise bandwidth (the header gives none: Gadgetron's default), so its noise has
    σ = 1.26 per sample where the gadget's own prewhitening leaves σ = 1; the buffered path takes that σ from the
    chain (``gadgets.slices.noise_adjusted``), so both reconstruct the same data in noise units and the buffered
    images are the raw ones × 1.26, to float32 differences between Gadgetron's and the gadget's arithmetic."""
    raw = {(im.slice, im.contrast, im.repetition): im for im in runs[("cdl_lambda", scan_name)].images}
    buffered = runs[("cdl_lambda_buffered", scan_name)].images
    if scan_name == "3d":
        (volume,) = buffered
        pairs = [(raw[(z, 0, 0)].data[0, 0], volume.data[0, z], raw[(z, 0, 0)], volume) for z in range(len(raw))]
    else:
        pairs = [(raw[(im.slice, im.contrast, im.repetition)].data[0, 0], im.data[0, 0],
                  raw[(im.slice, im.contrast, im.repetition)], im) for im in buffered]
    scale = 1 / np.sqrt(2 * 0.793)
    assert np.isclose(best_scale(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])), scale, rtol=1e-3)
    differences = [np.linalg.norm(a - scale * b) / np.linalg.norm(a) for a, b, _, _ in pairs]
    print(f"{scan_name}: buffered vs raw, relative difference per image: "
          + ", ".join(f"{d:.2e}" for d in differences))  # the figures in docs/gadgetron.md (pytest -s)
    assert max(differences) < BUFFERED_AGREEMENT, differences
    for a, b, raw_image, buffered_image in pairs:
        assert set(raw_image.meta.keys()) == set(buffered_image.meta.keys())
        for key in ("GADGETRON_SeqDescription", "GADGETRON_ImageComment", "DataRole", "CDL_Readouts", "ImageRowDir"):
            assert raw_image.meta[key] == buffered_image.meta[key], key
        assert raw_image.meta["CDL_NoiseStd"] == "1" and np.isclose(float(buffered_image.meta["CDL_NoiseStd"]),
                                                                     np.sqrt(2 * 0.793), rtol=1e-5)
        assert buffered_image.meta["CDL_NoiseSource"] == "prewhitened by Gadgetron's NoiseAdjustGadget"
        if scan_name != "3d":
            assert np.isclose(float(raw_image.meta["WindowWidth"]), scale * float(buffered_image.meta["WindowWidth"]),
                              rtol=0.02)
            assert np.allclose(raw_image.position, buffered_image.position)


def test_warm_server_keeps_its_reconstructor_between_scans(runs, warm_server):
    _, log = warm_server
    text = log.read_text()
    loads = [line for line in text.splitlines()
             if "loaded reconstructor" in line and f"'iterations': {ITERATIONS}" in line]
    assert len(loads) == 1, text[-3000:]  # three scans through <connect>, one load
    assert text.count("scan done") >= len([k for k in runs if k[0] == "cdl_lambda_connect"])


def test_ismrmrd_client_against_cdl_lambda_serve(build, scans, warm_server, tmp_path):
    """The Gadgetron client as a scanner would use it, asking the warm server for a chain by name."""
    port, _ = warm_server
    scan = scans["repetitions"]
    out = tmp_path / "client.h5"
    done = subprocess.run([gs.tool("gadgetron_ismrmrd_client"), "-f", str(scan.h5), "-c", "cdl-lambda-fast", "-a",
                           "127.0.0.1", "-p", str(port), "-o", str(out), "-G", "scan"], capture_output=True, text=True,
                          timeout=300, env=gs.environment())
    assert done.returncode == 0, done.stdout + done.stderr
    with h5py.File(out, "r") as f:
        data = f["scan/image_1/data"][:]
        headers = f["scan/image_1/header"][:]
    assert data.shape == (2, 1, 1, 64, 64)
    assert sorted(int(h["repetition"]) for h in headers) == [0, 1]
    for pixels, head in zip(data, headers):
        key = (0, 0, int(head["repetition"]), 0)
        assert relative_error(pixels[0, 0], scan.truth[key]) < relative_error(scan.rss[key], scan.truth[key])


# ------------------------------------------------------------------------------------------------------ failures
@pytest.fixture(scope="module")
def nan_scan(build, tmp_path_factory):
    """Two slices × two contrasts with NaN samples in one readout of slice 1, contrast 0."""
    return gs.synthetic_scan(tmp_path_factory.mktemp("nan_scan"), slices=2, contrasts=2, nan_image=(1, 0))


def _marked(image) -> bool:
    return "NOT RECONSTRUCTED" in image.meta["GADGETRON_ImageComment"]


@pytest.mark.parametrize("chain", ["cdl_lambda", "cdl_lambda_buffered"])
def test_bad_slice_is_reported_in_its_image_and_the_others_kept(build, nan_scan, chain, tmp_path):
    """The shipped chains (``slice_errors=report``): Gadgetron ends normally with every image; the bad slice's is
    a zero image whose comment says why, and Gadgetron's log has the error."""
    run = gs.run_chain(gs.chain_with(CHAINS[chain], {"iterations": ITERATIONS}), nan_scan.stream, tmp_path, **EAGER)
    assert run.rc == 0 and run.closed, run.log[-3000:]
    images = {(im.slice, im.contrast): im for im in run.images}
    assert sorted(images) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    bad = images[(1, 0)]
    assert _marked(bad) and "NaN" in bad.meta["GADGETRON_ImageComment"] and "NaN" in bad.meta["ImageComments"]
    assert not np.abs(bad.data).any()
    for key, image in images.items():
        if key != (1, 0):
            assert not _marked(image)
            truth = nan_scan.truth[(*key, 0, 0)]
            assert relative_error(image.data[0, 0], truth) < relative_error(nan_scan.rss[(*key, 0, 0)], truth)
    assert "NaN" in run.log and "NOT RECONSTRUCTED" in run.log


def test_bad_slice_with_slice_errors_fail_aborts_gadgetron(build, nan_scan, tmp_path):
    """``slice_errors=fail``: the ERROR reaches Gadgetron, which aborts; its output is cut off (no CLOSE)."""
    chain = gs.chain_with(CHAINS["cdl_lambda"], {"iterations": ITERATIONS, "slice_errors": "fail"})
    run = gs.run_chain(chain, nan_scan.stream, tmp_path, **EAGER)
    assert run.rc != 0 and not run.closed
    assert "Errors received" in run.log and "NaN" in run.log and "slice 1" in run.log
    assert not any(_marked(im) for im in run.images)


def test_missing_weights_reach_gadgetron_as_an_error(build, scans, tmp_path):
    """The manifest names a network file that is not there: an ERROR, Gadgetron aborts, no image."""
    weights = tmp_path / "weights"
    shutil.copytree(gs.ROOT / "weights", weights)
    for network in (weights / "networks").glob("*.pt"):
        network.unlink()
    run = gs.run_chain(gs.chain_with(CHAINS["cdl_lambda"], {"iterations": ITERATIONS}), scans["repetitions"].stream,
                       tmp_path, CDL_LAMBDA_WEIGHTS=weights, **EAGER)
    assert run.rc != 0 and not run.closed and run.images == []
    assert "Errors received" in run.log and "CDL-Lambda gadget failed" in run.log and "is missing" in run.log
