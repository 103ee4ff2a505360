"""Running chains inside the real Gadgetron (a CPU build of 4.7.2, unpacked by ``.ci/run``) and the scans they are
tested on.

``CDL_GADGETRON_HOME`` names the build's folder (``bin/``, ``lib/``, ``share/``; in the Docker image Gadgetron's
install prefix); default ``build/gadgetron/gadgetron-4.7.2`` in the checkout where ``.ci/run`` unpacks it, else
``/tmp/cdl-gadgetron/gadgetron-4.7.2``. Without it, or without its runtime libraries, the tests skip with the reason.
Gadgetron's ``<external>`` node starts ``python -m gadgetron`` with the first ``python`` on PATH: the interpreter
running the tests goes first and PYTHONPATH points at this checkout.

Scans: the build's own ``ismrmrd_generate_cartesian_shepp_logan`` (2-D, repetitions), and multi-slice/multi-contrast
or 3-D Cartesian scans synthesised here from its phantom and coil maps, each image a different shift and scale of
the phantom so that a mix-up of counters shows in the error. Ground truth per image: object × √Σ|csm|²; the
zero-filled root-sum-of-squares of the same data is the bar every reconstruction must beat.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from support import free_port  # noqa: F401 - re-exported for the Gadgetron tests

ROOT = Path(__file__).resolve().parents[1]
_UNPACKED = ROOT / "build" / "gadgetron" / "gadgetron-4.7.2"
HOME = Path(os.environ.get("CDL_GADGETRON_HOME")
            or (_UNPACKED if _UNPACKED.exists() else Path("/tmp/cdl-gadgetron/gadgetron-4.7.2")))
TARBALL = ROOT.parent / "shared" / "peers" / "gadgetron-4.7.2-cpu.tar.gz"
NS = {"m": "http://www.ismrm.org/ISMRMRD"}
RUNTIME_PACKAGES = ("libboost-filesystem1.81.0 libboost-program-options1.81.0 libpugixml1v5 libcurl4 libfftw3-double3 "
                    "libfftw3-single3 libhdf5-103-1 libopenblas0-pthread liblapacke libgomp1 libgfortran5")


def gadgetron_home() -> Path:
    """The build's folder, or a skip naming what is missing."""
    binary = HOME / "bin" / "gadgetron"
    if not binary.exists():
        where = f"{TARBALL} is there" if TARBALL.exists() else f"{TARBALL} is absent too"
        pytest.skip(f"no Gadgetron build at {HOME}: set CDL_GADGETRON_HOME to a Gadgetron 4.7.2 folder (bin/, share/); "
                    f".ci/run unpacks {TARBALL.name} into build/gadgetron ({where})")
    missing = [line.split()[0] for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
               .stdout.splitlines() if "not found" in line]
    if missing:
        pytest.skip(f"Gadgetron's runtime libraries are missing ({', '.join(missing)}): apt-get install "
                    f"{RUNTIME_PACKAGES}")
    return HOME


