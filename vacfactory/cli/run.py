"""``vacfactory run`` (foreground, for systemd) and ``vacfactory daemon`` (detached).

``daemon`` checks its pid file before detaching, where the terminal still shows what is
wrong: a pid file naming a live vacfactory process is refused (exit 1); one left by a daemon
that died (kill -9, a crash, a reboot without /run on tmpfs) is removed, as is one naming a
process that is not vacfactory (the pid was reused). python-daemon takes the pid file only
after detaching, so without this check a stale file made the daemon fail silently, its
traceback going to /dev/null while the command exited 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from vacfactory.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from vacfactory.errors import ConfigError, VacFactoryError

log = logging.getLogger(__name__)

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
    import lockfile
    from daemon.pidfile import TimeoutPIDLockFile

    from vacfactory.daemon import configure_logging, run_foreground

    sources = _sources(args)
    # Validate before detaching, so a broken configuration is reported on the terminal.
    from vacfactory.cli.common import load_config

    load_config(args)
    pidfile = os.path.abspath(args.pidfile)  # the daemon changes to / before taking it
    problem = clear_stale_pidfile(pidfile)
    if problem is not None:
        print(f"vacfactory daemon: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    context = python_daemon.DaemonContext(
        pidfile=TimeoutPIDLockFile(pidfile, acquire_timeout=1),
        umask=0o022,  # Vac used umask(0): world-writable state files
        working_directory="/",
    )
    try:
        context.open()
    except lockfile.Error as error:  # another daemon won a race since the check: say so in the log
        configure_logging(args.log_level, args.log_file)
        log.error("cannot take the pid file %s: %s", pidfile, error)
        return EXIT_FAILURE
    try:
        configure_logging(args.log_level, args.log_file)
        return _guarded(lambda: run_foreground(sources), logged=True)
    finally:
        context.close()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (whoever owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_vacfactory(pid: int) -> bool:
    """True unless /proc says the process is something else (a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume it is ours
    return b"vacfactory" in command


def clear_stale_pidfile(path: str) -> Optional[str]:
    """Remove ``path`` if it names no running vacfactory; return why the daemon must not
    start (a live daemon, an unreadable file), or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot read the pid file {path}: {error.strerror or error}"
    pid = int(text) if text.isdigit() else None
    if pid is not None and pid > 0 and pid != os.getpid() and pid_alive(pid) and _is_vacfactory(pid):
        return f"already running as pid {pid} (pid file {path}); stop it first"
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        return f"cannot remove the stale pid file {path}: {error.strerror or error}"
    print(f"vacfactory daemon: removed the stale pid file {path} (pid {text or 'missing'} is not running)",
          file=sys.stderr)
    return None


def _guarded(action, logged: bool = False) -> int:
    """Run the daemon; report a fatal error on stderr (or, once detached, in the log)."""
    try:
        action()
    except ConfigError as error:
        _fatal(f"configuration invalid:\n{error}", logged)
        return EXIT_CONFIG
    except VacFactoryError as error:
        _fatal(str(error), logged)
        return EXIT_FAILURE
    return EXIT_OK


def _fatal(message: str, logged: bool) -> None:
    if logged:  # stderr is /dev/null after detaching
        for line in message.splitlines():
            log.error("%s", line)
    else:
        print(f"vacfactory: {message}", file=sys.stderr)
