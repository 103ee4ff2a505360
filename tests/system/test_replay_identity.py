"""Replaying the bundled example gives the recorded image, pixel for pixel (see tests/fixtures/README.md)."""

from pathlib import Path

import numpy as np

from gadgets.replay import EXAMPLE, replay

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "replay_example_fast.npz"


def test_replay_of_the_bundled_example_is_bit_identical_to_the_recording():
    expected = np.load(FIXTURE)["image_1"]
    result = replay(EXAMPLE, config="cdl-lambda-fast")
    assert not result.errors
    assert [int(image.image_series_index) for image in result.images] == [1]
    pixels = result.images[0].data[0, 0]
    assert pixels.dtype == expected.dtype and pixels.shape == expected.shape == (128, 128)
    assert np.array_equal(pixels, expected)
