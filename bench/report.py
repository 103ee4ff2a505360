"""Writing a benchmark's Markdown table to docs/ and to the terminal."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: str | Path) -> None:
    """Write ``text`` to ``out`` (creating its folder) and print it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
