"""The ``cdl-lambda`` command: ``replay`` and ``serve`` from the product, ``simulate``, ``learn-dictionary``,
``train`` and ``evaluate`` from the research package :mod:`lab` (its ``lab`` extra). Each subcommand has an
``add_arguments(parser)`` and a ``main(args) -> int``. The lab is imported only when one of its subcommands runs,
so the product runs without the lab's dependencies."""

from __future__ import annotations

import argparse
import logging
import sys

from cdl_lambda.gadgets import replay, server

PRODUCT = {
    # name: (module, one-line help)
    "replay": (replay, "stream a recorded ISMRMRD file through the gadget and write the images"),
    "serve": (server, "warm server: keep torch and the weights loaded, serve scan after scan"),
}
LAB = {
    "simulate": "simulate low-field ISMRMRD acquisitions from MR images shipped in packages",
    "learn-dictionary": "online convolutional dictionary learning",
    "train": "train NET_Θ (V1/V2/V3) and the baselines",
    "evaluate": "evaluate methods and write a Markdown report with figures",
}


class LabMissing(SystemExit):
    """The lab's dependencies are not installed; exits with status 2."""


def lab_command(name: str):
    """``(add_arguments, main)`` of a lab subcommand; exits with status 2 and one line naming the missing package
    when the lab extra is not installed."""
    try:
        from cdl_lambda.lab import cli as lab_cli
    except ModuleNotFoundError as error:
        sys.stderr.write(f"cdl-lambda {name}: the Python package `{error.name}` is missing; the research commands "
                         f'need the lab extra: pip install ".[lab]"\n')
        raise LabMissing(2) from None
    return lab_cli.COMMANDS[name]


def _formatter(prog):
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=40)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand (the first of ``argv`` that names one) gets its options."""
    parser = argparse.ArgumentParser(prog="cdl-lambda", description="Inline low-field MRI reconstruction with CDL-Λ",
                                     formatter_class=_formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in PRODUCT or a in LAB), None)
    for name, help_text in [(n, h) for n, (_, h) in PRODUCT.items()] + list(LAB.items()):
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=_formatter)
        if name == chosen:
            add_arguments = PRODUCT[name][0].add_arguments if name in PRODUCT else lab_command(name)[0]
            add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)
    except LabMissing as missing:
        return int(missing.code)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    run = PRODUCT[args.command][0].main if args.command in PRODUCT else lab_command(args.command)[1]
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
