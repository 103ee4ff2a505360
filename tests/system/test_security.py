"""Security: localhost by default; no code or pickles from the network or from weights files; ``yaml.safe_load``;
XML without entity expansion; paths from chains, manifests or the network cannot leave their folders."""

from __future__ import annotations

import ast
import hashlib
import io
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from cdl_lambda.gadgets.chains import ChainError, ChainRegistry
from cdl_lambda.gadgets.errors import ProtocolError
from cdl_lambda.gadgets.wire import parse_ismrmrd_header, parse_xml_safely, read_image
from cdl_lambda.recon.weights import WeightsError, WeightsRegistry

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "gadgets").glob("*.py")) + sorted((ROOT / "recon").glob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, getattr(node.func.value, "id", None), node.func.attr


def test_default_bind_is_localhost():
    import argparse

    from cdl_lambda.gadgets import serve as server
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"
    srv = server.Server(port=0)
    try:
        assert srv.host == "127.0.0.1"
    finally:
        srv.listener.close()


def test_sources_load_no_code_every_torch_load_is_weights_only_every_yaml_load_safe():
    for path in SOURCES:
        text = path.read_text()
        assert "import pickle" not in text and "marshal" not in text, path
        for node, owner, name in _calls(path):
            where = f"{path.name}:{node.lineno}"
            if (owner, name) == ("torch", "load"):
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, where
            assert not (owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all")), where
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path.name}:{node.lineno}"


class _Payload:
    """Pickles to a call of ``Path.touch`` on ``marker``: what a malicious weights file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_in_a_weights_file_is_refused_even_with_a_matching_checksum(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"filters": _Payload(marker), "config": _Payload(marker)}, buffer)
    data = buffer.getvalue()
    (tmp_path / "evil.pt").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump({
        "dictionaries": [{"name": "evil", "file": "evil.pt", "sha256": sha}],
        "networks": [{"name": "evil", "file": "evil.pt", "sha256": sha}]}))
    registry = WeightsRegistry(tmp_path)
    with pytest.raises(WeightsError, match="unusable"):
        registry.dictionary("evil")
    with pytest.raises(WeightsError, match="unusable"):
        registry.network("evil")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the same bytes, to show what weights_only stops
        torch.load(io.BytesIO(data), weights_only=True)


def test_yaml_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = f'chains: !!python/object/apply:pathlib.Path.touch ["{marker}"]\n'
    (tmp_path / "registry.yaml").write_text(evil)
    with pytest.raises(ChainError, match="not valid YAML"):
        ChainRegistry(tmp_path)
    (tmp_path / "manifest.yaml").write_text(evil)
    with pytest.raises(WeightsError, match="not valid YAML"):
        WeightsRegistry(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("xml", [
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "bbbbbbbb"><!ENTITY c "&b;&b;&b;&b;&b;&b;">]><a>&c;</a>',
    '<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>',
    '<a/><!ENTITY x "y">',
])
def test_xml_with_entities_is_refused_everywhere(xml):
    # a declaration outside a DOCTYPE is not well-formed XML: refused by the parser itself
    reason = "DOCTYPE" if "<!DOCTYPE" in xml else "not valid XML"
    with pytest.raises(ProtocolError, match=reason):
        parse_xml_safely(xml, "config")
    with pytest.raises(ProtocolError, match=reason):
        parse_ismrmrd_header(xml)


def test_image_meta_with_entities_is_refused():
    import struct

    import ismrmrd
    import numpy as np
    image = ismrmrd.Image.from_array(np.zeros((2, 2), np.float32))
    meta = b'<!DOCTYPE m [<!ENTITY a "aaaa">]><ismrmrdMeta>&a;</ismrmrdMeta>'
    data = bytes(image.getHead()) + struct.pack("<Q", len(meta)) + meta + bytes(16)

    class Source:
        position = 0

        def read(self, n):
            part = data[self.position:self.position + n]
            self.position += n
            return part

    with pytest.raises(ProtocolError, match="DOCTYPE"):
        read_image(Source())


def test_an_image_cut_off_in_its_pixels_is_named_as_such():
    """A stream that ends inside an image's pixels (a peer that aborted mid-write): a ProtocolError saying how much
    arrived, not a numpy error; the whole image reads back."""
    import io

    import ismrmrd
    import numpy as np
    from cdl_lambda.gadgets.wire import encode_item
    pixels = np.arange(12, dtype=np.float32).reshape(3, 4)
    whole = encode_item(ismrmrd.Image.from_array(pixels))[2:]  # without the message id
    assert np.array_equal(read_image(io.BytesIO(whole)).data[0, 0], pixels)
    with pytest.raises(ProtocolError, match="cut off: 30 of its 48 bytes"):
        read_image(io.BytesIO(whole[:-18]))


def test_paths_cannot_escape_the_weights_folder(tmp_path):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"x")
    root = tmp_path / "weights"
    root.mkdir()
    (root / "link.pt").symlink_to(outside)
    sha = hashlib.sha256(b"x").hexdigest()
    entries = [{"name": n, "file": f, "sha256": sha} for n, f in
               (("dotdot", "../outside.pt"), ("absolute", str(outside)), ("symlink", "link.pt"))]
    (root / "manifest.yaml").write_text(yaml.safe_dump({"dictionaries": entries}))
    registry = WeightsRegistry(root)
    for name in ("dotdot", "absolute", "symlink"):
        with pytest.raises(WeightsError, match="leaves the weights folder"):
            registry.dictionary(name)


def test_names_from_chains_and_the_network_are_never_paths(tmp_path):
    from cdl_lambda.gadgets.errors import InputError
    from cdl_lambda.gadgets.settings import Parameters
    registry = ChainRegistry(data={"chains": {"plain": {}}})
    for name in ("../../etc/passwd", "/etc/passwd", "registry.yaml", "plain/../../x"):
        with pytest.raises(ChainError, match="unknown chain"):  # a config name only ever names a chain
            registry.select(name)
    for bad in ("../x", "/abs/x", "a/b", "x.pt", "..", ""):
        with pytest.raises(InputError):
            Parameters.from_sources({"dictionary": bad})
        with pytest.raises(InputError):
            Parameters.from_sources({}, {}, {"network": bad})  # JSON text from the client
    for name in ("../evil", "a/b", ".hidden", ""):
        with pytest.raises(ChainError):
            ChainRegistry(data={"chains": {name: {}}})
