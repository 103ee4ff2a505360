"""Low-field scanner raw data from magnitude images: complex ground truth, birdcage coils, correlated noise, the two
acquisition settings, and an ISMRMRD writer; also the ``cdl-lambda simulate`` command.

Conventions: images ``(..., ny, nx)``, ny = phase encoding (E1, rows), nx = readout (columns); k-space centred
(DC at ``n // 2``), orthonormal FFTs (:mod:`recon.fft`); coil maps ``(coils, ny, nx)`` with Σ_j |c_j|² = 1.

Settings (:class:`Setting`):

* ``lowres`` — the paper's low-field task: a centred ``ny/f × nx/f`` window of k-space (a low-resolution scan with
  the same field of view; ``f = 2`` by default), one coil unless asked otherwise, heavy noise.
* ``lines`` — multi-coil random phase-encoding lines (``ny / acceleration`` of them) with fully sampled central
  calibration lines.

Noise level: ``noise_level`` is the noise variance relative to the variance of the noise-free measured k-space,
σ² = level · Var(y_clean) over the acquired samples of all coils, in the k-space the reconstruction sees (readout
oversampling removed; removing it keeps white noise white with the same variance). Channel noise has covariance Ψ
with mean diagonal σ²; the noise pre-scan carries noise with the same Ψ.

Files: the acquisitions carry ``data`` ``(coils, 2·nx_enc)`` (2× readout oversampling: the readout field of view is
doubled, k_max unchanged). The ground truth lies in the HDF5 group ``/dataset/reference`` (see
:func:`read_reference`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from recon import fft as _fft
from recon import sampling

log = logging.getLogger(__name__)

GAMMA_BAR_HZ_PER_T = 42.577478518e6
SETTINGS = ("lowres", "lines")


# ----------------------------------------------------------------------------------------------------------------
# Physics: phase, coils, noise
# ----------------------------------------------------------------------------------------------------------------

def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1): ``(v, u)`` for rows and columns, 0 at the centre pixel ``n // 2``."""
    ny, nx = shape
    v = (np.arange(ny) - ny // 2) / (ny / 2)
    u = (np.arange(nx) - nx // 2) / (nx / 2)
    return np.meshgrid(v, u, indexing="ij")


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator, amplitude: float = np.pi,
                 cycles: float = 1.5) -> np.ndarray:
    """A smooth, low-order phase map (radians) ``(ny, nx)`` float32: a random offset, a linear ramp (a small shift
    of the echo / k-space centre), a quadratic term (B0 inhomogeneity) and a random field of spatial frequencies up
    to ``cycles`` per field of view; the non-constant part spans about ±``amplitude``."""
    v, u = _grid(shape)
    c = rng.normal(size=6)
    poly = c[0] * u + c[1] * v + 0.5 * (c[2] * u * u + c[3] * v * v + c[4] * u * v)
    field = np.zeros(shape)
    for _ in range(4):
        ky, kx = rng.uniform(-cycles, cycles, size=2)
        field += rng.normal() * np.cos(np.pi * (kx * u + ky * v) + rng.uniform(0, 2 * np.pi))
    smooth = poly + 0.5 * field
    smooth = smooth - smooth.mean()
    smooth = amplitude * smooth / max(np.abs(smooth).max(), 1e-12)
    return (smooth + rng.uniform(-np.pi, np.pi)).astype(np.float32)


def complex_image(magnitude: np.ndarray, rng: np.random.Generator, amplitude: float = np.pi) -> np.ndarray:
    """Complex ground truth ``magnitude · exp(iφ)`` with a :func:`smooth_phase` φ; complex64 ``(ny, nx)``."""
    phase = smooth_phase(magnitude.shape[-2:], rng, amplitude)
    return (magnitude * np.exp(1j * phase)).astype(np.complex64)


def birdcage_maps(coils: int, shape: tuple[int, int], radius: float = 1.5, rotation: float = 0.0) -> np.ndarray:
    """Birdcage-like receive sensitivities ``(coils, ny, nx)`` complex64, normalised so Σ_j |c_j|² = 1.

    Coil j sits at angle θ_j = 2πj/coils + ``rotation`` on a circle of ``radius`` (in half fields of view) around
    the centre; its sensitivity falls off as 1/distance and its phase follows the azimuth around the coil, offset
    by −θ_j (the model of sigpy's ``birdcage_maps``). One coil gives a uniform map."""
    if coils < 1:
        raise ValueError(f"coils must be ≥ 1, got {coils}")
    if coils == 1:
        return np.ones((1, *shape), dtype=np.complex64)
    v, u = _grid(shape)
    theta = 2 * np.pi * np.arange(coils) / coils + rotation
    du = u[None] - radius * np.cos(theta)[:, None, None]
    dv = v[None] - radius * np.sin(theta)[:, None, None]
    maps = np.exp(1j * (np.arctan2(du, -dv) - theta[:, None, None])) / np.hypot(du, dv)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0))).astype(np.complex64)


