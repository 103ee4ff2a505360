"""The lab stays beside the product: recon/ and gadgets/ never import it, the product's wheel does not carry it,
``cdl-lambda`` lists only the product's subcommands and runs without the lab installed, and ``cdl-lambda-lab``
carries the research commands."""

from __future__ import annotations

import ast
import configparser
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
            if node.module == "cdl_lambda":
                names.update(f"cdl_lambda.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["recon", "gadgets"])
def test_product_does_not_import_the_lab(package):
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path)
                                                     if n == "cdl_lambda.lab" or n.startswith("cdl_lambda.lab."))
                 for path in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_recon_imports_neither_the_gadgets_nor_the_lab():
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path)
                                                     if n.split(".")[:2] in (["cdl_lambda", "gadgets"],
                                                                             ["cdl_lambda", "lab"]))
                 for path in (ROOT / "recon").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_product_distribution_lists_no_lab_package():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    packages = config["options"]["packages"].split()
    assert packages and all(p.startswith("cdl_lambda.") for p in packages)
    assert not any(".lab" in p or p.startswith("lab") for p in packages)


def run_product_cli(*args: str) -> subprocess.CompletedProcess:
    """``cdl-lambda ARGS`` in a fresh interpreter in which the lab cannot be imported at all."""
    code = ("import sys; sys.modules['cdl_lambda.lab'] = None; from cdl_lambda.gadgets import cli; "
            f"sys.exit(cli.main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          cwd=ROOT, timeout=120)


def test_product_command_runs_without_the_lab_and_lists_only_its_own_subcommands():
    result = run_product_cli("replay", "--help")
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout
    listing = run_product_cli("--help")
    assert listing.returncode == 0, listing.stderr
    assert "replay" in listing.stdout and "serve" in listing.stdout
    assert not any(name in listing.stdout for name in ("simulate", "evaluate", "learn-dictionary"))
    refused = run_product_cli("train")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


def test_every_lab_option_has_help_and_shows_its_default_once():
    from cdl_lambda.lab import cli

    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert sorted(subcommands) == sorted(cli.COMMANDS)
    for name, sub in subcommands.items():
        formatter = sub.formatter_class(sub.prog)
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)
                assert formatter._expand_help(action).lower().count("(default") <= 1, (name, action.dest)
        assert "(default:" in sub.format_help(), name


def test_lab_command_without_a_subcommand_shows_its_commands_and_exits_2():
    from cdl_lambda.lab import cli

    assert cli.main([]) == 2
