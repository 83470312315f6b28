"""How and when a VM ended (what `finished` records: the step every later one reads).

engine.transitions writes the record (record_finished); this module says what it holds and,
once it is written, tells the metrics and the daemon.

End times come from one clock, the engine's: a stop event is stamped when it arrives; a VM
killed by the engine ended when the destroy returned; a VM seen running at the last round that
is gone without an event ended "now"; a VM that ended while the daemon was down (or blind)
ended at its last sign of life (the factory's last observation or qemu's last console write).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from vacfactory.core.efficiency import vm_efficiency
from vacfactory.core.outcomes import KillReason, Outcome, ShutdownMessage, classify
from vacfactory.engine.entries import VMEntry, VMTable
from vacfactory.view.metrics import MetricsRecorder
from vacfactory.state.machines import Machine
from vacfactory.state.records import Finished

log = logging.getLogger(__name__)

FAILED = Outcome.FAILED.value


def console_mtime(machine: Machine) -> Optional[float]:
    """When qemu last wrote the VM's serial console (the VM prints until it powers off)."""
    try:
        return os.stat(machine.console_log).st_mtime
    except OSError:
        return None


class Finisher:
    """Says how VMs ended. ``shutdown_message(machine)`` reads what the VM left (hostile
    input, engine.boundary); ``abort_on_700()`` is the setting in force; ``on_finished``
    hears about every VM that ran and ended."""

    def __init__(self, vms: VMTable, recorder: MetricsRecorder,
                 shutdown_message: Callable[[Machine], Optional[str]], abort_on_700: Callable[[], bool],
                 on_finished: Optional[Callable[[Machine], None]] = None) -> None:
        self.vms = vms
        self.recorder = recorder
        self.shutdown_message = shutdown_message
        self.abort_on_700 = abort_on_700
        self.on_finished = on_finished

    def announce(self, entry: VMEntry) -> None:
        """After its `finished` is recorded (engine.transitions): the metrics and ``on_finished``
        hear about a VM that ran."""
        machine = entry.machine
        finished = machine.finished
        assert finished is not None
        if finished.outcome != FAILED:
            self.recorder.finished(machine.record.machinetype, finished.code, finished.outcome)
            if self.on_finished is not None:
                self.on_finished(machine)

    def ending(self, entry: VMEntry, now: float, kill: Optional[KillReason], reason: Optional[str]) -> Finished:
        """How and when a VM ended, from what the engine knows now."""
        machine = entry.machine
        stop_time, final_cpu = self.vms.take_stop(entry)
        started = machine.started.time if machine.started else None
        if kill is not None:
            end_time = now
        elif stop_time is not None:
            end_time = stop_time
        elif entry.seen_running:
            end_time = now  # running at the last round, gone now; its stop event is late
        else:
            # it ended unobserved (the daemon was down): its last sign of life
            signs = [machine.heartbeat.time if machine.heartbeat else None, console_mtime(machine)]
            end_time = min(max([t for t in signs if t is not None] or [started or now]), now)
        if started is not None:
            end_time = max(end_time, started)  # a clock step back must not give negative walls
        if started is None or reason == "create_failed":
            return Finished(time=now, end_time=end_time, cpu_seconds=0.0, outcome=FAILED,
                            reason=reason or "create_failed")
        return self._ran(machine, now, end_time, started, final_cpu_time(entry, final_cpu), kill)

    def _ran(self, machine: Machine, now: float, end_time: float, started: float, cpu: float,
             kill: Optional[KillReason]) -> Finished:
        message = self.shutdown_message(machine)
        wall = end_time - started
        classified = classify(message, wall, machine.record.fizzle_seconds, kill, self.abort_on_700())
        shown: Optional[ShutdownMessage] = classified.message
        finished = Finished(
            time=now, end_time=end_time, cpu_seconds=cpu, outcome=classified.outcome.value,
            reason=kill.value if kill else ("shutdown_message" if message else "no_message"),
            code=shown.code if shown else None, text=shown.text if shown else "",
            cpu_efficiency=vm_efficiency(cpu, wall, machine.record.processors),
        )
        log.info("%s: finished after %ds: %s (%s)", machine.name, int(wall),
                 finished.message or "no shutdown_message", finished.outcome)
        if finished.code is not None and 300 <= finished.code < 400:
            # Vac's hint for tuning fizzle_seconds
            log.info("%s: aborted after %ds, so a %s VM needs fizzle_seconds of at least that "
                     "to count as a fizzle (Vac's hint)", machine.name, int(wall), machine.record.machinetype)
        return finished


def final_cpu_time(entry: VMEntry, final_cpu: Optional[float]) -> float:
    """A VM's CPU time at its end: the largest reading known (CPU time only grows). The read at
    the guest's power-off is exact but best effort (a starved event thread can miss the moment
    before qemu exits); then the last round's listing, then the last heartbeat written (after a
    restart, the only one left)."""
    heartbeat = entry.machine.heartbeat
    known = [final_cpu, entry.seen_cpu, heartbeat.cpu_seconds if heartbeat else None]
    return float(max([cpu for cpu in known if cpu is not None], default=0.0))
