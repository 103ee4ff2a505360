"""What the reconstruction needs from the ISMRMRD XML header: the first encoding's matrices, fields of view,
readout oversampling, k-space centre, encoding limits and acceleration (:class:`Encoding`, :func:`read_encoding`),
and the facts chain rules test (:func:`header_facts`). One attribute walker, :func:`header_value`, reads the parsed
header (``ismrmrd.xsd.ismrmrdHeader``), whose absent elements are None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cdl_lambda.gadgets.errors import InputError

log = logging.getLogger(__name__)

COUNTERS = ("slice", "contrast", "phase", "repetition", "set", "average")
MAX_MATRIX_VALUES = 2**27          # encoded voxels (x·y·z) one image may have


def header_value(obj, *path, default=None):
    """``obj.a.b.c`` for ``path`` ("a", "b", "c"), or ``default`` where any step is missing or None (the parsed
    ISMRMRD header leaves absent elements None)."""
    for name in path:
        obj = getattr(obj, name, None) if obj is not None else None
    return default if obj is None else obj


@dataclass
class Encoding:
    """What the buffer needs from the ISMRMRD header's first encoding (sizes in samples, fields of view in mm)."""

    nx_raw: int            # encoded readout samples (with oversampling)
    ny: int                # phase-encoding rows (E1)
    nz: int                # partitions (E2); 1 for 2-D
    recon_matrix: tuple    # (x, y, z)
    oversampling: int      # readout oversampling factor (encoded/recon field of view)
    e1_center: int
    e2_center: int
    encoded_fov: tuple     # (x, y, z) mm
    recon_fov: tuple       # (x, y, z) mm
    limits: dict           # counter name → maximum (only those present in the header)
    calibration_mode: str  # "embedded", "interleaved", "separate", ... or "" when absent
    receiver_channels: int | None
    image_matrix: tuple = (0, 0)        # (y, x) k-space grid the images are reconstructed on
    image_fov: tuple = (0.0, 0.0, 0.0)  # (x, y, z) mm of that grid (the recon space when the FOVs agree)
    e1_range: tuple | None = None       # (minimum, maximum) E1 counter of the encoding limits; None when absent
    e2_range: tuple | None = None       # the same for E2 (3-D)
    acceleration: tuple = (1, 1)        # parallelImaging accelerationFactor (E1, E2) as the header states it

    @property
    def is_3d(self) -> bool:
        return self.nz > 1


def readout_oversampling(nx_raw: int, recon_x: int, encoded_fov_x: float, recon_fov_x: float) -> int:
    """The readout oversampling factor, decided as Gadgetron's ``RemoveROOversamplingGadget`` does: from the fields
    of view, encoded FOV / recon FOV along x (1 when they agree), whatever the matrix sizes; from the matrices
    (raw samples / recon x, when the raw readout is longer) only when the header gives no fields of view.
    InputError when the factor is not an integer or does not divide the readout."""
    if encoded_fov_x > 0 and recon_fov_x > 0:
        ratio = encoded_fov_x / recon_fov_x
    elif recon_x and nx_raw > recon_x:
        ratio = nx_raw / recon_x
    else:
        return 1
    factor = max(1, int(round(ratio)))
    if ratio < 1 - 1e-3 or abs(ratio - factor) > 0.01 * factor:
        raise InputError(f"encoded readout field of view {encoded_fov_x} mm is not an integer multiple of the recon "
                         f"field of view {recon_fov_x} mm")
    if nx_raw % factor:
        raise InputError(f"readout of {nx_raw} samples is not divisible by the oversampling factor {factor}")
    return factor


def image_grid(encoded: tuple, recon: tuple, encoded_fov: tuple, recon_fov: tuple) -> tuple[tuple, tuple]:
    """(matrix (y, x), field of view (x, y, z) mm) the images are reconstructed on: along y and x (``encoded``
    (y, x) samples over ``encoded_fov`` (y, x) mm, oversampling removed), the recon matrix when the encoded and
    recon fields of view agree (k-space zero-padded or cropped around its centre: Gadgetron's zero-filling to the
    recon space), else the encoded grid as it is."""
    matrix, fov = [], []
    for axis, (n, r, efov, rfov) in enumerate(zip(encoded, recon, encoded_fov, (recon_fov[1], recon_fov[0]))):
        agree = r > 0 and (efov <= 0 or rfov <= 0 or abs(efov - rfov) <= 0.01 * rfov)
        matrix.append(r if agree else n)
        fov.append(rfov if agree and rfov > 0 else efov)
    return (matrix[0], matrix[1]), (fov[1], fov[0], recon_fov[2])


