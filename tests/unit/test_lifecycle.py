"""The VM lifecycle table (core/lifecycle.py) and the store's checked transitions.

The property test drives one VM with every possible event sequence (each event in any state,
the forbidden ones must be refused and change nothing): a VM is never lost (never deleted
unless its end was recorded and it was accounted and cleaned; from every state a life can
still reach DELETED) and never accounted twice.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vacfactory import faults
from vacfactory.core import lifecycle
from vacfactory.core.lifecycle import Event, LifecycleError, VMState
from vacfactory.errors import StateError, VacFactoryError
from vacfactory.state.machines import MachineStore
from vacfactory.state.records import Accounted, Finished, VMRecord

EVENTS = st.lists(st.sampled_from(list(Event)), max_size=40)
UUID = "8a0c3b52-1f4e-4b53-9c0e-0f6a1d2e3b4c"


def run(events):
    """Apply ``events`` to a new VM; return the final state and every action carried out."""
    state, done = VMState.NEW, []
    for event in events:
        if not lifecycle.allowed(state, event):
            with pytest.raises(LifecycleError):
                lifecycle.step(state, event)
            continue
        transition = lifecycle.step(state, event)
        state = transition.state
        done.extend(action.name for action in transition.actions)
    return state, done


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_no_event_sequence_accounts_a_vm_twice(events):
    _, done = run(events)
    assert done.count("write_apel_record") <= 1
    assert done.count("mark_accounted") <= 1
    assert done.count("mark_cleaned") <= 1
    assert done.count("record_finished") <= 1


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_no_event_sequence_loses_a_vm(events):
    state, done = run(events)
    if "start_domain" in done:  # a domain may have existed: its end is recorded before it goes
        if state is VMState.DELETED:
            assert {"record_finished", "mark_accounted", "mark_cleaned"} <= set(done)
    if state in (VMState.DONE, VMState.DELETED):
        assert done.count("mark_accounted") == 1 and done.count("mark_cleaned") == 1
    # and from wherever it is, a life can still reach the end (nothing is stuck)
    assert VMState.DELETED in reachable(state)


def reachable(state):
    seen, todo = {state}, [state]
    while todo:
        current = todo.pop()
        for (from_state, _), (to_state, _) in lifecycle.TABLE.items():
            if from_state is current and to_state not in seen:
                seen.add(to_state)
                todo.append(to_state)
    return seen


def test_a_live_vm_cannot_be_deleted_or_accounted():
    for state in lifecycle.LIVE:
        for event in (Event.ACCOUNT, Event.CLEAN, Event.EXPIRED):
            with pytest.raises(LifecycleError, match=f"{event.value} is not possible in state {state.value}"):
                lifecycle.step(state, event, machine="vm-01")


def test_the_error_is_a_project_error_naming_the_machine():
    with pytest.raises(VacFactoryError) as raised:
        lifecycle.step(VMState.DONE, Event.ACCOUNT, machine="vm-07.example.org")
    assert isinstance(raised.value, StateError)
    assert str(raised.value).startswith("vm-07.example.org: account is not possible in state done")


def test_crash_checkpoints_are_derived_from_the_table_in_life_order():
    assert faults.POINTS == lifecycle.checkpoints()
    assert faults.POINTS == (
        "create.prepared", "create.published", "create.domain_started", "destroy.before", "destroy.after",
        "finish.recorded", "account.written", "account.marked", "clean.withdrawn", "clean.disks_removed",
    )


def test_creation_steps_happen_only_before_a_vm_has_run():
    """Creating is three events (prepared and published on the engine's thread, started in the
    creation pool); publishing and starting keep the VM created and write no record."""
    assert [state for state in VMState if lifecycle.allowed(state, Event.CREATE)] == [VMState.NEW]
    for event in (Event.PUBLISH, Event.START):
        assert [state for state in VMState if lifecycle.allowed(state, event)] == [VMState.CREATED]
        transition = lifecycle.step(VMState.CREATED, event)
        assert transition.state is VMState.CREATED and all(not a.writes for a in transition.actions)


def test_state_of_reads_the_records():
    assert lifecycle.state_of(False, False, False, False) is VMState.CREATED
    assert lifecycle.state_of(True, False, False, False) is VMState.RUNNING
    assert lifecycle.state_of(True, True, False, False) is VMState.FINISHED
    assert lifecycle.state_of(True, True, True, False) is VMState.ACCOUNTED
    assert lifecycle.state_of(True, True, False, True) is VMState.CLEANED
    assert lifecycle.state_of(False, True, True, True) is VMState.DONE


# -- the store refuses transitions the table forbids ------------------------------------------


def record() -> VMRecord:
    return VMRecord(uuid=UUID, name="vm-00.example.org", slot=0, factory="f.example.org",
                    space="s.example.org", machinetype="alpha", machine_model="vm-raw", processors=1,
                    memory_mb=100, created=1000.0, shutdown_time=9000.0)


def finished() -> Finished:
    return Finished(time=2000.0, end_time=2000.0, cpu_seconds=1.0, outcome="success", reason="no_message")


def test_mark_accounted_refuses_a_machine_that_has_not_finished(tmp_path):
    store = MachineStore(str(tmp_path))
    machine = store.mark_started(store.prepare(record(), {}, {}), 1000.0)
    with pytest.raises(LifecycleError, match="account is not possible in state running"):
        store.mark_accounted(machine, Accounted(time=2000.0, skipped="never started"))
    assert store.load(machine.path).accounted is None  # nothing written


def test_mark_accounted_refuses_a_second_accounting(tmp_path):
    store = MachineStore(str(tmp_path))
    machine = store.mark_finished(store.mark_started(store.prepare(record(), {}, {}), 1000.0), finished())
    machine = store.mark_accounted(machine, Accounted(time=2000.0, archive="/a", queued="q"))
    with pytest.raises(LifecycleError, match="account is not possible in state accounted"):
        store.mark_accounted(machine, Accounted(time=2001.0, archive="/b", queued="r"))
    assert store.load(machine.path).accounted.archive == "/a"


def test_a_finished_machine_cannot_finish_again_or_be_deleted_before_it_is_done(tmp_path):
    store = MachineStore(str(tmp_path))
    machine = store.mark_finished(store.mark_started(store.prepare(record(), {}, {}), 1000.0), finished())
    with pytest.raises(LifecycleError):
        store.mark_finished(machine, finished())
    with pytest.raises(LifecycleError, match="expired is not possible in state finished"):
        store.delete(machine)
    assert store.load(machine.path).phase is VMState.FINISHED
