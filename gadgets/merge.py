"""The merge after Gadgetron's ``<distributed>`` node (``chains/cdl_lambda_distributed.xml``): images from several
workers in, one ordered and complete series out.

Gadgetron target ``<execute name="cdl_lambda.gadgets.merge" target="MergeGadget" type="python"/>`` on the main node
(a light process: no torch). It holds the images until the scan ends, then sends them sorted by series, slice, contrast,
phase, repetition, set and average, numbered 1, 2, … per series (each worker numbers its own from 1). A value of the
split dimension (property ``dimension``: ``slice`` as the distributor splits, or ``repetition``) that the header's
encoding limits announce but from which no image came back — its worker died or was unreachable — is sent in its
place as a zero image marked NOT RECONSTRUCTED (``GADGETRON_ImageComment``, ``ImageComments``,
``CDL_NotReconstructed``), with the counters and geometry of its neighbours: the position interpolated (or
extrapolated) linearly in the slice number from the two nearest images that did come back, and said so in the
reason. The series stays complete in count and position, and the operator sees which slice is missing where they
look. When no image came back at all the gadget sends an ERROR: an empty series must not look like success.
"""

from __future__ import annotations

import copy
import logging

import ismrmrd
import numpy as np

from cdl_lambda.gadgets.connection import RobustConnection
from cdl_lambda.gadgets.image_output import mark_not_reconstructed
from cdl_lambda.gadgets.settings import properties_of

log = logging.getLogger(__name__)

DIMENSIONS = ("slice", "repetition")
ORDER = ("image_series_index", "slice", "contrast", "phase", "repetition", "set", "average")
PER_SLICE_META = ("CDL_NoiseStd", "CDL_NoiseSource", "CDL_ResidualToNoise", "CDL_Readouts",  # measured per slice
                  "CDL_BackgroundWeight", "CDL_BackgroundDisagreement", "CDL_BackgroundWeightKept")


def expected_count(header, dimension: str) -> int | None:
    """How many values of ``dimension`` the scan has (``encodingLimits.<dimension>.maximum + 1``), or None."""
    try:
        limit = getattr(header.encoding[0].encodingLimits, dimension)
        return None if limit is None or limit.maximum is None else int(limit.maximum) + 1
    except (AttributeError, IndexError, TypeError):
        return None


def _group(image, dimension: str) -> tuple:
    return tuple(int(getattr(image, name)) for name in ORDER if name != dimension)


def placeholder(reference, value: int, dimension: str, present: list) -> ismrmrd.Image:
    """A zero image for ``dimension`` = ``value`` built from ``reference`` (an image of the same group);
    ``present``: (value, image) of the group's images that came back, for the position."""
    image = ismrmrd.Image.from_array(np.zeros_like(reference.data))
    image.setHead(copy.deepcopy(reference.getHead()))
    setattr(image, dimension, value)
    note = ""
    if dimension == "slice" and len(present) >= 2:
        (a, first), (b, second) = sorted(present, key=lambda p: (abs(p[0] - value), p[0]))[:2]
        start, end = np.asarray(first.position, float), np.asarray(second.position, float)
        image.position[:] = start + (value - a) * (end - start) / (b - a)
        note = f"; position interpolated from slices {min(a, b)} and {max(a, b)}"
    elif dimension == "slice":
        note = f"; position that of slice {int(getattr(reference, dimension))} (no second slice to interpolate)"
    meta = ismrmrd.Meta()
    for key in reference.meta.keys():
        if key not in PER_SLICE_META:
            meta[key] = reference.meta[key]
    mark_not_reconstructed(meta, f"no image came back for {dimension} {value} from its worker (distributed chain: "
                                 f"the worker failed or was unreachable, see the main node's log){note}")
    image.meta = meta
    return image


def merge(images: list, dimension: str, count: int | None) -> tuple[list, list]:
    """(images sorted and numbered per series with placeholders for missing ``dimension`` values, descriptions of
    what was missing)."""
    groups: dict[tuple, list] = {}
    for image in images:
        groups.setdefault(_group(image, dimension), []).append(image)
    missing = []
    result = list(images)
    if count is not None:
        for key, members in groups.items():
            present = {int(getattr(m, dimension)): m for m in members}
            for value in range(count):
                if value not in present:
                    nearest = min(present, key=lambda v: (abs(v - value), v))
                    result.append(placeholder(present[nearest], value, dimension, sorted(present.items())))
                    missing.append(f"{dimension} {value} (series {key[0]})")
    result.sort(key=lambda im: tuple(int(getattr(im, name)) for name in ORDER))
    numbers: dict[int, int] = {}
    for image in result:
        series = int(image.image_series_index)
        numbers[series] = numbers.get(series, 0) + 1
        image.image_index = numbers[series]
    return result, missing


class MergeGadget:
    """The Gadgetron target; ``handle(connection)`` serves one scan, never raises."""

    def handle(self, connection) -> int:
        original = connection
        connection = RobustConnection.adopt(connection) if not isinstance(connection, RobustConnection) else connection
        try:
            dimension = properties_of(connection.config).get("dimension", "slice")
            if dimension not in DIMENSIONS:
                raise ValueError(f"property dimension={dimension!r} must be one of {', '.join(DIMENSIONS)}")
            images = []
            for item in connection:
                if isinstance(item, ismrmrd.Image):
                    images.append(item)
                else:
                    connection.send(item)  # anything else passes at once
            if not images:
                connection.fail("CDL-Lambda merge: no image came back from any worker")
                return 0
            merged, missing = merge(images, dimension, expected_count(connection.header, dimension))
            for image in merged:
                connection.send(image)
            if missing:
                log.error("CDL-Lambda merge: %d part(s) missing, sent as images marked NOT RECONSTRUCTED: %s",
                          len(missing), ", ".join(missing))
            connection.close()
            return len(merged)
        except Exception as error:  # noqa: BLE001 - everything must reach the peer as an ERROR message
            log.exception("CDL-Lambda merge failed")
            connection.fail(f"CDL-Lambda merge failed: {type(error).__name__}: {error}")
            return 0
        finally:
            if original is not connection:
                original.socket = _Closed()


class _Closed:
    """Stands in for gadgetron's socket wrapper after we closed the socket (its exit would send CLOSE again)."""

    def close(self):
        pass
