"""Build the FactorySnapshot the VacQuery responder answers from, after every engine round.

The responder never reads files or asks libvirt: it serves this immutable object, replaced
whole after each round (an atomic reference swap), so an answer is never half old, half new.

A round that creates many VMs (or slow ones: a real domain takes 0.1-1 s to start) would leave
the other factories blind to them until it ends, so the daemon also rebuilds the snapshot
after a creation when :class:`SnapshotPacer` says one is due - see there for the cost bound.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Mapping, Optional

from vacfactory.core.efficiency import machinetype_efficiency
from vacfactory.core.views import FinishedVM, MachinetypeState
from vacfactory.engine import naming
from vacfactory.engine.hoststatus import HostStatus
from vacfactory.space.snapshot import (
    STATE_RUNNING,
    STATE_SHUTDOWN,
    STATE_STARTING,
    FactorySnapshot,
    FactoryStatus,
    MachineStatus,
    MachinetypeStatus,
)
from vacfactory.state.machines import Machine, latest_by_slot


def build_snapshot(
    config,
    machines: Mapping[str, Machine],
    own_states: Mapping[str, MachinetypeState],
    last_finishes: Mapping[str, FinishedVM],
    host: HostStatus,
    now: float,
    last_round: float,
    http_alive: bool,
    efficiency: Optional[Mapping[str, float]] = None,
) -> FactorySnapshot:
    s = config.settings
    hs06_per_processor = s.hs06_per_processor or 1.0
    by_slot = latest_by_slot(machines.values())
    slots = tuple(
        machine_status(by_slot[slot], now) if slot in by_slot
        else MachineStatus(machine=naming.domain_name(s.factory_name, slot))
        for slot in range(s.total_processors)
    )
    live = [m for m in machines.values() if m.live]
    machinetypes = tuple(
        machinetype_status(name, config.machinetypes.get(name), own_states.get(name, MachinetypeState()),
                           last_finishes.get(name), machines, s.mb_per_processor,
                           (efficiency or {}).get(name))
        for name in config.machinetypes
    )
    factory_status = FactoryStatus(
        running_processors=sum(m.record.processors for m in live),
        running_machines=len(live),
        running_hs06=sum(m.record.hs06 for m in live),
        max_processors=s.total_processors,
        max_machines=s.total_processors,
        max_hs06=s.total_processors * hs06_per_processor,
        root_disk_avail_kb=host.root_disk_avail_kb,
        root_disk_avail_inodes=host.root_disk_avail_inodes,
        daemon_disk_avail_kb=host.daemon_disk_avail_kb,
        daemon_disk_avail_inodes=host.daemon_disk_avail_inodes,
        load_average=host.load_average,
        kernel_version=host.kernel_version,
        os_issue=host.os_issue,
        boot_time=host.boot_time,
        factory_heartbeat_time=last_round,
        responder_heartbeat_time=now,
        mjf_heartbeat_time=now if http_alive else 0,
        metadata_heartbeat_time=now if http_alive else 0,
        swap_used_kb=host.swap_used_kb,
        swap_free_kb=host.swap_free_kb,
        mem_used_kb=host.mem_used_kb,
        mem_total_kb=host.mem_total_kb,
    )
    return FactorySnapshot(
        space=s.vac_space,
        factory=s.factory_name,
        site=s.gocdb_sitename or "",
        machines=slots,
        machinetypes=machinetypes,
        factory_status=factory_status,
        time=now,
    )


#: during a round, the snapshot is at most this old after a creation ...
REFRESH_SECONDS = 0.5
#: ... and rebuilt once the time since the last build is this many times what that build cost
COST_RATIO = 20.0


class SnapshotPacer:
    """When a creation in the middle of a round should rebuild the snapshot.

    A build costs ~0.5 ms with 64 VMs (~1-2 ms with 252): rebuilding after *every* creation
    of a fast fill would add a few percent to it, and O(n^2) work to a big one. So after a
    creation a rebuild is due once ``min(REFRESH_SECONDS, COST_RATIO x last build cost)`` has
    passed since the last build: snapshots then take at most 1/COST_RATIO (5 %) of a round's
    time, a creation that takes longer than ~20 builds (every real VM) is published right
    after it, and a VM created in a burst of fast ones is published at the latest after the
    next creation (or with the end-of-round snapshot).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 refresh_seconds: float = REFRESH_SECONDS, cost_ratio: float = COST_RATIO) -> None:
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.cost_ratio = cost_ratio
        self._built_at = -math.inf
        self._cost = 0.0
        #: snapshots built (the after-round ones included): tests and debugging
        self.builds = 0

    def build(self, make: Callable[[], FactorySnapshot]) -> FactorySnapshot:
        """``make()``, timed (every build goes through here, so the pace knows its cost)."""
        began = self.clock()
        snapshot = make()
        self._built_at = self.clock()
        self._cost = self._built_at - began
        self.builds += 1
        return snapshot

    def due(self) -> bool:
        """Whether a VM created just now should be published with a new snapshot."""
        wait = min(self.refresh_seconds, self.cost_ratio * self._cost)
        return self.clock() - self._built_at >= wait


