"""Prometheus metrics: a frozen snapshot, its text rendering, and a tiny local HTTP endpoint.

The engine (through :class:`MetricsRecorder`, which counts events as they happen) produces a
:class:`MetricsSnapshot`; :func:`render` turns it into the Prometheus text exposition format
(version 0.0.4); :class:`MetricsServer` answers ``GET /metrics`` on ``127.0.0.1:<metrics_port>``
by calling a provider for a fresh snapshot. The endpoint binds the loopback address only: the
figures say what a site runs, so they are published through a local agent or proxy, never
directly. No dependency on prometheus_client: the format is a few lines of text.

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
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from vacfactory import __version__

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BIND_ADDRESS = "127.0.0.1"


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


class _Handler(BaseHTTPRequestHandler):
    server_version = f"vacfactory/{__version__}"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8", with_body)
            return
        try:
            body = render(self.server.provider()).encode("utf-8")  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - a provider bug must give a 500, not a dead server
            log.error("metrics provider failed: %s", error)
            self._send(500, b"metrics unavailable\n", "text/plain; charset=utf-8", with_body)
            return
        self._send(200, body, CONTENT_TYPE, with_body)

    def _send(self, status: int, body: bytes, content_type: str, with_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        log.debug("metrics %s: " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], provider: Callable[[], MetricsSnapshot]) -> None:
        self.provider = provider
        super().__init__(address, _Handler)


class MetricsServer:
    """``GET /metrics`` on 127.0.0.1:``port`` (0 picks a free port: tests), in its own thread."""

    def __init__(self, port: int, provider: Callable[[], MetricsSnapshot]) -> None:
        self.requested_port = port
        self.provider = provider
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("metrics server not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Bind and serve; raises OSError if the port is taken."""
        self._server = _Server((BIND_ADDRESS, self.requested_port), self.provider)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", BIND_ADDRESS, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
