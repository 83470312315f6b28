"""Helpers shared by every CLI verb: exit codes, --config loading, JSON output, and the one
place that turns any failure into one line on stderr and a documented exit code."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any, Optional, Tuple

# Exit codes: scripts and monitoring can rely on these (sysexits.h where one fits).
EXIT_OK = 0
EXIT_FAILURE = 1       # the command ran and found a problem (or an operation failed)
EXIT_USAGE = 2         # bad command line (argparse's own code)
EXIT_NOINPUT = 66      # a file or directory that must already exist does not
EXIT_UNAVAILABLE = 69  # a service we need (libvirtd, the daemon, a broker) is not reachable
EXIT_SOFTWARE = 70     # a bug in vacfactory (the message says how to get the traceback)
EXIT_CANTCREAT = 73    # a file or directory cannot be created or written (read-only, not a directory)
EXIT_IOERR = 74        # an I/O error (disk full, ...)
EXIT_NOPERM = 77       # no permission (not root?)
EXIT_CONFIG = 78       # the configuration is invalid
EXIT_SIGPIPE = 141     # stdout was closed (`| head`): quietly, as a process killed by SIGPIPE

#: set (to anything) to see the traceback of an unexpected error
DEBUG_ENV = "VACFACTORY_DEBUG"
#: the main configuration file when --config is not given
CONFIG_ENV = "VACFACTORY_CONFIG"


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """Every verb that prints something accepts --json for machine-readable output."""
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of text")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")


def config_sources(args: argparse.Namespace):
    """The files --config (or VACFACTORY_CONFIG, or the defaults) names."""
    from vacfactory.config import loader

    main_file = getattr(args, "config", None)
    return loader.ConfigSources.for_main_file(main_file) if main_file else loader.ConfigSources.default()


def load_config(args: argparse.Namespace, host_facts: Optional[Any] = None):
    """Load the configuration named by --config (or the default files).

    On an invalid configuration print every problem to stderr and exit with EXIT_CONFIG.
    """
    from vacfactory.config import loader
    from vacfactory.errors import ConfigError

    try:
        config = loader.load_config(config_sources(args), host_facts=host_facts)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config


class CommandError(Exception):
    """A verb gives up: ``message`` is printed as one line, ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def require_state_dir(state_dir: str) -> None:
    """Verbs that write refuse to create a state directory: a missing one means a wrong
    --config (or a factory that never ran), and a fresh one would be read by no daemon."""
    if os.path.isdir(state_dir):
        return
    if os.path.exists(state_dir):
        raise CommandError(f"state_dir {state_dir} is not a directory", EXIT_CANTCREAT)
    raise CommandError(f"state_dir {state_dir} does not exist (wrong --config? has the daemon "
                       "ever run here?); not creating it", EXIT_NOINPUT)


def _os_failure(error: OSError) -> Tuple[int, str]:
    path = error.filename if error.filename is not None else ""
    where = f": {path}" if path else ""
    reason = error.strerror or str(error)
    if isinstance(error, PermissionError) or error.errno == errno.EPERM:
        return EXIT_NOPERM, f"no permission{where} (run as root?)"
    if error.errno == errno.EROFS:
        return EXIT_CANTCREAT, f"read-only file system{where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_IOERR, f"no space left on the device{where}"
    if isinstance(error, FileNotFoundError):
        return EXIT_NOINPUT, f"no such file or directory{where}"
    if isinstance(error, (NotADirectoryError, FileExistsError, IsADirectoryError)):
        return EXIT_CANTCREAT, f"{reason}{where} (a file where a directory is expected, or the reverse)"
    return EXIT_IOERR, f"{reason}{where}"


def describe_failure(error: BaseException) -> Tuple[int, str]:
    """(exit code, one line) for an error that ended a verb."""
    from vacfactory.errors import ConfigError, HypervisorError, StateError, VacFactoryError

    if isinstance(error, CommandError):
        return error.code, str(error)
    if isinstance(error, ConfigError):
        return EXIT_CONFIG, f"configuration invalid: {str(error).splitlines()[0]}"
    if isinstance(error, HypervisorError):
        return EXIT_UNAVAILABLE, f"libvirt: {error}"
    if isinstance(error, StateError):
        cause = error.__cause__ or error.__context__
        if isinstance(cause, OSError):
            code, _ = _os_failure(cause)
            return code, str(error)
        return EXIT_IOERR, str(error)
    if isinstance(error, VacFactoryError):
        return EXIT_FAILURE, str(error)
    if isinstance(error, OSError):
        return _os_failure(error)
    return EXIT_SOFTWARE, (f"internal error: {type(error).__name__}: {error} "
                           f"(set {DEBUG_ENV}=1 for the traceback and please report it)")


def one_line(text: str) -> str:
    return " ".join(str(text).split())
