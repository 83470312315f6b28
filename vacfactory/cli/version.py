"""``vacfactory version``."""

from __future__ import annotations

import argparse

from vacfactory import __version__
from vacfactory.cli.common import EXIT_OK, add_json_argument, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("version", help="print the version")
    add_json_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print_json({"version": __version__})
    else:
        print(f"vacfactory {__version__}")
    return EXIT_OK
