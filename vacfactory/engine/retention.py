"""Retention: (done, expired) -> a done machine directory is deleted after machines_dir_days."""

from __future__ import annotations

import logging
from typing import Callable, Optional

from vacfactory.core.lifecycle import Event
from vacfactory.engine.entries import VMTable
from vacfactory.engine.transitions import Facts, Transitions
from vacfactory.errors import StateError

log = logging.getLogger(__name__)

#: how long finished machine directories are kept when the machinetype is gone (Vac: 3 days)
DEFAULT_MACHINES_DIR_DAYS = 3.0
#: retention runs at most this often (it only walks the in-memory entries)
RETENTION_SECONDS = 60.0


class Retention:
    """``elapsed()``: the interval clock. A step back of the wall clock must not stop retention
    for as long as the step (the ages stay wall-clock times, as the records are)."""

    def __init__(self, vms: VMTable, transitions: Transitions, elapsed: Callable[[], float]) -> None:
        self.vms, self.transitions, self.elapsed = vms, transitions, elapsed
        self._last: Optional[float] = None

    def run(self, config, now: float) -> None:
        elapsed = self.elapsed()
        if self._last is not None and elapsed - self._last < RETENTION_SECONDS:
            return
        self._last = elapsed
        for entry in self.vms:
            machine = entry.machine
            if not self.transitions.allows(entry, Event.EXPIRED) or machine.finished is None:
                continue
            mt = config.machinetypes.get(machine.record.machinetype)
            days = mt.machines_dir_days if mt is not None else DEFAULT_MACHINES_DIR_DAYS
            if days <= 0 or now - machine.finished.time < days * 86400:
                continue
            try:
                deleted = self.transitions.apply(entry, Event.EXPIRED, Facts(time=now))
            except StateError as error:
                log.error("%s", error)
                continue
            if deleted is not None:
                log.info("%s: machine directory deleted after %.1f days", machine.name, days)
