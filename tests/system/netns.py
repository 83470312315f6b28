"""Hosts in network namespaces on one bridge: the lab for system tests of several factories.

A :class:`NetnsLab` creates a "switch" namespace holding a bridge and N host namespaces, each
joined to the bridge by a veth pair (``eth0`` inside the host) with an address in a private
/24 that exists only inside these namespaces. Hosts run commands and Python with
:meth:`Host.run`, :meth:`Host.popen` and :meth:`Host.python`; the processes a lab starts are
killed (by their own pids) and every namespace is deleted by :meth:`NetnsLab.teardown`, which
the :func:`netns_lab` fixture registers as a finalizer.

Everything is named ``<prefix><tag>-...`` (veths ``<prefix><tag>h<N>``; the prefix is
``vfsp`` unless a lab is given another) with a random tag per lab, so concurrent runs do not
collide and leftovers are easy to recognise. Needs root and ``ip`` (iproute2); where network
namespaces do not work the fixture FAILS with the reason - a system test must never pass by not
running.

Name resolution: :meth:`NetnsLab.hosts_file` gives every host of the lab its own
``/etc/hosts``. ``ip netns exec NS`` bind-mounts each file of ``/etc/netns/NS/`` over the same
file in ``/etc`` (in the private mount namespace of the command it runs), so factories find
each other by name while the real ``/etc/hosts`` is never touched; teardown removes
``/etc/netns/NS/``.

Usage::

    def test_something(netns_lab):
        lab = netns_lab(3)                     # h1, h2, h3 on 10.199.50.0/24
        server = lab.hosts[0].popen([sys.executable, "-m", "http.server"])
        print(lab.hosts[1].run(["ping", "-c1", lab.hosts[0].ip]).stdout)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

PREFIX = "vfsp"
DEFAULT_SUBNET = "10.199.50"
REPO = Path(__file__).resolve().parents[2]
#: where ``ip netns exec`` looks for per-namespace replacements of files in /etc
ETC_NETNS = Path("/etc/netns")
#: interface names are at most 15 characters: prefix + 4 hex digits + "h" + host index
MAX_PREFIX = 15 - 4 - 1 - 3


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, no kernel support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def netns_problem(prefix: str = PREFIX) -> Optional[str]:
    """Why network namespaces cannot be used here, or None if they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{prefix}{secrets.token_hex(2)}-probe"
    try:
        result = _ip("netns", "add", probe, check=False)
        if result.returncode != 0:
            return f"ip netns add failed: {result.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One host: a namespace with ``eth0`` at :attr:`ip` on the lab's bridge."""

    lab: "NetnsLab"
    index: int
    netns: str
    ip: str

    @property
    def name(self) -> str:
        return f"h{self.index}"

    def _argv(self, argv: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command in this host and wait for it (text output captured)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", str(REPO))
        kwargs.setdefault("env", self.lab.env())
        return subprocess.run(self._argv(argv), timeout=timeout, check=check, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a command in this host; the lab kills it at teardown if it still runs."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", str(REPO))
        kwargs.setdefault("env", self.lab.env())
        process = subprocess.Popen(self._argv(argv), **kwargs)
        self.lab.processes.append(process)
        return process

    def python(self, code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run ``python -c code args...`` (the test interpreter, the repo importable)."""
        return self.run([sys.executable, "-c", code, *args], **kwargs)

    def spawn_python(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``python argv...`` in this host (e.g. ``["-m", "some.module", ...]``)."""
        return self.popen([sys.executable, *argv], **kwargs)

    def write_etc(self, name: str, text: str) -> Path:
        """Make ``/etc/<name>`` read ``text`` for commands run in this host from now on.

        The file goes to ``/etc/netns/<netns>/<name>``, which ``ip netns exec`` bind-mounts
        over ``/etc/<name>`` for the command it starts (processes already running keep what
        they saw). The lab removes the directory at teardown.
        """
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a file name in /etc: {name!r}")
        directory = ETC_NETNS / self.netns
        if not ETC_NETNS.exists():
            self.lab._made_etc_netns = True
        directory.mkdir(parents=True, exist_ok=True)
        if directory not in self.lab._etc_dirs:
            self.lab._etc_dirs.append(directory)
        path = directory / name
        path.write_text(text)
        return path


@dataclass
class NetnsLab:
    """A bridge and hosts in namespaces; call :meth:`setup`, then :meth:`teardown`."""

    count: int
    subnet: str = DEFAULT_SUBNET
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: List[Host] = field(default_factory=list)
    processes: List[subprocess.Popen] = field(default_factory=list)
    #: first part of every namespace and interface name (labs of different suites differ)
    prefix: str = PREFIX
    _namespaces: List[str] = field(default_factory=list)
    _etc_dirs: List[Path] = field(default_factory=list)
    _made_etc_netns: bool = False

    def __post_init__(self) -> None:
        if not self.prefix.isalnum() or len(self.prefix) > MAX_PREFIX:
            raise ValueError(f"lab prefix must be 1-{MAX_PREFIX} letters or digits: {self.prefix!r}")

    @property
    def switch(self) -> str:
        return f"{self.prefix}{self.tag}-sw"

    def hosts_file(self, names: Dict[str, str]) -> None:
        """Give every host an ``/etc/hosts`` mapping ``names`` (host name -> address) plus
        localhost, so processes started in the lab resolve each other without DNS."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{address} {name}" for name, address in names.items()]
        for host in self.hosts:
            host.write_etc("hosts", "\n".join(lines) + "\n")

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def setup(self) -> "NetnsLab":
        if not 1 <= self.count <= 200:
            raise ValueError("a lab has 1 to 200 hosts")
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for _ in range(self.count):
                self.add_host()
        except subprocess.CalledProcessError as error:
            self.teardown()
            raise NetnsUnavailable(f"{' '.join(error.cmd)}: {error.stderr.strip()}") from None
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self) -> Host:
        """One more host on the bridge (addresses .1, .2, ... in creation order)."""
        index = len(self.hosts) + 1
        netns = f"{self.prefix}{self.tag}-h{index}"
        veth = f"{self.prefix}{self.tag}h{index}"
        self._add_namespace(netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", veth, "master", "br0", "up")
        address = f"{self.subnet}.{index}"
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(self, index, netns, address)
        self.hosts.append(host)
        return host

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Wait until the first host reaches every other one over the bridge.

        Probe: a connected UDP socket to port 9 of each host; the ICMP "port unreachable"
        coming back (ECONNREFUSED) proves the path works (no ping binary needed).
        """
        if len(self.hosts) < 2:
            return
        result = self.hosts[0].python(_PROBE, str(timeout), *[h.ip for h in self.hosts[1:]],
                                      timeout=timeout + 30)
        if result.returncode != 0:
            raise NetnsUnavailable(f"hosts unreachable over the bridge: {result.stdout}"
                                   f"{result.stderr[-300:]}")

    def teardown(self) -> None:
        """Kill what the lab started, delete its namespaces (their veths go with them) and
        the files it put in /etc/netns."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self.processes.clear()
        for name in reversed(self._namespaces):
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()
        for directory in self._etc_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._etc_dirs.clear()
        if self._made_etc_netns:
            try:
                ETC_NETNS.rmdir()  # this lab made it; only if no other lab has files there now
            except OSError:
                pass
            self._made_etc_netns = False

    def __enter__(self) -> "NetnsLab":
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


_PROBE = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
for ip in sys.argv[2:]:
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        s.connect((ip, 9))
        try:
            s.send(b"probe")
            s.recv(1)
        except ConnectionRefusedError:
            break
        except OSError:
            pass
        finally:
            s.close()
        if time.monotonic() > deadline:
            print("unreachable:", ip)
            sys.exit(1)
"""


def leftover_namespaces(tag: str, prefix: str = PREFIX) -> List[str]:
    """Namespaces of one lab that still exist (for tests of the teardown itself)."""
    listing = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.startswith(f"{prefix}{tag}-")]


@pytest.fixture
def netns_lab(request) -> Callable[..., NetnsLab]:
    """``netns_lab(n)`` -> a set-up :class:`NetnsLab` of n hosts, torn down after the test.

    FAILS (never skips) the test when network namespaces are unavailable.
    """
    problem = netns_problem()
    if problem is not None:
        pytest.fail(f"network namespaces unavailable: {problem}")

    def make(count: int, **kwargs) -> NetnsLab:
        lab = NetnsLab(count, **kwargs)
        request.addfinalizer(lab.teardown)
        try:
            lab.setup()
            lab.wait_reachable()
        except NetnsUnavailable as error:
            pytest.fail(f"network namespaces unavailable: {error}")
        return lab

    return make


def ready_lab(count: int, prefix: str = PREFIX, **kwargs) -> "NetnsLab":
    """A lab of ``count`` hosts, set up and reachable; the caller tears it down. Namespaces that
    cannot be had fail the test (never a skip: CI must not hide a missing component)."""
    problem = netns_problem(prefix)
    if problem is not None:
        pytest.fail(f"network namespaces unavailable: {problem}")
    lab = NetnsLab(count, prefix=prefix, **kwargs)
    try:
        lab.setup()
        lab.wait_reachable()
    except NetnsUnavailable as error:
        lab.teardown()
        pytest.fail(f"network namespaces unavailable: {error}")
    return lab
