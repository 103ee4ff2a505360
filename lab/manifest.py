"""Recording learned dictionaries and trained networks in a weights folder's ``manifest.yaml``
(the format :class:`recon.weights.WeightsRegistry` reads)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cdl_lambda.recon.weights import safe_join


def _read(weights_dir: Path) -> tuple[Path, dict]:
    path = Path(weights_dir) / "manifest.yaml"
    return path, (yaml.safe_load(path.read_text()) if path.exists() else None) or {}


def update_manifest(weights_dir: Path, table: str, entry: dict, default: dict | None = None) -> None:
    """Insert or replace ``entry`` (by name) in ``manifest.yaml``'s ``table``; optionally update ``default``."""
    path, manifest = _read(weights_dir)
    rows = [row for row in manifest.get(table) or [] if row.get("name") != entry["name"]] + [entry]
    manifest[table] = sorted(rows, key=lambda row: row["name"])
    if default:
        manifest["default"] = {**(manifest.get("default") or {}), **default}
    _write(path, manifest)


def retire(weights_dir: Path, table: str, name: str) -> None:
    """Remove the entry ``name`` from ``table`` and delete its file; refused for a default or an unknown name."""
    path, manifest = _read(weights_dir)
    rows = manifest.get(table) or []
    entry = next((row for row in rows if row.get("name") == name), None)
    if entry is None:
        raise ValueError(f"{path}: no {table} entry named {name!r}")
    if name in (manifest.get("default") or {}).values():
        raise ValueError(f"{path}: {name!r} is a default; make another the default first")
    manifest[table] = [row for row in rows if row is not entry]
    safe_join(Path(weights_dir), str(entry["file"])).unlink(missing_ok=True)
    _write(path, manifest)


def _write(path: Path, manifest: dict) -> None:
    known = ("default", "dictionaries", "networks", "baselines")
    ordered = {key: manifest[key] for key in known if key in manifest}
    ordered.update({key: value for key, value in manifest.items() if key not in known})
    path.write_text(yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120))
