"""Entry point of the ``vacfactory`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from vacfactory import __version__

# Verb modules, in the order their verbs appear in --help.
VERB_MODULES = (
    "vacfactory.cli.run",
    "vacfactory.cli.machines",
    "vacfactory.cli.evidence",
    "vacfactory.cli.config_cmd",
    "vacfactory.cli.space",
    "vacfactory.cli.apel",
    "vacfactory.cli.ops",
    "vacfactory.cli.version",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vacfactory",
        description="Autonomous VM lifecycle factory for grid and cloud sites.",
    )
    parser.add_argument("--version", action="version", version=f"vacfactory {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="main configuration file (default /etc/vacfactory.conf with /etc/vacfactory.d/*.conf;"
        " /etc/vac.conf is understood too)",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # a real import error inside the module: show it
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
