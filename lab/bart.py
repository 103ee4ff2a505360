"""The classical ℓ1-wavelet compressed-sensing reference: BART's ``pics`` through its command-line tool.

Arrays travel as BART ``.cfl``/``.hdr`` pairs (complex64, column-major, dimensions [PHS1, READ... ] as given).
Single-coil k-space ``(B, ny, nx)`` (centred layout, zeros where not measured) is reconstructed slice by slice with
all-ones sensitivities: ``bart pics -S -l1 -r λ kspace sens out`` (``-S`` re-scales the result to the units of the
data). ``OMP_NUM_THREADS`` is set to 1 unless the caller sets it (timings on a shared machine swing otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def available() -> bool:
    return shutil.which("bart") is not None


def write_cfl(base: Path, array: np.ndarray) -> None:
    """Write ``base.hdr`` / ``base.cfl`` for a complex array (first axis = BART dimension 0)."""
    array = np.asarray(array, dtype=np.complex64)
    Path(f"{base}.hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in array.shape) + "\n")
    np.asfortranarray(array).ravel(order="F").tofile(f"{base}.cfl")


def read_cfl(base: Path) -> np.ndarray:
    dims = [int(n) for n in Path(f"{base}.hdr").read_text().splitlines()[1].split()]
    data = np.fromfile(f"{base}.cfl", dtype=np.complex64)
    return data.reshape(dims, order="F")


def pics(kspace: np.ndarray, regularization: float = 0.01, extra: tuple[str, ...] = ()) -> np.ndarray:
    """ℓ1-wavelet CS reconstruction of centred single-coil k-space ``(B, ny, nx)`` → complex ``(B, ny, nx)``."""
    if not available():
        raise RuntimeError("the `bart` command is not installed (apt-get install bart)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in np.asarray(kspace):
            write_cfl(tmp / "k", k[:, :, None, None])
            write_cfl(tmp / "s", np.ones(k.shape + (1, 1), dtype=np.complex64))
            subprocess.run(["bart", "pics", "-S", "-l1", "-r", str(regularization), *extra,
                            str(tmp / "k"), str(tmp / "s"), str(tmp / "x")],
                           check=True, env=env, capture_output=True)
            out.append(read_cfl(tmp / "x").reshape(k.shape))
    return np.stack(out)


def ifft(kspace: np.ndarray) -> np.ndarray:
    """BART's centred unitary inverse FFT of ``(ny, nx)`` k-space (to check layout conventions)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cfl(tmp / "k", kspace[:, :, None])
        subprocess.run(["bart", "fft", "-u", "-i", "3", str(tmp / "k"), str(tmp / "x")], check=True,
                       capture_output=True)
        return read_cfl(tmp / "x").reshape(kspace.shape)


def _run(args: list[str]) -> None:
    if not available():
        raise RuntimeError("the `bart` command is not installed (apt-get install bart)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(["bart", *args], check=True, env=env, capture_output=True)


def _write_multicoil(base: Path, kspace: np.ndarray) -> None:
    """Centred multi-coil k-space ``(coils, ny, nx)`` as BART's [PHS/READ, READ/PHS, 1, COIL] array."""
    write_cfl(base, np.asarray(kspace).transpose(1, 2, 0)[:, :, None, :])


PICS_ITERATIONS = 30  # BART's own default for pics (FISTA/ADMM), passed explicitly so every run states it
ECALIB_CROPS = {"uncropped": 0.0, "cropped": 0.95}  # ecalib -c: maps set to 0 where the eigenvalue is below


def ecalib(kspace: np.ndarray, extra: tuple[str, ...] = ("-m1",)) -> np.ndarray:
    """BART's ESPIRiT maps ``(coils, ny, nx)`` complex64 of centred multi-coil k-space ``(coils, ny, nx)``."""
    coils, ny, nx = kspace.shape
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_multicoil(tmp / "k", kspace)
        _run(["ecalib", *extra, str(tmp / "k"), str(tmp / "s")])
        return read_cfl(tmp / "s").reshape(ny, nx, coils).transpose(2, 0, 1).copy()


def ecalib_maps(kspace: np.ndarray, crop: float) -> np.ndarray:
    """``bart ecalib -m1 -c crop`` maps ``(coils, ny, nx)``: one set, Σ_j |s_j|² = 1 where the calibration
    eigenvalue reaches ``crop`` and 0 elsewhere (``crop`` = 0: never cropped; BART's own default is 0.8)."""
    return ecalib(kspace, ("-m1", "-c", f"{crop:g}"))


def pics_multicoil(kspace: np.ndarray, regularization: tuple[str, ...], maps: np.ndarray | None = None,
                   iterations: int = PICS_ITERATIONS) -> np.ndarray:
    """``bart pics -S -i iterations <regularization>`` of centred multi-coil k-space ``(coils, ny, nx)``
    (prewhitened, zeros where not measured) with coil ``maps`` ``(coils, ny, nx)`` (None: ``bart ecalib -m1`` with
    BART's default crop) → complex ``(ny, nx)`` in the units of the data. ``-S`` undoes pics' automatic scaling of
    the data (without it the image comes back divided by BART's scale estimate, 5–19× too small on these scans);
    λ is relative to that scaled data."""
    _, ny, nx = kspace.shape
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_multicoil(tmp / "k", kspace)
        if maps is None:
            _run(["ecalib", "-m1", str(tmp / "k"), str(tmp / "s")])
        else:
            _write_multicoil(tmp / "s", maps)
        _run(["pics", "-S", "-i", str(iterations), *regularization, str(tmp / "k"), str(tmp / "s"), str(tmp / "x")])
        return read_cfl(tmp / "x").reshape(ny, nx)
