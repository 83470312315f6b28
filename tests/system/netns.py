"""Hosts in network namespaces on one bridge: the lab for system tests of several factories.

A :class:`NetnsLab` creates a "switch" namespace holding a bridge and N host namespaces, each
joined to the bridge by a veth pair (``eth0`` inside the host) with an address in a private
/24 that exists only inside these namespaces. Hosts run commands and Python with
:meth:`Host.run`, :meth:`Host.popen` and :meth:`Host.python`; the processes a lab starts are
killed (by their own pids) and every namespace is deleted by :meth:`NetnsLab.teardown`, which
the :func:`netns_lab` fixture registers as a finalizer.

Everything is named ``vfsp<tag>-...`` (veths ``vfsp<tag>h<N>``) with a random tag per lab, so
concurrent runs do not collide and leftovers are easy to recognise. Needs root and ``ip``
(iproute2); where network namespaces do not work the fixture FAILS with the reason - a system
test must never pass by not running.

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


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, no kernel support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def netns_problem() -> Optional[str]:
    """Why network namespaces cannot be used here, or None if they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{secrets.token_hex(2)}-probe"
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


@dataclass
class NetnsLab:
    """A bridge and hosts in namespaces; call :meth:`setup`, then :meth:`teardown`."""

    count: int
    subnet: str = DEFAULT_SUBNET
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: List[Host] = field(default_factory=list)
    processes: List[subprocess.Popen] = field(default_factory=list)
    _namespaces: List[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.tag}-sw"

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
        netns = f"{PREFIX}{self.tag}-h{index}"
        veth = f"{PREFIX}{self.tag}h{index}"
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
        """Kill what the lab started and delete its namespaces (their veths go with them)."""
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


def leftover_namespaces(tag: str) -> List[str]:
    """Namespaces of one lab that still exist (for tests of the teardown itself)."""
    listing = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.startswith(f"{PREFIX}{tag}-")]


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
