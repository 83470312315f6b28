"""/metrics: the text format as prometheus_client's own parser reads it, over a real socket."""

from __future__ import annotations

import http.client
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vacfactory import __version__
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import load_config_string
from vacfactory.metrics import (
    MachinetypeMetrics,
    MetricsRecorder,
    MetricsServer,
    MetricsSnapshot,
    OutcomeCount,
    render,
)

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
        "vacfactory_syslog_messages", "vacfactory_kept_overlays",
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
    assert server._server.server_address[0] == "127.0.0.1"
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

    from vacfactory.metrics import MetricsSnapshot, render

    snapshot = dataclasses.replace(
        MetricsSnapshot(factory="f1.example.org", total_processors=4),
        cpu_efficiency=(("atlas", 0.875),), syslog=(("filed", 12), ("dropped_rate", 3)), kept_overlays=2,
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(render(snapshot)) for s in family.samples}
    assert samples[("vacfactory_cpu_efficiency", (("machinetype", "atlas"),))] == 0.875
    assert samples[("vacfactory_syslog_messages_total", (("result", "dropped_rate"),))] == 3
    assert samples[("vacfactory_kept_overlays", ())] == 2
