"""A drain (an earlier factory shutdown_time) published in running VMs' MJF, as Vac does."""

from __future__ import annotations

import logging
from typing import Iterable

from vacfactory.core import enforce, mjf
from vacfactory.engine.entries import VMEntry
from vacfactory.state.machines import MachineStore

log = logging.getLogger(__name__)


def apply_drain(store: MachineStore, live: Iterable[VMEntry], settings) -> None:
    """Move each live VM's shutdown time to the factory's ``shutdown_time`` if that is earlier."""
    factory_shutdown = settings.shutdown_time
    if factory_shutdown is None:
        return
    for entry in live:
        new = enforce.drained_shutdown_time(entry.shutdown_time, factory_shutdown)
        if new is None:
            continue
        move_shutdown(store, entry, new, settings.grace_seconds, "drain")


def move_shutdown(store: MachineStore, entry: VMEntry, new: float, grace_seconds: int, why: str) -> None:
    """Publish an earlier shutdown time in a running VM's MJF (pilots read it) and enforce it."""
    machinefeatures, jobfeatures = mjf.shutdown_keys(int(new), grace_seconds)
    try:
        store.rewrite_features(entry.machine, machinefeatures, jobfeatures)
    except OSError as error:
        log.error("%s: cannot publish the new shutdown time: %s", entry.name, error)
        return
    entry.shutdown_time = new
    log.info("%s: shutdown time moved to %d (%s)", entry.name, int(new), why)
