"""Creating a round's VMs: each prepared in turn, then all started at once in a bounded pool.

Preparing (a slot, the record, MJF, user_data, the machine directory, the domain description,
the VM's exports) is quick file work and runs on the engine's thread, one VM after another, so
slots and directories never race. Starting (the hypervisor makes the disks and the slot port and
starts the domain: 0.3-1 s each for a TCG guest) runs concurrently, at most
``MAX_PARALLEL_CREATIONS`` at once, each on its own libvirt connection. Each step is a lifecycle
event carried out by engine.transitions ((new, create), (created, publish), (created, start),
then (created, domain_started) or (created, start_failed)), so every creation keeps its crash
checkpoints (create.prepared, create.published, create.domain_started) and its own failure
handling: a VM that cannot be started is finished as failed, accounted (no record)
and cleaned in the same round; the others go on.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from vacfactory.core.lifecycle import Event, LifecycleError
from vacfactory.core.views import Create, Decision
from vacfactory.engine import naming
from vacfactory.engine.entries import VMEntry, VMTable
from vacfactory.engine.pause import CreationPause
from vacfactory.engine.report import RoundReport
from vacfactory.engine.settling import Settler
from vacfactory.engine.transitions import Facts, NewVM, Transitions
from vacfactory.errors import VacFactoryError
from vacfactory.hypervisor.base import MachineSpec
from vacfactory.fetch.imagecache import ImageNotReady
from vacfactory.logsetup import RepeatSummariser
from vacfactory.view.metrics import MetricsRecorder
from vacfactory.state.machines import Machine
from vacfactory.state.status import StatusFiles

log = logging.getLogger(__name__)

#: creations started at once (libvirt serialises little; each worker has its own connection)
MAX_PARALLEL_CREATIONS = 8
#: what a failed creation raises: project errors, OS errors (a full disk), and ValueError from
#: a spec that refuses a value the configuration let through
CREATION_ERRORS = (VacFactoryError, OSError, ValueError)


class Creator:
    """Creates VMs; remembers creation failures per machinetype (status.json) and which
    machinetypes wait for their image."""

    def __init__(self, vms: VMTable, builder, transitions: Transitions, settler: Settler, pause: CreationPause,
                 recorder: MetricsRecorder, status: StatusFiles, clock: Callable[[], float],
                 elapsed: Callable[[], float], on_created: Optional[Callable[[Machine], None]] = None) -> None:
        self.vms, self.builder, self.transitions = vms, builder, transitions
        self.settler, self.pause = settler, pause
        self.recorder, self.status, self.clock = recorder, status, clock
        #: called after each VM this engine starts, mid-round (the daemon republishes its
        #: VacQuery snapshot, so a long round's VMs are not invisible to the space until it ends)
        self.on_created = on_created
        #: machinetype -> the last creation failure since its last successful creation
        self.failures: Dict[str, Dict[str, object]] = {}
        #: a creation failure repeats every round: logged first, then every few minutes with a count
        self._repeats = RepeatSummariser(clock=elapsed)
        #: machinetype -> why it waits for its image (logged once per change, not every round)
        self._waiting: Dict[str, str] = {}

    def create_all(self, config, decision: Decision, report: RoundReport) -> None:
        failed_types: Set[str] = set()
        ready: List[Tuple[VMEntry, MachineSpec]] = []
        for create in decision.creates:
            if create.machinetype in failed_types:
                continue
            try:
                prepared = self._prepare(config, create)
            except ImageNotReady as waiting:  # not startable this round; not a failed creation
                failed_types.add(create.machinetype)
                report.waiting.append(create.machinetype)
                if create.machinetype not in self._waiting:  # the image cache logs its failures
                    log.info("machinetype %s: not startable yet: %s", create.machinetype, waiting)
                self._waiting[create.machinetype] = str(waiting)
                continue
            if prepared is None:
                failed_types.add(create.machinetype)
                report.failed.append(create.machinetype)
                if self.pause.ran_out:  # the disk filled up: pause creation now
                    break
                continue
            if self._waiting.pop(create.machinetype, None) is not None:
                log.info("machinetype %s: its image is ready", create.machinetype)
            ready.append(prepared)
        for entry, error in self._start_all(ready):
            if error is None:
                self._started(entry)
                report.created.append(entry.name)
            else:
                self._start_failed(entry, error)
                report.failed.append(entry.machine.record.machinetype)
        if self.pause.ran_out:
            report.paused = self.pause.why()

    def _prepare(self, config, create: Create) -> Optional[Tuple[VMEntry, MachineSpec]]:
        """The VM's machine directory, exports and domain description; None if it failed (then
        nothing is left of it but, once its directory exists, its failed record)."""
        mt = config.machinetypes[create.machinetype]
        slot = self._free_slot(config.settings.total_processors)
        if slot is None:
            log.error("no free slot for a %s VM although processors are free", create.machinetype)
            return None
        name = naming.domain_name(config.settings.factory_name, slot)
        try:
            record = self.builder.new_record(
                config, mt, uuid=str(uuidlib.uuid4()), slot=slot, name=name,
                processors=create.processors, created=self.clock(), shutdown_time=create.shutdown_time,
            )
            machinefeatures, jobfeatures = self.builder.features(config, record)
            user_data = self.builder.user_data(config, mt, record)
            entry = self.transitions.apply(None, Event.CREATE, Facts(new=NewVM(record, machinefeatures, jobfeatures,
                                                                               user_data)))
        except ImageNotReady:
            raise  # nothing prepared yet: create_all skips the machinetype this round
        except CREATION_ERRORS as error:
            self._failed(name, create.machinetype, error)
            return None
        if entry is None:  # refused (logged): nothing was prepared
            return None
        try:
            spec = self.builder.machine_spec(config, mt, entry.machine)
            if self.transitions.apply(entry, Event.PUBLISH) is None:
                raise LifecycleError("its exports were not published", machine=entry.name)
        except CREATION_ERRORS as error:
            self._start_failed(entry, error)
            return None
        return entry, spec

    def _start_all(self, ready: List[Tuple[VMEntry, MachineSpec]]) -> Iterator[Tuple[VMEntry, Optional[BaseException]]]:
        """Start every domain, concurrently; yields each VM with its error (or None) as its
        start ends, so the engine records it (and the space hears of it) before the slowest."""
        workers = min(len(ready), MAX_PARALLEL_CREATIONS)
        if workers <= 1:
            for entry, spec in ready:
                yield entry, self._start(entry, spec)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vacfactory-create") as pool:
            futures = {pool.submit(self._start, entry, spec): entry for entry, spec in ready}
            for future in as_completed(futures):
                yield futures[future], future.result()

    def _start(self, entry: VMEntry, spec: MachineSpec) -> Optional[BaseException]:
        try:
            if self.transitions.apply(entry, Event.START, Facts(spec=spec)) is not None:
                return None
        except CREATION_ERRORS as error:
            return error
        return LifecycleError("its domain was not started", machine=entry.name)

    def _started(self, entry: VMEntry) -> None:
        record = entry.machine.record
        try:
            self.transitions.apply(entry, Event.DOMAIN_STARTED, Facts(time=self.clock()))
        except OSError as error:  # a full disk: the next round adopts the running domain
            log.error("%s: cannot record its start, adopting it later: %s", record.name, error)
        entry.seen_running = True
        self.status.clear_error()
        self.failures.pop(record.machinetype, None)
        self._repeats.forget(record.machinetype)
        self.recorder.created(record.machinetype)
        log.info("%s: created %s with %d processors, uuid %s", record.name, record.machinetype,
                 record.processors, record.uuid)
        if self.on_created is not None:
            self.on_created(entry.machine)

    def _start_failed(self, entry: VMEntry, error: BaseException) -> None:
        """A prepared VM that cannot run: finished as failed, accounted and cleaned at once."""
        self._failed(entry.name, entry.machine.record.machinetype, error)
        ended = Facts(time=self.clock(), reason="create_failed")
        if self.transitions.apply(entry, Event.START_FAILED, ended):  # else retried next round
            self.settler.settle([entry], self.clock())

    def _free_slot(self, total_processors: int) -> Optional[int]:
        busy = {entry.machine.record.slot for entry in self.vms if entry.machine.cleaned is None}
        for slot in range(total_processors):
            if slot not in busy:
                return slot
        return None

    def _failed(self, name: str, machinetype: str, error: BaseException) -> None:
        message = f"{name}: creation of a {machinetype} VM failed: {error}"
        reason = str(error).replace(name, "<name>")
        previous = self.failures.get(machinetype)
        self.failures[machinetype] = {
            "time": self.clock(), "reason": str(error), "vm": name,
            "count": (int(previous["count"]) + 1) if previous else 1,  # type: ignore[call-overload]
        }
        suppressed = self._repeats.due((machinetype, reason))
        if suppressed is not None:
            log.error("%s%s", message, self._repeats.suffix(suppressed))
        self.pause.failed(error)  # pause creation rather than fail again every round
        try:
            self.status.set_error(message)
        except OSError as status_error:  # the disk that made creation fail may be full
            log.error("cannot write factory-error: %s", status_error)
        self.recorder.creation_failed(machinetype)
