"""Shared fixtures: ISMRMRD files from Debian's ``ismrmrd_generate_cartesian_shepp_logan`` and a fast warm server.
Plain builders live in ``support.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import FAST_REGISTRY, make_shepp_logan


@pytest.fixture(scope="session")
def accelerated_file(tmp_path_factory) -> Path:
    """64², 4 coils, 2× oversampling, R=2 with 16 calibration lines, 4 repetitions (-r 2 -a 2), noise scan."""
    folder = tmp_path_factory.mktemp("sl_accel")
    return make_shepp_logan(folder / "accel.h5", matrix=64, coils=4, repetitions=2, acceleration=2, calibration=16)


@pytest.fixture(scope="session")
def simple_file(tmp_path_factory) -> Path:
    """64², 2 coils, 2× oversampling, fully sampled, one repetition, noise scan."""
    folder = tmp_path_factory.mktemp("sl_simple")
    return make_shepp_logan(folder / "simple.h5", matrix=64, coils=2)


@pytest.fixture(scope="session")
def registry():
    from cdl_lambda.gadgets.chains import ChainRegistry
    return ChainRegistry(data=FAST_REGISTRY)


@pytest.fixture(scope="session")
def cache():
    from cdl_lambda.gadgets.settings import ReconstructorCache
    return ReconstructorCache()


@pytest.fixture()
def server(cache, registry):
    from cdl_lambda.gadgets.server import Server
    srv = Server("127.0.0.1", 0, cache=cache, registry=registry)
    thread = srv.start()
    yield srv
    srv.stop()
    thread.join(timeout=30)