def read_encoding(header) -> Encoding:
    """Parse ``header`` (``ismrmrd.xsd.ismrmrdHeader``); InputError naming the missing or unsupported field."""
    encodings = header_value(header, "encoding") or []
    if not encodings:
        raise InputError("ISMRMRD header has no <encoding> section")
    enc = encodings[0]
    trajectory = header_value(enc, "trajectory")
    trajectory = getattr(trajectory, "value", trajectory)
    if trajectory is not None and str(trajectory).lower() != "cartesian":
        raise InputError(f"trajectory {trajectory!r} is not supported: only Cartesian sampling can be reconstructed")
    size = header_value(enc, "encodedSpace", "matrixSize")
    rsize = header_value(enc, "reconSpace", "matrixSize")
    if size is None or not size.x or not size.y:
        raise InputError("ISMRMRD header lacks encodedSpace/matrixSize (x and y)")
    rsize = rsize if rsize is not None and rsize.x and rsize.y else size
    efov = header_value(enc, "encodedSpace", "fieldOfView_mm")
    rfov = header_value(enc, "reconSpace", "fieldOfView_mm") or efov
    encoded_fov = (float(efov.x), float(efov.y), float(efov.z)) if efov is not None else (0.0, 0.0, 0.0)
    recon_fov = (float(rfov.x), float(rfov.y), float(rfov.z)) if rfov is not None else encoded_fov
    nx_raw, ny, nz = int(size.x), int(size.y), max(int(size.z or 1), 1)
    if nx_raw * ny * nz > MAX_MATRIX_VALUES:
        raise InputError(f"encoded matrix {nx_raw}×{ny}×{nz} is larger than the {MAX_MATRIX_VALUES} samples supported")
    oversampling = readout_oversampling(nx_raw, int(rsize.x), encoded_fov[0], recon_fov[0])
    image_matrix, image_fov = image_grid((ny, nx_raw // oversampling), (int(rsize.y), int(rsize.x)),
                                         (encoded_fov[1], encoded_fov[0] / oversampling), recon_fov)
    limits_node = header_value(enc, "encodingLimits")
    limits = {}
    e1_range = e2_range = None
    e1_center, e2_center = ny // 2, nz // 2
    if limits_node is None:
        log.warning("ISMRMRD header lacks encodingLimits: assuming the k-space centre at row %d", e1_center)
    else:
        e1 = header_value(limits_node, "kspace_encoding_step_1")
        e2 = header_value(limits_node, "kspace_encoding_step_2")
        if e1 is not None and e1.center is not None:
            e1_center = int(e1.center)
        if e2 is not None and e2.center is not None and nz > 1:
            e2_center = int(e2.center)
        e1_range = _limit_range(e1)
        e2_range = _limit_range(e2) if nz > 1 else None
        for name in COUNTERS:
            limit = header_value(limits_node, name)
            if limit is not None and limit.maximum is not None:
                limits[name] = int(limit.maximum)
    mode = header_value(enc, "parallelImaging", "calibrationMode")
    mode = str(getattr(mode, "value", mode) or "")
    channels = header_value(header, "acquisitionSystemInformation", "receiverChannels")
    factor = header_value(enc, "parallelImaging", "accelerationFactor")
    acceleration = (max(int(header_value(factor, "kspace_encoding_step_1", default=1)), 1),
                    max(int(header_value(factor, "kspace_encoding_step_2", default=1)), 1))
    return Encoding(nx_raw=nx_raw, ny=ny, nz=nz, recon_matrix=(int(rsize.x), int(rsize.y), max(int(rsize.z or 1), 1)),
                    oversampling=oversampling, image_matrix=image_matrix, image_fov=image_fov, e1_center=e1_center,
                    e2_center=e2_center, encoded_fov=encoded_fov,
                    recon_fov=recon_fov, limits=limits, calibration_mode=mode,
                    receiver_channels=int(channels) if channels else None, e1_range=e1_range, e2_range=e2_range,
                    acceleration=acceleration)


def _limit_range(limit) -> tuple | None:
    """(minimum, maximum) of an encoding limit, or None when the header does not give both."""
    if limit is None or limit.minimum is None or limit.maximum is None or int(limit.maximum) < int(limit.minimum):
        return None
    return int(limit.minimum), int(limit.maximum)


def header_facts(header) -> dict:
    """The header fields chain rules can test: protocol_name, sequence_type, field_strength_T, matrix (the larger
    of the recon matrix's x and y)."""
    facts = {"protocol_name": header_value(header, "measurementInformation", "protocolName"),
             "sequence_type": header_value(header, "sequenceParameters", "sequence_type"),
             "field_strength_T": header_value(header, "acquisitionSystemInformation", "systemFieldStrength_T"),
             "matrix": None}
    encodings = header_value(header, "encoding") or []
    size = header_value(encodings[0], "reconSpace", "matrixSize") if encodings else None
    if size is not None:
        facts["matrix"] = max(int(size.x or 0), int(size.y or 0))
    if isinstance(facts["sequence_type"], list):
        facts["sequence_type"] = facts["sequence_type"][0] if facts["sequence_type"] else None
    return facts
