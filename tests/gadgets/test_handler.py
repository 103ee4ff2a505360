"""The gadget without sockets: parameters, 3-D scans through ScanSession, errors isolated per slice."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.gadgets.scan import ScanSession
from cdl_lambda.gadgets.settings import Parameters, ReconstructorCache, properties_of
from cdl_lambda.gadgets.wire import parse_xml_safely
from cdl_lambda.recon import fft as _fft
from support import acquisition, header


def test_parameters_from_properties_and_checks():
    config = parse_xml_safely('<configuration><property name="iterations" value="7"/>'
                              '<property name="send_zero_filled" value="true"/></configuration>', "config")
    params = Parameters.from_sources({"iterations": 64}, properties_of(config))
    assert params.iterations == 7 and params.send_zero_filled is True
    with pytest.raises(InputError, match="iterations"):
        Parameters.from_sources({"iterations": "many"})
    for bad in ("../../etc/passwd", "/tmp/evil.pt", "x.pt"):
        with pytest.raises(InputError, match="not a path"):
            Parameters.from_sources({"dictionary": bad})
    assert properties_of(None) == {}


def test_dictionary_scale_property_is_auto_or_a_number_in_range():
    assert Parameters.from_sources({}).dictionary_scale == "auto"
    assert Parameters.from_sources({"dictionary_scale": "1"}).dictionary_scale == 1.0
    assert Parameters.from_sources({"dictionary_scale": " 2.5 "}).dictionary_scale == 2.5
    for bad in ("0", "-1", "twice", "20", "nan"):
        with pytest.raises(InputError, match="dictionary_scale"):
            Parameters.from_sources({"dictionary_scale": bad})
    scaled = Parameters.from_sources({"dictionary_scale": "1"}).reconstructor_arguments()
    assert scaled["dictionary_scale"] == 1.0 and Parameters().reconstructor_arguments()["dictionary_scale"] == "auto"


@pytest.fixture(scope="module")
def reconstructor():
    return ReconstructorCache().get(Parameters(iterations=4))


def test_3d_scan_transforms_along_k2_and_returns_partitions(reconstructor):
    nz, ny, nx, coils = 4, 16, 16, 2
    volume = np.zeros((nz, ny, nx), np.complex64)
    volume[:, 4:12, 4:12] = (1 + np.arange(nz))[:, None, None]
    maps = np.ones((coils, 1, 1, 1), np.complex64) / np.sqrt(coils)
    import torch
    k3 = _fft.fft1c(_fft.fft2c(torch.from_numpy(volume * maps)), dim=-3).numpy()  # (coils, nz, ny, nx)
    sent = []
    scan = ScanSession(header(nx=nx, ny=ny, nz=nz), Parameters(iterations=4), reconstructor, "test", sent.append)
    for e2 in range(nz):
        for e1 in range(ny):
            acq = acquisition(e1, samples=nx, coils=coils, e2=e2,
                              flags=(ismrmrd.ACQ_LAST_IN_SLICE,) if (e1, e2) == (ny - 1, nz - 1) else ())
            acq.data[:] = k3[:, e2, e1, :]
            acq.slice_dir[:] = (0, 0, 1)
            scan.on_item(acq)
    scan.finish()
    assert scan.failures == []
    assert [im.slice for im in sent] == [0, 1, 2, 3]
    means = [float(im.data[0, 0, 6:10, 6:10].mean()) for im in sent]
    assert np.all(np.diff(means) > 0)  # partition intensities 1, 2, 3, 4 in order
    positions = [im.position[2] for im in sent]
    assert np.allclose(np.diff(positions), 5.0)  # fov_z / nz along slice_dir
    assert [im.image_index for im in sent] == [1, 2, 3, 4]


def _three_slices_the_middle_one_bad(params, reconstructor):
    """A 3-slice scan whose slice 1 holds an Inf sample: (the session, the items it sent)."""
    sent = []
    scan = ScanSession(header(slices=3), params, reconstructor, "test", sent.append)
    for s in range(3):
        for e1 in range(16):
            acq = acquisition(e1, slice_=s, flags=(ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == 15 else (),
                              value=np.inf if (s, e1) == (1, 3) else 1.0)
            scan.on_item(acq)
    scan.finish()
    return scan, sent


def test_one_bad_slice_does_not_stop_the_others(reconstructor):
    scan, sent = _three_slices_the_middle_one_bad(Parameters(iterations=4), reconstructor)
    assert [im.slice for im in sent] == [0, 2]
    assert len(scan.failures) == 1 and "slice 1" in scan.failures[0]


def test_bad_slice_reported_in_its_place_with_slice_errors_report(reconstructor):
    scan, sent = _three_slices_the_middle_one_bad(Parameters(iterations=4, slice_errors="report"), reconstructor)
    assert [im.slice for im in sent] == [0, 1, 2] and [im.image_index for im in sent] == [1, 2, 3]
    assert len(scan.failures) == 1 and scan.reconstructed == 2
    comment = sent[1].meta["GADGETRON_ImageComment"]
    assert comment.startswith("CDL-Lambda: NOT RECONSTRUCTED") and "NaN/Inf" in comment
    assert sent[1].meta["ImageComments"] == comment and "NaN/Inf" in sent[1].meta["CDL_NotReconstructed"]
    assert not np.abs(sent[1].data).any() and sent[1].data.shape == sent[0].data.shape
    assert "NOT RECONSTRUCTED" not in sent[0].meta["GADGETRON_ImageComment"]
    with pytest.raises(InputError, match="slice_errors"):
        Parameters.from_sources({"slice_errors": "ignore"})


def test_after_the_peer_has_gone_the_slices_still_to_do_are_dropped_not_failed(reconstructor):
    """The peer goes after the first image: the next complete slice and the one still open at the end of the
    stream are counted as dropped, nothing more is sent and nothing is reported as a failure (no one to tell)."""
    sent, gone = [], []
    scan = ScanSession(header(slices=3), Parameters(iterations=4), reconstructor, "test", sent.append,
                       peer_gone=lambda: bool(gone))
    for s in range(3):
        for e1 in range(16 if s < 2 else 8):  # slice 2 is cut off half way
            scan.on_item(acquisition(e1, slice_=s, flags=(ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == 15 else ()))
        if s == 0:
            assert [im.slice for im in sent] == [0]
            gone.append(True)
    scan.finish(complete=False)
    assert [im.slice for im in sent] == [0] and scan.failures == []
    assert scan.abandoned == 2 and scan.reconstructed == 1
