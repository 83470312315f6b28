"""systemd's notify protocol, spoken by a real `vacfactory run` on libvirt's test driver.

conf/vacfactory.service is Type=notify with a watchdog: the daemon must send READY=1 once it
serves, WATCHDOG=1 after every decision round (at least every cycle_seconds, well inside
WatchdogSec) and STOPPING=1 on SIGTERM before it exits 0. Here the test plays systemd: it binds
the datagram socket named by $NOTIFY_SOCKET (a path, or '@name' in the abstract namespace) and
records what arrives, and when.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid as uuidlib
from typing import Iterator, List, Optional, Tuple

import pytest

from tests.waiting import poll, scaled, wait_for
from vacfactory.space.client import query_space
from vacfactory.space.protocol import QueryType
from vacfactory.state.lock import StateLock
from vacfactory.state.status import StatusFiles

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
UNIT = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "vacfactory.service")
CYCLE_SECONDS = 1.0
SPACE = "space.example.org"


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: every datagram, with its monotonic arrival time."""

    def __init__(self, address: str, reading: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: List[Tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if reading:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def received(self) -> List[Tuple[float, str]]:
        with self._lock:
            return list(self.messages)

    def states(self) -> List[str]:
        return [state for _, state in self.received()]

    def times_of(self, state: str) -> List[float]:
        return [when for when, s in self.received() if s == state]

    def wait_for(self, state: str, timeout: float, process: subprocess.Popen) -> float:
        """When ``state`` first arrived; fails if the daemon exits first or it never comes."""
        def arrived() -> List[float]:
            times = self.times_of(state)
            assert times or process.poll() is None, f"the daemon exited ({process.returncode}) before {state}"
            return times
        return wait_for(arrived, state, timeout, interval=0.05, details=lambda: f"received {self.states()}")[0]

    def wait_for_count(self, state: str, count: int, since: float, timeout: float) -> List[float]:
        """The times of the first ``count`` ``state`` messages that arrived after ``since``."""
        def arrived() -> List[float]:
            return [t for t in self.times_of(state) if t >= since][:count]
        return wait_for(lambda: len(arrived()) == count and arrived(), f"{count} x {state}", timeout,
                        interval=0.05, details=lambda: f"received {self.states()}")

    def wait_for_stopping(self) -> None:
        """The daemon has ended: let the reader take its last datagram (if it sent one)."""
        poll(lambda: "STOPPING=1" in self.states(), 2.0, interval=0.02)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory for the socket: AF_UNIX paths are limited to 107 bytes, pytest's are long."""
    path = tempfile.mkdtemp(prefix="vfnotify-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_conf(tmp_path, udp_port: int) -> Tuple[str, str, str]:
    """A factory on the test driver; returns (config path, factory name, state dir)."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not a kernel: the test driver boots nothing")
    name = f"vfnotify{os.getpid()}x{uuidlib.uuid4().hex[:6]}.example.org"
    state_dir = str(tmp_path / "state")
    path = tmp_path / "vacfactory.conf"
    path.write_text(textwrap.dedent(f"""\
        [settings]
        vac_space = {SPACE}
        factory_name = {name}
        factories = .
        state_dir = {state_dir}
        libvirt_uri = test:///default
        domain_type = test
        total_processors = 2
        hs06_per_processor = 10
        udp_port = {udp_port}
        udp_timeout_seconds = 1
        nfs_exporter = none
        cycle_seconds = {CYCLE_SECONDS}
        overload_per_processor = 100000
        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {kernel}
        """))
    return str(path), name, state_dir


def start(conf: str, tmp_path, notify_socket: str, seconds: Optional[float] = None) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket)
    env.pop("WATCHDOG_USEC", None)  # the daemon pings after every round; it reads neither
    env.pop("WATCHDOG_PID", None)
    command = [VACFACTORY, "--config", conf, "run", "--log-level", "DEBUG",
               "--log-file", str(tmp_path / "vacfactory.log")]
    if seconds is not None:
        command += ["--seconds", str(seconds)]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)


def finish(process: subprocess.Popen, timeout: float = 60.0) -> int:
    try:
        return process.wait(scaled(timeout))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the daemon did not exit within {scaled(timeout):.0f} s")


def unit_watchdog_seconds() -> float:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    return float(unit["Service"]["WatchdogSec"])


def answers_vacquery(name: str, port: int) -> bool:
    replies = query_space([name], QueryType.FACTORY, SPACE, 2.0, port=port, local_name=name,
                          resolver=lambda _name: ["127.0.0.1"])
    return name in replies.answered


def test_ready_once_serving_then_watchdog_every_round_then_stopping_on_sigterm(tmp_path, short_dir):
    port = free_udp_port()
    conf, name, state_dir = write_conf(tmp_path, port)
    systemd = FakeSystemd(os.path.join(short_dir, "notify"))
    process = start(conf, tmp_path, systemd.sock.getsockname())
    try:
        systemd.wait_for("READY=1", 60, process)
        # serving: the state lock is held and the VacQuery responder answers
        assert StateLock(state_dir).holder() is not None
        assert answers_vacquery(name, port)
        assert systemd.states()[0] == "READY=1"

        watch_from = time.monotonic()
        pings = systemd.wait_for_count("WATCHDOG=1", 3, watch_from, 6 * CYCLE_SECONDS)
        gaps = [b - a for a, b in zip([watch_from] + pings, pings)]
        # a ping every round (cycle_seconds, plus the round itself), far inside WatchdogSec
        assert max(gaps) < 3 * CYCLE_SECONDS + scaled(1), gaps
        assert max(gaps) < unit_watchdog_seconds() / 2

        process.send_signal(signal.SIGTERM)
        assert finish(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        systemd.wait_for_stopping()
        systemd.close()
    states = systemd.states()
    assert states.count("READY=1") == 1
    assert states.count("STOPPING=1") == 1
    assert states[-1] == "STOPPING=1"  # nothing after it: no watchdog ping from a stopping daemon
    assert set(states) == {"READY=1", "WATCHDOG=1", "STOPPING=1"}


def test_an_abstract_namespace_notify_socket_gets_the_same_messages(tmp_path):
    abstract = f"vacfactory-notify-test-{uuidlib.uuid4().hex}"
    conf, _name, _state = write_conf(tmp_path, free_udp_port())
    systemd = FakeSystemd("\0" + abstract)
    process = start(conf, tmp_path, "@" + abstract, seconds=3)
    try:
        systemd.wait_for("READY=1", 60, process)
        assert finish(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        systemd.wait_for_stopping()
        systemd.close()
    states = systemd.states()
    assert states[0] == "READY=1" and states[-1] == "STOPPING=1"
    assert "WATCHDOG=1" in states


def test_a_notify_socket_nobody_reads_never_blocks_the_engine_or_its_stop(tmp_path, short_dir):
    """systemd busy or wedged: the socket's queue is full. The daemon drops its notifications
    instead of blocking in send(), so it still runs rounds and still stops on SIGTERM."""
    conf, _name, state_dir = write_conf(tmp_path, free_udp_port())
    address = os.path.join(short_dir, "notify")
    systemd = FakeSystemd(address, reading=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.connect(address)
        filler.setblocking(False)
        queued = 0
        with pytest.raises(BlockingIOError):
            for queued in range(100_000):
                filler.send(b"FILLER=1")
    assert queued > 0
    process = start(conf, tmp_path, address)
    try:
        status = StatusFiles(state_dir)

        def beat() -> Optional[float]:
            assert process.poll() is None, "the daemon died"
            return status.last_beat()
        first = wait_for(beat, "a decision round", 60)
        wait_for(lambda: beat() != first, "another round (the engine must not stop running them)", 10 * CYCLE_SECONDS)
        process.send_signal(signal.SIGTERM)
        assert finish(process, timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        systemd.close()