def environment(**extra) -> dict:
    """Gadgetron's environment: this interpreter first on PATH, this checkout on PYTHONPATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p and Path(p).resolve() != ROOT])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tool(name: str) -> str:
    return str(gadgetron_home() / "bin" / name)


def to_stream(h5: Path) -> Path:
    """The build's ``ismrmrd_hdf5_to_stream`` (the file must carry this ISMRMRD version's header)."""
    out = h5.with_suffix(".bin")
    subprocess.run([tool("ismrmrd_hdf5_to_stream"), "-i", str(h5), "-o", str(out)], check=True, capture_output=True)
    return out


def chain_with(path: Path, properties: dict | None = None, port: int | None = None) -> str:
    """``path``'s text with ``<property>`` values of the ``<external>`` node replaced (added when absent) and the
    ``<connect>`` port changed: what a site edits in its copy of a chain."""
    root = ET.fromstring(path.read_bytes())
    external = root.find("./stream/external")
    config = external.find("configuration")
    for name, value in (properties or {}).items():
        prop = config.find(f"property[@name='{name}']")
        if prop is None:
            prop = ET.SubElement(config, "property", name=name)
        prop.set("value", str(value))
    if port is not None:
        external.find("connect").set("port", str(port))
    return ET.tostring(root, encoding="unicode")


@dataclass
class Run:
    rc: int
    log: str
    items: list = field(default_factory=list)    # (message id, item): images and ImageArrays
    closed: bool = False                         # the output ended with a CLOSE message

    @property
    def images(self) -> list:
        return [item for mid, item in self.items if mid == 1022]


def read_output(path: Path) -> tuple[list, bool]:
    """The messages of a Gadgetron output stream, up to its end (a stream cut off by an abort has no CLOSE, and its
    last message may be cut off mid-way: that one is left out; a malformed message before the end still fails)."""
    from cdl_lambda.gadgets import wire
    items, closed = [], False
    with open(path, "rb") as f:
        while True:
            head = f.read(2)
            if len(head) < 2:
                break
            mid = int.from_bytes(head, "little")
            if mid == wire.MSG_CLOSE:
                closed = True
                break
            try:
                if mid == wire.MSG_IMAGE:
                    items.append((mid, wire.read_image(f)))
                elif mid == wire.MSG_IMAGE_ARRAY:
                    items.append((mid, wire.read_image_array(f)))
                elif mid in (wire.MSG_TEXT, wire.MSG_HEADER):
                    items.append((mid, wire.read_text(f).decode()))
                else:
                    raise AssertionError(f"unexpected message id {mid} in Gadgetron's output")
            except (wire.ProtocolError, ValueError, struct.error):
                if f.read(1):  # not at the end: a malformed message, not a cut-off one
                    raise
                break
    return items, closed


def run_chain(chain_text: str, stream: Path, out_dir: Path, timeout: float = 300, **env) -> Run:
    """``gadgetron --from_stream`` with ``chain_text`` installed under a unique name in the build's config folder
    (without a storage server; the noise covariance goes to a file)."""
    home = gadgetron_home()
    name = f"cdl_test_{uuid.uuid4().hex[:8]}.xml"
    config = home / "share" / "gadgetron" / "config" / name
    config.write_text(chain_text)
    out = out_dir / f"{name}.out"
    try:
        done = subprocess.run([str(home / "bin" / "gadgetron"), "--from_stream", "--disable_storage", "true",
                               "--parameter", f"noisecovarianceout={out_dir / (name + '.noise')}", "-c", name,
                               "-i", str(stream), "-o", str(out)], capture_output=True, text=True, timeout=timeout,
                              env=environment(**env), cwd=out_dir)
    finally:
        config.unlink(missing_ok=True)
    items, closed = read_output(out) if out.exists() else ([], False)
    return Run(done.returncode, done.stdout + done.stderr, items, closed)


# --------------------------------------------------------------------------------------------------------- scans
@dataclass
class Scan:
    """A scan file and what each of its images should show: ``truth[(slice, contrast, repetition, partition)]``."""

    h5: Path
    truth: dict
    rss: dict
    matrix: tuple          # (x, y, z) recon matrix
    fov: tuple             # (x, y, z) recon field of view, mm
    directions: tuple = () # (read_dir, phase_dir, slice_dir) of the readouts

    @property
    def stream(self) -> Path:
        return to_stream(self.h5) if not self.h5.with_suffix(".bin").exists() else self.h5.with_suffix(".bin")


def _complex(a):
    return a["real"] + 1j * a["imag"]


def shepp_logan(folder: Path, matrix=64, coils=4, repetitions=1, acceleration=2, calibration=16) -> Scan:
    """The build's Shepp-Logan generator (noise scan, 2× readout oversampling); ``repetitions × acceleration``
    repetitions, each the same object."""
    path = folder / f"shepp_logan_{matrix}.h5"
    path.unlink(missing_ok=True)  # the generator appends to an existing file
    path.with_suffix(".bin").unlink(missing_ok=True)
    subprocess.run([tool("ismrmrd_generate_cartesian_shepp_logan"), "-m", str(matrix), "-c", str(coils),
                    "-a", str(acceleration), "-r", str(repetitions), "-w", str(calibration), "-C", "-o", str(path)],
                   check=True, capture_output=True, cwd=folder)
    with h5py.File(path, "r") as f:
        truth = np.abs(_complex(f["dataset/phantom"][0])) * np.sqrt((np.abs(_complex(f["dataset/csm"][0])) ** 2).sum(0))
    scan = Scan(path, {}, {}, (matrix, matrix, 1), (300.0, 300.0, 6.0))
    for repetition in range(repetitions * acceleration):
        scan.truth[(0, 0, repetition, 0)] = truth
    scan.rss = zero_filled_rss(path)
    scan.directions = scan.rss.pop("directions")
    return scan


def _template(folder: Path, matrix: int, coils: int):
    """Header text, phantom ``(ny, nx)`` and coil maps ``(coils, ny, nx)`` from the build's generator."""
    path = folder / "template.h5"
    path.unlink(missing_ok=True)
    subprocess.run([tool("ismrmrd_generate_cartesian_shepp_logan"), "-m", str(matrix), "-c", str(coils), "-o",
                    str(path)], check=True, capture_output=True, cwd=folder)
    with h5py.File(path, "r") as f:
        return (f["dataset/xml"][0].decode(), np.abs(_complex(f["dataset/phantom"][0])),
                _complex(f["dataset/csm"][0]).astype(np.complex64))


