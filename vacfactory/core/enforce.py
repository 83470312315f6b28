"""Which running VM the factory must end, and why (Vac's step 11, as one pure function).

The engine gathers :class:`RunningVMFacts` for each running VM (from the state directory, the
hypervisor and the VM's joboutputs) and destroys the VMs for which :func:`check_running_vm`
returns a :class:`KillReason`. The reason decides the recorded outcome
(:func:`vacfactory.core.outcomes.classify`): heartbeat kills are aborts, the others neutral.

Clock jumps. Every test here has the form "``now`` is later than some limit", so the set of
VMs to kill only grows as ``now`` grows. A backwards jump of the clock therefore never kills a
VM that the earlier ``now`` spared: an apparent negative age (``now`` before ``started``, or a
heartbeat written "in the future") never triggers anything. A heartbeat mtime ahead of ``now``
(clock skew between the VM's writes and the host, or a hostile ``touch``) counts as fresh; the
VM's wallclock limit still bounds how long such a VM can run. A forwards jump does age every
VM at once, as it should: the time really has passed by the corrected clock. The grace after a
daemon restart (``daemon_started + fizzle_seconds``) covers heartbeats that went unobserved
while the daemon was down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vacfactory.core.outcomes import KillReason


@dataclass(frozen=True)
class RunningVMFacts:
    """What enforcement needs to know about one running VM."""

    uuid: str
    name: str
    machinetype: str
    started: float
    #: the VM's current shutdowntime_job (lowered when the factory drains)
    shutdown_time: float
    #: the domain is paused or crashed instead of running
    paused: bool
    #: mtime of joboutputs/<heartbeat_file>; None = absent or unreadable
    heartbeat_mtime: Optional[float]


@dataclass(frozen=True)
class HeartbeatPolicy:
    """The machinetype's heartbeat rules (``heartbeat_file``, ``heartbeat_seconds``, fizzle)."""

    heartbeat_file: Optional[str]
    heartbeat_seconds: float
    fizzle_seconds: float


def check_running_vm(
    vm: RunningVMFacts,
    heartbeat: Optional[HeartbeatPolicy],
    factory_shutdown_time: Optional[float],
    grace_seconds: float,
    now: float,
    daemon_started: float,
) -> Optional[KillReason]:
    """Why ``vm`` must be destroyed now, or None to let it run.

    ``heartbeat`` is None when the machinetype has gone from the configuration: its VMs still
    obey their time limits, but there is no heartbeat rule to hold them to. The checks run in
    order and the first that applies wins: paused, own shutdown time, factory shutdown time,
    heartbeat.
    """
    if vm.paused:
        return KillReason.PAUSED
    if now > vm.shutdown_time + grace_seconds:
        return KillReason.WALLCLOCK
    if factory_shutdown_time is not None and now > factory_shutdown_time + grace_seconds:
        return KillReason.SHUTDOWN_TIME
    if heartbeat is not None and _heartbeat_due(vm, heartbeat, now, daemon_started):
        if vm.heartbeat_mtime is None:
            return KillReason.HEARTBEAT_NOT_CREATED
        if (
            heartbeat.heartbeat_seconds > 0
            and vm.heartbeat_mtime < now - heartbeat.heartbeat_seconds
        ):
            return KillReason.HEARTBEAT_NOT_UPDATED
    return None


def _heartbeat_due(
    vm: RunningVMFacts, heartbeat: HeartbeatPolicy, now: float, daemon_started: float
) -> bool:
    """Vac's conditions for judging a heartbeat: a file is expected and the VM (and this
    daemon) have been up for longer than the fizzle window."""
    return (
        bool(heartbeat.heartbeat_file)
        and heartbeat.fizzle_seconds > 0
        and now > vm.started + heartbeat.fizzle_seconds
        and now > daemon_started + heartbeat.fizzle_seconds
    )


def drained_shutdown_time(
    vm_shutdown_time: float, factory_shutdown_time: Optional[float]
) -> Optional[float]:
    """The earlier shutdown time to publish in a running VM's MJF, or None if it is unchanged.

    When the factory's ``shutdown_time`` moves before a VM's own shutdown time, the VM is told
    (``shutdowntime``/``shutdowntime_job``, see :func:`vacfactory.core.mjf.shutdown_keys`) so
    its payload can finish in time. A later factory shutdown time never extends a VM.
    """
    if factory_shutdown_time is not None and factory_shutdown_time < vm_shutdown_time:
        return factory_shutdown_time
    return None
