"""Builders shared by the tests: ISMRMRD files from Debian's ``ismrmrd_generate_cartesian_shepp_logan``, minimal
headers and acquisitions, synthetic images, coil maps and dictionaries, and a helper that plays Gadgetron's side of
a scan."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from cdl_lambda.recon.dictionary import Dictionary

SHEPP_LOGAN = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
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
PLAIN_REGISTRY = {"default": "cdl-lambda", "chains": {"cdl-lambda": {"parameters": {}}}}  # shipped defaults, no rules


def write_registry(folder: Path, data: dict = PLAIN_REGISTRY) -> Path:
    """A chains folder with ``registry.yaml`` holding ``data``; returns the folder."""
    import yaml
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "registry.yaml").write_text(yaml.safe_dump(data))
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process that binds it itself)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """‖s·x − ref‖ / ‖ref‖ with the best real scale s (in float64: integer images as the scanner takes them would
    overflow in x · x)."""
    x = np.abs(image).astype(np.float64)
    scale = (x * reference).sum() / max((x * x).sum(), 1e-30)
    return float(np.linalg.norm(scale * x - reference) / np.linalg.norm(reference))


def read_file(path: Path):
    """(header bytes, list of acquisitions) of an ISMRMRD file."""
    from cdl_lambda.gadgets.recording import read_recording
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


def _parse_header(text):
    from cdl_lambda.gadgets.wire import parse_ismrmrd_header
    return parse_ismrmrd_header(text)


def header(nx=32, ny=16, nz=1, rx=None, limits=True, trajectory="cartesian", e1_center=None, slices=1):
    return _parse_header(header_xml(nx, ny, nz, rx, limits, trajectory, e1_center, slices))


def header_xml(nx=32, ny=16, nz=1, rx=None, limits=True, trajectory="cartesian", e1_center=None, slices=1) -> str:
    """A minimal valid ISMRMRD header (text)."""
    rx = rx or nx
    limit_xml = (f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ny - 1}</maximum>"
                 f"<center>{ny // 2 if e1_center is None else e1_center}</center></kspace_encoding_step_1>"
                 f"<slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>0</center></slice>"
                 "</encodingLimits>") if limits else ""
    xml = f"""<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
    <experimentalConditions><H1resonanceFrequency_Hz>2100000</H1resonanceFrequency_Hz></experimentalConditions>
    <encoding>
    <encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>{nz}</z></matrixSize>
    <fieldOfView_mm><x>{2 * nx * nx / rx}</x><y>{2 * ny}</y><z>{5 * nz}</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{rx}</x><y>{ny}</y><z>{nz}</z></matrixSize>
    <fieldOfView_mm><x>{2 * nx}</x><y>{2 * ny}</y><z>{5 * nz}</z></fieldOfView_mm></reconSpace>
    {limit_xml}<trajectory>{trajectory}</trajectory></encoding></ismrmrdHeader>"""
    return xml


def acquisition(e1, samples=32, coils=2, slice_=0, repetition=0, e2=0, flags=(), center=None, value=1.0):
    data = np.full((coils, samples), value, np.complex64)
    acq = ismrmrd.Acquisition.from_array(data)
    acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2 = e1, e2
    acq.idx.slice, acq.idx.repetition = slice_, repetition
    acq.center_sample = samples // 2 if center is None else center
    for flag in flags:
        acq.set_flag(flag)
    return acq


def synthetic_maps(num_coils: int, shape) -> torch.Tensor:
    """Smooth complex sensitivities of coils placed around the object, like a receive array."""
    ny, nx = shape
    y = torch.linspace(-1, 1, ny, dtype=torch.float64)[:, None]
    x = torch.linspace(-1, 1, nx, dtype=torch.float64)[None, :]
    maps = []
    for j in range(num_coils):
        angle = 2 * torch.pi * j / num_coils
        cy, cx = 1.2 * torch.sin(torch.tensor(angle)), 1.2 * torch.cos(torch.tensor(angle))
        magnitude = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 1.5)
        maps.append(magnitude * torch.exp(1j * (angle + 0.7 * x - 0.4 * y)))
    return torch.stack(maps).to(torch.complex64)


def random_dictionary(num_filters: int = 8, kernel_size: int = 5, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Dictionary:
    generator = torch.Generator().manual_seed(seed)
    filters = torch.randn(num_filters, kernel_size, kernel_size, generator=generator, dtype=torch.float64)
    filters = filters / filters.flatten(1).norm(dim=1)[:, None, None]
    return Dictionary(filters.to(dtype), name=f"random-{num_filters}-{kernel_size}-{seed}")



def write_training_weights(root: Path) -> Path:
    """A weights folder ``root`` with two training dictionaries (K 4 and 6) and one held-out one (K 5)."""
    from cdl_lambda.lab.manifest import update_manifest
    (root / "dictionaries").mkdir(parents=True, exist_ok=True)
    for name, k, kf, seed, split in (("a", 4, 5, 0, "train"), ("b", 6, 3, 1, "train"), ("c", 5, 5, 2, "validation")):
        sha = random_dictionary(k, kf, seed).save(root / "dictionaries" / f"{name}.pt")
        update_manifest(root, "dictionaries", {"name": name, "file": f"dictionaries/{name}.pt", "K": k,
                                               "kernel_size": kf, "split": split, "sha256": sha})
    return root

def phantom(ny: int = 32, nx: int = 32, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """A piecewise-constant ellipse phantom with a smooth phase, ``(ny, nx)``."""
    y = torch.linspace(-1, 1, ny, dtype=torch.float64)[:, None]
    x = torch.linspace(-1, 1, nx, dtype=torch.float64)[None, :]
    image = 1.0 * ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1)
    image = image - 0.6 * (((x - 0.2) / 0.25) ** 2 + (y / 0.4) ** 2 < 1)
    image = image + 0.4 * (((x + 0.3) / 0.15) ** 2 + ((y - 0.3) / 0.2) ** 2 < 1)
    phase = torch.exp(1j * (0.8 * x + 0.5 * y))
    return (image * phase).to(dtype)


def complex_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def read_kspace(path: Path, repetition: int = 0):
    """Centred k-space ``(coils, ny, nx)`` complex64 and mask ``(ny, nx)`` of one repetition of a single-slice,
    2-D ISMRMRD file without readout oversampling (noise scans skipped), straight from the file."""
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    finally:
        dataset.close()
    lines = [a for a in acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
             and a.idx.repetition == repetition]
    coils, samples = lines[0].data.shape
    ny = max(a.idx.kspace_encode_step_1 for a in acquisitions) + 1  # all repetitions together cover every line
    kspace = np.zeros((coils, ny, samples), np.complex64)
    mask = np.zeros((ny, samples), np.float32)
    for a in lines:
        kspace[:, a.idx.kspace_encode_step_1] = a.data
        mask[a.idx.kspace_encode_step_1] = 1
    return torch.from_numpy(kspace), torch.from_numpy(mask)


def true_coil_maps(path: Path) -> torch.Tensor:
    """The tool's true sensitivities ``(coils, ny, nx)`` complex64, normalised so Σ|c|² = 1."""
    with h5py.File(path, "r") as f:
        csm = f["dataset/csm"][0]
    maps = torch.from_numpy((csm["real"] + 1j * csm["imag"]).astype(np.complex64))
    return maps / maps.abs().pow(2).sum(0).sqrt().clamp_min(1e-12)


