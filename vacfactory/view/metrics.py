"""Prometheus metrics: a frozen snapshot, its text rendering, and a tiny local HTTP endpoint.

The engine (through :class:`MetricsRecorder`, which counts events as they happen) produces a
:class:`MetricsSnapshot`; :func:`render` turns it into the Prometheus text exposition format
(version 0.0.4); :class:`MetricsServer` answers ``GET /metrics`` on ``<metrics_address>:<metrics_port>``
(default 127.0.0.1) by calling a provider for a fresh snapshot, and hands every other path to an
optional page handler (the status page, vacfactory/view/page.py), from one thread with deadlines and a connection cap
(any local process can connect: it must not be able to pile up threads or hold the endpoint). By default the endpoint binds the loopback address
only: the figures say what a site runs, so they are published through a local agent or proxy,
or on a site's monitoring network (``metrics_address``), never to the world. No dependency on prometheus_client: the format is a few lines of text.

Metric names (all ``vacfactory_``): ``running_vms``, ``running_processors`` (per machinetype),
``total_processors``, ``vm_outcomes_total`` (per machinetype, code and outcome, since start),
``creations_total``, ``creation_failures_total``, ``backoff``, ``backoff_remaining_seconds``
(per machinetype), ``apel_queued_messages``, ``apel_oldest_message_age_seconds``,
``cycle_duration_seconds``, ``rounds_total``, ``start_time_seconds``,
``hypervisor_reachable``, ``cpu_efficiency`` (per machinetype, last day),
``syslog_messages_total`` (by result), ``kept_overlays``, ``space_factories`` (the other
factories of the space by state: ``answered`` the last query round, ``held`` - counted from an
earlier answer - or ``unknown``) and ``info`` (factory name and version as labels).
"""

from __future__ import annotations

import logging
import math
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from vacfactory import __version__

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BIND_ADDRESS = "127.0.0.1"
MAX_REQUEST_HEAD = 8192
_TEXT = "text/plain; charset=utf-8"
#: what a page handler returns: (HTTP status, body, content type, extra headers)
PageAnswer = Tuple[int, bytes, str, Tuple[Tuple[str, str], ...]]


@dataclass(frozen=True)
class MachinetypeMetrics:
    """What is running of one machinetype, its counters since start, and its backoff."""

    machinetype: str
    running_vms: int = 0
    running_processors: int = 0
    creations: int = 0
    creation_failures: int = 0
    in_backoff: bool = False
    backoff_remaining_seconds: float = 0.0


