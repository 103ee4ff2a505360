"""The ReconData path (Gadgetron's BucketToBufferGadget in front of the gadget) against the raw path on the same
scan: the same images to float tolerance, the same header and meta; lines chosen by the sampling, not by the blank
headers' version; calibration-only lines used as k-space."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from cdl_lambda.gadgets.scan import ScanSession
from cdl_lambda.gadgets.settings import Parameters, ReconstructorCache
from cdl_lambda.gadgets.slices import acquired_slots, from_recon_bit
from cdl_lambda.gadgets.wire import ImageArray, parse_ismrmrd_header
from support import bucket_to_buffer, ground_truth, make_shepp_logan, read_file, relative_error

PARAMS = Parameters(iterations=8)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """64², 4 coils, 2× readout oversampling, R = 2 interleaved over two repetitions with 16 calibration lines; no
    noise scan, so both paths see the same k-space (prewhitening in Gadgetron's NoiseAdjustGadget scales by the
    receiver noise bandwidth as the raw path does not; ``tests/system/test_gadgetron.py`` measures that)."""
    path = make_shepp_logan(tmp_path_factory.mktemp("recon_data") / "scan.h5", matrix=64, coils=4,
                            repetitions=1, acceleration=2, calibration=16, noise_scan=False)
    header, acquisitions = read_file(path)
    return path, header, acquisitions


@pytest.fixture(scope="module")
def both_paths(scan):
    _, header, acquisitions = scan
    parsed = parse_ismrmrd_header(header)
    reconstructor = ReconstructorCache().get(PARAMS)
    raw, buffered = [], []
    session = ScanSession(parsed, PARAMS, reconstructor, "cdl-lambda", raw.append)
    for acq in acquisitions:
        session.on_item(acq)
    session.finish()
    assert session.failures == []
    session = ScanSession(parsed, PARAMS, reconstructor, "cdl-lambda", buffered.append)
    for recon_data in bucket_to_buffer(acquisitions, ny=64, oversampling=2):
        session.on_item(recon_data)
    session.finish()
    assert session.failures == []
    return raw, buffered


def test_blank_headers_are_not_taken_for_acquired_lines(scan):
    _, _, acquisitions = scan
    second = bucket_to_buffer(acquisitions, ny=64, oversampling=2)[1].bits[0]
    headers = np.asarray(second.data.headers)
    assert all(h.version == 1 for h in headers.ravel())  # blank and acquired headers alike: version says nothing
    slots = acquired_slots(second.data, 0, 0, 0)[:, 0]
    assert slots[1::2].all() and not slots[0::2].any()    # repetition 1 imaged the odd lines
    (one,) = from_recon_bit(second)
    assert one.key.repetition == 1 and one.reference.idx.repetition == 1
    # the calibration-only even lines near the centre were measured in repetition 1 and are used as k-space
    assert one.mask[24:40].all() and one.readouts == 32 + 8
    assert one.reference.idx.kspace_encode_step_1 == 32


def test_buffered_images_equal_raw_images(scan, both_paths):
    path, _, _ = scan
    raw, buffered = both_paths
    assert len(raw) == 2 and len(buffered) == 2 and all(isinstance(b, ImageArray) for b in buffered)
    truth = ground_truth(path)
    for image, array in zip(raw, buffered):
        pixels = array.data[:, :, 0, 0, 0, 0, 0].T
        assert array.data.dtype == np.complex64 and not np.abs(pixels.imag).any()
        np.testing.assert_allclose(pixels.real, image.data[0, 0], rtol=1e-5, atol=1e-6 * np.abs(image.data).max())
        assert relative_error(pixels.real, truth) < 0.5


def test_buffered_headers_and_meta_equal_raw(both_paths):
    raw, buffered = both_paths
    for image, array in zip(raw, buffered):
        head = array.headers[0, 0, 0]
        assert head.data_type == ismrmrd.DATATYPE_CXFLOAT and tuple(head.matrix_size) == (64, 64, 1)
        for name in ("repetition", "slice", "contrast", "image_index", "image_series_index", "image_type",
                     "measurement_uid", "acquisition_time_stamp"):
            assert getattr(head, name) == getattr(image, name), name
        for name in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position", "field_of_view"):
            assert np.allclose(getattr(head, name), getattr(image, name)), name
        meta = ismrmrd.Meta.deserialize(array.meta[0])
        assert dict(meta) == dict(image.meta)


@pytest.mark.parametrize("policy", ["report", "fail"])
def test_a_bad_image_in_recon_data(scan, policy):
    """``slice_errors=report``: the bad image's slot is a zero image marked NOT RECONSTRUCTED; ``fail``: only the
    good array is sent (the ERROR follows from the handler)."""
    _, header, acquisitions = scan
    first, second = bucket_to_buffer(acquisitions, ny=64, oversampling=2)
    np.asarray(first.bits[0].data.data)[5, 10, 0, 1, 0, 0, 0] = np.nan
    sent = []
    params = Parameters(iterations=8, slice_errors=policy)
    session = ScanSession(parse_ismrmrd_header(header), params, ReconstructorCache().get(params), "cdl-lambda",
                          sent.append)
    session.on_item(first)
    session.on_item(second)
    session.finish()
    assert len(session.failures) == 1 and "NaN" in session.failures[0] and "repetition 0" in session.failures[0]
    assert session.reconstructed == 1
    if policy == "fail":
        assert len(sent) == 1 and sent[0].headers[0, 0, 0].repetition == 1
        return
    bad, good = (ismrmrd.Meta.deserialize(a.meta[0]) for a in sent)
    assert "NOT RECONSTRUCTED" in bad["GADGETRON_ImageComment"] and "NaN" in bad["CDL_NotReconstructed"]
    assert not np.abs(sent[0].data).any() and np.abs(sent[1].data).any() and "NOT" not in good["ImageComments"]
    assert sent[0].headers[0, 0, 0].repetition == 0 and sent[1].headers[0, 0, 0].repetition == 1
