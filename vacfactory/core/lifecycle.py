"""A VM's life as an explicit state machine: a pure table (state, event) -> (state, actions).

Like h11's transition tables: no I/O, no clock. The engine gathers facts (what the hypervisor
lists, which limits a VM crossed, whether accounting worked), turns each into an :class:`Event`
for one VM, asks :func:`step` what that means, and carries out the returned actions in order
(engine/transitions.py: one handler per action name, the only caller of the checkpoints).
An event that makes no sense in the VM's state (accounting a VM that has not finished,
deleting one that is not done) is a :class:`LifecycleError`, never a silent write.

The state is what the machine directory records (``vm.json``, ``started``, ``finished``,
``accounted``, ``cleaned``), so it survives a crash; :func:`state_of` derives it from which
records exist. Every action that writes is followed (or preceded) by a named crash checkpoint
(vacfactory/faults.py, tests/faults): the checkpoints are derived from this table, in the
order a VM's life reaches them (:func:`checkpoints`).

The flow of one VM::

    NEW --create--> CREATED --publish, start--> CREATED --domain_started/domain_found--> RUNNING
    CREATED --start_failed/domain_missing--> FINISHED (outcome failed: never accounted)
    RUNNING --limit_reached (destroy) / domain_gone--> FINISHED
    FINISHED --account--> ACCOUNTED --clean--> DONE      (or clean first: CLEANED --account--> DONE)
    DONE --expired--> DELETED
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, Iterator, List, Optional, Tuple

from vacfactory.errors import StateError


class VMState(str, Enum):
    """Where a VM is in its life; all but NEW and DELETED are recorded on disk."""

    NEW = "new"              # decided, nothing on disk yet
    CREATED = "created"      # vm.json in place; its domain may or may not exist
    RUNNING = "running"      # `started` written: the domain ran
    FINISHED = "finished"    # `finished` written: how it ended is fixed
    ACCOUNTED = "accounted"  # `accounted` written (an APEL record, or why none was due)
    CLEANED = "cleaned"      # `cleaned` written (exports withdrawn, disks gone), not yet accounted
    DONE = "done"            # accounted and cleaned: kept for machines_dir_days
    DELETED = "deleted"      # the machine directory is gone


class Event(str, Enum):
    """What the engine observed or decided about one VM."""

    CREATE = "create"                  # the scheduler asked for this VM: its machine directory
    PUBLISH = "publish"                # its domain is described: publish its MJF/exports
    START = "start"                    # start its domain (in the creation pool, one VM per thread)
    DOMAIN_STARTED = "domain_started"  # the hypervisor started its domain
    START_FAILED = "start_failed"      # preparing, publishing or starting it failed
    DOMAIN_FOUND = "domain_found"      # a domain runs, or ran, whose start was never recorded (adopt)
    DOMAIN_MISSING = "domain_missing"  # no domain and none was ever started (interrupted creation)
    OBSERVED = "observed"              # its domain is running (the factory's heartbeat record)
    CLOCK_STEPPED = "clock_stepped"    # the wall clock stepped: its start time moves with it
    LIMIT_REACHED = "limit_reached"    # wallclock, heartbeat, shutdown time, paused: kill it
    DOMAIN_GONE = "domain_gone"        # its domain has ended
    ACCOUNT = "account"                # write its APEL record (or record why none is due)
    CLEAN = "clean"                    # withdraw its exports, remove its disks
    EXPIRED = "expired"                # machines_dir_days have passed since it ended


@dataclass(frozen=True)
class Action:
    """One step the engine carries out; ``before``/``after`` name its crash checkpoints."""

    name: str
    writes: str = ""               # the record this action writes in the machine directory
    before: Optional[str] = None
    after: Optional[str] = None


PREPARE = Action("prepare", writes="vm.json", after="create.prepared")
PUBLISH = Action("publish", after="create.published")
START_DOMAIN = Action("start_domain", after="create.domain_started")
RECORD_STARTED = Action("record_started", writes="started")
RECORD_OBSERVATION = Action("record_observation", writes="heartbeat")
MOVE_START = Action("move_start", writes="started")
DESTROY = Action("destroy", before="destroy.before")
#: a kill's last observation (the destroy's end): destroy.after follows it, so a crash there
#: ends the VM when the destroy returned, not at an older heartbeat
RECORD_LAST_OBSERVATION = Action("record_observation", writes="heartbeat", after="destroy.after")
RECORD_FINISHED = Action("record_finished", writes="finished", after="finish.recorded")
WRITE_RECORD = Action("write_apel_record", after="account.written")
MARK_ACCOUNTED = Action("mark_accounted", writes="accounted", after="account.marked")
WITHDRAW = Action("withdraw_exports", after="clean.withdrawn")
REMOVE_DISKS = Action("remove_disks", after="clean.disks_removed")
MARK_CLEANED = Action("mark_cleaned", writes="cleaned")
DELETE_DIRECTORY = Action("delete_directory")

_ACCOUNT = (WRITE_RECORD, MARK_ACCOUNTED)
_CLEAN = (WITHDRAW, REMOVE_DISKS, MARK_CLEANED)

S, E = VMState, Event
#: the whole life of a VM; anything not listed is a LifecycleError
TABLE: Dict[Tuple[VMState, Event], Tuple[VMState, Tuple[Action, ...]]] = {
    # creation is three events: preparing and publishing run on the engine's thread, one VM
    # after another (the domain is described between them), starting in a pool of threads
    (S.NEW, E.CREATE): (S.CREATED, (PREPARE,)),
    (S.CREATED, E.PUBLISH): (S.CREATED, (PUBLISH,)),
    (S.CREATED, E.START): (S.CREATED, (START_DOMAIN,)),
    (S.CREATED, E.DOMAIN_STARTED): (S.RUNNING, (RECORD_STARTED,)),
    (S.CREATED, E.DOMAIN_FOUND): (S.RUNNING, (RECORD_STARTED,)),
    (S.CREATED, E.START_FAILED): (S.FINISHED, (RECORD_FINISHED,)),
    (S.CREATED, E.DOMAIN_MISSING): (S.FINISHED, (RECORD_FINISHED,)),
    (S.RUNNING, E.OBSERVED): (S.RUNNING, (RECORD_OBSERVATION,)),
    (S.RUNNING, E.CLOCK_STEPPED): (S.RUNNING, (MOVE_START,)),
    (S.RUNNING, E.LIMIT_REACHED): (S.FINISHED, (DESTROY, RECORD_LAST_OBSERVATION, RECORD_FINISHED)),
    (S.RUNNING, E.DOMAIN_GONE): (S.FINISHED, (RECORD_FINISHED,)),
    (S.FINISHED, E.ACCOUNT): (S.ACCOUNTED, _ACCOUNT),
    (S.FINISHED, E.CLEAN): (S.CLEANED, _CLEAN),
    (S.ACCOUNTED, E.CLEAN): (S.DONE, _CLEAN),
    (S.CLEANED, E.ACCOUNT): (S.DONE, _ACCOUNT),
    (S.DONE, E.EXPIRED): (S.DELETED, (DELETE_DIRECTORY,)),
}
del S, E


class LifecycleError(StateError):
    """An event that the VM's state does not allow (an engine bug or a damaged directory)."""


