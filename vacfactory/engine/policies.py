"""Configuration -> the pure core's plain values (policies, local VMs, MJF inputs).

Kept in one place so the core never sees a Config and the option names stay in config/.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

from vacfactory.core.mjf import MJFInput
from vacfactory.core.views import AdaptiveBackoff, FactoryPolicy, LocalVM, MachinetypePolicy
from vacfactory.state.machines import Machine


def factory_policy(config, host_processors: int) -> FactoryPolicy:
    s = config.settings
    return FactoryPolicy(
        total_processors=s.total_processors,
        processors_per_superslot=s.processors_per_superslot,
        hs06_per_processor=s.hs06_per_processor or 1.0,
        mb_per_processor=s.mb_per_processor,
        total_memory_mb=s.total_memory_mb,
        overload_per_processor=s.overload_per_processor,
        host_processors=host_processors,
        shutdown_time=s.shutdown_time,
        draining=bool(s.draining),
        max_starting_processors=s.max_starting_processors,
        starting_seconds=s.starting_seconds,
        adaptive_backoff=adaptive_backoff(config),
    )


def adaptive_backoff(config) -> Optional[AdaptiveBackoff]:
    """The adaptive backoff settings, or None for Vac's fixed backoff_seconds (the default)."""
    s = config.settings
    if not s.adaptive_backoff:
        return None
    return AdaptiveBackoff(max_seconds=float(s.adaptive_backoff_max_seconds))


def machinetype_policies(config) -> List[MachinetypePolicy]:
    return [
        MachinetypePolicy(
            name=name,
            target_share=mt.target_share,
            machinegroup=mt.machinegroup,
            min_processors=mt.min_processors,
            max_processors=mt.max_processors,
            min_wallclock_seconds=mt.min_wallclock_seconds,
            max_wallclock_seconds=mt.max_wallclock_seconds,
            backoff_seconds=mt.backoff_seconds,
            fizzle_seconds=mt.fizzle_seconds,
            startable=mt.startable,
        )
        for name, mt in config.machinetypes.items()
    ]


def local_vm(machine: Machine, shutdown_time: float) -> LocalVM:
    record = machine.record
    return LocalVM(
        uuid=record.uuid,
        machinetype=record.machinetype,
        processors=record.processors,
        created=record.created,
        shutdown_time=shutdown_time,
        memory_mb=record.memory_mb,
        hs06=record.hs06,
        started=machine.started.time if machine.started else None,
    )


def mjf_input(config, record, extras: Mapping[str, str]) -> MJFInput:
    """MJF values for a VM being created (core.mjf computes the keys); ``extras`` are the
    non-standard machinefeatures (host facts, syslog, the site's machinefeatures_option_XXX)."""
    s = config.settings
    mt = config.machinetypes.get(record.machinetype)
    scratch_bytes = scratch_disk_bytes(s, mt, record.processors) if mt is not None else 0
    return MJFInput(
        job_id=record.uuid,
        processors=record.processors,
        jobstart=int(record.created),
        shutdown_time=int(record.shutdown_time),
        mb_per_processor=s.mb_per_processor,
        hs06_per_processor=record.hs06_per_processor,
        grace_seconds=s.grace_seconds,
        scratch_bytes=scratch_bytes,
        max_swap_bytes=0,
        extra_machinefeatures=extras,
    )


#: the disk of a CernVM VM (it boots from the ISO and installs onto this disk) when neither
#: the machinetype nor the settings give disk_gb_per_processor, per processor (Vac's 40 GB)
DEFAULT_CERNVM_DISK_GB = 40


def scratch_disk_bytes(settings, mt, processors: int) -> int:
    """The size of a VM's writable extra disk (0: none), the one rule for the disk the
    hypervisor makes and the size MJF announces: ``disk_gb_per_processor`` (the machinetype's,
    else the settings') x processors, in 10^9 bytes; a CernVM always has one (its root disk)."""
    disk_gb = mt.disk_gb_per_processor or settings.disk_gb_per_processor
    if mt.machine_model in ("cernvm3", "cernvm4"):
        disk_gb = disk_gb or DEFAULT_CERNVM_DISK_GB
    return int(disk_gb * processors * 1_000_000_000) if disk_gb else 0
