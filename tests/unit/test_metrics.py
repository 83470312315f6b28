"""/metrics: the text format as prometheus_client's own parser reads it, over a real socket;
and the daemon's count of the space's factories by state, against responders on loopback."""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.engine_harness import HOST, Clock, kernel_file, machinetype_text
from tests.waiting import poll, scaled
from vacfactory import __version__
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config_string
from vacfactory.daemon import Daemon
from vacfactory.engine.spacewatch import stale_after
from vacfactory.view.metrics import (
    MachinetypeMetrics,
    MetricsRecorder,
    MetricsServer,
    MetricsSnapshot,
    OutcomeCount,
    render,
)
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, MachinetypeStatus

SNAPSHOT = MetricsSnapshot(
    factory="wn01.example.com",
    total_processors=16,
    machinetypes=(
        MachinetypeMetrics("lhcb", running_vms=3, running_processors=6, creations=10, creation_failures=1),
        MachinetypeMetrics("atlas", running_vms=0, running_processors=0, creations=4, in_backoff=True,
                           backoff_remaining_seconds=42.5),
    ),
    outcomes=(OutcomeCount("lhcb", "200", "success", 7), OutcomeCount("atlas", "300", "abort", 4),
              OutcomeCount("lhcb", "none", "killed", 1)),
    apel_queued_messages=12,
    apel_oldest_message_age_seconds=3600.0,
    last_cycle_duration_seconds=0.25,
    rounds=99,
    start_time=1700000000.0,
    hypervisor_reachable=False,
)


def parse(text: str):
    """{family name: (type, {(sample name, frozenset(labels)): value})}"""
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}
        families[family.name] = (family.type, samples)
    return families


def test_render_is_valid_prometheus_text_with_the_expected_families():
    families = parse(render(SNAPSHOT))
    assert set(families) == {
        "vacfactory_info", "vacfactory_running_vms", "vacfactory_running_processors", "vacfactory_total_processors",
        "vacfactory_vm_outcomes", "vacfactory_creations", "vacfactory_creation_failures", "vacfactory_backoff",
        "vacfactory_backoff_remaining_seconds", "vacfactory_apel_queued_messages",
        "vacfactory_apel_oldest_message_age_seconds", "vacfactory_cycle_duration_seconds", "vacfactory_rounds",
        "vacfactory_start_time_seconds", "vacfactory_hypervisor_reachable", "vacfactory_cpu_efficiency",
        "vacfactory_syslog_messages", "vacfactory_kept_overlays", "vacfactory_space_factories",
    }
    kind, samples = families["vacfactory_running_processors"]
    assert kind == "gauge"
    assert samples == {("vacfactory_running_processors", frozenset({("machinetype", "lhcb")})): 6.0,
                       ("vacfactory_running_processors", frozenset({("machinetype", "atlas")})): 0.0}
    kind, samples = families["vacfactory_vm_outcomes"]
    assert kind == "counter"
    assert samples[("vacfactory_vm_outcomes_total",
                    frozenset({("machinetype", "atlas"), ("code", "300"), ("outcome", "abort")}))] == 4.0
    assert samples[("vacfactory_vm_outcomes_total",
                    frozenset({("machinetype", "lhcb"), ("code", "none"), ("outcome", "killed")}))] == 1.0
    assert families["vacfactory_creation_failures"][1] == {
        ("vacfactory_creation_failures_total", frozenset({("machinetype", "lhcb")})): 1.0,
        ("vacfactory_creation_failures_total", frozenset({("machinetype", "atlas")})): 0.0}
    assert families["vacfactory_backoff"][1][("vacfactory_backoff", frozenset({("machinetype", "atlas")}))] == 1.0
    assert families["vacfactory_backoff_remaining_seconds"][1][
        ("vacfactory_backoff_remaining_seconds", frozenset({("machinetype", "atlas")}))] == 42.5
    assert families["vacfactory_apel_queued_messages"][1] == {("vacfactory_apel_queued_messages", frozenset()): 12.0}
    assert families["vacfactory_rounds"] == ("counter", {("vacfactory_rounds_total", frozenset()): 99.0})
    assert families["vacfactory_cycle_duration_seconds"][1][("vacfactory_cycle_duration_seconds", frozenset())] == 0.25
    assert families["vacfactory_hypervisor_reachable"][1][("vacfactory_hypervisor_reachable", frozenset())] == 0.0
    assert families["vacfactory_info"][1] == {
        ("vacfactory_info", frozenset({("factory", "wn01.example.com"), ("version", __version__)})): 1.0}


