"""OpenRecon / FIRE: python-ismrmrd-server's own ``client.py`` against the product server started exactly as the
OpenRecon image starts it (the Dockerfile's CMD, only the port changed), with the parameters in the ISMRMRD header's
userParameters as the scanner sends them, on a multi-coil scan and on a bad one; the image label against Siemens'
schema; the packaging script with and without a Docker engine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from support import relative_error

ROOT = Path(__file__).resolve().parents[2]
OPENRECON = ROOT / "docker" / "openrecon"
# shared/ beside the clone (CI), or one level up (a worktree under a folder beside shared/)
SERVER_TARBALL = next((p for p in (ROOT.parent / "shared" / "peers" / "python-ismrmrd-server-df45f51.tar.gz",
                                   ROOT.parents[1] / "shared" / "peers" / "python-ismrmrd-server-df45f51.tar.gz")
                       if p.exists()), ROOT.parent / "shared" / "peers" / "python-ismrmrd-server-df45f51.tar.gz")
ITERATIONS = 16  # the header's cap, half the default; at 8 the background weight's smaller FISTA step leaves
                 # the 64² phantom at zero-filled level (relative error 0.34 either way; 0.24 at 16)


def image_command() -> list[str]:
    """The Dockerfile's CMD (exec form)."""
    line = next(line for line in (OPENRECON / "Dockerfile").read_text().splitlines() if line.startswith("CMD "))
    return json.loads(line[4:])


# -------------------------------------------------------------------------------------------------- the image
def test_dockerfiles_start_the_server_on_9002_as_root_within_cuda_11_8():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (OPENRECON / name).read_text()
        cmd = json.loads(next(line for line in text.splitlines() if line.startswith("CMD "))[4:])
        assert cmd == image_command() and cmd[:3] == ["cdl-lambda", "serve", "--openrecon"]
        assert cmd[cmd.index("--port") + 1] == "9002" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
        assert "EXPOSE 9002" in text and not any(line.startswith("USER ") for line in text.splitlines())
        assert 'LABEL "com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0"="${OPENRECON_LABEL}"' \
            in text
        for line in text.splitlines():  # every file copied from the build context exists
            if line.startswith("COPY") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), source
    cuda = (OPENRECON / "Dockerfile.cuda").read_text()
    version = cuda.split("nvidia/cuda:", 1)[1].split("-", 1)[0]
    assert tuple(int(v) for v in version.split(".")[:2]) <= (11, 8)
    assert "whl/cu118" in cuda and "torch==" in cuda
    assert "torch==2.13.0" in (OPENRECON / "Dockerfile").read_text()


