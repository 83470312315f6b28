"""Machine directories: the on-disk record of every VM, and the only code that writes them.

Layout of ``<state_dir>/machines/<uuid>/`` (see docs/ARCHITECTURE.md):
``vm.json`` (VMRecord), then ``started``, ``heartbeat``, ``finished``, ``accounted``,
``cleaned`` as the VM moves on, plus ``machinefeatures/``, ``jobfeatures/``, ``joboutputs/``
(written by the VM; for an NFS VM a size-limited filesystem of its own until it is cleaned,
see vmio.jobfs, with ``joboutputs.img`` beside it), ``user_data``, ``console.log`` and ``disks/``.

Crash safety: a VM directory is prepared under ``machines/.new-<uuid>`` and renamed into
place only when complete, so a kill during preparation leaves a ``.new-`` directory that
:meth:`MachineStore.load_all` removes. Every record file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from typing import Dict, Iterable, Mapping, Optional

from vacfactory.atomic import (
    atomic_write_json,
    atomic_write_text,
    fsync_directory,
    remove_stale_temporaries,
    write_new_file,
)
from vacfactory.core import lifecycle
from vacfactory.core.lifecycle import Event, VMState
from vacfactory.core.status import supersedes
from vacfactory.core.views import FinishedVM
from vacfactory.errors import StateError
from vacfactory.state.records import (
    Accounted,
    Cleaned,
    Finished,
    Heartbeat,
    Started,
    VMRecord,
    from_json,
    to_json,
)

log = logging.getLogger(__name__)

NEW_PREFIX = ".new-"
#: a machine directory being deleted: renamed first, so a removal that stops half way (a kill,
#: a file that appears meanwhile) never leaves a machine directory without its vm.json
GONE_PREFIX = ".gone-"
RECORD_FILES = {
    "started": Started,
    "heartbeat": Heartbeat,
    "finished": Finished,
    "accounted": Accounted,
    "cleaned": Cleaned,
}


@dataclass(frozen=True)
class Machine:
    """One VM as recorded on disk: its identity plus how far through its life it got."""

    record: VMRecord
    path: str
    started: Optional[Started] = None
    heartbeat: Optional[Heartbeat] = None
    finished: Optional[Finished] = None
    accounted: Optional[Accounted] = None
    cleaned: Optional[Cleaned] = None

    @property
    def uuid(self) -> str:
        return self.record.uuid

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def state(self) -> str:
        """created | running | finished | done (accounted and cleaned)."""
        if self.finished is None:
            return "running" if self.started is not None else "created"
        if self.accounted is not None and self.cleaned is not None:
            return "done"
        return "finished"

    @property
    def phase(self) -> VMState:
        """Its lifecycle state (core.lifecycle), from the records it has."""
        return lifecycle.state_of(self.started is not None, self.finished is not None,
                                  self.accounted is not None, self.cleaned is not None)

    def check(self, event: Event) -> lifecycle.Transition:
        """The lifecycle transition ``event`` makes; LifecycleError if its state forbids it."""
        return lifecycle.step(self.phase, event, machine=self.name)

    @property
    def live(self) -> bool:
        """True while the VM may have a domain (created or running)."""
        return self.finished is None

    @property
    def machinefeatures_dir(self) -> str:
        return os.path.join(self.path, "machinefeatures")

    @property
    def jobfeatures_dir(self) -> str:
        return os.path.join(self.path, "jobfeatures")

    @property
    def joboutputs_dir(self) -> str:
        return os.path.join(self.path, "joboutputs")

    @property
    def user_data_path(self) -> str:
        return os.path.join(self.path, "user_data")

    @property
    def console_log(self) -> str:
        return os.path.join(self.path, "console.log")

    @property
    def disks_dir(self) -> str:
        return os.path.join(self.path, "disks")


class MachineStore:
    """Reads and writes machine directories under ``<state_dir>/machines``."""

    def __init__(self, state_dir: str, create: bool = True) -> None:
        """``create=False`` for readers: a missing state directory is a StateError."""
        self.state_dir = state_dir
        self.machines_dir = os.path.join(state_dir, "machines")
        self.finishes_dir = os.path.join(state_dir, "finishes")
        #: the engine's copy of finishes/ (set by repair_last_finishes at its start), kept up
        #: to date by mark_finished: the one place the latest-finish rule is applied
        self.latest: Optional[Dict[str, FinishedVM]] = None
        for directory in (state_dir, self.machines_dir, self.finishes_dir):
            if create:
                os.makedirs(directory, mode=0o755, exist_ok=True)
            elif not os.path.isdir(directory):
                raise StateError("no such directory (has the factory ever run here?)", path=directory)

    # -- creating -------------------------------------------------------------------------

    def prepare(
        self,
        record: VMRecord,
        machinefeatures: Mapping[str, str],
        jobfeatures: Mapping[str, str],
        user_data: Optional[bytes] = None,
    ) -> Machine:
        """Write a complete machine directory for a VM that has no domain yet."""
        final = os.path.join(self.machines_dir, record.uuid)
        staging = os.path.join(self.machines_dir, NEW_PREFIX + record.uuid)
        if os.path.exists(final):
            raise StateError("machine directory already exists", machine=record.name, path=final)
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging, 0o755)
        try:
            self._fill_staging(staging, record, machinefeatures, jobfeatures, user_data)
            os.rename(staging, final)
        except BaseException:
            # a full disk (or anything else): leave no half-made directory behind until the
            # next daemon start; each failed creation would otherwise leak one
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.machines_dir)
        return Machine(record=record, path=final)

    @staticmethod
    def _fill_staging(
        staging: str,
        record: VMRecord,
        machinefeatures: Mapping[str, str],
        jobfeatures: Mapping[str, str],
        user_data: Optional[bytes],
    ) -> None:
        for sub in ("machinefeatures", "jobfeatures", "joboutputs", "disks"):
            os.mkdir(os.path.join(staging, sub), 0o755)
        # The staging directory is invisible until renamed, so its files need no temp file
        # of their own, and no fsync: a power cut kills the VM that reads them, while vm.json
        # (synced) keeps the VM accountable.
        for key, value in machinefeatures.items():
            write_new_file(os.path.join(staging, "machinefeatures", key), value.encode())
        for key, value in jobfeatures.items():
            write_new_file(os.path.join(staging, "jobfeatures", key), value.encode())
        if user_data is not None:
            # user_data may hold a proxy or site secrets: only root reads it (and a container,
            # whose default command is /user_data, runs it)
            mode = 0o700 if record.machine_model == "docker" else 0o600
            write_new_file(os.path.join(staging, "user_data"), user_data, mode=mode)
        atomic_write_json(os.path.join(staging, "vm.json"), to_json(record))

    # -- reading --------------------------------------------------------------------------

    def load_all(self, recover: bool = False) -> Dict[str, Machine]:
        """Every machine directory.

        ``recover=True`` (only the engine, at start-up, holding the state lock) also removes
        what interrupted preparations and writes left behind; readers such as the CLI must
        not, since the daemon may be writing those files right now. A directory that does
        not parse is logged and skipped (never deleted: an admin should see it).
        """
        machines: Dict[str, Machine] = {}
        if recover:
            remove_stale_temporaries(self.machines_dir)
            # A kill during a write of status.json, factory-heartbeat, factory-error or a
            # finishes/ file leaves its temporary here too; nothing else would ever remove it.
            # (Only a `vacfactory drain` writing runtime.conf in the very millisecond of a
            # daemon start could lose its temporary to this; it then fails and is repeated.)
            remove_stale_temporaries(self.finishes_dir)
            remove_stale_temporaries(self.state_dir)
        for entry in sorted(os.listdir(self.machines_dir)):
            path = os.path.join(self.machines_dir, entry)
            if entry.startswith(NEW_PREFIX):
                if recover:
                    log.info("%s: removing interrupted preparation", entry[len(NEW_PREFIX):])
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if entry.startswith(GONE_PREFIX):
                shutil.rmtree(path, ignore_errors=True)  # a deletion that did not finish
                continue
            if entry.startswith(".") or not os.path.isdir(path):
                continue
            try:
                machine = self.load(path, recover=recover)
            except StateError as error:
                log.error("%s: cannot load machine directory: %s", entry, error)
                continue
            machines[machine.uuid] = machine
        return machines

    def load(self, path: str, recover: bool = False) -> Machine:
        """Load one machine directory (``recover``: see :meth:`load_all`)."""
        if recover:
            remove_stale_temporaries(path)
        record = from_json(VMRecord, self._read_json(os.path.join(path, "vm.json")), os.path.join(path, "vm.json"))
        if os.path.basename(path) != record.uuid:
            raise StateError("vm.json uuid does not match the directory name", path=path)
        parts = {}
        for name, cls in RECORD_FILES.items():
            file_path = os.path.join(path, name)
            if os.path.exists(file_path):
                parts[name] = from_json(cls, self._read_json(file_path), file_path)
        return Machine(record=record, path=path, **parts)

    @staticmethod
    def _read_json(path: str) -> object:
        try:
            with open(path, "rb") as f:
                return json.loads(f.read(1 << 20))
        except FileNotFoundError:
            raise StateError("missing", path=path) from None
        except (OSError, ValueError) as error:
            raise StateError(f"unreadable: {error}", path=path) from None

    def current_shutdown_time(self, machine: Machine) -> float:
        """The VM's shutdown time now: jobfeatures/shutdowntime_job (drain moves it earlier)."""
        try:
            with open(os.path.join(machine.jobfeatures_dir, "shutdowntime_job")) as f:
                return float(f.read(64).strip())
        except (OSError, ValueError):
            return machine.record.shutdown_time

    def last_finishes(self) -> Dict[str, FinishedVM]:
        """The newest-created finished VM of each machinetype (finishes/<machinetype>.json)."""
        result: Dict[str, FinishedVM] = {}
        for entry in os.listdir(self.finishes_dir):
            if not entry.endswith(".json"):
                continue
            path = os.path.join(self.finishes_dir, entry)
            try:
                finish = from_json(FinishedVM, self._read_json(path), path)
            except StateError as error:
                log.error("cannot read %s: %s", path, error)
                continue
            result[finish.machinetype] = finish
        return result

    def repair_last_finishes(self, machines: Iterable[Machine]) -> Dict[str, FinishedVM]:
        """:meth:`last_finishes`, brought up to date with the finished VMs in ``machines``.

        A kill between writing a VM's ``finished`` and its finishes/ record would otherwise
        leave the record one VM behind for good (Vac rebuilt it from the machine directories
        every time). Only the engine calls this, at start-up, holding the state lock.
        """
        latest = self.last_finishes()
        for machine in machines:
            if machine.finished is not None and machine.finished.outcome != "failed":
                finish = finished_vm(machine, machine.finished)
                known = latest.get(finish.machinetype)
                if finish != known and supersedes(finish, known):
                    log.info("%s: finishes/%s.json brought up to date", machine.name, finish.machinetype)
                    self._write_last_finish(finish)
                    latest[finish.machinetype] = finish
        self.latest = latest
        return latest

    # -- moving a VM through its life -----------------------------------------------------

    def mark_started(self, machine: Machine, time: float) -> Machine:
        """Record the domain's start (or move it with a step of the clock: a running VM)."""
        machine.check(Event.CLOCK_STEPPED if machine.started is not None else Event.DOMAIN_STARTED)
        started = Started(time=time)
        # Atomic but not fsynced: a killed daemon loses nothing (the page cache survives it),
        # and the kernel writes it back within ~30 s, long before a VM passes fizzle_seconds,
        # so even a power cut cannot cost a VM that was worth accounting its record.
        atomic_write_json(os.path.join(machine.path, "started"), to_json(started), sync=False)
        return replace(machine, started=started)

    def write_heartbeat(self, machine: Machine, time: float, cpu_seconds: float) -> Machine:
        machine.check(Event.OBSERVED)
        heartbeat = Heartbeat(time=time, cpu_seconds=cpu_seconds,
                              cpu_percentage=recent_cpu_percentage(machine.heartbeat, time,
                                                                   cpu_seconds))
        # rewritten every cycle for every VM: atomic, but not worth an fsync each time
        atomic_write_json(os.path.join(machine.path, "heartbeat"), to_json(heartbeat), sync=False)
        return replace(machine, heartbeat=heartbeat)

    def mark_finished(self, machine: Machine, finished: Finished) -> Machine:
        machine.check(Event.DOMAIN_GONE if machine.started is not None else Event.START_FAILED)
        atomic_write_json(os.path.join(machine.path, "finished"), to_json(finished))
        if finished.outcome != "failed":
            self._update_last_finish(machine, finished)
        return replace(machine, finished=finished)

    def mark_accounted(self, machine: Machine, accounted: Accounted) -> Machine:
        """Record its APEL record (or why none was due); only once, only after it finished."""
        machine.check(Event.ACCOUNT)
        atomic_write_json(os.path.join(machine.path, "accounted"), to_json(accounted))
        return replace(machine, accounted=accounted)

    def mark_cleaned(self, machine: Machine, time: float) -> Machine:
        machine.check(Event.CLEAN)
        cleaned = Cleaned(time=time)
        atomic_write_json(os.path.join(machine.path, "cleaned"), to_json(cleaned))
        return replace(machine, cleaned=cleaned)

    def rewrite_features(
        self, machine: Machine, machinefeatures: Mapping[str, str], jobfeatures: Mapping[str, str]
    ) -> None:
        """Rewrite some MJF keys of a running VM (a drain moves its shutdown time earlier)."""
        for key, value in machinefeatures.items():
            atomic_write_text(os.path.join(machine.machinefeatures_dir, key), value)
        for key, value in jobfeatures.items():
            atomic_write_text(os.path.join(machine.jobfeatures_dir, key), value)

    def delete(self, machine: Machine) -> None:
        """Remove a finished, accounted and cleaned machine directory (retention expired)."""
        machine.check(Event.EXPIRED)
        if os.path.ismount(machine.joboutputs_dir):
            # an NFS VM's joboutputs filesystem (vmio.jobfs) is released when the VM is cleaned;
            # removing the tree under a mount would empty it and leave the mount behind
            raise StateError("refusing to delete: joboutputs is still a mount point", machine=machine.name)
        gone = os.path.join(self.machines_dir, GONE_PREFIX + machine.uuid)
        os.rename(machine.path, gone)
        shutil.rmtree(gone, ignore_errors=True)
        if os.path.exists(gone):
            log.warning("%s: machine directory not wholly removed yet (%s); retried at the next pass",
                        machine.name, gone)

    def _update_last_finish(self, machine: Machine, finished: Finished) -> None:
        """Make ``machine`` its machinetype's latest finish unless a newer-created VM is."""
        finish = finished_vm(machine, finished)
        if self.latest is not None:
            previous = self.latest.get(finish.machinetype)
        else:
            path = self._last_finish_path(finish.machinetype)
            try:
                previous = from_json(FinishedVM, self._read_json(path), path)
            except StateError:
                previous = None
        if supersedes(finish, previous):
            self._write_last_finish(finish)
            if self.latest is not None:
                self.latest[finish.machinetype] = finish

    def _last_finish_path(self, machinetype: str) -> str:
        return os.path.join(self.finishes_dir, machinetype + ".json")

    def _write_last_finish(self, finish: FinishedVM) -> None:
        atomic_write_json(self._last_finish_path(finish.machinetype), to_json(finish))


