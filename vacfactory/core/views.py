"""Plain values that cross from the adapters into the pure core and back.

The engine builds these from the configuration, the state directory, the hypervisor and the
space; the core (scheduler, status, enforcement) only ever sees these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple


@dataclass(frozen=True)
class MachinetypePolicy:
    """What the scheduler needs to know about one configured machinetype."""

    name: str
    target_share: float
    machinegroup: str
    min_processors: int = 1
    max_processors: int = 1
    min_wallclock_seconds: float = 86400.0
    max_wallclock_seconds: float = 86400.0
    backoff_seconds: float = 10.0
    fizzle_seconds: float = 600.0
    #: False for machinetypes we understand but cannot start (docker, singularity)
    startable: bool = True


@dataclass(frozen=True)
class FactoryPolicy:
    """Factory-wide limits and switches (from [settings] and the host)."""

    total_processors: int
    processors_per_superslot: int = 1
    hs06_per_processor: float = 1.0
    mb_per_processor: int = 2048
    #: memory VMs may use in total; None = no limit
    total_memory_mb: Optional[int] = None
    overload_per_processor: float = 1.25
    #: processors the host really has (/proc/cpuinfo); the overload guard uses it
    host_processors: int = 1
    #: the factory's shutdown_time (drain deadline), epoch seconds
    shutdown_time: Optional[float] = None
    draining: bool = False
    #: processors in VMs younger than starting_seconds may not exceed this
    max_starting_processors: int = 64
    starting_seconds: float = 60.0
    #: learn backoff from the space's recent aborts (core.adaptive_backoff); None: Vac's rule
    adaptive_backoff: Optional["AdaptiveBackoff"] = None


@dataclass(frozen=True)
class AdaptiveBackoff:
    """Adaptive backoff settings: the wait after an abort doubles with each abort the space saw
    within ``window_seconds``, from ``base_seconds`` up to ``max_seconds``."""

    max_seconds: float = 1800.0
    base_seconds: float = 60.0

    @property
    def window_seconds(self) -> float:
        return 4.0 * self.max_seconds


@dataclass(frozen=True)
class LocalVM:
    """A VM of this factory that occupies processors (created or running, not finished)."""

    uuid: str
    machinetype: str
    processors: int
    created: float
    #: the VM's current shutdown time (jobfeatures/shutdowntime_job): its superslot key
    shutdown_time: float
    memory_mb: int
    hs06: float
    started: Optional[float] = None


@dataclass(frozen=True)
class FinishedVM:
    """The newest-created finished VM of a machinetype (finishes/<machinetype>.json): the one
    whose outcome drives backoff and the VacQuery shutdown fields (Vac's ``finishes/<mt>``).
    See core.status.supersedes for the order."""

    uuid: str
    machinetype: str
    finished_time: float
    code: Optional[int]
    text: str
    outcome: str  # core.outcomes.Outcome value
    #: when the VM was created; None in records written before it was kept
    created: Optional[float] = None


@dataclass(frozen=True)
class MachinetypeState:
    """One machinetype as seen by one factory, or summed over a space."""

    running_hs06: float = 0.0
    running_processors: int = 0
    running_machines: int = 0
    #: VMs still inside their fizzle window (or starting)
    num_before_fizzle: int = 0
    #: newest end time of a latest-finished VM whose end counted as an abort
    last_abort_time: Optional[float] = None
    #: end time of every factory's latest-finished VM that aborted (one per factory): how
    #: often the machinetype found no work lately, for adaptive backoff. Evidence that
    #: ``last_abort_time`` sums up, so it takes no part in comparing two states.
    abort_times: Tuple[float, ...] = field(default=(), compare=False)
    #: adaptive backoff's memory: has a VM started after the newest abort outlived its fizzle
    #: window (None: not known, no memory kept)
    work_shown: Optional[bool] = field(default=None, compare=False)


#: machinetype name -> its state across the space (or this factory alone)
SpaceView = Mapping[str, MachinetypeState]


@dataclass(frozen=True)
class Create:
    """Decision: start one VM of ``machinetype`` with ``processors``, ending by ``shutdown_time``."""

    machinetype: str
    processors: int
    shutdown_time: float


@dataclass(frozen=True)
class Decision:
    """What one decision round decided, and why it stopped where it did (for logs/check)."""

    creates: Tuple[Create, ...]
    reason: str
