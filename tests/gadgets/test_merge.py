"""gadgets.merge: the images of a distributed scan sorted, numbered per series, and a missing slice put in its place
as a marked zero image at its interpolated position."""

from types import SimpleNamespace

import ismrmrd
import numpy as np
import pytest

from cdl_lambda.gadgets import merge


def image(slice_, contrast=0, index=1, series=1, z=None):
    im = ismrmrd.Image.from_array(np.full((6, 8), 1.0 + slice_, np.float32))
    im.slice, im.contrast, im.image_index, im.image_series_index = slice_, contrast, index, series
    im.position[:] = (1.0, 2.0, 5.0 * slice_ + 3.0 if z is None else z)
    im.slice_dir[:] = (0.0, 0.0, 1.0)
    meta = ismrmrd.Meta()
    meta["CDL_Chain"], meta["CDL_ResidualToNoise"], meta["WindowCenter"] = "cdl-lambda", "1.0", "10"
    im.meta = meta
    return im


def test_images_are_sorted_and_numbered_per_series():
    arrived = [image(3, index=1), image(0, contrast=1, index=1), image(0, index=2), image(2, index=1),
               image(1, index=1), image(1, series=2, index=1)]
    merged, missing = merge.merge(arrived, "slice", None)
    assert missing == []
    assert [(im.image_series_index, im.slice, im.contrast) for im in merged] == [
        (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 2, 0), (1, 3, 0), (2, 1, 0)]
    assert [im.image_index for im in merged] == [1, 2, 3, 4, 5, 1]


def test_a_missing_slice_is_marked_in_its_place_at_its_position():
    arrived = [image(s, contrast=c) for s in (0, 2, 3) for c in (0, 1)]
    merged, missing = merge.merge(arrived, "slice", 4)
    assert missing == ["slice 1 (series 1)", "slice 1 (series 1)"]
    assert [(im.slice, im.contrast) for im in merged] == [(s, c) for s in range(4) for c in (0, 1)]
    for marked in [im for im in merged if im.slice == 1]:
        assert not np.asarray(marked.data).any() and marked.data.shape == arrived[0].data.shape
        assert np.allclose(marked.position, (1.0, 2.0, 8.0))  # halfway between slices 0 (3 mm) and 2 (13 mm)
        assert "NOT RECONSTRUCTED" in marked.meta["GADGETRON_ImageComment"]
        assert "interpolated from slices 0 and 2" in marked.meta["CDL_NotReconstructed"]
        assert "CDL_ResidualToNoise" not in marked.meta and marked.meta["CDL_Chain"] == "cdl-lambda"
    assert [im.image_index for im in merged] == list(range(1, 9))


def test_missing_end_slices_are_extrapolated_and_a_lone_slice_says_so():
    merged, _ = merge.merge([image(1), image(2)], "slice", 4)
    assert [im.slice for im in merged] == [0, 1, 2, 3]
    assert np.isclose(merged[0].position[2], 3.0) and np.isclose(merged[3].position[2], 18.0)
    merged, _ = merge.merge([image(1)], "slice", 2)
    assert "no second slice to interpolate" in merged[0].meta["CDL_NotReconstructed"]


@pytest.mark.parametrize("limits, expected", [(None, None), (3, 4)])
def test_expected_count_from_the_header(limits, expected):
    """``encodingLimits.slice.maximum + 1`` of the parsed header (the attributes ismrmrd.xsd gives)."""
    slice_limit = None if limits is None else SimpleNamespace(minimum=0, maximum=limits, center=0)
    header = SimpleNamespace(encoding=[SimpleNamespace(encodingLimits=SimpleNamespace(slice=slice_limit))])
    assert merge.expected_count(header, "slice") == expected
    assert merge.expected_count(SimpleNamespace(encoding=[]), "slice") is None
