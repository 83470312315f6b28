"""What a factory tells the space: plain frozen records the engine fills from on-disk state.

The responder answers every VacQuery from one :class:`FactorySnapshot` that the engine builds
whenever its state changes (a VM created, started, finished, a heartbeat observed). The
responder never reads files or asks the hypervisor itself, so it answers in microseconds even
while the engine is busy, and a half-written state directory can never produce a half-true
answer. Every field of Vac's ``machine_status``, ``machinetype_status`` and ``factory_status``
replies has a home here; everything has a default so the engine can fill the records
gradually. The same records are what the client decodes replies into.

This module is pure data: no clock, no file system, no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

#: the values Vac uses for ``machine_status.state``
STATE_UNKNOWN = "Unknown"
STATE_SHUTDOWN = "Shut down"
STATE_STARTING = "Starting"
STATE_RUNNING = "Running"
STATE_PAUSED = "Paused"
STATE_ZOMBIE = "Zombie"
STATES = (STATE_UNKNOWN, STATE_SHUTDOWN, STATE_STARTING, STATE_RUNNING, STATE_PAUSED, STATE_ZOMBIE)


@dataclass(frozen=True)
class MachineStatus:
    """One slot of the factory: a ``machine_status`` reply (``vac machines`` shows these).

    Times are epoch seconds; None where Vac sends ``null`` (a free slot has no uuid, no
    machinetype and no times). The fields mean what they mean in Vac 03.01:
    ``machine_model`` is the machinetype's model (``cernvm3``, ``vm-raw``, ...); a slot never
    used has 0 processors and 0.0 HS06; ``cpu_percentage`` is the recent CPU use (between the
    factory's last two observations) summed over the VM's processors, so a busy 8-processor
    VM shows about 800. ``cpu_efficiency`` is vacfactory's additive field: CPU seconds /
    (wall seconds x processors) over the VM's life so far (Vac peers ignore it).
    """

    machine: str
    state: str = STATE_SHUTDOWN
    uuid: Optional[str] = None
    machinetype: Optional[str] = None
    machine_model: Optional[str] = None
    created_time: Optional[float] = None
    started_time: Optional[float] = None
    heartbeat_time: Optional[float] = None
    num_processors: int = 0
    cpu_seconds: Optional[float] = None
    cpu_percentage: Optional[float] = None
    hs06: Optional[float] = None
    shutdown_message: Optional[str] = None
    #: when the shutdown message was written (Vac: its ctime)
    shutdown_time: Optional[float] = None
    fqan: Optional[str] = None
    cpu_efficiency: Optional[float] = None


@dataclass(frozen=True)
class MachinetypeStatus:
    """One configured machinetype on this factory: a ``machinetype_status`` reply.

    This is what other factories' schedulers sum: ``running_hs06`` over the space, divided by
    the target share, says how starved the machinetype is; ``num_before_fizzle`` and the
    latest finished VM's ``shutdown_message``/``shutdown_time`` drive the space-wide backoff.
    ``shutdown_message`` should be the *classified* message (a message-less fizzle carries the
    synthesised ``300 ...`` text) so that Vac peers back off too.
    """

    machinetype: str
    running_hs06: float = 0.0
    running_machines: int = 0
    running_processors: int = 0
    num_before_fizzle: int = 0
    shutdown_message: Optional[str] = None
    shutdown_time: Optional[float] = None
    shutdown_machine: Optional[str] = None
    fqan: Optional[str] = None
    max_wallclock_seconds: Optional[float] = None
    max_processors: Optional[int] = None
    bytes_per_processor: Optional[int] = None
    #: vacfactory's additive field: CPU seconds / (wall x processors) of its VMs that ended
    #: in the last day (None when none did); Vac peers ignore it
    cpu_efficiency_1d: Optional[float] = None


@dataclass(frozen=True)
class FactoryStatus:
    """The host as a whole: a ``factory_status`` reply (``vac factories`` shows these).

    Disk figures are kilobytes and inode counts of the filesystems Vac measured (``root`` =
    ``/tmp``, ``daemon`` = the state directory); memory figures are kilobytes from
    ``/proc/meminfo``; heartbeat times are epoch seconds, 0 when unknown (as Vac).
    """

    running_processors: int = 0
    running_machines: int = 0
    running_hs06: float = 0.0
    max_processors: int = 0
    max_machines: int = 0
    max_hs06: float = 0.0
    root_disk_avail_kb: int = 0
    root_disk_avail_inodes: int = 0
    daemon_disk_avail_kb: int = 0
    daemon_disk_avail_inodes: int = 0
    load_average: float = 0.0
    kernel_version: str = ""
    os_issue: str = ""
    boot_time: float = 0
    factory_heartbeat_time: float = 0
    responder_heartbeat_time: float = 0
    mjf_heartbeat_time: float = 0
    metadata_heartbeat_time: float = 0
    swap_used_kb: int = 0
    swap_free_kb: int = 0
    mem_used_kb: int = 0
    mem_total_kb: int = 0


def default_site(space: str) -> str:
    """Vac's site name when ``gocdb_sitename`` is unset: the space without its first label."""
    return space.split(".", 1)[1] if "." in space else space


@dataclass(frozen=True)
class FactorySnapshot:
    """Everything the responder needs to answer any query, built once per state change.

    ``factory`` is the name replies carry (Vac: ``os.uname()[1]``); clients check the reply's
    cookie against it, so it must equal the name other factories have in their ``factories``
    list. ``time`` is when the engine built the snapshot (for logs and staleness checks).
    """

    space: str
    factory: str
    site: str = ""
    machines: Tuple[MachineStatus, ...] = ()
    machinetypes: Tuple[MachinetypeStatus, ...] = ()
    factory_status: FactoryStatus = FactoryStatus()
    time: float = 0.0

    @property
    def site_name(self) -> str:
        """The ``site`` field of replies: the configured one, else Vac's default."""
        return self.site or default_site(self.space)
