"""machine_status as the engine fills it: Vac's meanings for Vac's fields (issue 12 item 9).

A real engine (test:///default libvirt) creates VMs; the snapshot it publishes is what the
responder sends, decoded here as a Vac client would read it.
"""

from __future__ import annotations

import json
import os
import itertools

import pytest

from tests.unit.engine_harness import kernel_file, machinetype_text, make_harness, settings_text
from vacfactory.engine.hoststatus import HostStatus
from vacfactory.engine.snapshot import build_snapshot
from vacfactory.space.protocol import Query, QueryType, replies_for
from vacfactory.state.machines import recent_cpu_percentage
from vacfactory.state.records import Heartbeat

_names = itertools.count(1)


@pytest.fixture
def harness(tmp_path):
    name = f"ms{os.getpid()}n{next(_names)}.example.org"
    kernel = kernel_file(str(tmp_path))
    text = settings_text(name, str(tmp_path / "state"), 4, "")
    text += machinetype_text("alpha", kernel, 1, "machine_model = vm-raw\nmax_processors = 1")
    h = make_harness(str(tmp_path), text, name=name)
    yield h
    h.teardown()


def machine_replies(h, now):
    factory = h.factory
    snapshot = build_snapshot(factory.config, factory.machines, factory.own_states(now),
                              factory.last_finishes, HostStatus(), now, now, True)
    query = Query(QueryType.MACHINES, snapshot.space, "c" * 64)
    return [json.loads(d) for d in replies_for(query, snapshot, now)]


def test_running_slots_send_the_real_model_and_empty_slots_zero(harness):
    h = harness
    before = machine_replies(h, h.clock())
    assert len(before) == 4
    for reply in before:  # never used: Vac's 0 processors and 0.0 HS06 (we sent 1 and 1.0)
        assert reply["state"] == "Shut down" and reply["uuid"] is None
        assert reply["num_processors"] == reply["num_cpus"] == 0 and reply["hs06"] == 0.0
    h.factory.run_round()
    assert len(h.live()) == 4
    for reply in machine_replies(h, h.clock()):
        assert reply["state"] in ("Starting", "Running")
        assert reply["machine_model"] == "vm-raw"  # not "vm" (Vac showed "??")
        assert reply["num_processors"] == 1 and reply["hs06"] == 10.0


def test_cpu_percentage_is_recent_use_summed_over_processors():
    """Vac's heartbeat figure: a busy 4-processor VM shows ~400, a VM idle since the last
    observation shows 0 whatever it did before; lifetime efficiency is a separate field."""
    first = Heartbeat(time=1000.0, cpu_seconds=100.0)
    assert recent_cpu_percentage(None, 1000.0, 100.0) is None
    assert recent_cpu_percentage(first, 1010.0, 140.0) == 400.0  # 40 CPU-s in 10 s
    assert recent_cpu_percentage(first, 1010.0, 100.0) == 0.0  # idle since
    busy = Heartbeat(time=1010.0, cpu_seconds=140.0, cpu_percentage=400.0)
    assert recent_cpu_percentage(busy, 1010.5, 141.0) == 400.0  # too close: keep the figure
    assert recent_cpu_percentage(first, 1010.0, 90.0) == 0.0  # a counter reset is not negative


def test_the_engine_records_recent_cpu_and_sends_lifetime_efficiency_apart(harness):
    h = harness
    h.factory.run_round()
    machine = h.live()[0]
    store = h.factory.store
    start = machine.started.time
    machine = store.write_heartbeat(machine, start + 100.0, 50.0)
    machine = store.write_heartbeat(machine, start + 110.0, 60.0)  # 10 CPU-s in 10 s
    assert machine.heartbeat.cpu_percentage == 100.0
    h.factory.vms[machine.uuid].machine = machine
    (reply,) = [r for r in machine_replies(h, start + 110.0) if r["uuid"] == machine.uuid]
    assert reply["cpu_percentage"] == 100.0
    assert reply["cpu_efficiency"] == pytest.approx(60.0 / 110.0, abs=0.001)
    assert store.load(machine.path).heartbeat.cpu_percentage == 100.0  # on disk too
