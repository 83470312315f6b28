"""Carrying out a VM's lifecycle: the one place where an event moves a VM on.

:meth:`Transitions.apply` asks the pure table (core.lifecycle) what ``event`` means in the VM's
state and carries out the returned actions in order, one handler per action name, each
between the crash checkpoints the table names (``before``/``after``), so no engine module names
a checkpoint itself. An event the state does not allow is a LifecycleError, logged with the
VM's name: nothing is written.

What an action needs beyond the VM (the time, CPU seconds, why it was killed, its new record,
its domain, its accounting result) comes in one frozen :class:`Facts` value. A handler returns
the entry and facts for the next action (the destroy moves the time to when it returned: the
VM's end), or None to stop the transition where it is: the record could not be written (a
full disk), the accounting or the withdrawal failed; the VM keeps its state and a later round
tries again. Other errors (preparing, starting a domain) propagate to the caller,
which handles them as before: the checkpoint after a failed action is never reached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

from vacfactory.core import lifecycle
from vacfactory.core.lifecycle import Event, LifecycleError, VMState
from vacfactory.core.outcomes import KillReason
from vacfactory.engine.ending import Finisher
from vacfactory.engine.entries import VMEntry, VMTable
from vacfactory.errors import AccountingError, HypervisorError, StateError, VacFactoryError
from vacfactory.faults import checkpoint
from vacfactory.hypervisor.base import Hypervisor
from vacfactory.state import kept
from vacfactory.state.machines import MachineStore
from vacfactory.state.records import Accounted, VMRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewVM:
    """What preparing a VM writes: its record, MJF and user_data (engine.vmbuild made them)."""

    record: VMRecord
    machinefeatures: Mapping[str, str]
    jobfeatures: Mapping[str, str]
    user_data: Optional[bytes] = None


@dataclass(frozen=True)
class Facts:
    """What the engine knows for one transition, besides the VM itself."""

    #: the time the actions record: now; a start (record_started, move_start); a kill's end
    time: float = 0.0
    #: the domain's CPU seconds as last seen (an observation; a killed VM's final CPU time)
    cpu_seconds: float = 0.0
    kill: Optional[KillReason] = None
    #: why a VM that did not run ended ("create_failed")
    reason: Optional[str] = None
    new: Optional[NewVM] = None     # create: what to prepare
    spec: object = None             # start: the domain to start (hypervisor.base.VMSpec)
    accounted: Union[Accounted, AccountingError, None] = None  # account: the record's result


Carry = Optional[Tuple[VMEntry, Facts]]


def destroy_domain(hypervisor: Hypervisor, uuid: str, name: str) -> None:
    """Destroy a domain; a failure is logged (the next round sees whether it is still there)."""
    try:
        hypervisor.destroy(uuid)
    except HypervisorError as error:
        log.error("%s: destroy failed: %s", name, error)


class Transitions:
    """``settings()`` is the configuration's [settings] in force (keep_on_abnormal_end...)."""

    def __init__(self, store: MachineStore, vms: VMTable, hypervisor: Hypervisor, boundary, finisher: Finisher,
                 settings: Callable[[], object], clock: Callable[[], float]) -> None:
        self.store, self.vms, self.hypervisor, self.boundary = store, vms, hypervisor, boundary
        self.finisher, self.settings, self.clock = finisher, settings, clock
        self._handlers: Dict[str, Callable[[VMEntry, Facts], Carry]] = {
            "prepare": self._prepare, "publish": self._publish, "start_domain": self._start_domain,
            "record_started": self._record_started, "record_observation": self._record_observation,
            "move_start": self._move_start, "destroy": self._destroy, "record_finished": self._record_finished,
            "write_apel_record": self._write_apel_record, "mark_accounted": self._mark_accounted,
            "withdraw_exports": self._withdraw_exports, "remove_disks": self._remove_disks,
            "mark_cleaned": self._mark_cleaned, "delete_directory": self._delete_directory,
        }
        #: what an action tells others once its checkpoint is passed (its record is safe)
        self._afterwards: Dict[str, Callable[[VMEntry], None]] = {"record_finished": finisher.announce}

    @staticmethod
    def state_of(entry: Optional[VMEntry]) -> VMState:
        """The VM's lifecycle state; no entry yet is NEW."""
        return VMState.NEW if entry is None else entry.state

    def allows(self, entry: Optional[VMEntry], event: Event) -> bool:
        return lifecycle.allowed(self.state_of(entry), event)

    def apply(self, entry: Optional[VMEntry], event: Event, facts: Facts = Facts()) -> Optional[VMEntry]:
        """Move ``entry`` (None: a new VM, ``facts.new``) on by ``event``; the entry when every
        action was carried out, None when the event was refused or an action stopped it."""
        name = entry.name if entry is not None else (facts.new.record.name if facts.new else None)
        try:
            transition = lifecycle.step(self.state_of(entry), event, machine=name)
        except LifecycleError as error:
            log.error("%s", error)
            return None
        for action in transition.actions:
            if action.before:
                checkpoint(action.before)
            carried = self._handlers[action.name](entry, facts)  # type: ignore[arg-type]
            if carried is None:
                return None
            entry, facts = carried
            if action.after:
                checkpoint(action.after)
            if action.name in self._afterwards:
                self._afterwards[action.name](entry)
        return entry

    # -- creating ---------------------------------------------------------------------------

    def _prepare(self, entry: None, facts: Facts) -> Carry:
        new = facts.new
        assert new is not None, "a create brings the new VM"
        machine = self.store.prepare(new.record, new.machinefeatures, new.jobfeatures, new.user_data)
        return self.vms.add(machine), facts

    def _publish(self, entry: VMEntry, facts: Facts) -> Carry:
        self.boundary.publish(entry.machine)
        return entry, facts

    def _start_domain(self, entry: VMEntry, facts: Facts) -> Carry:
        self.hypervisor.create(facts.spec)  # type: ignore[arg-type]
        return entry, facts

    def _record_started(self, entry: VMEntry, facts: Facts) -> Carry:
        entry.machine = self.store.mark_started(entry.machine, facts.time)
        return entry, facts

    # -- running ----------------------------------------------------------------------------

    def _record_observation(self, entry: VMEntry, facts: Facts) -> Carry:
        """The factory's last observation; a full disk only costs precision (it goes on)."""
        machine = entry.machine
        cpu_seconds = facts.cpu_seconds
        if machine.heartbeat is not None:
            cpu_seconds = max(cpu_seconds, machine.heartbeat.cpu_seconds)
        try:
            entry.machine = self.store.write_heartbeat(machine, facts.time, cpu_seconds)
        except OSError as error:
            log.error("%s: cannot record the last observation: %s", machine.name, error)
        return entry, facts

    def _move_start(self, entry: VMEntry, facts: Facts) -> Carry:
        entry.machine = self.store.mark_started(entry.machine, facts.time)
        return entry, facts

    def _destroy(self, entry: VMEntry, facts: Facts) -> Carry:
        self.vms.set_final_cpu(entry, facts.cpu_seconds)  # destroy reports no CPU time
        destroy_domain(self.hypervisor, entry.uuid, entry.name)
        # The VM ran until the destroy returned (1-2 s for qemu, more on a busy host, and
        # later kills of a round wait for the earlier ones): that is its end, not the
        # round's start. Recorded as the last observation next, so a restart after a
        # crash right there ends it then too, not at an older heartbeat.
        return entry, replace(facts, time=max(self.clock(), facts.time))

    # -- ending -----------------------------------------------------------------------------

    def _record_finished(self, entry: VMEntry, facts: Facts) -> Carry:
        """Record how it ended; a full disk keeps it live in memory with this same record,
        written at the next try."""
        retry = entry.unrecorded is not None
        finished = entry.unrecorded or self.finisher.ending(entry, facts.time, facts.kill, facts.reason)
        try:
            machine = self.store.mark_finished(entry.machine, finished)
        except OSError as error:
            entry.unrecorded = finished
            log.log(logging.DEBUG if retry else logging.ERROR,
                    "%s: cannot record how it ended, will retry: %s", entry.name, error)
            return None
        self.vms.ended(entry, machine)
        return entry, facts

    # -- settling ---------------------------------------------------------------------------

    def _write_apel_record(self, entry: VMEntry, facts: Facts) -> Carry:
        """The record was written with the round's others (engine.accountant, in parallel):
        its result decides whether the VM is marked accounted."""
        if isinstance(facts.accounted, AccountingError):
            if not entry.accounting_failed:
                log.error("%s: accounting failed, will retry: %s", entry.name, facts.accounted)
                entry.accounting_failed = True
            return None
        entry.accounting_failed = False
        return entry, facts

    def _mark_accounted(self, entry: VMEntry, facts: Facts) -> Carry:
        assert isinstance(facts.accounted, Accounted)
        entry.machine = self.store.mark_accounted(entry.machine, facts.accounted)
        return entry, facts

    def _withdraw_exports(self, entry: VMEntry, facts: Facts) -> Carry:
        try:
            self.boundary.withdraw(entry.machine)
        except VacFactoryError as error:
            log.error("%s: withdrawing exports failed, will retry: %s", entry.name, error)
            return None
        return entry, facts

    def _remove_disks(self, entry: VMEntry, facts: Facts) -> Carry:
        if not self._keep_evidence(entry, facts.time):
            return None  # retried next round: evidence is never deleted by a failed move
        self.hypervisor.remove_disks(entry.machine.disks_dir)
        return entry, facts

    def _keep_evidence(self, entry: VMEntry, now: float) -> bool:
        """With keep_on_abnormal_end, move an abnormally ended VM's disks aside (read-only)."""
        s = self.settings()
        machine = entry.machine
        finished = machine.finished
        if not s.keep_on_abnormal_end or finished is None or machine.started is None:
            return True
        why = kept.abnormal_end(finished.reason, finished.code)
        if why is None:
            return True
        try:
            record = kept.keep_overlay(
                self.store.state_dir, machine.path, uuid=machine.uuid, name=machine.name,
                machinetype=machine.record.machinetype, reason=why, now=now,
                days=s.keep_days, backing_file=machine.record.root_image_path,
                max_kept=s.keep_max_overlays,
            )
        except StateError as error:
            log.error("%s: keeping its disks failed, will retry: %s", machine.name, error)
            return False
        if record is not None:
            log.info("%s: disks kept for %g days (%s)", machine.name, s.keep_days, why)
        return True

    def _mark_cleaned(self, entry: VMEntry, facts: Facts) -> Carry:
        entry.machine = self.store.mark_cleaned(entry.machine, facts.time)
        return entry, facts

    def _delete_directory(self, entry: VMEntry, facts: Facts) -> Carry:
        self.store.delete(entry.machine)
        self.vms.remove(entry.uuid)
        return entry, facts
