"""Image geometry: whatever the raw readout length, the images come back on the header's recon space (matrix and
field of view), for every setting ``cdl-lambda simulate`` writes and for Shepp-Logan files with 2× readout
oversampling from Debian's ``ismrmrd_generate_cartesian_shepp_logan``."""

from __future__ import annotations

import numpy as np
import pytest

from cdl_lambda.gadgets.buffer import read_encoding, readout_oversampling
from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.gadgets.replay import replay
from cdl_lambda.gadgets.wire import parse_ismrmrd_header
from support import make_shepp_logan, phantom, read_file


def _recon_space(header_bytes):
    enc = parse_ismrmrd_header(header_bytes).encoding[0]
    size, fov = enc.reconSpace.matrixSize, enc.reconSpace.fieldOfView_mm
    return (int(size.x), int(size.y)), (float(fov.x), float(fov.y))


def _assert_on_recon_space(path, iterations=2):
    header, _ = read_file(path)
    matrix, fov = _recon_space(header)
    result = replay(path, config="cdl-lambda", parameters={"iterations": str(iterations)})
    assert result.images and not result.errors, result.errors
    for image in result.images:
        assert image.data.shape[-2:] == (matrix[1], matrix[0])  # (y, x)
        assert tuple(image.matrix_size[:2]) == matrix
        assert tuple(image.field_of_view[:2]) == pytest.approx(fov)
    return result


@pytest.mark.parametrize("kind, coils", [("lowres", 1), ("lines", 4)])
def test_every_simulate_setting_comes_back_on_the_recon_space(tmp_path, kind, coils):
    from cdl_lambda.lab import acquisition, mrd_writer
    magnitudes = np.abs(phantom(48, 48).numpy())
    setting = acquisition.Setting(kind=kind, matrix=(48, 48), coils=coils, noise_level=0.01, calib_lines=12,
                                  acceleration=2.0)
    path = mrd_writer.write_ismrmrd(tmp_path / f"{kind}.h5", acquisition.Scan(magnitudes, setting, seed=1),
                                    mrd_writer.Protocol(noise_readouts=2))
    header, _ = read_file(path)
    enc = read_encoding(parse_ismrmrd_header(header))
    assert enc.oversampling == 2  # 2× readout oversampling, told by the fields of view
    if kind == "lowres":
        assert enc.nx_raw == 48  # raw readout as long as the recon matrix: the case the matrix rule missed
    result = _assert_on_recon_space(path)
    # the object fills the field of view as in the ground truth: its support is not squeezed into the middle half
    image = np.abs(result.images[0].data[0, 0])
    truth = np.abs(mrd_writer.read_reference(path)["image"][0])
    columns = lambda a: np.flatnonzero(a.max(axis=0) > 0.3 * a.max())  # noqa: E731 - a one-line helper reads best as a lambda here
    assert abs(columns(image)[0] - columns(truth)[0]) <= 2 and abs(columns(image)[-1] - columns(truth)[-1]) <= 2


def test_shepp_logan_with_2x_oversampling_comes_back_on_the_recon_space(tmp_path):
    path = make_shepp_logan(tmp_path / "sl.h5", matrix=64, coils=2, oversampling=2)
    header, _ = read_file(path)
    assert read_encoding(parse_ismrmrd_header(header)).oversampling == 2
    _assert_on_recon_space(path)


def test_oversampling_follows_the_fields_of_view():
    assert readout_oversampling(320, 320, 440.0, 220.0) == 2   # simulate's lowres: as long as the recon matrix
    assert readout_oversampling(256, 128, 440.0, 220.0) == 2
    assert readout_oversampling(256, 128, 220.0, 220.0) == 1   # longer readout, same FOV: not oversampled
    assert readout_oversampling(256, 128, 0.0, 0.0) == 2       # no FOVs: from the matrices
    with pytest.raises(InputError):
        readout_oversampling(300, 128, 330.0, 220.0)          # 1.5×: not an integer factor
