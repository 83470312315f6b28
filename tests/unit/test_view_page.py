"""The status page's documents from a real daemon (libvirt's test driver) over real HTTP on
loopback: the slots are `vacfactory machines --json`'s rows, the numbers follow VMs starting
and ending, the space shows every factory (silent ones marked), the history survives a
restart, /machine/UUID is `vacfactory machine UUID`, and nothing but the page's paths answers."""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.error

import pytest

from tests.unit.view_harness import ViewDaemon, free_port, write_config
from vacfactory.cli.main import main
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, MachinetypeStatus
from vacfactory.view.evidence import collect, format_evidence
from vacfactory.view.page import CSP, static_file

HOSTILE = "<script>document.title='pwned'</script>"


@pytest.fixture
def view(tmp_path):
    daemons = []

    def make(**kwargs) -> ViewDaemon:
        config = kwargs.pop("config", None) or write_config(str(tmp_path), **kwargs)
        daemons.append(ViewDaemon(config, kwargs.pop("clock", None)))
        return daemons[-1]

    yield make
    for daemon in daemons:
        daemon.close()


def machines_json(capsys, config_path: str) -> list:
    capsys.readouterr()
    assert main(["-c", config_path, "machines", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_slots_are_the_rows_of_machines_json_and_follow_vms_starting_and_ending(view, capsys):
    v = view(processors=4)
    config = v.daemon.watcher.sources.main_file
    v.round()
    doc = v.status()
    assert doc["processors"] == {"total": 4, "busy": 4, "free": 0}
    rows = machines_json(capsys, config)
    assert [{k: s.get(k) for k in row} for s, row in zip(doc["slots"], rows)] == rows
    assert {m["name"]: m["running_vms"] for m in doc["machinetypes"]} == {"alpha": 3, "beta": 1}
    assert {m["name"]: m["target_share"] for m in doc["machinetypes"]} == {"alpha": 0.75, "beta": 0.25}

    # one VM ends with an abort: busy drops, its outcome and message show, the slot is refilled
    (ended,) = [m for m in v.live() if m.record.machinetype == "beta"]
    v.clock.advance(3600)
    v.power_off(ended, "300 " + HOSTILE)
    v.round()
    doc = v.status()
    beta = {m["name"]: m for m in doc["machinetypes"]}["beta"]
    assert beta["outcomes_since_start"] == {"300": 1}
    assert beta["backoff_remaining_seconds"] > 0
    assert doc["engine"]["backoffs"] and "beta" in doc["engine"]["backoffs"]
    (row,) = [r for r in doc["recent"] if r["uuid"] == ended.uuid]
    assert row["shutdown_message"] == "300 " + HOSTILE and row["code"] == 300
    assert row["link"] == f"/machine/{ended.uuid}"
    rows = machines_json(capsys, config)
    assert [{k: s.get(k) for k in row} for s, row in zip(doc["slots"], rows)] == rows
    assert doc["processors"]["busy"] == sum(r["processors"] for r in rows if r["state"] in ("Running", "Starting"))


def test_a_restart_keeps_the_history_and_adds_to_it(view, tmp_path):
    v = view()
    v.round()
    v.clock.advance(60)
    v.round()
    before = json.loads(v.get("/history.json"))["machinetypes"]["alpha"]
    assert len(before["time"]) == 2 and before["started"] == [3, 0]
    config, clock = v.daemon.watcher.sources.main_file, v.clock
    v.close()
    clock.advance(60)
    again = view(config=config, clock=clock)
    assert json.loads(again.get("/history.json"))["machinetypes"]["alpha"]["time"] == before["time"]
    again.round()
    after = json.loads(again.get("/history.json"))["machinetypes"]["alpha"]
    assert after["time"][:2] == before["time"] and len(after["time"]) == 3


def test_the_space_lists_every_factory_and_marks_the_silent_ones(view, tmp_path):
    udp_port = free_port(socket.SOCK_DGRAM)
    path = write_config(str(tmp_path), extra="factories = . 127.0.0.2 127.0.0.3\nudp_timeout_seconds = 0.3\n")
    with open(path) as f:
        text = re.sub(r"udp_port = [0-9]+", f"udp_port = {udp_port}", f.read())
    with open(path, "w") as f:
        f.write(text)
    snapshot = FactorySnapshot(space="space.example.org", factory="127.0.0.2",
                               machinetypes=(MachinetypeStatus("alpha", running_processors=5, running_hs06=50.0),
                                             MachinetypeStatus("gamma", running_processors=2, running_hs06=20.0)))
    responder = Responder(("127.0.0.2", udp_port), lambda: snapshot, "space.example.org", lambda: {"127.0.0.1"})
    responder.start()
    try:
        v = view(config=path)
        v.daemon.space.clock = v.clock  # the engine's clock is the test's
        v.daemon.space.query_once()
        v.round()
        space = {f["name"]: f for f in v.status()["space"]}
        assert space["127.0.0.2"]["state"] == "answered"
        assert space["127.0.0.2"]["processors"] == {"alpha": 5, "gamma": 2}
        assert space["127.0.0.3"]["state"] == "unknown" and space["127.0.0.3"]["age"] is None
        mts = {m["name"]: m for m in v.status()["machinetypes"]}
        alpha, beta = (10.0 * mts[name]["running_processors"] for name in ("alpha", "beta"))
        # shares of the HS06 of this factory's machinetypes, here and over the space
        assert mts["alpha"]["share"] == pytest.approx(alpha / (alpha + beta))
        assert mts["alpha"]["space_share"] == pytest.approx((alpha + 50) / (alpha + 50 + beta))
    finally:
        responder.stop()


def test_machine_link_serves_what_vacfactory_machine_prints_and_only_for_full_uuids(view):
    v = view()
    v.round()
    machine = v.live()[0]
    v.power_off(machine, "200 done")
    v.clock.advance(120)
    v.round()
    body = v.get(f"/machine/{machine.uuid}").decode()
    expected = "\n".join(format_evidence(collect(v.daemon.config.settings.state_dir, machine.uuid))) + "\n"
    assert body == expected and "token" not in body.lower().replace("no token", "")
    for path in (f"/machine/{machine.uuid[:8]}", "/machine/../../etc/passwd", f"/machine/{machine.uuid}/x",
                 "/machine/00000000-0000-0000-0000-000000000000"):
        with pytest.raises(urllib.error.HTTPError) as error:
            v.get(path)
        assert error.value.code == 404, path


def request(v: ViewDaemon, method: str, path: str):
    host, port = v.daemon.metrics.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def test_the_page_and_its_files_carry_a_policy_that_allows_only_this_listener(view):
    v = view()
    response, body = request(v, "GET", "/status.json")
    assert response.status == 503  # before the first round: said, not an empty document
    v.round()
    for path, kind in (("/", "text/html"), ("/status.js", "text/javascript"), ("/status.css", "text/css"),
                       ("/status.json", "application/json"), ("/history.json", "application/json")):
        response, body = request(v, "GET", path)
        assert response.status == 200 and response.getheader("Content-Type").startswith(kind), path
        assert response.getheader("Content-Security-Policy") == CSP
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert "connect-src 'self'" in CSP and "script-src 'self'" in CSP
    response, body = request(v, "GET", "/")
    assert body == static_file("status.html") and b"http" not in body.replace(b'href="/', b"")
    assert b"http" not in static_file("status.js").replace(b"http://www.w3.org/2000/svg", b"")
    response, body = request(v, "HEAD", "/status.json")
    assert response.status == 200 and body == b""
    for method, path, status in (("POST", "/status.json", 405), ("GET", "/status.json/..", 404),
                                 ("GET", "/../state/status.json", 404), ("GET", "/metrics", 200)):
        response, _ = request(v, method, path)
        assert response.status == status, (method, path)


def test_metrics_address_moves_the_listener(view, tmp_path):
    v = view(extra="metrics_address = 127.0.0.2\n")
    assert v.daemon.metrics.address[0] == "127.0.0.2"
    v.round()
    assert v.status()["factory"] == v.daemon.config.settings.factory_name
