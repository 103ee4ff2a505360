"""The ``cdl-lambda`` command: the product's subcommands ``replay``, ``serve``, ``stream``, ``export-dicom``
and ``dictionary``. Each subcommand module has an ``add_arguments(parser)`` and a ``main(args) -> int``. The
research commands (simulate, train, evaluate) are the lab's own command, ``cdl-lambda-lab``; the product neither
imports nor lists them."""

from __future__ import annotations

import argparse
import logging
import sys

from cdl_lambda.gadgets import dicom_export, mrd2_stream, replay, serve, site_dictionary
from cdl_lambda.gadgets.provenance import software_version

PRODUCT = {
    # name: (module, one-line help)
    "replay": (replay, "stream a recorded ISMRMRD file through the gadget and write the images"),
    "serve": (serve, "warm server: keep torch and the weights loaded, serve scan after scan"),
    "stream": (mrd2_stream, "MRD 2 stream on stdin → images as an MRD 2 stream on stdout (a Unix pipe node)"),
    "export-dicom": (dicom_export, "write an ISMRMRD images file as DICOM, one series per image series"),
    "dictionary": (site_dictionary, "import a site's own dictionary (.npy/.pt/.mat), list the dictionaries"),
}


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Appends "(default: …)" to an option's help unless the help already says its default or there is none to
    say (None, False, an empty list, a suppressed option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
                or text == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _formatter(prog):
    return DefaultsOnceFormatter(prog, max_help_position=40)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser with every product subcommand."""
    parser = argparse.ArgumentParser(prog="cdl-lambda", description="Inline low-field MRI reconstruction with CDL-Λ",
                                     formatter_class=_formatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging (to stderr), and a traceback with each failure")
    parser.add_argument("--version", action="version", version=f"cdl-lambda {software_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in PRODUCT.items():
        module.add_arguments(subparsers.add_parser(name, help=help_text, description=help_text,
                                                   formatter_class=_formatter))
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
    return int(PRODUCT[args.command][0].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