def finished_vm(machine: Machine, finished: Finished) -> FinishedVM:
    """The finishes/ record of ``machine``, which ended as ``finished``."""
    record = machine.record
    return FinishedVM(
        uuid=record.uuid,
        machinetype=record.machinetype,
        finished_time=finished.end_time,
        code=finished.code,
        text=finished.text,
        outcome=finished.outcome,
        created=record.created,
    )


def latest_by_slot(machines: Iterable[Machine]) -> Dict[int, Machine]:
    """Each slot's live VM, else the most recent VM that used it (Vac's one-line-per-slot view)."""
    by_slot: Dict[int, Machine] = {}
    for machine in machines:
        current = by_slot.get(machine.record.slot)
        if current is None or (machine.live, machine.record.created) > (current.live, current.record.created):
            by_slot[machine.record.slot] = machine
    return by_slot


def recent_cpu_percentage(previous: Optional[Heartbeat], time: float,
                          cpu_seconds: float) -> Optional[float]:
    """Vac's heartbeat figure: CPU seconds used since ``previous`` per wall second, x 100 (a
    busy 4-processor VM: ~400). None without an earlier observation to compare with; an
    observation less than a second after the previous one keeps the previous figure (a
    destroy right after a round must not turn a steady figure into noise)."""
    if previous is None:
        return None
    wall = time - previous.time
    if wall < 1.0:
        return previous.cpu_percentage
    return round(100.0 * max(cpu_seconds - previous.cpu_seconds, 0.0) / wall, 1)