def test_label_validates_against_the_openrecon_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from cdl_lambda.gadgets.chains import ChainRegistry
    from cdl_lambda.gadgets.openrecon_label import LABEL_KEY, build_label, encode_label, package_version
    schema = json.loads((OPENRECON / "OpenReconSchema_1.1.0.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for gpu in (False, True):
        label = build_label(gpu=gpu)
        assert not list(validator.iter_errors(label)), list(validator.iter_errors(label))
        assert label["reconstruction"]["can_use_gpu"] is gpu and label["reconstruction"]["port"] == 9002
    assert label["general"]["version"] == package_version()
    ids = {p["id"]: p for p in label["parameters"]}
    assert {"config", "dictionary", "network", "iterations", "sliceerrors"} <= set(ids) and len(ids) <= 14
    assert {v["id"] for v in ids["config"]["values"]} == set(ChainRegistry().chains)
    assert json.loads(__import__("base64").b64decode(encode_label(label))) == label
    assert LABEL_KEY in (OPENRECON / "Dockerfile").read_text()
    # the schema does catch a bad label: an id with an underscore, too many parameters
    bad = dict(label, parameters=label["parameters"] + [dict(ids["iterations"], id="slice_errors")])
    assert list(validator.iter_errors(bad))
    assert list(validator.iter_errors(dict(label, parameters=label["parameters"] * 2)))


def test_label_values_map_to_gadget_properties():
    from cdl_lambda.gadgets.openrecon_label import settings_from_values
    from cdl_lambda.gadgets.settings import Parameters
    chain, properties = settings_from_values({"config": "cdl-lambda-fast", "iterations": "0", "dictionary": "chain",
                                              "sliceerrors": "report", "zerofilled": "true", "BitsStored": "12"})
    assert chain == "cdl-lambda-fast" and properties == {"slice_errors": "report", "send_zero_filled": "true"}
    params = Parameters.from_sources({"iterations": 24}, properties)
    assert params.iterations == 24 and params.slice_errors == "report" and params.send_zero_filled
    # the gadget property names work as well (python-ismrmrd-server JSON written by hand)
    assert settings_from_values({"slice_errors": "fail", "iterations": "12"}) == (
        None, {"slice_errors": "fail", "iterations": "12"})
    # the dictionary's scale from the scanner's UI reaches the gadget as a number
    _, properties = settings_from_values({"dictionaryscale": "1", "dictionary": "chain"})
    assert properties == {"dictionary_scale": "1"} and Parameters.from_sources(properties).dictionary_scale == 1.0


def test_packaging_states_the_docker_steps_it_cannot_run(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(OPENRECON / "package.py"), "--out", str(out), "--docker",
                           str(tmp_path / "no-docker")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "cannot run steps 3-5 (docker build, docker save, zip)" in done.stderr
    assert json.loads((out / "OpenReconLabel.json").read_text())["general"]["id"] == "cdllambda"
    assert (out / "OpenRecon_CDLLambda_CDL-Lambda_V0.1.0.pdf").read_bytes().startswith(b"%PDF")


def test_packaging_with_a_docker_engine_writes_the_zip(tmp_path):
    """A stand-in ``docker`` (engine 24.0.7) records its calls and writes the saved tar: the zip holds tar + PDF,
    the build gets the label, and an engine of version 25 or newer is refused."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "docker"
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
open({str(log)!r}, "a").write(json.dumps(args) + "\\n")
if args[0] == "version":
    print(open({str(tmp_path / 'version')!r}).read().strip())
elif args[0] == "save":
    open(args[args.index("-o") + 1], "wb").write(b"image tar")
""")
    fake.chmod(0o755)
    (tmp_path / "version").write_text("24.0.7")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(OPENRECON / "package.py"), "--out", str(out), "--docker", str(fake)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    base = "OpenRecon_CDLLambda_CDL-Lambda_V0.1.0"
    with zipfile.ZipFile(out / f"{base}.zip") as bundle:
        assert sorted(bundle.namelist()) == [f"{base}.pdf", f"{base}.tar"]
        assert bundle.read(f"{base}.tar") == b"image tar"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    build = next(c for c in calls if c[0] == "build")
    from cdl_lambda.gadgets.openrecon_label import encode_label
    label_arg = build[build.index("--build-arg") + 1]
    assert label_arg.startswith("OPENRECON_LABEL=") and json.loads(
        __import__("base64").b64decode(label_arg.split("=", 1)[1]))["general"]["id"] == "cdllambda"
    assert build[build.index("-t") + 1] == "openrecon_cdllambda_cdl-lambda:v0.1.0"
    assert encode_label  # the same encoder the image label uses
    (tmp_path / "version").write_text("26.1.0")
    done = subprocess.run([sys.executable, str(OPENRECON / "package.py"), "--out", str(out), "--docker", str(fake)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "below 25" in done.stderr


# ------------------------------------------------------------------------------- python-ismrmrd-server client
@pytest.fixture(scope="module")
def client_py(tmp_path_factory) -> Path:
    if not SERVER_TARBALL.exists():
        pytest.skip(f"python-ismrmrd-server snapshot not found at {SERVER_TARBALL}")
    folder = tmp_path_factory.mktemp("pis")
    with tarfile.open(SERVER_TARBALL) as tar:
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.10.12: refuse links and paths leaving the folder
            tar.extractall(folder, filter="data")
        else:
            tar.extractall(folder)
    return folder / "python-ismrmrd-server" / "client.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """The product server started with the image's CMD (``cdl-lambda`` = this tree's ``gadgets.cli``), port
    9002 swapped for a free one."""
    command = image_command()
    port = _free_port()
    command[command.index("--port") + 1] = str(port)
    argv = [sys.executable, "-m", "cdl_lambda.gadgets.cli"] + command[1:]
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while "serving CDL-" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield port, log
    process.terminate()
    process.wait(timeout=60)


def with_user_parameters(source: Path, target: Path, values: dict, nan_readout: int | None = None) -> Path:
    """A copy of ``source`` whose header carries ``values`` as userParameterString/Long (as OpenRecon sends the
    label's parameters); with ``nan_readout``, that imaging readout's samples are NaN."""
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        header = ismrmrd.xsd.CreateFromDocument(f["dataset/xml"][0])
        user = ismrmrd.xsd.userParametersType()
        for name, value in values.items():
            if isinstance(value, int):
                user.userParameterLong.append(ismrmrd.xsd.userParameterLongType(name=name, value=value))
            else:
                user.userParameterString.append(ismrmrd.xsd.userParameterStringType(name=name, value=value))
        user.userParameterLong.append(ismrmrd.xsd.userParameterLongType(name="BitsStored", value=12))  # not ours
        header.userParameters = user
        f["dataset/xml"][0] = ismrmrd.xsd.ToXML(header).encode()
        if nan_readout is not None:
            record = f["dataset/data"][nan_readout]
            record["data"][:] = np.nan
            f["dataset/data"][nan_readout] = record
    return target


def run_client(client_py: Path, scan: Path, port: int, config: str, folder: Path):
    out = folder / "out.h5"
    done = subprocess.run([sys.executable, str(client_py), str(scan), "-a", "127.0.0.1", "-p", str(port), "-c", config,
                           "-o", str(out), "-G", "scan"], cwd=folder, capture_output=True, text=True, timeout=600)
    images = []
    if out.exists():
        with ismrmrd.Dataset(str(out), "scan", create_if_needed=False) as dataset:
            for group in dataset.list():
                if group.startswith("image_"):
                    images += [dataset.read_image(group, i) for i in range(dataset.number_of_images(group))]
    return done, images


def _marked(image) -> bool:
    meta = ismrmrd.Meta.deserialize(image.attribute_string)
    return "NOT RECONSTRUCTED" in meta.get("ImageComments", "") and bool(meta.get("CDL_NotReconstructed"))


def _first_imaging_readout(path: Path, repetition: int) -> int:
    with h5py.File(path, "r") as f:
        heads = f["dataset/data"]["head"]
    noise = ismrmrd.ACQ_IS_NOISE_MEASUREMENT
    return next(i for i, h in enumerate(heads) if not int(h["flags"]) & (1 << (noise - 1))
                and int(h["idx"]["repetition"]) == repetition and int(h["idx"]["kspace_encode_step_1"]) == 32)


def test_client_reconstructs_a_multicoil_scan_with_header_parameters(client_py, image_server, accelerated_file,
                                                                     tmp_path):
    """4 coils, R = 2, 4 repetitions: 4 CDL-Λ images better than the coil-combined zero-filled ones, which come
    back too (``zerofilled`` set in the header) as their own series; the iteration cap from the header is used."""
    port, log = image_server
    scan = with_user_parameters(accelerated_file, tmp_path / "scan.h5",
                                {"config": "cdl-lambda", "iterations": ITERATIONS, "zerofilled": "true",
                                 "sliceerrors": "report", "dictionary": "chain"})
    done, images = run_client(client_py, scan, port, "invertcontrast", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    series = {}
    for image in images:
        series.setdefault(int(image.image_series_index), []).append(image)
    assert sorted(series) == [1, 2] and len(series[1]) == len(series[2]) == 4, sorted(series)
    with h5py.File(accelerated_file, "r") as f:
        truth = np.abs(f["dataset/phantom"][0]["real"] + 1j * f["dataset/phantom"][0]["imag"])
        csm = f["dataset/csm"][0]
        truth = truth * np.sqrt((np.abs(csm["real"] + 1j * csm["imag"]) ** 2).sum(0))
    for cdl, zero in zip(series[1], series[2]):
        meta = ismrmrd.Meta.deserialize(cdl.attribute_string)
        assert meta["CDL_Iterations"] == str(ITERATIONS) and meta["CDL_Chain"] == "cdl-lambda" and not _marked(cdl)
        # as the scanner's injector takes them: 16-bit integers, 12 bits used (BitsStored in the header: 12)
        assert cdl.data.dtype == np.int16 and cdl.data.max() == 4095 and cdl.data.min() >= 0
        assert float(meta["WindowCenter"]) < 4095 and float(meta["CDL_PixelScale"]) > 0
        assert relative_error(cdl.data[0, 0], truth) < relative_error(zero.data[0, 0], truth)
    assert "ERROR" not in done.stderr


def test_client_gets_a_bad_slice_marked_and_a_warning_then_a_clean_close(client_py, image_server, accelerated_file,
                                                                         tmp_path):
    port, log = image_server
    bad = _first_imaging_readout(accelerated_file, repetition=1)
    scan = with_user_parameters(accelerated_file, tmp_path / "bad.h5",
                                {"config": "cdl-lambda", "iterations": ITERATIONS, "sliceerrors": "report"},
                                nan_readout=bad)
    done, images = run_client(client_py, scan, port, "cdl-lambda", tmp_path)
    assert done.returncode == 0 and "Session complete" in done.stderr, done.stderr[-3000:]
    assert len(images) == 4
    marked = [image for image in images if _marked(image)]
    assert len(marked) == 1 and int(marked[0].repetition) == 1 and not np.abs(marked[0].data).any()
    assert "NaN" in ismrmrd.Meta.deserialize(marked[0].attribute_string)["CDL_NotReconstructed"]
    assert "WARNING  1 image(s) NOT RECONSTRUCTED" in done.stderr  # the logging text, as the client logs it
    assert "Received MRD_MESSAGE_CLOSE" in done.stderr


def test_client_gets_an_error_text_then_a_clean_close(client_py, image_server, accelerated_file, tmp_path):
    """A failure the client must hear about — slice_errors=fail with a bad readout (sent as python-ismrmrd-server
    JSON after the header, overriding the header), and an unknown chain — arrives as an ERROR logging text before a
    normal CLOSE: the client finishes and keeps what came before."""
    port, log = image_server
    bad = _first_imaging_readout(accelerated_file, repetition=1)
    scan = with_user_parameters(accelerated_file, tmp_path / "bad.h5",
                                {"iterations": ITERATIONS, "sliceerrors": "report"}, nan_readout=bad)
    (tmp_path / "cdl-lambda.json").write_text(json.dumps({"version": "1.1.0", "parameters": {"sliceerrors": "fail"}}))
    done, images = run_client(client_py, scan, port, "cdl-lambda", tmp_path)
    assert done.returncode == 0 and "Received MRD_MESSAGE_CLOSE" in done.stderr, done.stderr[-3000:]
    assert "ERROR    1 problem(s); 3 image(s) were sent" in done.stderr and "NaN" in done.stderr
    assert len(images) == 3 and not any(_marked(image) for image in images)

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    scan = with_user_parameters(accelerated_file, unknown / "scan.h5", {"config": "cdl-lamda-typo"})
    done, images = run_client(client_py, scan, port, "cdl-lambda", unknown)
    assert done.returncode == 0 and "Received MRD_MESSAGE_CLOSE" in done.stderr, done.stderr[-3000:]
    assert "ERROR" in done.stderr and "unknown chain 'cdl-lamda-typo'" in done.stderr and not images
    assert "serving CDL-" in log.read_text()
