"""The engine's one dispatcher (engine/transitions.py): every VM transition goes through the
lifecycle table, the crash checkpoints come from it, and an event the state does not allow
is refused (a LifecycleError, logged with the VM's name) without writing anything."""

from __future__ import annotations

import ast
import logging
import os

import pytest

from tests.unit.test_engine_fake import REPO, fake_engine  # noqa: F401 (the fixture)
from vacfactory import faults
from vacfactory.core import lifecycle
from vacfactory.core.lifecycle import Event, VMState
from vacfactory.engine import transitions as transitions_module
from vacfactory.engine.transitions import Facts

ENGINE = os.path.join(REPO, "vacfactory", "engine")


def checkpoint_calls():
    """(module, argument) of every checkpoint(...) call in vacfactory/engine."""
    for name in sorted(os.listdir(ENGINE)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ENGINE, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            called = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(called, "id", getattr(called, "attr", None)) == "checkpoint":
                yield name, ast.unparse(node.args[0])


def test_no_engine_module_names_a_checkpoint():
    calls = list(checkpoint_calls())
    # only the dispatcher calls checkpoint, with the names the table gives each action
    assert sorted(calls) == [("transitions.py", "action.after"), ("transitions.py", "action.before")]


def test_the_fault_suite_kills_at_exactly_the_tables_checkpoints():
    assert faults.POINTS == lifecycle.checkpoints()
    with open(os.path.join(REPO, "tests", "faults", "test_crash.py")) as f:
        tree = ast.parse(f.read())
    imports = [(n.module, [a.name for a in n.names]) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert ("vacfactory.faults", ["POINTS"]) in imports  # the suite's list is the table's


def test_every_action_of_the_table_has_one_handler(fake_engine):  # noqa: F811
    factory, _hv, _clock = fake_engine(total=1)
    named = {action.name for _state, actions in lifecycle.TABLE.values() for action in actions}
    assert set(factory.transitions._handlers) == named


def test_a_life_reaches_every_checkpoint_in_the_tables_order(fake_engine, monkeypatch):  # noqa: F811
    reached = []
    monkeypatch.setattr(transitions_module, "checkpoint", reached.append)
    factory, hv, clock = fake_engine(total=1, extra="max_wallclock_seconds = 100\n")
    factory.run_round()  # created and started
    clock.advance(200)
    report = factory.run_round()  # killed at its wallclock limit, accounted, cleaned; replaced
    assert len(report.killed) == 1 and len(report.created) == 1
    # each once, in order; then the replacement's creation
    assert reached == list(lifecycle.checkpoints()) + ["create.prepared", "create.published", "create.domain_started"]


def running_vm(fake_engine):  # noqa: F811
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (entry,) = factory.vms.live()
    assert entry.state is VMState.RUNNING
    return factory, entry


def snapshot(path):
    files = {}
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, path)] = f.read()
    return files


@pytest.mark.parametrize("event", [Event.ACCOUNT, Event.CLEAN, Event.EXPIRED, Event.DOMAIN_STARTED, Event.CREATE])
def test_a_disallowed_event_is_refused_logged_and_writes_nothing(fake_engine, caplog, event):  # noqa: F811
    factory, entry = running_vm(fake_engine)
    before, machine = snapshot(entry.machine.path), entry.machine
    with caplog.at_level(logging.ERROR, logger="vacfactory.engine.transitions"):
        assert factory.transitions.apply(entry, event, Facts(time=factory.clock())) is None
    assert f"{entry.name}: {event.value} is not possible in state running" in caplog.text
    assert snapshot(entry.machine.path) == before and entry.machine is machine
    assert factory.vms[entry.uuid] is entry and entry.live


def test_a_done_vm_cannot_finish_again(fake_engine, caplog):  # noqa: F811
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (entry,) = factory.vms.live()
    hv.power_off(entry.uuid, cpu_seconds=5.0)
    clock.advance(10)
    factory.run_round()
    assert entry.state is VMState.DONE
    before, calls = snapshot(entry.machine.path), list(hv.calls)
    for event in (Event.DOMAIN_GONE, Event.LIMIT_REACHED, Event.ACCOUNT, Event.OBSERVED):
        assert factory.transitions.apply(entry, event, Facts(time=clock(), cpu_seconds=9.0)) is None
    assert snapshot(entry.machine.path) == before
    assert "limit_reached is not possible in state done" in caplog.text
    assert hv.calls == calls  # nothing was destroyed either