def test_an_empty_queue_has_no_oldest_age_and_labels_are_escaped():
    snapshot = MetricsSnapshot(factory='odd"name\\with\nnewline', total_processors=1)
    text = render(snapshot)
    families = parse(text)
    assert "vacfactory_apel_oldest_message_age_seconds" not in families
    labels = dict(next(iter(families["vacfactory_info"][1]))[1])
    assert labels["factory"] == 'odd"name\\with\nnewline'
    assert text.endswith("\n") and all(line for line in text.splitlines())


def test_recorder_counts_events_and_builds_a_snapshot():
    recorder = MetricsRecorder(start_time=123.0)
    for _ in range(3):
        recorder.created("lhcb")
    recorder.creation_failed("atlas")
    recorder.finished("lhcb", 200, "success")
    recorder.finished("lhcb", 200, "success")
    recorder.finished("lhcb", None, "killed")
    recorder.round_done(0.5)
    recorder.round_done(0.75)
    snapshot = recorder.snapshot("wn01.example.com", 8, running={"lhcb": (2, 4), "cms": (1, 1)},
                                 backoff_remaining={"atlas": 30.0, "cms": 0.0}, apel_queued=5, apel_oldest_age=60.0)
    by_name = {m.machinetype: m for m in snapshot.machinetypes}
    assert sorted(by_name) == ["atlas", "cms", "lhcb"]
    assert (by_name["lhcb"].creations, by_name["lhcb"].running_processors, by_name["lhcb"].in_backoff) == (3, 4, False)
    assert (by_name["atlas"].creation_failures, by_name["atlas"].in_backoff) == (1, True)
    assert by_name["cms"].in_backoff is False
    assert snapshot.outcomes == (OutcomeCount("lhcb", "200", "success", 2), OutcomeCount("lhcb", "none", "killed", 1))
    assert (snapshot.rounds, snapshot.last_cycle_duration_seconds, snapshot.start_time) == (2, 0.75, 123.0)
    families = parse(render(snapshot))
    assert families["vacfactory_creations"][1][("vacfactory_creations_total", frozenset({("machinetype", "lhcb")}))] == 3


@pytest.fixture
def server():
    calls = []

    def provider():
        calls.append(1)
        return SNAPSHOT

    s = MetricsServer(0, provider)
    s.start()
    s.calls = calls
    yield s
    s.stop()


def get(port: int, path: str):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        connection.close()


