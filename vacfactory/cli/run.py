"""``vacfactory run`` (foreground, for systemd) and ``vacfactory daemon`` (detached).

Both check, before anything starts, what makes a start fail: the configuration, the state
directory (created if missing, must be writable), another engine on it, the log. ``daemon``
does so before detaching, so every start-up failure is one line on the terminal and a
non-zero exit; relative --config/--log-file/--pidfile are made absolute first (it changes to
/ once detached).

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
import tempfile
from typing import Optional, Tuple

from vacfactory.config.model import Settings
from vacfactory.cli.common import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    CommandError,
    describe_failure,
    load_config,
)
from vacfactory.errors import ConfigError, VacFactoryError

log = logging.getLogger(__name__)

DEFAULT_PIDFILE = "/run/vacfactory.pid"
DEFAULT_LOGFILE = "/var/log/vacfactory.log"


LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run the factory in the foreground (systemd, containers, debugging)")
    run.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                     help="log events of this level and above (default %(default)s)")
    run.add_argument("--log-file", metavar="FILE",
                     help="log to this file instead of the log_to option (default: stderr)")
    run.add_argument("--seconds", type=float, help="stop after this many seconds (tests, demos)")
    run.set_defaults(handler=run_command)

    daemon = subparsers.add_parser(
        "daemon", help="run the factory detached, with a pid file; start-up problems are reported "
                       "here, before it detaches")
    daemon.add_argument("--pidfile", default=DEFAULT_PIDFILE, metavar="FILE",
                        help="pid file, refused if it names a running vacfactory (default %(default)s)")
    daemon.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="log events of this level and above (default %(default)s)")
    daemon.add_argument("--log-file", metavar="FILE",
                        help="log to this file (default: the log_to option; with log_to = stderr, "
                             f"{DEFAULT_LOGFILE}, as stderr is closed after detaching)")
    daemon.set_defaults(handler=daemon_command)


def _sources(args: argparse.Namespace):
    from vacfactory.cli.common import config_sources

    return config_sources(args)


def log_destination(args: argparse.Namespace, settings: Settings, detached: bool) -> Tuple[str, Optional[str]]:
    """(log_to, log file): --log-file wins, then the log_to option; a detached daemon has no
    stderr, so log_to = stderr means its log_file there."""
    if args.log_file:
        return "file", args.log_file
    log_to = settings.log_to
    if log_to == "stderr" and detached:
        log_to = "file"
    return log_to, settings.log_file if log_to == "file" else None


def check_log_destination(log_to: str, log_file: Optional[str]) -> None:
    """Open the log once, so that a log that cannot be written is reported on the terminal."""
    from vacfactory.logsetup import make_handler

    try:
        make_handler(log_to, log_file).close()
    except OSError as error:
        code, why = describe_failure(error)
        raise CommandError(f"cannot log to {log_file or log_to}: {why}", code) from None


def prepare_state_dir(state_dir: str) -> None:
    """The daemon's state directory exists (created if need be) and can be written."""
    if os.path.exists(state_dir) and not os.path.isdir(state_dir):
        raise CommandError(f"state_dir {state_dir} is not a directory", EXIT_CANTCREAT)
    try:
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=state_dir, prefix=".probe-")
        probe.close()
    except OSError as error:
        code, why = describe_failure(error)
        raise CommandError(f"state_dir {state_dir} is unusable: {why}", code) from None


def check_no_engine(state_dir: str) -> None:
    """One engine per state directory: say so now, not in a log after detaching."""
    from vacfactory.state.lock import StateLock

    holder = StateLock(state_dir).holder()
    if holder is not None:
        raise CommandError(f"another vacfactory daemon (pid {holder if holder > 0 else 'unknown'}) is using "
                           f"state_dir {state_dir}; stop it first", EXIT_FAILURE)


def run_command(args: argparse.Namespace) -> int:
    from vacfactory.daemon import configure_logging, run_foreground

    config = load_config(args)
    prepare_state_dir(config.settings.state_dir)
    check_no_engine(config.settings.state_dir)
    log_to, log_file = log_destination(args, config.settings, detached=False)
    check_log_destination(log_to, log_file)
    configure_logging(args.log_level, log_file, log_to)
    return _guarded(lambda: run_foreground(_sources(args), seconds=args.seconds))


def _absolute(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(path) if path else path


def daemon_command(args: argparse.Namespace) -> int:
    import daemon as python_daemon
    import lockfile
    from daemon.pidfile import TimeoutPIDLockFile

    from vacfactory.daemon import configure_logging, run_foreground

    # the daemon changes to / before it reads them: relative paths are the caller's
    args.config = _absolute(args.config)
    args.log_file = _absolute(args.log_file)
    pidfile = os.path.abspath(args.pidfile)
    sources = _sources(args)
    # everything that can be checked is checked before detaching, where stderr is the terminal
    config = load_config(args)
    problem = clear_stale_pidfile(pidfile)
    if problem is not None:
        print(f"vacfactory daemon: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    state_dir = config.settings.state_dir
    prepare_state_dir(state_dir)
    check_no_engine(state_dir)
    log_to, log_file = log_destination(args, config.settings, detached=True)
    check_log_destination(log_to, log_file)
    if not os.path.isdir(os.path.dirname(pidfile)):
        raise CommandError(f"cannot write the pid file {pidfile}: no such directory", EXIT_CANTCREAT)
    context = python_daemon.DaemonContext(
        pidfile=TimeoutPIDLockFile(pidfile, acquire_timeout=1),
        umask=0o022,  # Vac used umask(0): world-writable state files
        working_directory="/",
    )
    try:
        context.open()
    except lockfile.Error as error:  # another daemon won a race since the check: say so in the log
        configure_logging(args.log_level, log_file, log_to)
        log.error("cannot take the pid file %s: %s", pidfile, error)
        return EXIT_FAILURE
    try:
        configure_logging(args.log_level, log_file, log_to)
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
    except OSError as error:
        code, message = describe_failure(error)
        _fatal(message, logged)
        return code
    return EXIT_OK


def _fatal(message: str, logged: bool) -> None:
    if logged:  # stderr is /dev/null after detaching
        for line in message.splitlines():
            log.error("%s", line)
    else:
        print(f"vacfactory: {message}", file=sys.stderr)
