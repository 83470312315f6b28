"""Hostile VMs for the MJF/metadata HTTP server: the denial patterns of issue 13, played from
distinct loopback addresses (all of 127/8 is local) by one single-threaded selectors loop, so
that a few hundred attacking connections cost the machine little besides the server's work.

Patterns, each on ``CONNECTIONS`` connections per attacking VM, reconnecting when the server
closes or refuses one:

- ``keepalive``: one GET, then silence until just before the idle timeout (``interval``),
  again and again: holds connections open at almost no cost.
- ``pipeline``: ``BATCH`` GETs in one write, read all the answers, again at once.
- ``slowloris``: a request head that never ends, one byte every ``interval``.

Used by tests/unit/test_http_fairness.py (the victim is never refused) and
tests/bench/bench_vmio.py (the victim's p99 under attack).
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

CONNECTIONS = 64
BATCH = 64
GET = b"GET /machinefeatures/total_cpu HTTP/1.1\r\nHost: 169.254.169.253\r\n\r\n"
HALF_HEAD = b"GET /machinefeatures/total_cpu HTTP/1.1\r\nX-Slow: " + b"a" * 4000
PATTERNS = ("keepalive", "pipeline", "slowloris")


@dataclass(eq=False)
class _Attack:
    address: str
    pattern: str
    sock: socket.socket
    due: float = 0.0          # when to send next
    expected: int = 0         # answers still to read
    sent_bytes: int = 0
    buffer: bytes = b""


@dataclass
class Tally:
    """What the attackers achieved: answers by status, connections closed by the server."""

    answers: Dict[str, Dict[str, int]] = field(default_factory=dict)
    closed: Dict[str, int] = field(default_factory=dict)
    held: Dict[str, int] = field(default_factory=dict)  # most connections open at once

    def add(self, pattern: str, status: str, n: int = 1) -> None:
        per = self.answers.setdefault(pattern, {})
        per[status] = per.get(status, 0) + n


def attackers(first: int, count: int) -> List[Tuple[str, str]]:
    """``count`` attacking VMs from 127.0.0.<first>, the patterns in turn."""
    return [(f"127.0.0.{first + i}", PATTERNS[i % len(PATTERNS)]) for i in range(count)]


def run(port: int, vms: Sequence[Tuple[str, str]], seconds: float, interval: float = 0.5,
        ready=None) -> Tally:
    """Attack 127.0.0.1:``port`` from every (address, pattern) for ``seconds``.

    ``ready`` (a callable) is called once every connection has been tried the first time.
    """
    sel = selectors.DefaultSelector()
    tally = Tally()
    attacks: List[_Attack] = []
    reconnect: List[Tuple[float, str, str]] = []
    now = time.monotonic()

    def connect(address: str, pattern: str) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(address, 0))
        except OSError:
            reconnect.append((time.monotonic() + 0.1, address, pattern))
            return
        s.setblocking(False)
        a = _Attack(address, pattern, s)
        attacks.append(a)
        sel.register(s, selectors.EVENT_READ, a)

    def drop(a: _Attack) -> None:
        tally.closed[a.pattern] = tally.closed.get(a.pattern, 0) + 1
        sel.unregister(a.sock)
        a.sock.close()
        attacks.remove(a)
        reconnect.append((time.monotonic() + interval, a.address, a.pattern))

    for address, pattern in vms:
        for _ in range(CONNECTIONS):
            connect(address, pattern)
    if ready is not None:
        ready()
    end = now + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        for pattern in PATTERNS:
            open_now = sum(1 for a in attacks if a.pattern == pattern)
            tally.held[pattern] = max(tally.held.get(pattern, 0), open_now)
        for a in list(attacks):
            if a.due > now or (a.expected and a.pattern != "slowloris"):
                continue
            try:
                if a.pattern == "keepalive":
                    a.sock.send(GET)
                    a.expected, a.due = 1, now + interval
                elif a.pattern == "pipeline":
                    a.sock.sendall(GET * BATCH)
                    a.expected, a.due = BATCH, now
                elif a.sent_bytes < len(HALF_HEAD):
                    a.sock.send(HALF_HEAD[a.sent_bytes:a.sent_bytes + 1])
                    a.sent_bytes += 1
                    a.due = now + interval
            except (BlockingIOError, InterruptedError):
                a.due = now + 0.01
            except OSError:
                drop(a)
        for key, _ in sel.select(timeout=0.02):
            a = key.data
            try:
                data = a.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                drop(a)
                continue
            a.buffer = (a.buffer + data)[-64:]
            for status in ("200", "503", "403", "408", "400"):
                n = data.count(b"HTTP/1.1 " + status.encode())
                if n:
                    tally.add(a.pattern, status, n)
                    if status == "200":
                        a.expected = max(0, a.expected - n)
        for item in [r for r in reconnect if r[0] <= now]:
            reconnect.remove(item)
            connect(item[1], item[2])
    for a in list(attacks):
        sel.unregister(a.sock)
        a.sock.close()
    sel.close()
    return tally


def run_in_child(port: int, vms: Sequence[Tuple[str, str]], seconds: float, conn,
                 cpu: int = -1, nice: int = 0) -> None:
    """``run`` in a child process: sends "ready", then the Tally, over ``conn``. ``nice``
    lowers the attackers' CPU priority: real VMs run on cores of their own, so on a 2-core
    test machine the victim's client should not queue behind them for a CPU."""
    import os
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    if nice:
        os.nice(nice)
    tally = run(port, vms, seconds, ready=lambda: conn.send("ready"))
    conn.send(tally)
