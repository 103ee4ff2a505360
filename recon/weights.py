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
from cdl_lambda.recon.lambda_nets import LambdaNet, build_lambda_net, set_trained_matrix


class WeightsError(ValueError):
    """A weights file or the manifest is missing, corrupt, tampered with, or names something unknown."""


def shipped_data_dir(name: str) -> Path:
    """Where the shipped ``name`` folder (``weights``, ``chains``) is: beside this package's folder, both in a
    checkout (``<checkout>/recon`` and ``<checkout>/name``) and installed (``cdl_lambda/recon`` and
    ``cdl_lambda/name``, as setup.cfg maps them)."""
    return Path(__file__).resolve().parent.parent / name


def default_weights_dir() -> Path:
    """``$CDL_LAMBDA_WEIGHTS`` if set, else the shipped ``weights`` folder (:func:`shipped_data_dir`)."""
    env = os.environ.get("CDL_LAMBDA_WEIGHTS")
    if env:
        return Path(env)
    return shipped_data_dir("weights")


def default_site_weights_dir() -> Path:
    """The site's own weights (dictionaries brought in with ``cdl-lambda dictionary import``), overlaying the shipped
    ones: ``$CDL_LAMBDA_SITE_WEIGHTS`` if set, else ``$XDG_DATA_HOME/cdl-lambda/weights`` (default
    ``~/.local/share/cdl-lambda/weights``). Its ``manifest.yaml`` has the shipped manifest's layout."""
    env = os.environ.get("CDL_LAMBDA_SITE_WEIGHTS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cdl-lambda" / "weights"


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative`` if it stays inside ``root``; WeightsError otherwise (absolute paths, ``..``)."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise WeightsError(f"path {relative!r} leaves the weights folder {root}")
    return candidate


# The solver a network runs with when its manifest entry names none: FISTA, 64 iterations, no early stop.
DEFAULT_SOLVER = {"solver": "fista", "iterations": 64, "tolerance": 0.0}


@dataclass
class LoadedNetwork:
    """A trained Λ network with the model settings it was trained with (``settings``) and the solver it is deployed
    with (``deployed``: the manifest entry's ``solver``; :meth:`solver_settings` fills in :data:`DEFAULT_SOLVER`)."""

    name: str
    network: LambdaNet
    beta: float
    settings: dict = field(default_factory=dict)
    sha256: str = ""
    deployed: dict = field(default_factory=dict)

    def solver_settings(self) -> dict:
        """``{"solver", "iterations", "tolerance"}``: the solver, cap and stopping rule this network was trained
        and validated for."""
        return {**DEFAULT_SOLVER, **self.deployed}


def _read_manifest(path: Path, what: str) -> dict:
    """A manifest's YAML mapping (``safe_load``); :class:`WeightsError` naming ``what`` and the file otherwise."""
    try:
        manifest = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise WeightsError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(manifest, dict):
        raise WeightsError(f"{what} {path} must be a mapping")
    return manifest


class WeightsRegistry:
    """Reads ``manifest.yaml`` in ``root`` and loads entries by name, verifying checksums. A folder without a
    manifest is refused (WeightsError): the product never falls back silently to its built-in defaults."""

    def __init__(self, root: str | Path | None = None, site: str | Path | None = None):
        self.root = Path(root) if root is not None else default_weights_dir()
        # the site's dictionaries overlay the default weights folder (never an explicitly named one)
        self.site = Path(site) if site is not None else (default_site_weights_dir() if root is None else None)
        manifest_path = self.root / "manifest.yaml"
        if manifest_path.exists():
            manifest = _read_manifest(manifest_path, "weights manifest")
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
        self.site_dictionaries = self._site_dictionaries()

    def _site_dictionaries(self) -> list[str]:
        """Add the site manifest's dictionaries (each read from the site folder); their names, sorted. A site name
        that is also a shipped one is refused: a site cannot replace what the manifest ships."""
        path = self.site / "manifest.yaml" if self.site is not None else None
        if path is None or not path.exists():
            return []
        manifest = _read_manifest(path, "site weights manifest")
        entries = self._entries(manifest, "dictionaries", path)
        for name, entry in entries.items():
            if name in self.dictionaries:
                raise WeightsError(f"site dictionary {name!r} ({path}) has the name of a shipped one; rename it")
            self.dictionaries[name] = dict(entry, root=str(self.site), origin="site")
        return sorted(entries)

    @staticmethod
    def _entries(manifest: dict, kind: str, path: Path) -> dict:
        entries = manifest.get(kind) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
            raise WeightsError(f"weights manifest {path}: '{kind}' must be a list of entries with a name")
        return {str(e["name"]): e for e in entries}

    def read_verified(self, entry: dict, kind: str) -> tuple[bytes, Path]:
        """The bytes of the file of a manifest ``entry`` and its path, after checking its sha256."""
        path = safe_join(Path(entry.get("root") or self.root), str(entry.get("file", "")))
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
        settings = dict(payload.get("settings") or {})
        set_trained_matrix(network, trained_matrix(settings))
        return LoadedNetwork(name=name, network=network, beta=float(payload.get("beta", 1.0)),
                             settings=settings, sha256=entry["sha256"],
                             deployed=dict(entry.get("solver") or {}))


def trained_matrix(settings: dict) -> int | None:
    """The largest matrix a saved network was trained at: its settings' ``matrix``, or ``size`` in files written
    before that was recorded."""
    return settings.get("matrix", settings.get("size"))


def save_network(path: str | Path, network: LambdaNet, beta: float, settings: dict | None = None) -> str:
    """Write a network file that :meth:`WeightsRegistry.network` can load; returns its sha256."""
    buffer = io.BytesIO()
    torch.save({"config": network.config(), "state_dict": network.state_dict(), "beta": float(beta),
                "settings": dict(settings or {})}, buffer)
    data = buffer.getvalue()
    Path(path).write_bytes(data)
    return sha256_of_bytes(data)
