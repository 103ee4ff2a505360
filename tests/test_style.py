"""The code keeps the style ruff checks (pyproject.toml's [tool.ruff]); a `# noqa` always says why."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["recon", "gadgets", "lab", "bench", "tests"]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]' brings it)")
def test_ruff_finds_nothing():
    result = subprocess.run(["ruff", "check", "--no-cache", *FOLDERS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_noqa_gives_its_reason():
    bare = []
    for path in (p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = re.search(r"\s#\s*noqa(:\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*)?(.*)$", line)
            if match and not re.match(r"\s*-\s*\S", match.group(3)):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "noqa without a reason:\n" + "\n".join(bare)


def test_the_gadgets_never_print_to_stdout():
    """Under Gadgetron stdout is shared with the server: the gadgets write to stderr or log (the MRD 2 pipe's image
    stream is written to its own protected file object, not with print)."""
    import ast
    found = []
    for path in (ROOT / "gadgets").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "print() in gadgets/: " + ", ".join(found)
