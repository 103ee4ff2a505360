"""The shipped weights: checksums, safe loading, tamper refusal, and the V3 network's permutation invariance."""

import hashlib
import io
import shutil

import pytest
import torch

from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.sampling import central_window_mask
from cdl_lambda.recon.weights import WeightsError, WeightsRegistry, default_weights_dir, safe_join

from support import phantom

REGISTRY = WeightsRegistry(default_weights_dir())
pytestmark = pytest.mark.skipif(not REGISTRY.dictionaries, reason="no shipped weights manifest")


def all_entries():
    return [e for table in ("dictionaries", "networks", "baselines") for e in REGISTRY.manifest.get(table) or []]


def test_every_manifest_file_matches_its_sha256():
    assert REGISTRY.verify_all()
    for entry in all_entries():
        data = safe_join(REGISTRY.root, entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]


def test_family_has_training_and_held_out_dictionaries_with_an_unseen_size():
    train = [e for e in REGISTRY.dictionaries.values() if e["split"] == "train"]
    held = [e for e in REGISTRY.dictionaries.values() if e["split"] != "train"]
    assert len(train) >= 6 and len(held) >= 2
    seen = {(e["K"], e["kernel_size"]) for e in train}
    assert any((e["K"], e["kernel_size"]) not in seen for e in held)
    for entry in REGISTRY.dictionaries.values():
        d = REGISTRY.dictionary(entry["name"])
        assert (d.num_filters, d.kernel_size) == (entry["K"], entry["kernel_size"])


def test_default_network_loads_with_weights_only():
    name = REGISTRY.defaults.get("network")
    assert name in REGISTRY.networks
    data = safe_join(REGISTRY.root, REGISTRY.networks[name]["file"]).read_bytes()
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    assert payload["config"]["version"] == "v3"
    loaded = REGISTRY.network("default")
    assert loaded.name == name and loaded.beta > 0
    assert REGISTRY.dictionary("default").name == REGISTRY.defaults["dictionary"]


def test_tampered_file_is_refused(tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(REGISTRY.root, root)
    entry = next(iter(REGISTRY.dictionaries.values()))
    path = root / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        WeightsRegistry(root).dictionary(entry["name"])
    network = REGISTRY.networks[REGISTRY.defaults["network"]]
    (root / network["file"]).write_bytes((root / network["file"]).read_bytes()[:-10])
    with pytest.raises(WeightsError):
        WeightsRegistry(root).network("default")


def test_shipped_v3_is_invariant_to_filter_order():
    torch.set_num_threads(1)
    loaded = REGISTRY.network("default")
    dictionary = REGISTRY.dictionary("default")
    model = CDLLambda(loaded.network, beta=loaded.beta, iterations=8).eval()
    target = phantom(40, 40)[None]
    mask = central_window_mask((40, 40), (20, 20))
    noise = 0.05 * torch.randn(1, 40, 40, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    kspace = mask * (fft2c(target) + noise)
    order = torch.randperm(dictionary.num_filters, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(kspace, mask, dictionary)
        b = model(kspace, mask, dictionary.permuted(order))
    assert torch.allclose(a.image, b.image, atol=1e-5, rtol=1e-4)
    assert torch.allclose(a.lambda_maps[:, order], b.lambda_maps, atol=1e-6)


def test_a_network_runs_with_the_solver_its_manifest_entry_names(tmp_path):
    """Reconstructor without an iteration count runs the cap, solver and tolerance the network was trained for;
    an explicit count overrides the cap; an entry without ``solver`` gets FISTA, 64, no early stop. A network with
    a background weight naming ADMM is refused (ADMM cannot take the weight)."""
    import yaml

    from cdl_lambda.recon.pipeline import Reconstructor
    from cdl_lambda.recon.weights import DEFAULT_SOLVER

    root = tmp_path / "weights"
    shutil.copytree(REGISTRY.root, root)
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    default = next(e for e in manifest["networks"] if e["name"] == manifest["default"]["network"])
    default["solver"] = {"solver": "admm", "iterations": 7, "tolerance": 0.02}
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    if WeightsRegistry(root).network("default").network.config().get("background"):
        with pytest.raises(ValueError, match="ADMM solver does not take the background weight"):
            Reconstructor(weights_dir=str(root), device="cpu", compiled=False)
    name = next(e["name"] for e in manifest["networks"] if e.get("version") == "v3"
                and not WeightsRegistry(root).network(e["name"]).network.config().get("background"))
    manifest["default"]["network"] = name
    entry = next(e for e in manifest["networks"] if e["name"] == name)
    entry["solver"] = {"solver": "admm", "iterations": 7, "tolerance": 0.02}
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    rec = Reconstructor(weights_dir=str(root), device="cpu", compiled=False)
    assert (rec.iterations, rec.model.iterations, rec.model.solver, rec.model.tolerance) == (7, 7, "admm", 0.02)
    assert rec.identity["solver"] == "admm, cap 7, tolerance 0.02"
    assert Reconstructor(weights_dir=str(root), device="cpu", compiled=False, iterations=5).model.iterations == 5
    del entry["solver"]
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    plain = Reconstructor(weights_dir=str(root), device="cpu", compiled=False).model
    assert (plain.solver, plain.iterations, plain.tolerance) == (DEFAULT_SOLVER["solver"], 64, 0.0)