def channel_covariance(coils: int, rng: np.random.Generator, correlation: float = 0.3,
                       gain_spread: float = 0.15) -> np.ndarray:
    """Receiver noise covariance Ψ ``(coils, coils)`` complex128 with mean diagonal 1.

    Ψ_ij = g_i g_j ρ^{d(i,j)}, d the distance between channels around the ring (neighbours couple most), g_i
    log-normal channel gains (spread ``gain_spread``). ``correlation`` ρ ∈ [0, 1)."""
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    idx = np.arange(coils)
    dist = np.abs(idx[:, None] - idx[None, :])
    dist = np.minimum(dist, coils - dist)
    gains = np.exp(gain_spread * rng.normal(size=coils))
    cov = gains[:, None] * gains[None, :] * correlation ** dist
    return (cov / np.mean(np.diag(cov))).astype(np.complex128)


def correlated_noise(rng: np.random.Generator, covariance: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Complex Gaussian noise ``(coils, *shape)`` complex64 with channel covariance E[n nᴴ] = ``covariance``."""
    eigval, eigvec = np.linalg.eigh(covariance)  # Ψ = A Aᴴ with A = V √Λ (also for a singular or zero Ψ)
    chol = eigvec * np.sqrt(np.clip(eigval, 0.0, None))
    white = (rng.normal(size=(len(covariance), *shape)) + 1j * rng.normal(size=(len(covariance), *shape))) / np.sqrt(2)
    return np.tensordot(chol, white, axes=(1, 0)).astype(np.complex64)


def kspace_variance(k: np.ndarray) -> float:
    """Var(k) = mean |k − mean k|² over all given samples."""
    return float(np.mean(np.abs(k - k.mean()) ** 2))


def oversample_readout(k: np.ndarray, factor: int = 2) -> np.ndarray:
    """What a scanner samples with ``factor``× readout oversampling: the readout field of view is enlarged by
    zero-padding the hybrid (x, k_y) profile, so :func:`recon.coils.remove_readout_oversampling` inverts it exactly.
    ``k`` ``(..., nx)`` centred k-space along the readout → ``(..., factor·nx)``."""
    if factor == 1:
        return k
    t = torch.from_numpy(np.ascontiguousarray(k))
    profile = _fft.ifft1c(t, dim=-1)
    n = t.shape[-1]
    pad = (factor * n - n) // 2
    padded = torch.nn.functional.pad(profile, (pad, factor * n - n - pad))
    return _fft.fft1c(padded, dim=-1).numpy().astype(np.complex64)


# ----------------------------------------------------------------------------------------------------------------
# Acquisition settings and a simulated scan
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """How the scan is acquired. ``matrix``: reconstruction matrix (ny, nx). ``lowres``: ``window_factor`` ×
    lower resolution per axis. ``lines``: ``acceleration`` and ``calib_lines``. ``noise_level``: relative noise
    variance (module docstring); ``correlation``: neighbour-channel noise correlation."""

    kind: str = "lowres"
    matrix: tuple[int, int] = (320, 320)
    coils: int = 1
    noise_level: float = 0.2
    correlation: float = 0.3
    window_factor: int = 2
    acceleration: float = 4.0
    calib_lines: int = 24
    oversampling: int = 2

    def __post_init__(self):
        if self.kind not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.kind!r}")
        if self.noise_level < 0:
            raise ValueError("noise_level must be ≥ 0")

    @property
    def encoded(self) -> tuple[int, int]:
        """The encoded matrix (E1 lines, readout samples before oversampling)."""
        ny, nx = self.matrix
        if self.kind == "lowres":
            return ny // self.window_factor, nx // self.window_factor
        return ny, nx

    def recon_mask(self, seed: int = 0) -> np.ndarray:
        """The sampled k-space positions on the reconstruction grid ``(ny, nx)`` float32."""
        if self.kind == "lowres":
            return sampling.central_window_mask(self.matrix, self.encoded).numpy()
        return sampling.random_line_mask(self.matrix, self.acceleration, self.calib_lines, seed=seed).numpy()

    def calibration_rows(self) -> np.ndarray:
        """E1 indices (encoded grid) flagged as calibration lines (none for ``lowres``)."""
        if self.kind == "lowres" or self.calib_lines == 0:
            return np.zeros(0, dtype=int)
        ny = self.matrix[0]
        start = ny // 2 - self.calib_lines // 2
        return np.arange(start, start + self.calib_lines)


class Scan:
    """A simulated multi-slice scan: ground truth and everything needed to produce its raw data, lazily.

    ``image`` ``(slices, ny, nx)`` complex64, ``coil_maps`` ``(slices, coils, ny, nx)``, ``covariance`` Ψ
    ``(coils, coils)`` (scaled to the requested noise level), ``mask`` ``(ny, nx)`` on the reconstruction grid,
    ``rows`` the acquired E1 lines of the encoded grid. :meth:`raw` gives one (repetition, slice)'s oversampled data
    ``(lines, coils, oversampling·nx_enc)``; it is deterministic in (seed, repetition, slice), whatever the order."""

    def __init__(self, magnitudes: np.ndarray, setting: Setting, seed: int = 0):
        magnitudes = np.asarray(magnitudes, dtype=np.float32)
        if magnitudes.ndim == 2:
            magnitudes = magnitudes[None]
        if magnitudes.shape[-2:] != tuple(setting.matrix):
            raise ValueError(f"images are {magnitudes.shape[-2:]}, the setting's matrix is {setting.matrix}")
        self.setting, self.seed = setting, seed
        rng = np.random.default_rng([seed, 0])
        self.image = np.stack([complex_image(m, rng) for m in magnitudes])
        rotation = rng.uniform(0, 2 * np.pi)
        maps = birdcage_maps(setting.coils, setting.matrix, rotation=rotation)
        self.coil_maps = np.repeat(maps[None], len(self.image), axis=0)
        self.mask = setting.recon_mask(seed)
        ny, nx = setting.matrix
        wy, wx = setting.encoded
        self._y0, self._x0 = ny // 2 - wy // 2, nx // 2 - wx // 2
        if setting.kind == "lowres":
            self.rows = np.arange(wy)
        else:
            self.rows = np.nonzero(self.mask[:, 0] > 0)[0]
        clean = [self.clean(s) for s in range(len(self.image))]
        self.signal_variance = float(np.mean([kspace_variance(c) for c in clean]))
        self.sigma2 = setting.noise_level * self.signal_variance
        self.covariance = channel_covariance(setting.coils, rng, setting.correlation) * self.sigma2

    @property
    def slices(self) -> int:
        return len(self.image)

    def clean(self, slice_index: int) -> np.ndarray:
        """Noise-free acquired k-space of one slice on the encoded grid, oversampling removed:
        ``(lines, coils, nx_enc)`` complex64."""
        k = _fft.fft2c(torch.from_numpy(self.coil_maps[slice_index] * self.image[slice_index])).numpy()
        wy, wx = self.setting.encoded
        k = k[:, self._y0:self._y0 + wy, self._x0:self._x0 + wx] if self.setting.kind == "lowres" else k
        return np.ascontiguousarray(k[:, self.rows].transpose(1, 0, 2))

    def raw(self, repetition: int, slice_index: int) -> np.ndarray:
        """Oversampled noisy readouts ``(lines, coils, oversampling·nx_enc)`` complex64."""
        signal = oversample_readout(self.clean(slice_index), self.setting.oversampling)
        rng = np.random.default_rng([self.seed, 1, repetition, slice_index])
        noise = correlated_noise(rng, self.covariance, (signal.shape[0], signal.shape[2])).transpose(1, 0, 2)
        return signal + noise

    def noise_prescan(self, samples: int) -> np.ndarray:
        """Noise-only readouts ``(coils, samples)`` complex64 with covariance Ψ."""
        return correlated_noise(np.random.default_rng([self.seed, 2]), self.covariance, (samples,))


# ----------------------------------------------------------------------------------------------------------------
# ISMRMRD
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Protocol:
    """Scanner-side description written to the header and the acquisition headers."""

    field_strength_t: float = 0.05
    fov_mm: tuple[float, float] = (220.0, 220.0)  # (phase, readout)
    slice_thickness_mm: float = 5.0
    slice_gap_mm: float = 1.0
    repetitions: int = 1
    tr_ms: float = 500.0
    te_ms: float = 20.0
    pixel_bandwidth_hz: float = 100.0
    noise_readouts: int = 8
    vendor: str = "cdl-lambda"
    model: str = "low-field simulator"


def build_header(scan: Scan, protocol: Protocol):
    """The ISMRMRD XML header (``ismrmrd.xsd.ismrmrdHeader``) of a scan."""
    import ismrmrd.xsd as x

    setting = scan.setting
    ny, nx = setting.matrix
    wy, wx = setting.encoded
    fy, fx = protocol.fov_mm
    os_ = setting.oversampling
    limit = lambda maximum, center=0: x.limitType(minimum=0, maximum=maximum, center=center)  # noqa: E731
    space = lambda mx, my, fov_x, fov_y: x.encodingSpaceType(  # noqa: E731
        matrixSize=x.matrixSizeType(x=mx, y=my, z=1),
        fieldOfView_mm=x.fieldOfViewMm(x=fov_x, y=fov_y, z=protocol.slice_thickness_mm))
    encoding = x.encodingType(
        encodedSpace=space(os_ * wx, wy, os_ * fx, fy),
        reconSpace=space(nx, ny, fx, fy),
        encodingLimits=x.encodingLimitsType(
            kspace_encoding_step_0=limit(os_ * wx - 1, os_ * wx // 2),
            kspace_encoding_step_1=limit(wy - 1, wy // 2),
            kspace_encoding_step_2=limit(0), average=limit(0), slice=limit(scan.slices - 1),
            contrast=limit(0), phase=limit(0), repetition=limit(protocol.repetitions - 1), set=limit(0),
            segment=limit(0)),
        trajectory=x.trajectoryType.CARTESIAN)
    if setting.kind == "lines":
        encoding.parallelImaging = x.parallelImagingType(
            accelerationFactor=x.accelerationFactorType(
                kspace_encoding_step_1=int(round(setting.acceleration)), kspace_encoding_step_2=1),
            calibrationMode=x.calibrationModeType.EMBEDDED)
    header = x.ismrmrdHeader(
        version=2,
        measurementInformation=x.measurementInformationType(
            measurementID=f"LF_{scan.seed}", patientPosition=x.patientPositionType.HFS,
            protocolName=setting.kind, sequenceName="se2d"),
        acquisitionSystemInformation=x.acquisitionSystemInformationType(
            systemVendor=protocol.vendor, systemModel=protocol.model,
            systemFieldStrength_T=protocol.field_strength_t, relativeReceiverNoiseBandwidth=1.0,
            receiverChannels=setting.coils,
            coilLabel=[x.coilLabelType(coilNumber=c, coilName=f"RX{c}") for c in range(setting.coils)]),
        experimentalConditions=x.experimentalConditionsType(
            H1resonanceFrequency_Hz=int(round(GAMMA_BAR_HZ_PER_T * protocol.field_strength_t))),
        encoding=[encoding],
        sequenceParameters=x.sequenceParametersType(
            TR=[protocol.tr_ms], TE=[protocol.te_ms], flipAngle_deg=[90.0], sequence_type="SpinEcho"),
        userParameters=x.userParametersType(
            userParameterDouble=[x.userParameterDoubleType(name="noise_level_relative", value=setting.noise_level)],
            userParameterString=[x.userParameterStringType(name="reference_group", value="/dataset/reference")]))
    return header


def _acquisition(data: np.ndarray, protocol: Protocol, scan: Scan, counter: int, slice_index: int,
                 sample_time_us: float, uid: int):
    import ismrmrd

    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    acq.version = 1
    acq.measurement_uid = uid
    acq.scan_counter = counter
    acq.acquisition_time_stamp = int(counter * protocol.tr_ms / 2.5) % (2 ** 32)  # 2.5 ms ticks
    acq.center_sample = data.shape[-1] // 2
    acq.sample_time_us = sample_time_us
    for c in range(data.shape[0]):
        acq.setChannelActive(c)
    gap = protocol.slice_thickness_mm + protocol.slice_gap_mm
    acq.position[:] = (0.0, 0.0, (slice_index - (scan.slices - 1) / 2) * gap)
    acq.read_dir[:] = (1.0, 0.0, 0.0)
    acq.phase_dir[:] = (0.0, 1.0, 0.0)
    acq.slice_dir[:] = (0.0, 0.0, 1.0)
    return acq


def count_acquisitions(scan: Scan, protocol: Protocol) -> int:
    """How many acquisitions :func:`write_ismrmrd` writes (noise pre-scan included)."""
    return protocol.noise_readouts + protocol.repetitions * scan.slices * len(scan.rows)


def write_ismrmrd(path: str | Path, scan: Scan, protocol: Protocol = Protocol(), progress=None,
                  attrs: dict | None = None) -> Path:
    """Write ``scan`` as an ISMRMRD file as a low-field scanner would, ground truth in ``/dataset/reference``.

    Order: ``noise_readouts`` noise acquisitions (ACQ_IS_NOISE_MEASUREMENT), then per repetition, per slice the
    acquired lines in ascending E1 order, flagged FIRST/LAST_IN_ENCODE_STEP1, FIRST/LAST_IN_SLICE,
    FIRST/LAST_IN_REPETITION, LAST_IN_MEASUREMENT, and ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING on calibration lines.
    ``progress``: an optional callable ``progress(n)`` told of every n acquisitions written."""
    import h5py
    import ismrmrd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    setting = scan.setting
    samples = setting.oversampling * setting.encoded[1]
    readout_s = 1.0 / protocol.pixel_bandwidth_hz
    sample_time_us = 1e6 * readout_s / samples
    uid = int(np.random.default_rng([scan.seed, 3]).integers(1, 2 ** 31))
    calibration = set(int(r) for r in setting.calibration_rows())
    counter = 0
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as dset:
        dset.write_xml_header(ismrmrd.xsd.ToXML(build_header(scan, protocol)))
        noise = scan.noise_prescan(protocol.noise_readouts * samples).reshape(setting.coils, -1, samples)
        for i in range(protocol.noise_readouts):
            counter += 1
            acq = _acquisition(noise[:, i], protocol, scan, counter, 0, sample_time_us, uid)
            acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            dset.append_acquisition(acq)
        if progress:
            progress(protocol.noise_readouts)
        for rep in range(protocol.repetitions):
            for s in range(scan.slices):
                raw = scan.raw(rep, s)
                for j, row in enumerate(scan.rows):
                    counter += 1
                    acq = _acquisition(raw[j], protocol, scan, counter, s, sample_time_us, uid)
                    acq.idx.kspace_encode_step_1 = int(row)
                    acq.idx.slice = s
                    acq.idx.repetition = rep
                    acq.idx.contrast = 0
                    first, last = j == 0, j == len(scan.rows) - 1
                    if first:
                        acq.set_flag(ismrmrd.ACQ_FIRST_IN_ENCODE_STEP1)
                        acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
                        if s == 0:
                            acq.set_flag(ismrmrd.ACQ_FIRST_IN_REPETITION)
                    if last:
                        acq.set_flag(ismrmrd.ACQ_LAST_IN_ENCODE_STEP1)
                        acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                        if s == scan.slices - 1:
                            acq.set_flag(ismrmrd.ACQ_LAST_IN_REPETITION)
                            if rep == protocol.repetitions - 1:
                                acq.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
                    if int(row) in calibration:
                        acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
                    dset.append_acquisition(acq)
                if progress:
                    progress(len(scan.rows))
    with h5py.File(path, "a") as f:
        ref = f.require_group("dataset/reference")
        ref.create_dataset("image", data=scan.image)
        ref.create_dataset("coil_maps", data=scan.coil_maps)
        ref.create_dataset("mask", data=scan.mask)
        ref.create_dataset("noise_covariance", data=scan.covariance)
        ref.attrs.update({"setting": setting.kind, "noise_level": setting.noise_level,
                          "noise_variance": scan.sigma2, "signal_variance": scan.signal_variance,
                          "seed": scan.seed, **(attrs or {})})
    return path


def read_reference(path: str | Path) -> dict:
    """The ground truth of a simulated file: ``image`` ``(slices, ny, nx)``, ``coil_maps``
    ``(slices, coils, ny, nx)``, ``mask`` ``(ny, nx)``, ``noise_covariance`` ``(coils, coils)``, plus the attributes
    (``noise_level``, ``noise_variance``, ``source``, ``subject``, ``split``, ``seed``, …)."""
    import h5py

    with h5py.File(path, "r") as f:
        ref = f["dataset/reference"]
        out = {name: ref[name][()] for name in ref}
        out.update({k: (v.decode() if isinstance(v, bytes) else v) for k, v in ref.attrs.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line: cdl-lambda simulate
# ----------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lab import images

    parser.add_argument("--source", choices=sorted(images.SOURCES), action="append",
                        help="image source (repeatable); default: every available source of --split")
    parser.add_argument("--split", choices=sorted(images.SPLITS), default="test")
    parser.add_argument("--setting", choices=SETTINGS, default="lowres")
    parser.add_argument("--matrix", type=int, nargs="+", default=[320], help="reconstruction matrix: N or NY NX")
    parser.add_argument("--coils", type=int, default=None, help="receive channels (default 1 lowres, 8 lines)")
    parser.add_argument("--noise", type=float, default=None,
                        help="noise variance relative to k-space variance (default 0.2 lowres, 0.02 lines)")
    parser.add_argument("--correlation", type=float, default=0.3, help="neighbour-channel noise correlation")
    parser.add_argument("--window-factor", type=int, default=2, help="lowres: resolution reduction per axis")
    parser.add_argument("--acceleration", type=float, default=4.0, help="lines: undersampling factor")
    parser.add_argument("--calib-lines", type=int, default=24, help="lines: central calibration lines")
    parser.add_argument("--slices", type=int, default=4, help="slices per file, evenly spaced through the stack")
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--field-strength", type=float, default=0.05, help="B0 in tesla")
    parser.add_argument("--fov", type=float, default=220.0, help="field of view in mm (square)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("simulated"),
                        help="output folder (one file per source) or a .h5 path for a single source")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lab import images

    matrix = (args.matrix[0], args.matrix[-1])
    lines = args.setting == "lines"
    setting = Setting(kind=args.setting, matrix=matrix, coils=args.coils or (8 if lines else 1),
                      noise_level=args.noise if args.noise is not None else (0.02 if lines else 0.2),
                      correlation=args.correlation, window_factor=args.window_factor,
                      acceleration=args.acceleration, calib_lines=args.calib_lines)
    protocol = Protocol(field_strength_t=args.field_strength, fov_mm=(args.fov, args.fov),
                        repetitions=args.repetitions)
    names = args.source or [n for n in images.SPLITS[args.split] if images.available(n)]
    if not names:
        log.error("no image source of split %r is installed (%s)", args.split,
                  ", ".join(f"{n}: {images.SOURCES[n].package}" for n in images.SPLITS[args.split]))
        return 1
    if args.output.suffix == ".h5" and len(names) > 1:
        log.error("--output %s names one file but %d sources were chosen", args.output, len(names))
        return 2
    jobs = []
    for name in names:
        try:
            stack = images.load_source(name, matrix, images.DEFAULT_ORIENTATIONS[args.split][:1])
        except images.SourceUnavailable as error:
            log.error("%s", error)
            return 1
        picks = np.unique(np.linspace(0, len(stack) - 1, min(args.slices, len(stack)) + 2).round().astype(int)[1:-1])
        picks = picks if len(picks) else np.arange(min(args.slices, len(stack)))
        scan = Scan(stack[picks], setting, seed=args.seed)
        path = args.output if args.output.suffix == ".h5" else \
            args.output / f"{name}_{setting.kind}_{matrix[0]}x{matrix[1]}_seed{args.seed}.h5"
        jobs.append((name, picks, scan, path))
    total = sum(count_acquisitions(scan, protocol) for _, _, scan, _ in jobs)
    with tqdm(total=total, unit="acq", desc="simulate") as bar:
        for name, picks, scan, path in jobs:
            source = images.SOURCES[name]
            write_ismrmrd(path, scan, protocol, progress=bar.update,
                          attrs={"source": name, "subject": source.subject, "split": args.split,
                                 "slice_index": picks})
            log.info("wrote %s (%d slices, %d coils)", path, scan.slices, setting.coils)
    return 0
