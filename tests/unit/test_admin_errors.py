"""Every verb under bad conditions, run as a real ``vacfactory`` subprocess, as an admin meets them.

Each case asserts: no traceback, the documented non-zero exit code, and one line on stderr
naming the cause. The conditions: a state_dir that is a file, cannot be created, is missing,
is on a read-only or a full file system (tmpfs mounts), unreadable to an unprivileged user
(the CLI run as ``nobody`` with ``setpriv``), locked by another engine; a libvirtd that cannot
be reached; a missing configuration, template, log directory or pid directory; a closed
stdout (``| head``); a drain time that is past.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

from tests.waiting import scaled
from vacfactory.state.lock import StateLock
from vacfactory.state.machines import MachineStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


class Site:
    """A site directory every user can read (the config in it), with a state directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.state = os.path.join(root, "state")
        self.conf = os.path.join(root, "vf.conf")
        self.pidfile = os.path.join(root, "vf.pid")
        self.log = os.path.join(root, "vf.log")
        self.mounts: List[str] = []

    def write_conf(self, state_dir: Optional[str] = None, libvirt_uri: str = "test:///default",
                   extra: str = "") -> str:
        kernel = os.path.join(self.root, "vmlinux")
        with open(kernel, "wb") as f:
            f.write(b"the test driver boots nothing")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(self.conf, "w") as f:
            f.write(textwrap.dedent(f"""\
                [settings]
                vac_space = space.example.org
                factory_name = vfadm{os.getpid()}x{uuidlib.uuid4().hex[:6]}.example.org
                factories = .
                state_dir = {state_dir or self.state}
                libvirt_uri = {libvirt_uri}
                domain_type = test
                total_processors = 2
                udp_port = {port}
                nfs_exporter = none
                {extra}
                [machinetype alpha]
                target_share = 1
                machine_model = vm-raw
                kernel_image = {kernel}
                """))
        return self.conf

    def used_state(self, mode: int = 0o700) -> str:
        """A state directory as a factory that ran leaves it (root's, private)."""
        MachineStore(self.state)
        os.chmod(self.state, mode)
        return self.state

    def mount_tmpfs(self, path: str, options: str) -> str:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
        self.mounts.append(path)
        return path


@pytest.fixture
def site() -> Iterator[Site]:
    root = tempfile.mkdtemp(prefix="vfadm-", dir="/tmp")  # not under pytest's private tmp: nobody reads it
    os.chmod(root, 0o755)
    s = Site(root)
    s.write_conf()
    yield s
    pid = _read_pid(s.pidfile)
    if pid:  # a daemon that detached although it should not have: do not leave it running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for path in reversed(s.mounts):
        subprocess.run(["umount", "-l", path], check=False)
    shutil.rmtree(root, ignore_errors=True)


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VACFACTORY_")}
    env["PYTHONPATH"] = REPO
    return env


