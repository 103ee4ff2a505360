"""Recording learned dictionaries and trained networks in a weights folder's ``manifest.yaml``
(the format :class:`recon.weights.WeightsRegistry` reads)."""

from __future__ import annotations

from pathlib import Path

import yaml


def update_manifest(weights_dir: Path, table: str, entry: dict, default: dict | None = None) -> None:
    """Insert or replace ``entry`` (by name) in ``manifest.yaml``'s ``table``; optionally update ``default``."""
    path = Path(weights_dir) / "manifest.yaml"
    manifest = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    rows = [row for row in manifest.get(table) or [] if row.get("name") != entry["name"]] + [entry]
    manifest[table] = sorted(rows, key=lambda row: row["name"])
    if default:
        manifest["default"] = {**(manifest.get("default") or {}), **default}
    known = ("default", "dictionaries", "networks", "baselines")
    ordered = {key: manifest[key] for key in known if key in manifest}
    ordered.update({key: value for key, value in manifest.items() if key not in known})
    path.write_text(yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120))
