"""The accounting step as the engine sees it: a finished VM -> an APEL record, or why not.

A VM that never started, or ran less than ``fizzle_seconds``, gets no record (as Vac). Every
other VM gets one, even if its machinetype has left the configuration: everything the
record needs was written into vm.json and ``finished`` before this step runs, so a retry
after a crash produces an identical record.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

from vacfactory.accounting.account import account_vms
from vacfactory.accounting.records import VMUsage
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.core.apel import why_no_record
from vacfactory.core.outcomes import Outcome
from vacfactory.errors import AccountingError
from vacfactory.state.machines import Machine
from vacfactory.state.records import Accounted


class Accountant:
    def __init__(self, settings: Callable[[], AccountingSettings]) -> None:
        """``settings`` is called each time, so a reloaded configuration takes effect."""
        self.settings = settings

    @classmethod
    def for_config(cls, source) -> "Accountant":
        """Accounting with the settings of ``source.current`` (a config.loader.ConfigWatcher:
        the configuration in force) at each call."""
        return cls(lambda: AccountingSettings.from_config(source.current))

    def account(self, machines: Sequence[Machine], now: float) -> List[Union[Accounted, AccountingError]]:
        """Account finished VMs, in order; a VM whose record failed gets its error instead.

        VMs that ended together (a drain, a restart) are written in parallel: the time goes
        into fsync, which the file system commits together.
        """
        results: List[Union[Accounted, AccountingError, None]] = [self._skip(m, now) for m in machines]
        due = [i for i, result in enumerate(results) if result is None]
        written = account_vms([usage(machines[i]) for i in due], self.settings(), now)
        for i, result in zip(due, written):
            results[i] = result if isinstance(result, AccountingError) else Accounted(
                time=now, archive=result.archive_path, queued=result.queue_name)
        return results  # type: ignore[return-value]

    @staticmethod
    def _skip(machine: Machine, now: float) -> Optional[Accounted]:
        """Why a VM gets no record (core.apel.why_no_record), or None if it gets one."""
        finished = machine.finished
        assert finished is not None, "only finished VMs are accounted"
        ran = machine.started is not None and finished.outcome != Outcome.FAILED.value
        wall = finished.end_time - machine.started.time if ran else None  # type: ignore[union-attr]
        why = why_no_record(wall, machine.record.fizzle_seconds)
        return None if why is None else Accounted(time=now, skipped=why)


def usage(machine: Machine) -> VMUsage:
    record = machine.record
    finished = machine.finished
    started = machine.started
    assert finished is not None and started is not None
    return VMUsage(
        uuid=record.uuid,
        machinetype=record.machinetype,
        hostname=record.name,
        processors=record.processors,
        start_time=int(started.time),
        end_time=int(finished.end_time),
        cpu_seconds=int(finished.cpu_seconds),
        memory_mb=record.memory_mb,
        hs06_per_processor=record.hs06_per_processor,
        accounting_fqan=record.accounting_fqan,
    )
