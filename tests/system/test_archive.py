"""``cdl-lambda replay`` over an archive: a folder (with a subfolder) and a file in one process, the model loaded
once, outputs named after the inputs, a summary line per file, a broken file named and the others kept."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cdl_lambda.gadgets import cli
from cdl_lambda.gadgets import replay as single
from support import make_shepp_logan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERATIONS = "4"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    (folder / "site" / "day2").mkdir(parents=True)
    make_shepp_logan(folder / "site" / "one.h5", matrix=32, coils=2, noise=0.05)
    make_shepp_logan(folder / "site" / "day2" / "two.h5", matrix=32, coils=2, repetitions=2, noise=0.08)
    (folder / "site" / "broken.h5").write_bytes(b"not an HDF5 file")
    make_shepp_logan(folder / "three.h5", matrix=32, coils=2, noise=0.03)
    return folder


def test_archive_replays_every_file_with_one_model_load(archive):
    out = archive / "out"
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "cdl_lambda.gadgets.cli", "replay", str(archive / "site"),
                           str(archive / "three.h5"), "--out", str(out), "--param", f"iterations={ITERATIONS}",
                           "--no-previews", "--no-progress"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and [line.split()[0] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    status = {line.split()[2].rstrip(":"): line.split()[1] for line in lines}
    assert status == {str(archive / "site" / "broken.h5"): "FAILED", str(archive / "site" / "day2" / "two.h5"): "ok",
                      str(archive / "site" / "one.h5"): "ok", str(archive / "three.h5"): "ok"}
    assert done.stderr.strip().splitlines()[-1] == f"1 of 4 file(s) failed: {archive / 'site' / 'broken.h5'}"
    assert done.stderr.count("loaded reconstructor") == 1  # torch and the weights once for the whole archive
    assert not (out / "broken.h5").exists()
    for name, count in (("one.h5", 1), ("day2/two.h5", 2), ("three.h5", 1)):
        with h5py.File(out / name, "r") as f:
            assert f["dataset/image_1/data"].shape[0] == count, name

    # the same pixels as a replay of that file alone
    alone = single.replay(archive / "three.h5", parameters={"iterations": ITERATIONS})
    with h5py.File(out / "three.h5", "r") as f:
        archived = f["dataset/image_1/data"][0, 0, 0]
    reference = np.asarray(alone.images[0].data[0, 0])
    # one process each, same code and data: only float32 summation order in threaded kernels may differ
    assert np.linalg.norm(archived - reference) / np.linalg.norm(reference) < 1e-4


def test_archive_refuses_clashing_outputs_and_a_file_as_out(archive, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "three.h5").write_bytes((archive / "three.h5").read_bytes())
    assert cli.main(["replay", str(archive / "three.h5"), str(tmp_path / "other" / "three.h5"),
                     "--out", str(tmp_path / "out")]) == 2
    assert cli.main(["replay", str(archive / "three.h5"), str(archive / "site" / "one.h5"),
                     "--out", str(tmp_path / "images.h5")]) == 2
    assert cli.main(["replay", str(tmp_path / "missing"), str(archive / "three.h5"), "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "out").exists()
