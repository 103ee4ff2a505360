"""The ``cdl-lambda`` command. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; modules are imported only when their subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    # name: (module, one-line help)
    "replay": ("gadgets.replay", "stream a recorded ISMRMRD file through the gadget and write the images"),
    "serve": ("gadgets.server", "warm server: keep torch and the weights loaded, serve scan after scan"),
    "simulate": ("lab.simulate", "simulate low-field ISMRMRD acquisitions from MR images shipped in packages"),
    "learn-dictionary": ("lab.dictionary_learning", "online convolutional dictionary learning"),
    "train": ("lab.train", "train NET_Θ (V1/V2/V3) and the baselines"),
    "evaluate": ("lab.evaluate", "evaluate methods and write a Markdown report with figures"),
}


def _load(name: str):
    module_name = SUBCOMMANDS[name][0]
    return importlib.import_module(module_name)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdl-lambda", description="Inline low-field MRI reconstruction with CDL-Λ")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(_load(args.command).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
