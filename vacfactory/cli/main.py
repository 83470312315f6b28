"""Entry point of the ``vacfactory`` command.

Every verb, every failure: one line on stderr (``vacfactory VERB: what went wrong``) and a
documented exit code (cli.common), never a traceback (unless VACFACTORY_DEBUG is set).
``-c/--config`` is accepted before or after the verb; VACFACTORY_CONFIG is its default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import List, Optional

from vacfactory import __version__
from vacfactory.cli.common import (
    CONFIG_ENV,
    DEBUG_ENV,
    EXIT_SIGPIPE,
    EXIT_USAGE,
    describe_failure,
    one_line,
)

# Verb modules, in the order their verbs appear in --help.
VERB_MODULES = (
    "vacfactory.cli.run",
    "vacfactory.cli.status",
    "vacfactory.cli.machines",
    "vacfactory.cli.top",
    "vacfactory.cli.evidence",
    "vacfactory.cli.config_cmd",
    "vacfactory.cli.space",
    "vacfactory.cli.apel",
    "vacfactory.cli.ops",
    "vacfactory.cli.version",
)

CONFIG_HELP = ("main configuration file (default: $VACFACTORY_CONFIG, else /etc/vacfactory.conf with "
               "/etc/vacfactory.d/*.conf; /etc/vac.conf is understood too); before or after the verb")


def _add_config_option(parser: argparse.ArgumentParser, top: bool) -> None:
    # SUPPRESS after the verb: an absent option must not overwrite the one given before it
    parser.add_argument("-c", "--config", metavar="FILE", dest="config",
                        default=os.environ.get(CONFIG_ENV) or None if top else argparse.SUPPRESS,
                        help=CONFIG_HELP if top else "as before the verb")


def _verb_parsers(parser: argparse.ArgumentParser):
    """Every (sub)verb's parser, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # aliases share a parser
                    seen.add(id(sub))
                    yield sub
                    yield from _verb_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vacfactory",
        description="Autonomous VM lifecycle factory for grid and cloud sites.",
        epilog=f"Exit codes are listed in vacfactory(1) (`vacfactory man`). Set {DEBUG_ENV}=1 to see the "
               "traceback of an unexpected error.",
    )
    parser.add_argument("--version", action="version", version=f"vacfactory {__version__}")
    _add_config_option(parser, top=True)
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # a real import error inside the module: show it
                raise
            continue
        module.register(subparsers)
    for sub in _verb_parsers(parser):
        if not any("--config" in a.option_strings for a in sub._actions):
            _add_config_option(sub, top=False)
        sub.set_defaults(prog=sub.prog)
    return parser


def _quiet_stdout() -> None:
    """stdout's reader went away (`| head`): send what is left to /dev/null, so that the
    interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prog = getattr(args, "prog", "vacfactory")
    try:
        code = int(handler(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_SIGPIPE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns any failure into one line
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        code, message = describe_failure(error)
        try:
            print(f"{prog}: {one_line(message)}", file=sys.stderr)
        except OSError:
            pass
        return code


if __name__ == "__main__":
    sys.exit(main())
