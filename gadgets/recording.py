"""Recorded ISMRMRD 1 files, read for replay: the header, the acquisition count and the acquisitions in blocks
(:func:`read_recording`), and how many images the file should give (:func:`expected_images`, for progress)."""

from __future__ import annotations

from pathlib import Path

import h5py
import ismrmrd
import numpy as np

CHUNK = 256  # acquisitions per HDF5 read


def read_recording(path: str | Path, dataset: str = "dataset"):
    """(header XML bytes, acquisition count, iterator of acquisitions) of an ISMRMRD file; ValueError on a file that
    is missing, truncated or not ISMRMRD.

    Read with h5py in blocks of ``CHUNK`` records rather than ``ismrmrd.Dataset.read_acquisition`` one record at a
    time: a long scan streams without a Python call per HDF5 read, and a truncated file or a record whose sample
    count disagrees with its header is named (which record, what it holds) instead of failing inside the reader.
    The records are still decoded by ``ismrmrd.Acquisition`` (and files are written with ``ismrmrd.Dataset``)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"cannot read {path}: not a readable HDF5 file ({error})") from None
    if dataset not in handle or "xml" not in handle[dataset]:
        handle.close()
        raise ValueError(f"{path} has no ISMRMRD dataset {dataset!r} with an XML header")
    group = handle[dataset]
    header = group["xml"][0]
    header = header.encode() if isinstance(header, str) else bytes(header)
    count = group["data"].shape[0] if "data" in group else 0

    def acquisitions():
        try:
            for start in range(0, count, CHUNK):
                try:
                    block = group["data"][start:start + CHUNK]
                except (OSError, KeyError) as error:
                    raise ValueError(f"{path}: acquisitions {start}… are unreadable (truncated file?): {error}") \
                        from None
                for record in block:
                    acq = ismrmrd.Acquisition(record["head"])
                    values = record["data"].view(np.complex64)
                    if values.size != acq.active_channels * acq.number_of_samples:
                        raise ValueError(f"{path}: acquisition {acq.scan_counter} holds {values.size} samples, its "
                                         f"header says {acq.active_channels}×{acq.number_of_samples}")
                    acq.data[:] = values.reshape(acq.active_channels, acq.number_of_samples)
                    if acq.traj.size:
                        acq.traj[:] = record["traj"].reshape(acq.number_of_samples, acq.trajectory_dimensions)
                    yield acq
        finally:
            handle.close()

    return header, count, acquisitions()


def expected_images(path: str | Path, dataset: str = "dataset") -> int | None:
    """How many 2-D images the file's acquisitions should give (distinct slice/contrast/phase/repetition/set/average
    counters of its non-noise readouts, times its partitions), for the progress bar; None when unreadable."""
    try:
        with h5py.File(path, "r") as handle:
            heads = handle[dataset]["data"].fields("head")[:]
            xml = handle[dataset]["xml"][0]
    except (OSError, KeyError, ValueError):
        return None
    imaging = (heads["flags"] & (1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))) == 0
    idx = heads["idx"][imaging]
    keys = {tuple(row) for row in zip(*(idx[name] for name in ("slice", "contrast", "phase", "repetition", "set",
                                                                "average")))}
    try:
        from cdl_lambda.gadgets.encoding import read_encoding
        partitions = read_encoding(ismrmrd.xsd.CreateFromDocument(xml)).nz
    except Exception:  # noqa: BLE001 - only the progress bar's total depends on it
        partitions = 1
    return len(keys) * partitions or None