def _set(root, path: str, value) -> None:
    node = root
    for part in path.split("/"):
        child = node.find(f"m:{part}", NS)
        if child is None:
            child = ET.SubElement(node, f"{{{NS['m']}}}{part}")
        node = child
    node.text = str(value)


def synthetic_scan(folder: Path, *, slices=1, contrasts=1, partitions=1, matrix=64, coils=4, acceleration=2,
                   calibration=16, noise=0.02, seed=0, nan_image: tuple | None = None) -> Scan:
    """A Cartesian scan written with the Python ``ismrmrd`` package under the build's header: ``slices`` ×
    ``contrasts`` 2-D images, or one 3-D volume of ``partitions`` (k2 fully sampled), E1 undersampled by
    ``acceleration`` with ``calibration`` central lines (flagged calibration-only where not imaged), a noise
    scan first; no readout oversampling. Image (s, c, z) shows the phantom shifted by 3(s + 2c + z) pixels along
    the readout and scaled by 1 + 0.3(s + c + z). ``nan_image`` (slice, contrast): one of its readouts carries NaN."""
    ET.register_namespace("", NS["m"])
    xml, phantom, csm = _template(folder, matrix, coils)
    root = ET.fromstring(xml)
    enc = root.find("m:encoding", NS)
    fov_z = 6.0 * partitions
    for space in ("encodedSpace", "reconSpace"):
        _set(enc, f"{space}/matrixSize/x", matrix)
        _set(enc, f"{space}/matrixSize/z", partitions)
        _set(enc, f"{space}/fieldOfView_mm/x", 300)
        _set(enc, f"{space}/fieldOfView_mm/z", fov_z)
    limits = enc.find("m:encodingLimits", NS)
    for child in list(limits):
        limits.remove(child)
    for name, maximum in (("kspace_encoding_step_1", matrix - 1), ("kspace_encoding_step_2", partitions - 1),
                          ("slice", slices - 1), ("contrast", contrasts - 1)):
        _set(limits, f"{name}/minimum", 0)
        _set(limits, f"{name}/maximum", maximum)
        _set(limits, f"{name}/center", (maximum + 1) // 2 if name.startswith("kspace") else 0)
    parallel = enc.find("m:parallelImaging", NS)
    if parallel is not None:
        enc.remove(parallel)
    _set(enc, "parallelImaging/accelerationFactor/kspace_encoding_step_1", acceleration)
    _set(enc, "parallelImaging/accelerationFactor/kspace_encoding_step_2", 1)
    _set(enc, "parallelImaging/calibrationMode", "embedded")
    header = ET.tostring(root, encoding="unicode")

    rng = np.random.default_rng(seed)
    norm = np.sqrt((np.abs(csm) ** 2).sum(0))
    path = folder / f"synthetic_s{slices}_c{contrasts}_z{partitions}{'_nan' if nan_image else ''}.h5"
    path.unlink(missing_ok=True)
    path.with_suffix(".bin").unlink(missing_ok=True)
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dataset.write_xml_header(header.encode())
    counter = 0

    def append(data, flags=(), **idx):
        nonlocal counter
        acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, np.complex64))
        acq.scan_counter, acq.center_sample, acq.sample_time_us = counter, matrix // 2, 5.0
        acq.read_dir[:], acq.phase_dir[:], acq.slice_dir[:] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
        for name, value in idx.items():
            setattr(acq.idx, name, value)
        for flag in flags:
            acq.set_flag(flag)
        counter += 1
        dataset.append_acquisition(acq)

    scale = 0.0
    truth, centre = {}, matrix // 2
    calib = range(centre - calibration // 2, centre + calibration // 2)
    volumes = {}
    for s in range(slices):
        for c in range(contrasts):
            objects = [np.roll(phantom, 3 * (s + 2 * c + z), axis=-1) * (1 + 0.3 * (s + c + z))
                       for z in range(partitions)]
            for z, obj in enumerate(objects):
                truth[(s, c, 0, z)] = obj * norm
            coil_images = csm[:, None] * np.stack(objects)[None]                     # coils, z, y, x
            kspace = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(coil_images, axes=(1, 2, 3)), axes=(1, 2, 3),
                                                 norm="ortho"), axes=(1, 2, 3))
            volumes[(s, c)] = kspace
            scale = max(scale, np.abs(kspace).max())
    sigma = noise * scale
    for _ in range(4):
        append(sigma * (rng.standard_normal((coils, matrix)) + 1j * rng.standard_normal((coils, matrix))) / np.sqrt(2),
               flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
    keys = [(s, c) for s in range(slices) for c in range(contrasts)]
    for number, (s, c) in enumerate(keys):
        lines = [(z, e1) for z in range(partitions) for e1 in range(matrix) if e1 % acceleration == 0 or e1 in calib]
        for i, (z, e1) in enumerate(lines):
            flags = []
            if e1 in calib:
                flags.append(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING if e1 % acceleration == 0
                             else ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            if i == 0:
                flags.append(ismrmrd.ACQ_FIRST_IN_SLICE)
            if i == len(lines) - 1:
                flags.append(ismrmrd.ACQ_LAST_IN_SLICE)
                if number == len(keys) - 1:
                    flags.append(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
            line = volumes[(s, c)][:, z, e1, :]
            line = line + sigma * (rng.standard_normal(line.shape) + 1j * rng.standard_normal(line.shape)) / np.sqrt(2)
            if (s, c) == nan_image and i == 5:
                line[0, 3] = np.nan
            append(line, flags, kspace_encode_step_1=e1, kspace_encode_step_2=z, slice=s, contrast=c)
    dataset.close()
    scan = Scan(path, truth, {}, (matrix, matrix, partitions), (300.0, 300.0, fov_z))
    scan.rss = zero_filled_rss(path)
    scan.directions = scan.rss.pop("directions")
    return scan


def zero_filled_rss(path: Path) -> dict:
    """Root-sum-of-squares of the zero-filled k-space of every image, readout oversampling cropped:
    ``{(slice, contrast, repetition, partition): (ny, nx)}``."""
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
    enc = header.encoding[0]
    nx_raw, ny, nz = enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y, max(enc.encodedSpace.matrixSize.z, 1)
    nx = enc.reconSpace.matrixSize.x
    e1c = enc.encodingLimits.kspace_encoding_step_1.center
    e2c = enc.encodingLimits.kspace_encoding_step_2.center if nz > 1 else 0
    kspace = {}
    for i in range(dataset.number_of_acquisitions()):
        acq = dataset.read_acquisition(i)
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            continue
        directions = (tuple(acq.read_dir), tuple(acq.phase_dir), tuple(acq.slice_dir))
        key = (acq.idx.slice, acq.idx.contrast, acq.idx.repetition)
        k = kspace.setdefault(key, np.zeros((acq.active_channels, nz, ny, nx_raw), np.complex64))
        k[:, acq.idx.kspace_encode_step_2 - e2c + nz // 2, acq.idx.kspace_encode_step_1 - e1c + ny // 2] = acq.data
    dataset.close()
    images = {"directions": directions}
    for (s, c, r), k in kspace.items():
        x = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=(1, 2, 3)), axes=(1, 2, 3)), axes=(1, 2, 3))
        x = x[..., (nx_raw - nx) // 2:(nx_raw - nx) // 2 + nx]
        rss = np.sqrt((np.abs(x) ** 2).sum(0))
        for z in range(nz):
            images[(s, c, r, z)] = rss[z]
    return images


def inline_distributed(stream: ET.Element) -> None:
    """The single-machine form of a chain: its ``<distributed>`` node replaced, in place, by the inner stream."""
    distributed = stream.find("distributed")
    position = list(stream).index(distributed)
    stream.remove(distributed)
    for offset, node in enumerate(distributed.find("stream")):
        stream.insert(position + offset, node)


def wait_for_port(port: int, process, log, timeout: float = 120) -> None:
    """Return once something listens on 127.0.0.1:``port``; AssertionError with the tail of ``log`` when
    ``process`` died first or ``timeout`` seconds passed."""
    import socket
    import time
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"process on port {port} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
