"""Every `vacfactory ...` command shown in a code block of README.md and docs/admin-guide.md runs.

Each command runs as a real subprocess against a factory on libvirt's test driver: the
configuration is written at ``<root>/etc/vacfactory.conf``, and every absolute path in a shown
command is moved under ``<root>`` (so ``/etc/squid/squid.conf`` is ``<root>/etc/squid/...``;
nothing outside the test's directory is touched). A command without ``--config`` gets that
configuration. The shown ``vacfactory daemon`` command starts the factory the other commands
talk to (its VacQuery responder answers `machines -a`, `machinetypes` and `factories`), and is
stopped at the end; files the commands read (``INPUTS``) are made first; the shown ``vacfactory run`` runs on a second state directory until its
first heartbeat and is stopped with SIGTERM. ``UUID`` stands for a VM that daemon created.

Every command must print no traceback and exit with the code in ``EXPECTED`` (0 unless listed).
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest

from tests.ports import free_port
from tests.waiting import poll, scaled, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCUMENTS = ("README.md", "docs/admin-guide.md")
#: first words of a shown command (after `vacfactory` and its options) -> (exit code(s), what
#: stdout or stderr must contain), for commands that do not exit 0 against the test factory
EXPECTED: Dict[str, Tuple[Tuple[int, ...], str]] = {
    # the test factory's name is not in DNS, so squid cannot be given its address
    "squid-conf": ((1,), "does not resolve"),
    # OK, or WARNING while a `drain` shown earlier is in force
    "check": ((0, 1), "VACFACTORY "),
}
#: files the shown commands read, made under the root (a site has them)
INPUTS = {"/etc/squid/squid.conf.in": "http_port 3128\nhttp_access allow localnet\n",
          # `simulate --workload`: a short run of the test factory's machinetypes
          "/etc/vacfactory-workload.json": '{"hours": 6, "warmup_hours": 1}'}
#: how long one command may take on an idle machine (the space queries wait udp_timeout_seconds = 2
#: at most); stretched by tests.waiting.scaled on a loaded one
COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class Shown:
    document: str
    line: int
    words: Tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}:{' '.join(self.words[1:])}"

    @property
    def verb(self) -> Tuple[str, ...]:
        """The words after `vacfactory` and its global options (--config FILE, -c FILE)."""
        rest = list(self.words[1:])
        while rest and rest[0].startswith("-"):
            option = rest.pop(0)
            if option in ("--config", "-c") and rest:
                rest.pop(0)
        return tuple(rest)


def shown_commands(document: str) -> List[Shown]:
    """`vacfactory` command lines in the document's ``` blocks (not ini/json blocks), with
    shell comments, a `$ ` prompt and anything after `&&` or `;` removed."""
    found: List[Shown] = []
    with open(os.path.join(REPO, document), encoding="utf-8") as f:
        lines = f.read().split("\n")
    fence: Optional[str] = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence is None or fence not in ("", "sh", "bash", "shell", "console"):
            continue
        text = re.split(r"\s(?:&&|;|\|\|)\s", stripped[2:] if stripped.startswith("$ ") else stripped)[0]
        if text.split()[:1] == ["vacfactory"]:
            found.append(Shown(document, number, tuple(shlex.split(text, comments=True))))
    return found


COMMANDS = [shown for document in DOCUMENTS for shown in shown_commands(document)]


def test_the_documents_show_every_verb():
    """The README's command list is complete (issue 14): every verb is shown somewhere."""
    verbs = {shown.verb[0] for shown in COMMANDS if shown.verb}
    assert verbs >= {"config", "run", "daemon", "check", "machines", "machine", "machinetypes", "factories",
                     "drain", "undrain", "apel", "squid-conf", "simulate", "man", "version", "status",
                     "machinetype"}
    assert any(shown.verb[:2] == ("machines", "--include-done") for shown in COMMANDS)


# --------------------------------------------------------------------------- the test factory