def efficiency_last_day(machines: Mapping[str, Machine], now: float) -> Dict[str, float]:
    """CPU efficiency per machinetype of the VMs that ended in the last 24 hours."""
    rows = [
        (m.record.machinetype, m.finished.cpu_seconds, m.finished.end_time - m.started.time,
         m.record.processors, m.finished.end_time)
        for m in machines.values()
        if m.finished is not None and m.started is not None and m.finished.outcome != "failed"
    ]
    return {name: e.efficiency for name, e in machinetype_efficiency(rows, now - 86400).items()
            if e.efficiency is not None}


def machine_status(machine: Machine, now: float) -> MachineStatus:
    """The slot's ``machine_status`` with Vac's meanings: the real ``machine_model``;
    ``cpu_percentage`` the recent CPU use summed over processors (Vac's heartbeat figure: the
    last one a finished VM had); our lifetime efficiency in the additive ``cpu_efficiency``."""
    record = machine.record
    state = {"created": STATE_STARTING, "running": STATE_RUNNING}.get(machine.state, STATE_SHUTDOWN)
    heartbeat = machine.heartbeat
    cpu = machine.finished.cpu_seconds if machine.finished else (heartbeat.cpu_seconds if heartbeat else None)
    cpu_efficiency = None
    if machine.started is not None and cpu is not None:
        end = machine.finished.end_time if machine.finished else (heartbeat.time if heartbeat else now)
        wall = max(end - machine.started.time, 1e-9) * record.processors
        cpu_efficiency = round(cpu / wall, 3)
    cpu_percentage = heartbeat.cpu_percentage if heartbeat is not None else None
    if cpu_percentage is None and machine.started is not None:
        cpu_percentage = 0.0  # started, not yet observed twice: nothing measured yet
    finished = machine.finished
    return MachineStatus(
        machine=record.name,
        state=state,
        uuid=record.uuid,
        machinetype=record.machinetype,
        machine_model=record.machine_model,
        created_time=record.created,
        started_time=machine.started.time if machine.started else None,
        heartbeat_time=heartbeat.time if heartbeat else None,
        num_processors=record.processors,
        cpu_seconds=cpu,
        cpu_percentage=cpu_percentage,
        hs06=record.hs06,
        shutdown_message=(finished.message or None) if finished else None,
        shutdown_time=finished.end_time if finished else None,
        fqan=record.accounting_fqan,
        cpu_efficiency=cpu_efficiency,
    )


def machinetype_status(
    name: str,
    mt,
    state: MachinetypeState,
    last: Optional[FinishedVM],
    machines: Mapping[str, Machine],
    mb_per_processor: int,
    cpu_efficiency: Optional[float] = None,
) -> MachinetypeStatus:
    message = None
    if last is not None and last.code is not None:
        message = f"{last.code} {last.text}".strip()
    last_machine: Optional[Machine] = machines.get(last.uuid) if last else None
    return MachinetypeStatus(
        machinetype=name,
        running_hs06=state.running_hs06,
        running_machines=state.running_machines,
        running_processors=state.running_processors,
        num_before_fizzle=state.num_before_fizzle,
        shutdown_message=message,
        shutdown_time=last.finished_time if last else None,
        shutdown_machine=last_machine.name if last_machine else None,
        fqan=mt.accounting_fqan if mt is not None else None,
        max_wallclock_seconds=mt.max_wallclock_seconds if mt is not None else None,
        max_processors=mt.max_processors if mt is not None else None,
        bytes_per_processor=mb_per_processor * 1048576,
        cpu_efficiency_1d=cpu_efficiency,
    )