def vacfactory(*args: str, user: bool = False, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vacfactory.cli.main", *args]
    return subprocess.run((NOBODY if user else []) + command, capture_output=True, text=True, timeout=scaled(60),
                          env=_env(), cwd=cwd or "/")


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """No traceback, exit ``code`` (never 0), one line on stderr that contains ``words``."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert code != 0 and result.returncode == code, (result.returncode, output)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- the cases


class Case(NamedTuple):
    prepare: Callable[[Site], Tuple[List[str], dict]]  # -> (argv, options of vacfactory())
    code: int
    words: Tuple[str, ...]


def _state_is_a_file(s: Site) -> str:
    with open(s.state, "w") as f:
        f.write("not a directory\n")
    return s.state


def _state_cannot_be_made(s: Site) -> str:
    blocker = os.path.join(s.root, "blocker")
    with open(blocker, "w") as f:
        f.write("a file where a directory should be\n")
    s.write_conf(state_dir=os.path.join(blocker, "state"))
    return blocker


def _read_only_state(s: Site) -> str:
    state = s.mount_tmpfs(os.path.join(s.root, "ro"), "ro,size=1m,mode=755")
    s.write_conf(state_dir=state)
    return state


def _full_state(s: Site, override: str = "") -> str:
    state = s.mount_tmpfs(os.path.join(s.root, "full"), "size=64k,mode=755")
    s.write_conf(state_dir=state)
    if override:
        with open(os.path.join(state, "runtime.conf"), "w") as f:
            f.write(override)
    fd = os.open(os.path.join(state, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)
    return state


def _full_drained_state(s: Site) -> str:
    return _full_state(s, override="[settings]\ndraining = yes\n")


def _drained(s: Site) -> str:
    """A readable state directory whose runtime override drains (root's files)."""
    s.used_state(0o755)
    path = os.path.join(s.state, "runtime.conf")
    with open(path, "w") as f:
        f.write("[settings]\ndraining = yes\n")
    return path


def _drain_now_prepared(s: Site) -> str:
    os.makedirs(s.state)
    return s.state


CASES: Dict[str, Case] = {
    # state_dir that is a file
    "run, state_dir is a file": Case(
        lambda s: (["-c", s.conf, "run", "--seconds", "1"], {}) if _state_is_a_file(s) else None,
        73, ("state_dir", "is not a directory")),
    "daemon, state_dir is a file (before detaching)": Case(
        lambda s: (["daemon", "-c", s.conf, "--pidfile", s.pidfile, "--log-file", s.log], {})
        if _state_is_a_file(s) else None, 73, ("state_dir", "is not a directory")),
    "drain, state_dir is a file": Case(
        lambda s: (["drain", "-c", s.conf], {}) if _state_is_a_file(s) else None, 73, ("is not a directory",)),
    "status, state_dir is a file": Case(
        lambda s: (["status", "-c", s.conf], {}) if _state_is_a_file(s) else None, 66, ("is not a directory",)),
    # state_dir that cannot be created
    "run, state_dir cannot be created": Case(
        lambda s: (["run", "-c", s.conf, "--seconds", "1"], {}) if _state_cannot_be_made(s) else None,
        73, ("is unusable", "blocker")),
    "daemon, state_dir cannot be created": Case(
        lambda s: (["daemon", "-c", s.conf, "--pidfile", s.pidfile, "--log-file", s.log], {})
        if _state_cannot_be_made(s) else None, 73, ("is unusable", "blocker")),
    # missing state_dir: verbs that write refuse to create it
    "drain, state_dir missing": Case(lambda s: (["drain", "-c", s.conf], {}), 66, ("does not exist", "not creating")),
    "undrain, state_dir missing": Case(lambda s: (["undrain", "-c", s.conf], {}), 66, ("does not exist",)),
    "status, state_dir missing": Case(lambda s: (["status", "-c", s.conf], {}), 66, ("does not exist",)),
    "machines, state_dir missing": Case(lambda s: (["machines", "-c", s.conf], {}), 1,
                                        ("has the factory ever run here?",)),
    # read-only and full file systems
    "drain, read-only state_dir": Case(lambda s: (["drain", "-c", s.conf], {}) if _read_only_state(s) else None,
                                       73, ("read-only file system", "runtime.conf")),
    "daemon, read-only state_dir": Case(
        lambda s: (["daemon", "-c", s.conf, "--pidfile", s.pidfile, "--log-file", s.log], {})
        if _read_only_state(s) else None, 73, ("is unusable", "read-only file system")),
    "run, read-only state_dir": Case(lambda s: (["run", "-c", s.conf, "--seconds", "1"], {})
                                     if _read_only_state(s) else None, 73, ("read-only file system",)),
    "drain, full disk": Case(lambda s: (["drain", "-c", s.conf], {}) if _full_state(s) else None,
                             74, ("no space left", "runtime.conf")),
    "undrain, full disk": Case(lambda s: (["undrain", "-c", s.conf], {}) if _full_drained_state(s) else None,
                               74, ("no space left", "runtime.conf")),
    "squid-conf, a factory name that does not resolve": Case(
        lambda s: (["squid-conf", "-c", s.conf, s.conf, os.path.join(s.root, "squid.conf")], {}),
        1, ("does not resolve", "squid.conf left unchanged")),
    # no permission: the CLI as nobody on root's private state directory
    "drain as nobody": Case(lambda s: (["drain", "-c", s.conf], {"user": True}) if s.used_state() else None,
                            77, ("no permission", "run as root?")),
    "undrain as nobody": Case(lambda s: (["undrain", "-c", s.conf], {"user": True}) if _drained(s) else None,
                              77, ("no permission", "runtime.conf", "run as root?")),
    "run as nobody": Case(lambda s: (["run", "-c", s.conf, "--seconds", "1"], {"user": True})
                          if s.used_state() else None, 77, ("no permission", "run as root?")),
    "daemon as nobody": Case(
        lambda s: (["daemon", "-c", s.conf, "--pidfile", s.pidfile, "--log-file", s.log], {"user": True})
        if s.used_state() else None, 77, ("no permission", "run as root?")),
    "apel status as nobody": Case(lambda s: (["apel", "status", "-c", s.conf], {"user": True})
                                  if s.used_state() else None, 77, ("no permission", "run as root?")),
    "machines as nobody": Case(lambda s: (["machines", "-c", s.conf], {"user": True})
                               if s.used_state() else None, 77, ("no permission", "/state (run as root?)")),
    "status as nobody": Case(lambda s: (["status", "-c", s.conf], {"user": True})
                             if s.used_state() else None, 77, ("no permission",)),
    "machine as nobody": Case(lambda s: (["machine", "-c", s.conf, "0123"], {"user": True})
                              if s.used_state() else None, 77, ("no permission",)),
    # missing files
    "run, configuration missing": Case(lambda s: (["run", "-c", os.path.join(s.root, "nowhere.conf")], {}),
                                       78, ("nowhere.conf",)),
    "squid-conf, template missing": Case(
        lambda s: (["squid-conf", "-c", s.conf, os.path.join(s.root, "no-template"),
                    os.path.join(s.root, "out")], {}), 1, ("no-template", "No such file", "left unchanged")),
    "daemon, log directory missing": Case(
        lambda s: (["daemon", "-c", s.conf, "--pidfile", s.pidfile, "--log-file",
                    os.path.join(s.root, "no-dir", "vf.log")], {}), 66, ("cannot log to", "no-dir")),
    "daemon, pid file directory missing": Case(
        lambda s: (["daemon", "-c", s.conf, "--pidfile", os.path.join(s.root, "no-dir", "vf.pid"),
                    "--log-file", s.log], {}), 73, ("pid file", "no-dir")),
    # unsafe drains
    "drain --at in the past": Case(lambda s: (["drain", "-c", s.conf, "--at", "2020-01-01T00:00Z"], {})
                                   if _drain_now_prepared(s) else None, 2, ("is in the past", "--now")),
    "drain --at within grace_seconds": Case(
        lambda s: (["drain", "-c", s.write_conf(extra="grace_seconds = 3600"), "--at", "+10m"], {})
        if _drain_now_prepared(s) else None, 2, ("is within grace_seconds (3600 s)", "--now")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_verb_fails_with_one_line_and_its_exit_code(site, name):
    case = CASES[name]
    argv, options = case.prepare(site)
    result = vacfactory(*argv, **options)
    assert_clean_failure(result, case.code, *case.words)
    assert _read_pid(site.pidfile) is None  # no daemon detached
    if name.startswith(("drain", "undrain")) and "missing" in name:
        assert not os.path.exists(site.state)  # never created
    if name.startswith("drain --at"):
        assert not os.path.exists(os.path.join(site.state, "runtime.conf"))


def test_a_second_engine_on_the_same_state_dir_is_refused_before_detaching(site):
    lock = StateLock(site.used_state())
    lock.acquire()  # this process plays the running daemon
    try:
        daemon = vacfactory("daemon", "-c", site.conf, "--pidfile", site.pidfile, "--log-file", site.log)
        run = vacfactory("run", "-c", site.conf, "--seconds", "1")
    finally:
        lock.release()
    for result in (daemon, run):
        assert_clean_failure(result, 1, f"another vacfactory daemon (pid {os.getpid()})", site.state)
    assert _read_pid(site.pidfile) is None


def test_daemon_reads_a_relative_config_before_it_changes_to_the_root(site):
    _state_is_a_file(site)
    result = vacfactory("daemon", "-c", "vf.conf", "--pidfile", "vf.pid", "--log-file", "vf.log", cwd=site.root)
    assert_clean_failure(result, 73, f"state_dir {site.state} is not a directory")


def test_check_with_libvirtd_unreachable_is_critical_and_names_the_uri(site):
    uri = f"qemu+unix:///system?socket={site.root}/no-libvirt-sock"
    site.write_conf(libvirt_uri=uri)
    site.used_state()
    result = vacfactory("check", "-c", site.conf, "--libvirt-timeout", "20")
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2 and f"libvirt {uri} unreachable" in result.stdout


def test_check_as_nobody_is_unknown_not_daemon_not_running(site):
    site.used_state(0o711)  # the lock file's directory can be entered, not listed; the lock is private
    os.chmod(os.path.join(site.state, "machines"), 0o700)
    with open(os.path.join(site.state, "daemon.lock"), "w") as f:
        f.write("1\n")
    os.chmod(os.path.join(site.state, "daemon.lock"), 0o600)
    result = vacfactory("check", "-c", site.conf, "--libvirt-timeout", "20", user=True)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode != 0 and "cannot read the daemon lock" in result.stdout
    assert "daemon not running" not in result.stdout


@pytest.mark.parametrize("argv", [["man"], ["machines", "--json"], ["status", "--json"], ["config", "show"]])
def test_a_closed_stdout_ends_quietly_with_141(site, argv):
    site.used_state(0o755)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already exited
    try:
        result = subprocess.run([sys.executable, "-m", "vacfactory.cli.main", "-c", site.conf, *argv],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=scaled(60), env=_env())
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert result.returncode == 141 and result.stderr == ""


def test_config_is_accepted_after_the_verb_and_from_the_environment(site):
    site.used_state(0o755)
    after = vacfactory("status", "-c", site.conf, "--json")
    assert after.returncode == 0, after.stderr
    env = dict(_env(), VACFACTORY_CONFIG=site.conf)
    from_env = subprocess.run([sys.executable, "-m", "vacfactory.cli.main", "status", "--json"],
                              capture_output=True, text=True, timeout=scaled(60), env=env)
    assert from_env.returncode == 0, from_env.stderr
    assert f'"state_dir": "{site.state}"' in from_env.stdout and f'"state_dir": "{site.state}"' in after.stdout


def test_an_unexpected_error_is_one_line_with_exit_70_and_debug_shows_the_traceback(monkeypatch, capsys):
    from vacfactory.cli import main as cli_main, version

    def broken(args):
        raise KeyError("a bug's stand-in")

    monkeypatch.setattr(version, "run", broken)
    monkeypatch.delenv("VACFACTORY_DEBUG", raising=False)
    assert cli_main.main(["version"]) == 70
    err = capsys.readouterr().err
    assert err.splitlines() == ['vacfactory version: internal error: KeyError: "a bug\'s stand-in" '
                                "(set VACFACTORY_DEBUG=1 for the traceback and please report it)"]
    monkeypatch.setenv("VACFACTORY_DEBUG", "1")
    assert cli_main.main(["version"]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_drain_now_is_the_explicit_way_to_stop_everything(site):
    os.makedirs(site.state)
    started = time.time()
    result = vacfactory("drain", "-c", site.conf, "--at", "2020-01-01T00:00Z", "--now", "--json")
    assert result.returncode == 0, result.stderr
    assert '"shutdown_time": "1577836800"' in result.stdout
    result = vacfactory("drain", "-c", site.conf, "--now")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(site.state, "runtime.conf")) as f:
        value = int(f.read().split("shutdown_time = ")[1].split()[0])
    assert started - 1 <= value <= time.time() + 1
