"""The lab stays beside the product: recon/ and gadgets/ never import it (only the command line does, lazily), and
``cdl-lambda`` runs the product's subcommands without the lab's dependencies, naming what is missing otherwise."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module or "")
    return names


@pytest.mark.parametrize("package", ["recon", "gadgets"])
def test_product_does_not_import_the_lab(package):
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if n.split(".")[0] == "lab")
                 for path in (ROOT / package).rglob("*.py") if path.name != "cli.py" or package != "gadgets"}
    assert {k: v for k, v in offenders.items() if v} == {}


def run_cli(blocked: str, *args: str) -> subprocess.CompletedProcess:
    """``cdl-lambda ARGS`` in a fresh interpreter in which module ``blocked`` cannot be imported."""
    code = (f"import sys; sys.modules[{blocked!r}] = None; from gadgets import cli; "
            f"sys.exit(cli.main({list(args)!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_lab_subcommand_without_its_dependency_says_what_to_install():
    result = run_cli("nibabel", "simulate", "--help")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "`nibabel`" in lines[0] and 'pip install ".[lab]"' in lines[0]


def test_product_subcommands_run_without_the_lab():
    result = run_cli("lab", "replay", "--help")
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "simulate" not in result.stdout
    listing = run_cli("lab", "--help")
    assert listing.returncode == 0 and all(name in listing.stdout for name in ("replay", "serve", "evaluate"))


def test_every_lab_option_has_help_and_shows_its_default():
    from cdl_lambda.gadgets import cli

    for name in cli.LAB:
        parser = cli.build_parser([name])
        sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(name))
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)
        text = sub.format_help()
        assert "(default:" in text, name
