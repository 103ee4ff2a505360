"""Writing a simulated scan as an ISMRMRD file (through ``ismrmrd.Dataset``), as a low-field scanner would, and
reading back its ground truth.

File layout: the XML header, ``noise_readouts`` noise acquisitions, then the image acquisitions (see
:func:`write_ismrmrd`), each ``data`` ``(coils, oversampling·nx_enc)`` complex64. The ground truth lies in the HDF5
group ``/dataset/reference`` (``image`` ``(slices, ny, nx)``, ``coil_maps``, ``mask``, ``noise_covariance`` and
attributes; see :func:`read_reference`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np

from cdl_lambda.lab.acquisition import Scan

GAMMA_BAR_HZ_PER_T = 42.577478518e6


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
    x = ismrmrd.xsd

    setting = scan.setting
    ny, nx = setting.matrix
    wy, wx = setting.encoded
    fy, fx = protocol.fov_mm
    os_ = setting.oversampling
    limit = lambda maximum, center=0: x.limitType(minimum=0, maximum=maximum, center=center)  # noqa: E731 - a one-line helper reads best as a lambda here
    space = lambda mx, my, fov_x, fov_y: x.encodingSpaceType(  # noqa: E731 - a one-line helper reads best as a lambda here
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
    with h5py.File(path, "r") as f:
        ref = f["dataset/reference"]
        out = {name: ref[name][()] for name in ref}
        out.update({k: (v.decode() if isinstance(v, bytes) else v) for k, v in ref.attrs.items()})
    return out