def test_server_answers_get_metrics_over_a_real_socket(server):
    status, content_type, body = get(server.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert parse(body)["vacfactory_running_vms"][1][("vacfactory_running_vms", frozenset({("machinetype", "lhcb")}))] == 3
    get(server.port, "/metrics")
    assert len(server.calls) == 2  # a fresh snapshot per scrape
    assert get(server.port, "/")[0] == 404
    assert get(server.port, "/metrics?x=1")[0] == 200


def test_server_binds_loopback_only(server):
    assert server.address[0] == "127.0.0.1"
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for address in addresses - {"127.0.0.1", "127.0.1.1"}:
        with pytest.raises(OSError):
            socket.create_connection((address, server.port), timeout=2).close()


def test_a_failing_provider_gives_500_and_the_server_survives():
    state = {"fail": True}

    def provider():
        if state["fail"]:
            raise RuntimeError("engine not ready")
        return SNAPSHOT

    s = MetricsServer(0, provider)
    s.start()
    try:
        assert get(s.port, "/metrics")[0] == 500
        state["fail"] = False
        assert get(s.port, "/metrics")[0] == 200
    finally:
        s.stop()


def test_a_taken_port_raises_oserror(server):
    other = MetricsServer(server.port, lambda: SNAPSHOT)
    with pytest.raises(OSError):
        other.start()


def test_metrics_port_option_defaults_to_off():
    host = HostFacts(fqdn="wn01.example.com", cpu_count=4, mem_total_mb=8192)
    config = load_config_string("[settings]\nvac_space = vac01.example.com\n", host)
    assert config.settings.metrics_port == 0
    config = load_config_string("[settings]\nvac_space = vac01.example.com\nmetrics_port = 9105\n", host)
    assert config.settings.metrics_port == 9105


def test_efficiency_syslog_and_kept_overlays_are_rendered():
    import dataclasses

    from vacfactory.view.metrics import MetricsSnapshot, render

    snapshot = dataclasses.replace(
        MetricsSnapshot(factory="f1.example.org", total_processors=4),
        cpu_efficiency=(("atlas", 0.875),), syslog=(("filed", 12), ("dropped_rate", 3)), kept_overlays=2,
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(render(snapshot)) for s in family.samples}
    assert samples[("vacfactory_cpu_efficiency", (("machinetype", "atlas"),))] == 0.875
    assert samples[("vacfactory_syslog_messages_total", (("result", "dropped_rate"),))] == 3
    assert samples[("vacfactory_kept_overlays", ())] == 2


# -- the space's factories by state ----------------------------------------------------------


def space_samples(snapshot: MetricsSnapshot) -> dict:
    """{state: value} of vacfactory_space_factories, read back by prometheus_client's parser."""
    kind, samples = parse(render(snapshot))["vacfactory_space_factories"]
    assert kind == "gauge"
    return {dict(labels)["state"]: value for (_name, labels), value in samples.items()}


def test_space_factories_are_rendered_by_state():
    snapshot = dataclasses.replace(SNAPSHOT, space_answered=7, space_held=2, space_unknown=1)
    assert space_samples(snapshot) == {"answered": 7.0, "held": 2.0, "unknown": 1.0}
    # a factory alone in its space still shows the family, all zeros
    assert space_samples(MetricsSnapshot(factory="f", total_processors=1)) == {
        "answered": 0.0, "held": 0.0, "unknown": 0.0}


SPACE = "metrics.example.org"
PEERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def space_daemon(tmp_path):
    """A Daemon (libvirt's test driver; not started: the test runs its space rounds by hand)
    configured with three peer factories on loopback, of which the test starts responders."""
    port = free_udp_port()
    path = os.path.join(tmp_path, "vacfactory.conf")
    with open(path, "w") as f:
        f.write(
            "[settings]\n"
            f"vac_space = {SPACE}\n"
            f"factory_name = d{os.getpid()}metrics.example.org\n"
            f"factories = . {' '.join(PEERS)}\n"
            f"state_dir = {tmp_path / 'state'}\n"
            "libvirt_uri = test:///default\n"
            "domain_type = test\n"
            "total_processors = 2\n"
            "mb_per_processor = 100\n"
            f"udp_port = {port}\n"
            "udp_timeout_seconds = 0.5\n"
            + machinetype_text("atlas", kernel_file(str(tmp_path))))
    daemon = Daemon(ConfigSources.for_main_file(path), host_facts=HOST, clock=Clock())
    daemon.space.clock = clock = Clock()
    responders = {}

    def start(address: str) -> None:
        snapshot = FactorySnapshot(space=SPACE, factory=address,
                                   machinetypes=(MachinetypeStatus("atlas", running_hs06=10.0),))
        responders[address] = Responder((address, port), lambda: snapshot, SPACE,
                                        lambda: {"127.0.0.1", *PEERS})
        responders[address].start()

    def stop(address: str) -> None:
        responders.pop(address).stop()

    yield daemon, clock, start, stop
    for responder in responders.values():
        responder.stop()
    daemon.hypervisor.close()


def published_space(daemon: Daemon) -> dict:
    daemon.publish_metrics()
    return space_samples(daemon.metrics_snapshot)


def test_daemon_metrics_count_the_space_factories_answered_held_and_unknown(space_daemon):
    daemon, clock, start, stop = space_daemon
    # before any query round nothing is known of the others (this factory is not counted)
    assert published_space(daemon) == {"answered": 0, "held": 0, "unknown": 3}

    start("127.0.0.2")
    start("127.0.0.3")
    daemon.space.query_once()
    assert daemon.space.unknown == {"127.0.0.4"}
    assert published_space(daemon) == {"answered": 2, "held": 0, "unknown": 1}

    # .3 falls silent: one round later its last answer still counts (held) ...
    stop("127.0.0.3")
    clock.now += 5
    daemon.space.query_once()
    assert published_space(daemon) == {"answered": 1, "held": 1, "unknown": 1}

    # ... and beyond the staleness window it is unknown
    clock.now += stale_after(0.5)
    daemon.space.query_once()
    assert published_space(daemon) == {"answered": 1, "held": 0, "unknown": 2}

    # back again: answered
    start("127.0.0.3")
    clock.now += 5
    daemon.space.query_once()
    assert published_space(daemon) == {"answered": 2, "held": 0, "unknown": 1}


def test_daemon_metrics_count_every_factory_unknown_when_no_round_ends(space_daemon):
    """A stuck query thread: the last round's answers age out of the view, and so out of
    'answered' - the gauge says what the shares are computed from, not what once was."""
    daemon, clock, start, stop = space_daemon
    for peer in PEERS:
        start(peer)
    daemon.space.query_once()
    assert published_space(daemon) == {"answered": 3, "held": 0, "unknown": 0}
    clock.now += stale_after(0.5) - 1
    assert published_space(daemon) == {"answered": 3, "held": 0, "unknown": 0}
    clock.now += 2
    assert published_space(daemon) == {"answered": 0, "held": 0, "unknown": 3}


# --------------------------------------------------------------------------- hostile local clients


def _half_request(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    return s


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    s.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_idle_half_requests_take_no_threads_time_out_and_do_not_block_a_scrape():
    s = MetricsServer(0, lambda: SNAPSHOT, timeout=1.0, max_connections=128)
    s.start()
    threads = threading.active_count()
    idle = []
    try:
        opened = time.monotonic()
        idle = [_half_request(s.port) for _ in range(80)]
        assert threading.active_count() == threads  # no thread per connection
        status, _, body = get(s.port, "/metrics")  # served while 80 half-requests wait
        assert status == 200 and "vacfactory_running_vms" in body
        deadline = opened + 1.0 + scaled(3.0)
        assert all(_closed_by_server(c, deadline) for c in idle)  # cut off at their timeout
        assert time.monotonic() - opened >= 0.9  # ... not before it
        assert s.open_connections == 0
    finally:
        for c in idle:
            c.close()
        s.stop()


def test_beyond_the_connection_cap_the_oldest_half_request_makes_room():
    s = MetricsServer(0, lambda: SNAPSHOT, timeout=30.0, max_connections=8)
    s.start()
    idle = []
    try:
        idle = [_half_request(s.port) for _ in range(20)]
        assert get(s.port, "/metrics")[0] == 200  # nobody can shut a scraper out
        assert poll(lambda: s.open_connections <= 8)
        assert _closed_by_server(idle[0], time.monotonic() + 3)  # oldest went first
    finally:
        for c in idle:
            c.close()
        s.stop()


HOSTILE = [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n",              # half-request, left open
    b"G",                                                  # one byte, left open
    b"",                                                   # connect and say nothing
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",       # oversized head
    b"\x00\xff\r\n\r\n",                                   # binary junk
    b"POST /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",  # a body we never read
    b"GET /metrics HTTP/9.9\r\n\r\n",                      # bad version
    b"GET /../../etc/passwd HTTP/1.0\r\n\r\n",            # not /metrics
    b"GET /metrics HTTP/1.0\r\n\r\n",                      # fine, but never reads the answer
    b"GET /metrics\r\n\r\n",                               # HTTP/0.9 style
]


def test_a_hundred_hostile_attempts_leave_no_thread_and_no_connection_behind():
    s = MetricsServer(0, lambda: SNAPSHOT, timeout=1.0, max_connections=32)
    s.start()
    threads = threading.active_count()
    socks = []
    try:
        for i in range(100):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(HOSTILE[i % len(HOSTILE)])
            socks.append(c)
            if i % 3 == 0:
                c.close()  # some vanish at once, some stay open
            assert threading.active_count() == threads
        assert get(s.port, "/metrics")[0] == 200
        assert poll(lambda: s.open_connections == 0)
        assert threading.active_count() == threads
        assert get(s.port, "/metrics")[0] == 200
    finally:
        for c in socks:
            c.close()
        s.stop()
    assert threading.active_count() == threads - 1  # stop() ended the server's own thread
