"""``vacfactory run`` (foreground, for systemd) and ``vacfactory daemon`` (detached)."""

from __future__ import annotations

import argparse
import sys

from vacfactory.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from vacfactory.errors import ConfigError, VacFactoryError

DEFAULT_PIDFILE = "/run/vacfactory.pid"
DEFAULT_LOGFILE = "/var/log/vacfactory.log"


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run the factory in the foreground (systemd, containers, debugging)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--log-file", help="log to this file instead of stderr")
    run.add_argument("--seconds", type=float, help="stop after this many seconds (tests, demos)")
    run.set_defaults(handler=run_command)

    daemon = subparsers.add_parser("daemon", help="run the factory detached, with a pid file")
    daemon.add_argument("--pidfile", default=DEFAULT_PIDFILE)
    daemon.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    daemon.add_argument("--log-file", default=DEFAULT_LOGFILE)
    daemon.set_defaults(handler=daemon_command)


def _sources(args: argparse.Namespace):
    from vacfactory.config.loader import ConfigSources

    return ConfigSources.for_main_file(args.config) if args.config else ConfigSources.default()


def run_command(args: argparse.Namespace) -> int:
    from vacfactory.daemon import configure_logging, run_foreground

    configure_logging(args.log_level, args.log_file)
    return _guarded(lambda: run_foreground(_sources(args), seconds=args.seconds))


def daemon_command(args: argparse.Namespace) -> int:
    import daemon as python_daemon
    from daemon.pidfile import TimeoutPIDLockFile

    from vacfactory.daemon import configure_logging, run_foreground

    sources = _sources(args)
    # Validate before detaching, so a broken configuration is reported on the terminal.
    from vacfactory.cli.common import load_config

    load_config(args)
    context = python_daemon.DaemonContext(
        pidfile=TimeoutPIDLockFile(args.pidfile, acquire_timeout=1),
        umask=0o022,  # Vac used umask(0): world-writable state files
        working_directory="/",
    )
    with context:
        configure_logging(args.log_level, args.log_file)
        return _guarded(lambda: run_foreground(sources))


def _guarded(action) -> int:
    try:
        action()
    except ConfigError as error:
        print(f"vacfactory: configuration invalid:\n{error}", file=sys.stderr)
        return EXIT_CONFIG
    except VacFactoryError as error:
        print(f"vacfactory: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