def bucket_to_buffer(acquisitions, ny: int, trigger: str = "repetition", oversampling: int = 1):
    """ReconData per ``trigger`` value as Gadgetron's BucketToBufferGadget builds them (seen with Gadgetron 4.7.2):
    ``data`` [RO, E1, 1, CHA, 1, 1, 1] with the imaging lines, ``ref`` the same shape with the calibration lines
    (calibration-only and calibration-and-imaging); every slot of a line that was not acquired holds zeros and a
    blank header whose ``version`` is 1. 2-D, one slice; noise readouts are left out; readouts cropped by
    ``oversampling`` as RemoveROOversamplingGadget does (a centred crop of each readout's Fourier transform)."""
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription
    from cdl_lambda.recon.coils import remove_readout_oversampling
    groups: dict[int, list] = {}
    for acq in acquisitions:
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            groups.setdefault(int(getattr(acq.idx, trigger)), []).append(acq)

    def blank():
        head = ismrmrd.AcquisitionHeader()
        head.version = 1
        return head

    def buffer(lines):
        coils, samples = lines[0].data.shape
        samples //= oversampling
        data = np.zeros((samples, ny, 1, coils, 1, 1, 1), np.complex64)
        headers = np.empty((ny, 1, 1, 1, 1), dtype=object)
        for e1 in range(ny):
            headers[e1, 0, 0, 0, 0] = blank()
        for acq in lines:
            line = torch.from_numpy(np.ascontiguousarray(acq.data))
            if oversampling > 1:
                line = remove_readout_oversampling(line, oversampling, dim=-1)
            data[:, acq.idx.kspace_encode_step_1, 0, :, 0, 0, 0] = line.numpy().T
            headers[acq.idx.kspace_encode_step_1, 0, 0, 0, 0] = acq.getHead()
        sampling = SamplingDescription()
        sampling.encoded_matrix[:] = (samples, ny, 1)
        sampling.recon_matrix[:] = (samples, ny, 1)
        for axis, (lo, centre, hi) in enumerate([(0, samples // 2, samples - 1), (0, ny // 2, ny - 1), (0, 0, 0)]):
            sampling.sampling_limits[axis].min, sampling.sampling_limits[axis].center = lo, centre
            sampling.sampling_limits[axis].max = hi
        return ReconBuffer(data, None, None, headers, sampling)

    calibration = (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    result = []
    for _, lines in sorted(groups.items()):
        imaging = [a for a in lines if not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
        ref = [a for a in lines if any(a.is_flag_set(f) for f in calibration)]
        result.append(ReconData([ReconBit(buffer(imaging), buffer(ref) if ref else None)]))
    return result
