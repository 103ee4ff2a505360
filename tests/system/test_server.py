"""The warm server: scan after scan without reloading, isolation of a failing scan, localhost by default, and the
chain registry."""

from __future__ import annotations

import socket

import pytest

from support import FAST_REGISTRY, read_file, run_scan
from cdl_lambda.gadgets.chains import ChainError, ChainRegistry
from cdl_lambda.gadgets.settings import ReconstructorCache
from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE
from cdl_lambda.gadgets.client import Peer
from cdl_lambda.gadgets.server import Server
from cdl_lambda.gadgets.replay import replay


def test_two_scans_in_a_row_do_not_reload_weights(accelerated_file, registry):
    server = Server("127.0.0.1", 0, cache=ReconstructorCache(), registry=registry)
    thread = server.start()
    try:
        first = replay(accelerated_file, local_server=server, config="cdl-lambda")
        assert server.cache.loads == 1
        second = replay(accelerated_file, local_server=server, config="cdl-lambda")
        assert server.cache.loads == 1  # warm: the second scan reused the loaded reconstructor
        assert len(first.images) == len(second.images) == 4 and not first.errors and not second.errors
    finally:
        server.stop()
        thread.join(timeout=30)


def test_a_crashing_scan_does_not_take_the_server_down(accelerated_file, server):
    bad = socket.create_connection(("127.0.0.1", server.port))
    bad.sendall(b"\x07\x07garbage")
    bad.shutdown(socket.SHUT_WR)
    assert bad.recv(2) == b"\x08\x00"  # ERROR message
    bad.close()
    header, acquisitions = read_file(accelerated_file)
    replies = run_scan(Peer.connect("127.0.0.1", server.port), header, acquisitions, name="cdl-lambda")
    assert sum(m == MSG_IMAGE for m, _ in replies) == 4 and not any(m == MSG_ERROR for m, _ in replies)


def test_binds_localhost_by_default():
    server = Server(port=0)
    try:
        assert server.host == "127.0.0.1"
    finally:
        server.listener.close()


def test_registry_selection_by_name_rule_and_default():
    from cdl_lambda.gadgets.wire import parse_ismrmrd_header
    data = dict(FAST_REGISTRY, rules=FAST_REGISTRY["rules"] + [
        {"when": {"protocol_name": "*brain*", "field_strength_T": [0.01, 0.2]}, "chain": "cdl-lambda-research"}])
    registry = ChainRegistry(data=data)
    assert registry.select("cdl-lambda-research").name == "cdl-lambda-research"
    assert registry.select("cdl_lambda_research.xml").name == "cdl-lambda-research"
    assert registry.select("cdl_lambda.xml").name == "cdl-lambda"  # a shipped chain file: rules, then the default
    for unknown in ("anything.xml", "cdl-lamda-fats"):
        with pytest.raises(ChainError, match="unknown chain .*known chains: cdl-lambda, cdl-lambda-research"):
            registry.select(unknown)
    header = parse_ismrmrd_header(
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><measurementInformation><protocolName>T1 Brain'
        '</protocolName><patientPosition>HFS</patientPosition></measurementInformation><acquisitionSystemInformation><systemFieldStrength_T>0.064'
        '</systemFieldStrength_T></acquisitionSystemInformation><experimentalConditions><H1resonanceFrequency_Hz>'
        '2700000</H1resonanceFrequency_Hz></experimentalConditions><encoding><encodedSpace><matrixSize><x>64</x>'
        '<y>64</y><z>1</z></matrixSize><fieldOfView_mm><x>1</x><y>1</y><z>1</z></fieldOfView_mm></encodedSpace>'
        '<reconSpace><matrixSize><x>64</x><y>64</y><z>1</z></matrixSize><fieldOfView_mm><x>1</x><y>1</y><z>1</z>'
        '</fieldOfView_mm></reconSpace><encodingLimits/><trajectory>cartesian</trajectory></encoding>'
        '</ismrmrdHeader>')
    assert registry.select(None, header).name == "cdl-lambda-research"
    with pytest.raises(ChainError):
        ChainRegistry(data={"chains": {"../evil": {}}})


def test_shipped_registry_loads():
    registry = ChainRegistry()
    assert registry.default in registry.chains and registry.select("cdl_lambda.xml").name == registry.default
