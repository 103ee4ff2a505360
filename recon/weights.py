"""Shipped dictionaries and trained networks: the manifest, checksums and safe loading.

``weights/manifest.yaml`` (parsed with ``yaml.safe_load``) lists every file with its sha256::

    default: {dictionary: NAME, network: NAME}
    dictionaries:
      - {name: NAME, file: dictionaries/NAME.pt, K: 32, kernel_size: 9, lambda_d: 0.5, beta_d: 0.25,
         learned_on: ..., split: train, sha256: ...}
    networks:
      - {name: NAME, file: networks/NAME.pt, version: v3, sha256: ..., training: {...}, metrics: {...}}

Files are loaded with ``torch.load(..., weights_only=True)`` after their checksum is verified; a file whose checksum
differs, a missing file, or a path that would leave the weights folder is refused with an error naming it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from cdl_lambda.recon.checksum import sha256_of, sha256_of_bytes  # noqa: F401 - re-exported
from cdl_lambda.recon.dictionary import Dictionary, dct_dictionary
from cdl_lambda.recon.lambda_nets import LambdaNet, build_lambda_net


class WeightsError(ValueError):
    """A weights file or the manifest is missing, corrupt, tampered with, or names something unknown."""


def shipped_data_dir(name: str) -> Path:
    """Where the shipped ``name`` folder (``weights``, ``chains``) is: ``<checkout>/name`` next to the packages in a
    source checkout or an editable install, else ``cdl_lambda_data/name`` in the installed package (setup.cfg maps
    the repository's folder there). The checkout's path when neither exists, for the error to name."""
    packages = Path(__file__).resolve().parent.parent
    checkout, installed = packages / name, packages / "cdl_lambda_data" / name
    if checkout.is_dir() or not installed.is_dir():
        return checkout
    return installed


def default_weights_dir() -> Path:
    """``$CDL_LAMBDA_WEIGHTS`` if set, else the shipped ``weights`` folder (:func:`shipped_data_dir`)."""
    env = os.environ.get("CDL_LAMBDA_WEIGHTS")
    if env:
        return Path(env)
    return shipped_data_dir("weights")


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative`` if it stays inside ``root``; WeightsError otherwise (absolute paths, ``..``)."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise WeightsError(f"path {relative!r} leaves the weights folder {root}")
    return candidate


@dataclass
class LoadedNetwork:
    """A trained Λ network with the model settings it was trained with."""

    name: str
    network: LambdaNet
    beta: float
    settings: dict = field(default_factory=dict)
    sha256: str = ""


class WeightsRegistry:
    """Reads ``manifest.yaml`` in ``root`` and loads entries by name, verifying checksums. A folder without a
    manifest is refused (WeightsError): the product never falls back silently to its built-in defaults."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_weights_dir()
        manifest_path = self.root / "manifest.yaml"
        if manifest_path.exists():
            try:
                manifest = yaml.safe_load(manifest_path.read_text()) or {}
            except yaml.YAMLError as error:
                raise WeightsError(f"weights manifest {manifest_path} is not valid YAML: {error}") from None
            if not isinstance(manifest, dict):
                raise WeightsError(f"weights manifest {manifest_path} must be a mapping")
        else:
            raise WeightsError(f"no weights manifest at {manifest_path}: the weights folder is missing or incomplete "
                               "(reinstall the package, or set CDL_LAMBDA_WEIGHTS to a folder with manifest.yaml)")
        self.manifest = manifest
        self.dictionaries = self._entries(manifest, "dictionaries", manifest_path)
        self.networks = self._entries(manifest, "networks", manifest_path)
        self.baselines = self._entries(manifest, "baselines", manifest_path)
        self.defaults = manifest.get("default") or {}
        if not isinstance(self.defaults, dict):
            raise WeightsError(f"weights manifest {manifest_path}: 'default' must be a mapping")

    @staticmethod
    def _entries(manifest: dict, kind: str, path: Path) -> dict:
        entries = manifest.get(kind) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
            raise WeightsError(f"weights manifest {path}: '{kind}' must be a list of entries with a name")
        return {str(e["name"]): e for e in entries}

    def read_verified(self, entry: dict, kind: str) -> tuple[bytes, Path]:
        """The bytes of the file of a manifest ``entry`` and its path, after checking its sha256."""
        path = safe_join(self.root, str(entry.get("file", "")))
        try:
            data = path.read_bytes()
        except OSError:
            raise WeightsError(f"{kind} {entry['name']!r}: file {path} is missing") from None
        expected = entry.get("sha256")
        if not expected or sha256_of_bytes(data) != expected:
            raise WeightsError(f"{kind} {entry['name']!r}: file {path} does not match the manifest's sha256 "
                               "(corrupt, truncated or tampered); refusing to load it")
        return data, path

    def verify_all(self) -> list[str]:
        """Check every file the manifest lists; returns the names verified, raises WeightsError on the first bad."""
        names = []
        for kind, table in (("dictionary", self.dictionaries), ("network", self.networks),
                            ("baseline", self.baselines)):
            for entry in table.values():
                self.read_verified(entry, kind)
                names.append(entry["name"])
        return names

    def dictionary(self, name: str | None = None) -> Dictionary:
        """A shipped dictionary by name (``None``/"default" → the manifest's default; the built-in ``dct-7x7``
        when the manifest has none; ``dct-N`` names the built-in N×N DCT dictionary). Only files listed in the
        manifest, with a matching checksum, are ever loaded."""
        if name in (None, "default"):
            name = self.defaults.get("dictionary")
            if name is None:
                return dct_dictionary(7)
        if name.startswith("dct-"):
            size = int(name.split("-")[1].split("x")[0])
            return dct_dictionary(size)
        if name in self.dictionaries:
            entry = self.dictionaries[name]
            data, path = self.read_verified(entry, "dictionary")
            try:
                payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                dictionary = Dictionary(payload["filters"], name=name, meta={k: v for k, v in entry.items()})
            except Exception as error:  # noqa: BLE001 - incl. pickle errors from weights_only refusing content
                raise WeightsError(f"dictionary {name!r} ({path}) is unusable: {error}") from None
            return dictionary
        raise WeightsError(f"unknown dictionary {name!r}; shipped: {sorted(self.dictionaries)}")

    def network(self, name: str | None = None) -> LoadedNetwork | None:
        """A trained network by name (``None``/"default" → the manifest's default, or None when none ships;
        "none" → None, i.e. the scalar-λ baseline)."""
        if name in (None, "default"):
            name = self.defaults.get("network")
            if name is None:
                return None
        if name == "none":
            return None
        if name not in self.networks:
            raise WeightsError(f"unknown network {name!r}; shipped: {sorted(self.networks)}")
        entry = self.networks[name]
        data, path = self.read_verified(entry, "network")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            network = build_lambda_net(payload["config"])
            network.load_state_dict(payload["state_dict"])
        except Exception as error:  # noqa: BLE001 - incl. pickle errors from weights_only refusing content
            raise WeightsError(f"network {name!r} ({path}) is unusable: {error}") from None
        network.eval()
        return LoadedNetwork(name=name, network=network, beta=float(payload.get("beta", 1.0)),
                             settings=dict(payload.get("settings") or {}), sha256=entry["sha256"])


def save_network(path: str | Path, network: LambdaNet, beta: float, settings: dict | None = None) -> str:
    """Write a network file that :meth:`WeightsRegistry.network` can load; returns its sha256."""
    buffer = io.BytesIO()
    torch.save({"config": network.config(), "state_dict": network.state_dict(), "beta": float(beta),
                "settings": dict(settings or {})}, buffer)
    data = buffer.getvalue()
    Path(path).write_bytes(data)
    return sha256_of_bytes(data)
