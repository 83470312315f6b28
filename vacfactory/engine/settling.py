"""After a VM has finished: its APEL record (`accounted`), then its exports and disks (`cleaned`).

Both steps are retried every round until they work, independently (a failed record does not
keep exports alive, a failed withdrawal does not hold up the record). VMs that ended together
(a drain, a restart) are accounted in one batch (engine.accountant writes them in parallel).
"""

from __future__ import annotations

import logging
from typing import Callable, List

from vacfactory.engine.entries import VMEntry
from vacfactory.errors import AccountingError, StateError, VacFactoryError
from vacfactory.faults import checkpoint
from vacfactory.hypervisor.base import Hypervisor
from vacfactory.state import kept
from vacfactory.state.machines import MachineStore

log = logging.getLogger(__name__)


class Settler:
    """``settings()`` is the configuration's [settings] in force (keep_on_abnormal_end...)."""

    def __init__(self, store: MachineStore, accountant, boundary, hypervisor: Hypervisor,
                 settings: Callable[[], object]) -> None:
        self.store = store
        self.accountant = accountant
        self.boundary = boundary
        self.hypervisor = hypervisor
        self.settings = settings

    def settle(self, entries: List[VMEntry], now: float) -> None:
        """Account, then clean, each finished VM of ``entries`` that still needs it."""
        unaccounted = [e for e in entries if e.machine.finished is not None and e.machine.accounted is None]
        if unaccounted:
            self._account(unaccounted, now)
        for entry in entries:
            if entry.machine.finished is not None and entry.machine.cleaned is None:
                try:
                    self._clean(entry, now)
                except OSError as error:  # a full disk: one VM's failure does not stop the round
                    log.error("%s: cleaning failed, will retry: %s", entry.name, error)

    def _account(self, entries: List[VMEntry], now: float) -> None:
        results = self.accountant.account([e.machine for e in entries], now)
        for entry, result in zip(entries, results):
            if isinstance(result, AccountingError):
                if not entry.accounting_failed:
                    log.error("%s: accounting failed, will retry: %s", entry.name, result)
                    entry.accounting_failed = True
                continue
            entry.accounting_failed = False
            checkpoint("account.written")
            try:
                entry.machine = self.store.mark_accounted(entry.machine, result)
            except OSError as error:  # a full disk: the record is rewritten in place later
                log.error("%s: cannot mark it accounted, will retry: %s", entry.name, error)
                continue
            checkpoint("account.marked")

    def _clean(self, entry: VMEntry, now: float) -> None:
        machine = entry.machine
        try:
            self.boundary.withdraw(machine)
        except VacFactoryError as error:
            log.error("%s: withdrawing exports failed, will retry: %s", machine.name, error)
            return
        checkpoint("clean.withdrawn")
        if not self._keep_evidence(entry, now):
            return  # retried next round: evidence is never deleted by a failed move
        self.hypervisor.remove_disks(machine.disks_dir)
        checkpoint("clean.disks_removed")
        entry.machine = self.store.mark_cleaned(machine, now)

    def _keep_evidence(self, entry: VMEntry, now: float) -> bool:
        """With keep_on_abnormal_end, move an abnormally ended VM's disks aside (read-only)."""
        s = self.settings()
        machine = entry.machine
        finished = machine.finished
        if not s.keep_on_abnormal_end or finished is None or machine.started is None:
            return True
        why = kept.abnormal_end(finished.reason, finished.code)
        if why is None:
            return True
        try:
            record = kept.keep_overlay(
                self.store.state_dir, machine.path, uuid=machine.uuid, name=machine.name,
                machinetype=machine.record.machinetype, reason=why, now=now, days=s.keep_days,
                backing_file=machine.record.root_image_path, max_kept=s.keep_max_overlays,
            )
        except StateError as error:
            log.error("%s: keeping its disks failed, will retry: %s", machine.name, error)
            return False
        if record is not None:
            log.info("%s: disks kept for %g days (%s)", machine.name, s.keep_days, why)
        return True