def write_config(root: str, state: str) -> str:
    """A factory on the test driver with nothing for `config check` to complain about."""
    kernel = os.path.join(root, "vmlinux")
    with open(kernel, "w") as f:
        f.write("not a kernel: the test driver boots nothing")
    path = os.path.join(root, "etc", "vacfactory.conf")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            [settings]
            vac_space = space.example.org
            factory_name = doctest{os.getpid()}.example.org
            factories = .
            state_dir = {state}
            libvirt_uri = test:///default
            domain_type = test
            total_processors = 2
            overload_per_processor = 1000
            hs06_per_processor = 10
            udp_port = {free_port(socket.SOCK_DGRAM)}
            udp_timeout_seconds = 2
            http_port = {free_port(socket.SOCK_STREAM)}
            metrics_port = {free_port(socket.SOCK_STREAM)}
            syslog_server =
            nfs_exporter = none
            cycle_seconds = 1
            check_disk_free_warning_mb = 0
            check_disk_free_critical_mb = 0

            [machinetype alpha]
            target_share = 1
            machine_model = vm-raw
            kernel_image = {kernel}
            """))
    return path


def command_line(shown: Shown, root: str, config: str, uuid: Optional[str]) -> List[str]:
    """The shown command with its paths moved under ``root`` and the test configuration."""
    words: List[str] = []
    for word in shown.words[1:]:
        name, eq, value = word.partition("=")
        if word.startswith("/"):
            word = moved(root, word)
        elif eq and name.startswith("-") and value.startswith("/"):
            word = f"{name}={moved(root, value)}"
        elif word == "UUID" and uuid:
            word = uuid
        elif word == "NAME":  # a machinetype of the test factory
            word = "alpha"
        words.append(word)
    if not any(w in ("--config", "-c") or w.startswith("--config=") for w in words):
        words = ["--config", config] + words
    return [sys.executable, "-m", "vacfactory.cli.main"] + words


def moved(root: str, path: str) -> str:
    """``path`` under ``root``, its directory made (as /run, /etc/squid or /var/log exist on a
    real host)."""
    inside = root + path
    os.makedirs(os.path.dirname(inside), exist_ok=True)
    return inside


def run(argv: List[str], root: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("VACFACTORY_CONFIG", None)
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=scaled(timeout))


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def a_vm(state: str) -> Optional[str]:
    machines = os.path.join(state, "machines")
    names = [n for n in os.listdir(machines) if not n.startswith(".")] if os.path.isdir(machines) else []
    return names[0] if names else None


@dataclass
class Factory:
    root: str
    config: str
    state: str
    daemon: subprocess.CompletedProcess
    uuid: str


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """The test factory, started by the `vacfactory daemon` command the documents show."""
    [shown] = [s for s in COMMANDS if s.verb[:1] == ("daemon",)][:1]
    root = str(tmp_path_factory.mktemp("docroot"))
    state = os.path.join(root, "var", "lib", "vacfactory")
    config = write_config(root, state)
    for path, text in INPUTS.items():
        with open(moved(root, path), "w") as f:
            f.write(text)
    argv = command_line(shown, root, config, None)
    if "--log-file" not in argv:
        argv += ["--log-file", os.path.join(root, "var", "log", "vacfactory.log")]
    pidfile = argv[argv.index("--pidfile") + 1] if "--pidfile" in argv else None
    started = run(argv, root)
    assert started.returncode == 0 and pidfile, started.stderr
    pid = wait_for(lambda: read_pid(pidfile), f"the daemon's pid file {pidfile}")
    try:
        uuid = wait_for(lambda: a_vm(state), "a VM of the daemon")
        yield Factory(root, config, state, started, uuid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            stopped = poll(lambda: not alive(pid), 30)
            if not stopped:  # never leave a daemon behind, even when the test has failed
                os.kill(pid, signal.SIGKILL)
            assert stopped, f"the daemon (pid {pid}) did not stop after SIGTERM"


def check_result(shown: Shown, result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    codes, text = EXPECTED.get(shown.verb[0] if shown.verb else "", ((0,), ""))
    assert result.returncode in codes, f"{shown.id}: exit {result.returncode}, expected {codes}:\n{output}"
    assert text in output, f"{shown.id}: {text!r} not in:\n{output}"


@pytest.mark.parametrize("shown", [s for s in COMMANDS if s.verb[:1] not in (("run",), ("daemon",))],
                         ids=lambda s: s.id)
def test_shown_command_runs(shown, factory):
    assert factory.daemon.returncode == 0 and factory.uuid, factory.daemon.stderr
    check_result(shown, run(command_line(shown, factory.root, factory.config, factory.uuid), factory.root))


@pytest.mark.parametrize("shown", [s for s in COMMANDS if s.verb[:1] == ("daemon",)], ids=lambda s: s.id)
def test_shown_daemon_command_starts_the_factory(shown, factory):
    check_result(shown, factory.daemon)
    assert factory.uuid and os.path.isfile(os.path.join(factory.state, "factory-heartbeat"))


@pytest.mark.parametrize("shown", [s for s in COMMANDS if s.verb[:1] == ("run",)], ids=lambda s: s.id)
def test_shown_run_command_runs_until_sigterm(shown, tmp_path):
    state = str(tmp_path / "state")
    config = write_config(str(tmp_path), state)
    env = dict(os.environ, PYTHONPATH=REPO)
    process = subprocess.Popen(command_line(shown, str(tmp_path), config, None), cwd=str(tmp_path), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(state, "factory-heartbeat")) or process.poll() is not None,
                 "the first heartbeat of `vacfactory run`")
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=scaled(COMMAND_TIMEOUT))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    check_result(shown, subprocess.CompletedProcess(process.args, process.returncode, out, err))