@dataclass(frozen=True)
class OutcomeCount:
    """How many VMs of a machinetype ended with a shutdown code (``none``: no message)."""

    machinetype: str
    code: str
    outcome: str
    count: int


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything /metrics shows, at one instant."""

    factory: str
    total_processors: int
    machinetypes: Tuple[MachinetypeMetrics, ...] = ()
    outcomes: Tuple[OutcomeCount, ...] = ()
    apel_queued_messages: int = 0
    #: None when the queue is empty
    apel_oldest_message_age_seconds: Optional[float] = None
    last_cycle_duration_seconds: float = 0.0
    rounds: int = 0
    start_time: float = 0.0
    hypervisor_reachable: bool = True
    #: machinetype -> CPU efficiency of its VMs that ended in the last day
    cpu_efficiency: Tuple[Tuple[str, float], ...] = ()
    #: syslog receiver counters: result (filed, dropped_unknown, ...) -> messages
    syslog: Tuple[Tuple[str, int], ...] = ()
    kept_overlays: int = 0
    #: the other factories of the space: answered the last query round; silent then but
    #: counted from an earlier answer; unknown (no answer young enough: they add nothing)
    space_answered: int = 0
    space_held: int = 0
    space_unknown: int = 0


#: the states of ``vacfactory_space_factories``, in the order they are rendered
SPACE_STATES = ("answered", "held", "unknown")


# --------------------------------------------------------------------------- rendering


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Sample = Tuple[Mapping[str, str], float]


class _Writer:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        """One metric family; a counter is exposed as ``<name>_total`` (the usual convention)."""
        sample_name = name + "_total" if kind == "counter" else name
        self.lines.append(f"# HELP {sample_name} {help_text}")
        self.lines.append(f"# TYPE {sample_name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{sample_name}{{{text}}} {_number(value)}" if text else f"{sample_name} {_number(value)}")


def render(snapshot: MetricsSnapshot) -> str:
    """The snapshot in the Prometheus text format."""
    w = _Writer()
    mts = snapshot.machinetypes
    w.family("vacfactory_info", "gauge", "This factory and the vacfactory version it runs.",
             [({"factory": snapshot.factory, "version": __version__}, 1)])
    w.family("vacfactory_running_vms", "gauge", "VMs running now, per machinetype.",
             [({"machinetype": m.machinetype}, m.running_vms) for m in mts])
    w.family("vacfactory_running_processors", "gauge", "Processors of the VMs running now, per machinetype.",
             [({"machinetype": m.machinetype}, m.running_processors) for m in mts])
    w.family("vacfactory_total_processors", "gauge", "Processors this factory may give to VMs.",
             [({}, snapshot.total_processors)])
    w.family("vacfactory_vm_outcomes", "counter",
             "VMs that finished since the daemon started, per machinetype, shutdown code and outcome.",
             [({"machinetype": o.machinetype, "code": o.code, "outcome": o.outcome}, o.count)
              for o in snapshot.outcomes])
    w.family("vacfactory_creations", "counter", "VMs created since the daemon started, per machinetype.",
             [({"machinetype": m.machinetype}, m.creations) for m in mts])
    w.family("vacfactory_creation_failures", "counter",
             "VM creations that failed since the daemon started, per machinetype.",
             [({"machinetype": m.machinetype}, m.creation_failures) for m in mts])
    w.family("vacfactory_backoff", "gauge", "1 while a machinetype is backing off after an abort, else 0.",
             [({"machinetype": m.machinetype}, m.in_backoff) for m in mts])
    w.family("vacfactory_backoff_remaining_seconds", "gauge", "Seconds until a machinetype's backoff ends.",
             [({"machinetype": m.machinetype}, max(0.0, float(m.backoff_remaining_seconds))) for m in mts])
    w.family("vacfactory_apel_queued_messages", "gauge", "APEL messages waiting in apel-outgoing.",
             [({}, snapshot.apel_queued_messages)])
    if snapshot.apel_oldest_message_age_seconds is not None:
        w.family("vacfactory_apel_oldest_message_age_seconds", "gauge",
                 "Age of the oldest APEL message waiting in apel-outgoing.",
                 [({}, float(snapshot.apel_oldest_message_age_seconds))])
    w.family("vacfactory_cycle_duration_seconds", "gauge", "How long the last decision round took.",
             [({}, float(snapshot.last_cycle_duration_seconds))])
    w.family("vacfactory_rounds", "counter", "Decision rounds since the daemon started.", [({}, snapshot.rounds)])
    w.family("vacfactory_start_time_seconds", "gauge", "When the daemon started (Unix time).",
             [({}, float(snapshot.start_time))])
    w.family("vacfactory_hypervisor_reachable", "gauge", "1 if the last round could list the hypervisor's VMs.",
             [({}, snapshot.hypervisor_reachable)])
    w.family("vacfactory_cpu_efficiency", "gauge",
             "CPU seconds / (wall seconds x processors) of the VMs that ended in the last day, per machinetype.",
             [({"machinetype": name}, float(value)) for name, value in snapshot.cpu_efficiency])
    w.family("vacfactory_syslog_messages", "counter", "Syslog messages from VMs since start, by what became of them.",
             [({"result": result}, count) for result, count in snapshot.syslog])
    w.family("vacfactory_kept_overlays", "gauge", "VMs whose disks are kept for examination (keep_on_abnormal_end).",
             [({}, snapshot.kept_overlays)])
    w.family("vacfactory_space_factories", "gauge",
             "Other factories of the space: answered the last query round, held (silent, counted from "
             "an earlier answer) or unknown (no recent answer: they add nothing to the shares).",
             [({"state": state}, count) for state, count in zip(
                 SPACE_STATES, (snapshot.space_answered, snapshot.space_held, snapshot.space_unknown))])
    return "\n".join(w.lines) + "\n"


# --------------------------------------------------------------------------- counting


class MetricsRecorder:
    """Counters the engine bumps as things happen (thread-safe), and the snapshot builder."""

    def __init__(self, start_time: float) -> None:
        self.start_time = start_time
        self._lock = threading.Lock()
        self._creations: Dict[str, int] = {}
        self._failures: Dict[str, int] = {}
        self._outcomes: Dict[Tuple[str, str, str], int] = {}
        self._rounds = 0
        self._last_duration = 0.0

    def created(self, machinetype: str) -> None:
        with self._lock:
            self._creations[machinetype] = self._creations.get(machinetype, 0) + 1

    def creation_failed(self, machinetype: str) -> None:
        with self._lock:
            self._failures[machinetype] = self._failures.get(machinetype, 0) + 1

    def finished(self, machinetype: str, code: Optional[int], outcome: str) -> None:
        key = (machinetype, "none" if code is None else str(code), outcome)
        with self._lock:
            self._outcomes[key] = self._outcomes.get(key, 0) + 1

    def round_done(self, duration_seconds: float) -> None:
        with self._lock:
            self._rounds += 1
            self._last_duration = duration_seconds

    def snapshot(self, factory: str, total_processors: int,
                 running: Mapping[str, Tuple[int, int]],
                 backoff_remaining: Mapping[str, float],
                 apel_queued: int = 0, apel_oldest_age: Optional[float] = None,
                 hypervisor_reachable: bool = True) -> MetricsSnapshot:
        """Combine the counters with the engine's gauges.

        ``running``: machinetype -> (VMs, processors); ``backoff_remaining``: machinetype ->
        seconds left (0 or absent: not backing off). Every machinetype named anywhere appears.
        """
        with self._lock:
            names = sorted(set(running) | set(backoff_remaining) | set(self._creations) | set(self._failures))
            machinetypes = tuple(
                MachinetypeMetrics(
                    machinetype=name,
                    running_vms=running.get(name, (0, 0))[0],
                    running_processors=running.get(name, (0, 0))[1],
                    creations=self._creations.get(name, 0),
                    creation_failures=self._failures.get(name, 0),
                    in_backoff=backoff_remaining.get(name, 0.0) > 0,
                    backoff_remaining_seconds=max(0.0, backoff_remaining.get(name, 0.0)),
                )
                for name in names
            )
            outcomes = tuple(OutcomeCount(mt, code, outcome, count)
                             for (mt, code, outcome), count in sorted(self._outcomes.items()))
            return MetricsSnapshot(
                factory=factory, total_processors=total_processors, machinetypes=machinetypes,
                outcomes=outcomes, apel_queued_messages=apel_queued,
                apel_oldest_message_age_seconds=apel_oldest_age, last_cycle_duration_seconds=self._last_duration,
                rounds=self._rounds, start_time=self.start_time, hypervisor_reachable=hypervisor_reachable,
            )


# --------------------------------------------------------------------------- serving


@dataclass(eq=False)
class _Conn:
    """One scrape in progress: the request head read so far, the response left to send."""

    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)


class MetricsServer:
    """``GET /metrics`` on 127.0.0.1:``port`` (0 picks a free port: tests), in its own thread.

    One thread runs a ``selectors`` loop, whatever the clients do: a connection has
    ``timeout`` seconds in total to send its request head (8 KiB at most) and read its answer,
    then it is closed (a trickled half-request cannot hold it longer). At most
    ``max_connections`` are open; a new one beyond that closes the oldest, so a pile of idle
    half-requests delays a scraper by one accept, never shuts it out. One request per
    connection (HTTP/1.0 style, ``Connection: close``).
    """

    def __init__(self, port: int, provider: Callable[[], MetricsSnapshot], *,
                 timeout: float = 5.0, max_connections: int = 64, address: str = BIND_ADDRESS,
                 pages: Optional[Callable[[str], Optional[PageAnswer]]] = None) -> None:
        """``pages``: path -> (status, body, content type, extra headers), or None for 404."""
        self.requested_port = port
        self.bind_address = address
        self.pages = pages
        self.provider = provider
        self.timeout = timeout
        self.max_connections = max_connections
        self._listener: Optional[socket.socket] = None
        self._sel: Optional[selectors.BaseSelector] = None
        self._conns: Dict[int, _Conn] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._wake: Optional[Tuple[socket.socket, socket.socket]] = None

    @property
    def address(self) -> Tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("metrics server not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        """Bind and serve; raises OSError if the port is taken."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.bind_address, self.requested_port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._wake = socket.socketpair()
        self._wake[0].setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake[0], selectors.EVENT_READ, "wake")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics%s", self.bind_address, self.port,
                 ", the status page on /" if self.pages else "")

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        assert self._wake is not None
        try:
            self._wake[1].send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._thread = None
        for conn in list(self._conns.values()):
            self._close(conn)
        for sock in (self._listener, *self._wake):
            if sock is not None:
                sock.close()
        self._listener, self._wake = None, None
        if self._sel is not None:
            self._sel.close()
            self._sel = None

    # the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        while not self._stopping.is_set():
            try:
                for key, mask in self._sel.select(timeout=min(0.25, self.timeout / 2)):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        continue
                    elif mask & selectors.EVENT_READ:
                        self._read(key.data)
                    else:
                        self._write(key.data)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if now > c.deadline]:
                    self._close(conn)
            except Exception:  # noqa: BLE001 - the endpoint must outlive any bug in one round
                log.exception("metrics server loop error; continuing")
                time.sleep(0.1)

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        for _ in range(64):
            try:
                sock, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("metrics accept failed: %s", error)
                return
            if len(self._conns) >= self.max_connections:
                self._close(min(self._conns.values(), key=lambda c: c.deadline))
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.timeout)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0 and b"\n\n" in conn.inbuf:
            end = conn.inbuf.find(b"\n\n")
        if end >= 0:
            conn.out += self._answer(bytes(conn.inbuf[:end]))
        elif len(conn.inbuf) > MAX_REQUEST_HEAD:
            conn.out += _response(431, b"request head too large\n", _TEXT, True)
        else:
            return
        conn.inbuf.clear()
        assert self._sel is not None
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"bad request\n", _TEXT, True)
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", _TEXT, True)
        with_body = method == b"GET"
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            return self._page(path, with_body)
        try:
            body = render(self.provider()).encode("utf-8")
        except Exception as error:  # noqa: BLE001 - a provider bug must give a 500, not a dead server
            log.error("metrics provider failed: %s", error)
            return _response(500, b"metrics unavailable\n", _TEXT, with_body)
        return _response(200, body, CONTENT_TYPE, with_body)

    def _page(self, path: bytes, with_body: bool) -> bytes:
        answer = None
        if self.pages is not None:
            try:
                answer = self.pages(path.decode("ascii", "replace"))
            except Exception as error:  # noqa: BLE001 - a page bug must give a 500, not a dead server
                log.error("status page failed on %r: %s", path[:100], error)
                return _response(500, b"page unavailable\n", _TEXT, with_body)
        if answer is None:
            return _response(404, b"not found: try /metrics\n", _TEXT, with_body)
        status, body, content_type, headers = answer
        return _response(status, body, content_type, with_body, headers)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self._conns.pop(fd, None)
        if self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()



def _response(status: int, body: bytes, content_type: str, with_body: bool,
              headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              431: "Request Header Fields Too Large", 500: "Internal Server Error",
              503: "Service Unavailable"}[status]
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (f"HTTP/1.0 {status} {reason}\r\nServer: vacfactory/{__version__}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
            f"Connection: close\r\n\r\n").encode("ascii")
    return head + body if with_body else head
