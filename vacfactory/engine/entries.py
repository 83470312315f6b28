"""The engine's memory of its VMs: one :class:`VMEntry` per UUID, in one :class:`VMTable`.

An entry holds the VM's machine directory as last read or written (its lifecycle state is
derived from it, core.lifecycle) and what the engine knows besides that is not on disk yet:
the stop time and final CPU time its lifecycle events brought, whether this process saw it
running, how it ended when that could not be written yet (a full disk). Everything about a
VM goes when its entry goes, so nothing can pile up for VMs that have ended (the soak test
once found event facts kept for ever, one per killed VM, in tables of their own).

Events arrive on the hypervisor's thread: :meth:`VMTable.note_stop` and :meth:`VMTable.take_stop`
are the only methods that thread and the engine share, under the table's lock. Facts about
a VM that is not live (the stop event of one the engine destroyed and finished already, or
another factory's VM on the same libvirtd) are dropped at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from vacfactory.core.lifecycle import VMState
from vacfactory.state.machines import Machine
from vacfactory.state.records import Finished


@dataclass
class VMEntry:
    """Everything the engine knows about one VM."""

    machine: Machine
    #: its shutdown time now (a drain moves it earlier; the VM reads it from its MJF)
    shutdown_time: float
    #: when its stop event arrived (the engine's clock), and its final CPU time if known
    stop_time: Optional[float] = None
    final_cpu: Optional[float] = None
    #: this process saw its domain running (so if it is gone now, it ended since then)
    seen_running: bool = False
    #: the CPU time the last round listed (kept in memory: the heartbeat file is written at most
    #: every HEARTBEAT_WRITE_SECONDS), the fallback when the final read at power-off is missed
    seen_cpu: Optional[float] = None
    #: how it ended, when `finished` could not be written yet: the retry writes the same
    unrecorded: Optional[Finished] = None
    #: its accounting failed and that was logged (logged once until it works)
    accounting_failed: bool = False

    @property
    def uuid(self) -> str:
        return self.machine.uuid

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def state(self) -> VMState:
        return self.machine.phase

    @property
    def live(self) -> bool:
        return self.machine.live


class VMTable:
    """The engine's entries by UUID."""

    def __init__(self) -> None:
        self._entries: Dict[str, VMEntry] = {}
        self._lock = threading.Lock()  # the event thread's facts

    def load(self, machines: Dict[str, Machine], shutdown_time) -> None:
        """Entries for the machine directories found at start-up (``shutdown_time(machine)``:
        its current shutdown time, read for live VMs only)."""
        self._entries = {
            uuid: VMEntry(machine, shutdown_time(machine) if machine.live else machine.record.shutdown_time)
            for uuid, machine in machines.items()
        }

    def add(self, machine: Machine) -> VMEntry:
        entry = self._entries[machine.uuid] = VMEntry(machine, machine.record.shutdown_time)
        return entry

    def get(self, uuid: str) -> Optional[VMEntry]:
        return self._entries.get(uuid)

    def __getitem__(self, uuid: str) -> VMEntry:
        return self._entries[uuid]

    def __contains__(self, uuid: str) -> bool:
        return uuid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[VMEntry]:
        return iter(list(self._entries.values()))

    def remove(self, uuid: str) -> None:
        del self._entries[uuid]

    def live(self) -> List[VMEntry]:
        return [entry for entry in self._entries.values() if entry.live]

    def machines(self) -> Dict[str, Machine]:
        """Every VM's machine directory, by UUID (a copy: readers in other threads iterate it)."""
        return {uuid: entry.machine for uuid, entry in list(self._entries.items())}

    # -- shared with the event thread ---------------------------------------------------

    def note_stop(self, uuid: str, time: Optional[float], cpu_seconds: Optional[float]) -> None:
        """A stop event (``time`` None: a shutdown that only brought the final CPU time)."""
        with self._lock:
            entry = self._entries.get(uuid)
            if entry is None or not entry.live:
                return
            if cpu_seconds is not None:
                entry.final_cpu = cpu_seconds
            if time is not None and entry.stop_time is None:
                entry.stop_time = time

    def take_stop(self, entry: VMEntry) -> Tuple[Optional[float], Optional[float]]:
        """The stop time and final CPU time of ``entry``, forgotten (its end is being recorded)."""
        with self._lock:
            facts = entry.stop_time, entry.final_cpu
            entry.stop_time = entry.final_cpu = None
        return facts

    def ended(self, entry: VMEntry, machine: Machine) -> None:
        """``machine`` (its `finished` written) replaces the entry's, and the event facts go:
        under the lock, so a stop event racing with the end cannot leave one behind."""
        with self._lock:
            entry.machine = machine
            entry.stop_time = entry.final_cpu = None
            entry.unrecorded, entry.seen_running, entry.seen_cpu = None, False, None

    def set_final_cpu(self, entry: VMEntry, cpu_seconds: float) -> None:
        with self._lock:
            entry.final_cpu = cpu_seconds
