"""Shared fixtures: ISMRMRD files from Debian's ``ismrmrd_generate_cartesian_shepp_logan`` and a fast warm server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

SHEPP_LOGAN = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
FAST_REGISTRY = {
    "default": "cdl-lambda",
    "chains": {
        "cdl-lambda": {"parameters": {"iterations": 12}},
        # enough FISTA iterations for the quality assertions (the shipped dictionary's step is 1/L)
        "cdl-lambda-research": {"parameters": {"iterations": 32, "send_zero_filled": True,
                                               "send_lambda_maps": True}},
    },
    "rules": [{"when": {"config": "cdl_lambda_research*"}, "chain": "cdl-lambda-research"}],
}


def make_shepp_logan(path: Path, matrix=64, coils=4, oversampling=2, repetitions=1, acceleration=1,
                     calibration=0, noise=0.05, noise_scan=True) -> Path:
    """Run the Debian tool; see ``ismrmrd_generate_cartesian_shepp_logan -h``. Repetitions written = r × a."""
    if SHEPP_LOGAN is None:
        pytest.skip("ismrmrd_generate_cartesian_shepp_logan (Debian ismrmrd-tools) is not installed")
    args = [SHEPP_LOGAN, "-m", str(matrix), "-c", str(coils), "-O", str(oversampling), "-r", str(repetitions),
            "-a", str(acceleration), "-w", str(calibration), "-n", str(noise), "-o", str(path)]
    if noise_scan:
        args.append("-C")
    subprocess.run(args, check=True, capture_output=True, cwd=path.parent)
    return path


def ground_truth(path: Path) -> np.ndarray:
    """|phantom| × coil-sensitivity norm: what a normalised-maps coil combination should return, (ny, nx)."""
    with h5py.File(path, "r") as f:
        def c(a):
            return a["real"] + 1j * a["imag"]
        phantom = np.abs(c(f["dataset/phantom"][0]))
        csm = c(f["dataset/csm"][0])
    return phantom * np.sqrt((np.abs(csm) ** 2).sum(0))


def relative_error(image: np.ndarray, reference: np.ndarray) -> float:
    """‖s·x − ref‖ / ‖ref‖ with the best real scale s."""
    x = np.abs(image)
    scale = (x * reference).sum() / max((x * x).sum(), 1e-30)
    return float(np.linalg.norm(scale * x - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="session")
def accelerated_file(tmp_path_factory) -> Path:
    """64², 4 coils, 2× oversampling, R=2 with 16 calibration lines, 4 repetitions (-r 2 -a 2), noise scan."""
    folder = tmp_path_factory.mktemp("sl_accel")
    return make_shepp_logan(folder / "accel.h5", matrix=64, coils=4, repetitions=2, acceleration=2, calibration=16)


@pytest.fixture(scope="session")
def simple_file(tmp_path_factory) -> Path:
    """64², 2 coils, 2× oversampling, fully sampled, one repetition, noise scan."""
    folder = tmp_path_factory.mktemp("sl_simple")
    return make_shepp_logan(folder / "simple.h5", matrix=64, coils=2)


@pytest.fixture(scope="session")
def registry():
    from gadgets.chains import ChainRegistry
    return ChainRegistry(data=FAST_REGISTRY)


@pytest.fixture(scope="session")
def cache():
    from gadgets.handler import ReconstructorCache
    return ReconstructorCache()


@pytest.fixture()
def server(cache, registry):
    from gadgets.server import Server
    srv = Server("127.0.0.1", 0, cache=cache, registry=registry)
    thread = srv.start()
    yield srv
    srv.stop()
    thread.join(timeout=30)


def read_file(path: Path):
    """(header bytes, list of acquisitions) of an ISMRMRD file."""
    from gadgets.replay import read_recording
    header, _, acquisitions = read_recording(path)
    return header, list(acquisitions)


SCAN_CONFIG = '<?xml version="1.0"?>\n<configuration>\n\t<property name="iterations" value="6" />\n</configuration>\n'


def run_scan(peer, header: bytes, acquisitions, config=None, name=None, nul=False, extra=()):
    """Play Gadgetron's side of one scan on ``peer`` (config text or name, header, acquisitions, close) and return
    the replies as (message id, item) pairs."""
    if name is not None:
        peer.send_config_name(name)
    else:
        peer.send_config_text(config or SCAN_CONFIG, nul_terminated=nul)
    peer.send_header(header, nul_terminated=nul)
    for raw in extra:
        peer.send_raw(raw)
    for acq in acquisitions:
        peer.send(acq)
    peer.send_close()
    replies = list(peer.replies())
    peer.close()
    return replies
