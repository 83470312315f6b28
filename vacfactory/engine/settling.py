"""After a VM has finished: its APEL record (`accounted`), then its exports and disks (`cleaned`).

Both steps are retried every round until they work, independently (a failed record does not
keep exports alive, a failed withdrawal does not hold up the record). VMs that ended together
(a drain, a restart) are accounted in one batch (engine.accountant writes them in parallel);
each VM's result is then its (finished/cleaned, account) transition, and cleaning its
(finished/accounted, clean) one (engine.transitions carries both out).
"""

from __future__ import annotations

import logging
from typing import List

from vacfactory.core.lifecycle import Event
from vacfactory.engine.entries import VMEntry
from vacfactory.engine.transitions import Facts, Transitions

log = logging.getLogger(__name__)


class Settler:
    def __init__(self, transitions: Transitions, accountant) -> None:
        self.transitions = transitions
        self.accountant = accountant

    def settle(self, entries: List[VMEntry], now: float) -> None:
        """Account, then clean, each finished VM of ``entries`` that still needs it."""
        unaccounted = [e for e in entries if self.transitions.allows(e, Event.ACCOUNT)]
        if unaccounted:
            self._account(unaccounted, now)
        for entry in entries:
            if self.transitions.allows(entry, Event.CLEAN):
                try:
                    self.transitions.apply(entry, Event.CLEAN, Facts(time=now))
                except OSError as error:  # a full disk: one VM's failure does not stop the round
                    log.error("%s: cleaning failed, will retry: %s", entry.name, error)

    def _account(self, entries: List[VMEntry], now: float) -> None:
        results = self.accountant.account([e.machine for e in entries], now)
        for entry, result in zip(entries, results):
            try:
                self.transitions.apply(entry, Event.ACCOUNT, Facts(time=now, accounted=result))
            except OSError as error:  # a full disk: the record is rewritten in place later
                log.error("%s: cannot mark it accounted, will retry: %s", entry.name, error)
