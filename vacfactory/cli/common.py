"""Helpers shared by every CLI verb: exit codes, --config loading, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

# Exit codes: scripts and monitoring can rely on these (sysexits.h where one fits).
EXIT_OK = 0
EXIT_FAILURE = 1       # the command ran and found a problem (or an operation failed)
EXIT_USAGE = 2         # bad command line (argparse's own code)
EXIT_UNAVAILABLE = 69  # a service we need (libvirtd, the daemon, a broker) is not reachable
EXIT_CONFIG = 78       # the configuration is invalid


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """Every verb that prints data accepts --json for machine-readable output."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")


def load_config(args: argparse.Namespace, host_facts: Optional[Any] = None):
    """Load the configuration named by --config (or the default files).

    On an invalid configuration print every problem to stderr and exit with EXIT_CONFIG.
    """
    from vacfactory.config import loader
    from vacfactory.errors import ConfigError

    sources = loader.ConfigSources.for_main_file(args.config) if args.config else loader.ConfigSources.default()
    try:
        config = loader.load_config(sources, host_facts=host_facts)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config
