"""The sha256 checksums the weights manifest records for every file (one place for the product and the lab)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``."""
    return sha256_of_bytes(Path(path).read_bytes())