@dataclass(frozen=True)
class Transition:
    state: VMState
    actions: Tuple[Action, ...]

    @property
    def checkpoints(self) -> Tuple[str, ...]:
        return tuple(point for action in self.actions for point in (action.before, action.after) if point)


def step(state: VMState, event: Event, machine: Optional[str] = None) -> Transition:
    """What ``event`` means for a VM in ``state``: its next state and the actions to carry out."""
    try:
        new_state, actions = TABLE[(state, event)]
    except KeyError:
        raise LifecycleError(f"{event.value} is not possible in state {state.value}", machine=machine) from None
    return Transition(new_state, actions)


def allowed(state: VMState, event: Event) -> bool:
    return (state, event) in TABLE


def state_of(started: bool, finished: bool, accounted: bool, cleaned: bool) -> VMState:
    """The state recorded by a machine directory that has ``vm.json`` and these records."""
    if not finished:
        return VMState.RUNNING if started else VMState.CREATED
    if accounted and cleaned:
        return VMState.DONE
    if accounted:
        return VMState.ACCOUNTED
    return VMState.CLEANED if cleaned else VMState.FINISHED


#: states in which the VM may have a domain (the engine must watch it)
LIVE = frozenset({VMState.CREATED, VMState.RUNNING})


def _walk_order() -> Iterator[Transition]:
    """Every transition, depth first from NEW in table order: a normal life's order first."""
    seen = {VMState.NEW}

    def visit(state: VMState) -> Iterator[Transition]:
        for (from_state, _event), (to_state, actions) in TABLE.items():
            if from_state is state:
                yield Transition(to_state, actions)
                if to_state not in seen:
                    seen.add(to_state)
                    yield from visit(to_state)

    return visit(VMState.NEW)


def checkpoints() -> Tuple[str, ...]:
    """Every crash checkpoint the table names, each once, in the order a life reaches them."""
    names: List[str] = []
    for transition in _walk_order():
        for point in transition.checkpoints:
            if point not in names:
                names.append(point)
    return tuple(names)
