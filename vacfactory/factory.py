"""The engine: keeps the hypervisor full of VMs, one decision round at a time.

A round: poll the configuration -> list the hypervisor's domains -> reconcile them with the
machine directories (adopt, finish, destroy zombies) -> enforce limits on running VMs ->
account and clean finished VMs -> ask the core scheduler what to create -> create all of it.

Rounds run whenever a libvirt lifecycle event arrives (so a VM that powers off is replaced
within about a second) and at least every ``cycle_seconds``. Unlike Vac (one creation per
60 s cycle) a round creates as many VMs as there are free processors, so an empty factory
fills in one round.

Crash safety comes from the state directory: everything the engine knows is on disk before
it acts on it, and at start-up the engine rebuilds its view from disk plus the hypervisor.
While the hypervisor cannot be reached the engine is *blind*: it finishes nothing and creates
nothing until it can see again (a libvirtd restart must not look like every VM ending).
While the state directory is (nearly) full, creation is *paused* (every other step goes on,
so VMs are still killed on time and accounted once space returns).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from vacfactory.core import enforce, mjf, scheduler, status as core_status
from vacfactory.core.status import supersedes
from vacfactory.core.outcomes import KillReason, Outcome, ShutdownMessage, classify
from vacfactory.core.views import Create, Decision, FinishedVM, MachinetypeState, SpaceView
from vacfactory.engine import naming, policies
from vacfactory.errors import AccountingError, HypervisorError, StateError, VacFactoryError
from vacfactory.core.efficiency import vm_efficiency
from vacfactory.faults import checkpoint
from vacfactory.imagecache import ImageNotReady
from vacfactory.logsetup import RepeatSummariser
from vacfactory.state import kept
from vacfactory.hypervisor.base import DomainEvent, DomainInfo, DomainState, Hypervisor
from vacfactory.metrics import MetricsRecorder
from vacfactory.state.machines import Machine, MachineStore, finished_vm
from vacfactory.state.records import Finished
from vacfactory.state.status import StatusFiles

log = logging.getLogger(__name__)

#: how long finished machine directories are kept when the machinetype is gone (Vac: 3 days)
DEFAULT_MACHINES_DIR_DAYS = 3.0
#: the factory's own heartbeat record of a VM is rewritten at most this often
HEARTBEAT_WRITE_SECONDS = 10.0
#: retention clean-up runs at most this often (it only walks the in-memory list)
RETENTION_SECONDS = 60.0
#: a difference this large between the wall clock's and the monotonic clock's progress from
#: one round to the next is a step of the wall clock (NTP, `date -s`), not time passing
CLOCK_STEP_SECONDS = 10.0
#: creation pauses while the state directory has less free space than this: a new VM needs
#: room for its machine directory and disk overlays, and every VM that ends for its records
#: (without this floor a full disk made every round fail a creation, found by the fault suite)
MIN_FREE_STATE_MIB = 64
#: a creation that ran out of space although the floor was met (no inodes left, a quota)
#: pauses creation until the free space grows by the floor again or this long has passed
ENOSPC_PAUSE_SECONDS = 300.0


def free_bytes(path: str) -> int:
    """Space available in the filesystem holding ``path`` (to unprivileged writers)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def out_of_space(error: BaseException) -> bool:
    """Did ``error`` (or what caused it) fail for want of space? qemu-img reports it in text."""
    seen: Set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def console_mtime(machine: Machine) -> Optional[float]:
    """When qemu last wrote the VM's serial console (the VM prints until it powers off)."""
    try:
        return os.stat(machine.console_log).st_mtime
    except OSError:
        return None


@dataclass
class RoundReport:
    """What one round did; kept for status.json, logs and tests."""

    time: float
    blind: bool = False
    adopted: List[str] = field(default_factory=list)
    finished: List[str] = field(default_factory=list)
    killed: List[str] = field(default_factory=list)
    zombies: List[str] = field(default_factory=list)
    created: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    #: machinetypes not startable this round (their image is still downloading): no failure
    waiting: List[str] = field(default_factory=list)
    #: why creation is paused (the state directory is full), None if it is not
    paused: Optional[str] = None
    decision: Optional[Decision] = None


class Factory:
    """The lifecycle engine. Collaborators are injected so tests use real but local ones.

    ``config_source`` has ``poll()`` returning an object with ``config``, ``changed`` and
    ``errors`` (config.loader.ConfigWatcher). ``builder`` turns a machine into a VMSpec
    (engine.vmbuild), ``boundary`` publishes a VM's MJF/joboutputs and reads what it wrote
    (engine.boundary), ``accountant`` writes its APEL record (engine.accountant).
    ``space_view`` (optional) returns the space-wide view given this factory's own view.
    """

    def __init__(
        self,
        config_source,
        hypervisor: Hypervisor,
        store: MachineStore,
        builder,
        boundary,
        accountant,
        host_processors: int,
        clock: Callable[[], float] = time.time,
        load_average: Callable[[], float] = lambda: max(os.getloadavg()),
        space_view: Optional[Callable[[object, SpaceView, float], SpaceView]] = None,
        rng: Optional[random.Random] = None,
        on_finished: Optional[Callable[[Machine], None]] = None,
        on_created: Optional[Callable[[Machine], None]] = None,
        monotonic: Optional[Callable[[], float]] = None,
        free_space: Callable[[str], int] = free_bytes,
    ) -> None:
        self.config_source = config_source
        self.hypervisor = hypervisor
        self.store = store
        self.status = StatusFiles(store.state_dir)
        self.builder = builder
        self.boundary = boundary
        self.accountant = accountant
        self.host_processors = host_processors
        self.clock = clock
        self.load_average = load_average
        self.space_view = space_view
        self.rng = rng or random.Random()
        self.on_finished = on_finished
        #: called after each VM this engine starts, mid-round (the daemon republishes its
        #: VacQuery snapshot, so a long round's VMs are not invisible to the space until it ends)
        self.on_created = on_created
        self.recorder = MetricsRecorder(clock())

        self.config = config_source.current
        self.machines: Dict[str, Machine] = {}
        self.shutdown_times: Dict[str, float] = {}
        self.started_at = clock()
        #: elapsed time, to tell a step of the wall clock from time passing: time.monotonic for
        #: the real clock; an injected (test) clock brings its own partner, or none
        self.monotonic = monotonic if monotonic is not None else (time.monotonic if clock is time.time else None)
        self._last_tick: Optional[Tuple[float, float]] = None
        #: measures intervals (retention): a step of the wall clock must not stop them
        self._elapsed: Callable[[], float] = self.monotonic or clock
        #: heartbeats are judged from fizzle_seconds after this (the start, or a clock step)
        self._judge_heartbeats_from = self.started_at
        self.last_report: Optional[RoundReport] = None
        self._blind_logged = False
        self._config_errors_logged: Optional[str] = None
        #: a creation failure repeats every round: logged first, then every few minutes with a count
        self._failure_repeats = RepeatSummariser(clock=self._elapsed)
        #: machinetype -> the last creation failure since its last successful creation (status.json)
        self.creation_failures: Dict[str, Dict[str, object]] = {}
        #: the daemon's additions to status.json (itself, the configuration, the space)
        self.status_extra: Optional[Callable[[], Dict[str, object]]] = None
        self._last_retention: Optional[float] = None  # self._elapsed() of the last retention
        #: bytes free in a filesystem (the state directory's), for the creation pause
        self.free_space = free_space
        #: (self._elapsed(), bytes free) when a creation last ran out of space
        self._out_of_space: Optional[Tuple[float, Optional[int]]] = None
        self._paused_kind: Optional[str] = None  # "floor" or "enospc": logged once per change
        self._unaccountable: Set[str] = set()
        #: how VMs ended whose `finished` could not be written yet (a full disk): the same
        #: record is written at the next try, so a retry neither moves the end nor the reason
        self._unrecorded: Dict[str, Finished] = {}
        #: VMs this process has seen running (so a vanished one ended since the last round)
        self._seen_running: Set[str] = set()
        self._last_reason: Optional[str] = None
        #: machinetype -> why it waits for its image (logged once per change, not every round)
        self._waiting: Dict[str, str] = {}

        # written by the hypervisor's event thread, read by the engine thread
        self._events_lock = threading.Lock()
        self._stop_times: Dict[str, float] = {}
        self._final_cpu: Dict[str, float] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()

    @property
    def last_finishes(self) -> Dict[str, FinishedVM]:
        """The newest-created finished VM of each machinetype (kept by the store)."""
        return self.store.latest if self.store.latest is not None else {}

    # -- start-up and the loop ----------------------------------------------------------

    def start(self) -> None:
        """Rebuild the in-memory view from disk; the first round reconciles with libvirt."""
        self.machines = self.store.load_all(recover=True)
        self.store.repair_last_finishes(self.machines.values())
        for machine in self.machines.values():
            if machine.live:
                self.shutdown_times[machine.uuid] = self.store.current_shutdown_time(machine)
        self.boundary.start(self.config, [m for m in self.machines.values() if m.live and m.cleaned is None])
        self.hypervisor.set_event_callback(self.on_event)
        live = sum(1 for m in self.machines.values() if m.live)
        log.info("engine started: %d machine directories, %d live", len(self.machines), live)

    def run(
        self, until: Optional[Callable[[], bool]] = None, after_round: Optional[Callable[[], None]] = None
    ) -> None:
        """Run rounds until ``stop()`` (or ``until()`` is true); ``after_round`` runs after each."""
        while not self.stopping.is_set() and not (until and until()):
            self.wake.clear()
            try:
                self.run_round()
            except (VacFactoryError, OSError) as error:  # disk full, permissions: report, go on
                log.error("round failed: %s", error)
            if after_round is not None:
                after_round()
            self.wake.wait(self.config.settings.cycle_seconds)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def on_event(self, event: DomainEvent) -> None:
        """Lifecycle event from the hypervisor's thread: remember facts, wake the engine.

        The stop is stamped with the engine's own clock (not the adapter's), so every time
        in a VM's record comes from one source.
        """
        if event.kind in ("shutdown", "stopped", "crashed"):
            now = self.clock()
            with self._events_lock:
                if event.cpu_seconds is not None:
                    self._final_cpu[event.uuid] = event.cpu_seconds
                if event.kind != "shutdown":
                    self._stop_times.setdefault(event.uuid, now)
        if event.kind in ("stopped", "crashed", "suspended"):
            self.wake.set()

    # -- one round ----------------------------------------------------------------------

    def run_round(self) -> RoundReport:
        began = time.monotonic()
        try:
            return self._round()
        finally:
            self.recorder.round_done(time.monotonic() - began)

    def flush(self) -> None:
        """At shutdown: finish the VMs that ended since the last round (a stop event that came
        with the signal found no round to handle it), then account and clean what has finished,
        so nothing waits for the restart. Running VMs are left alone."""
        try:
            now = self.clock()
            self._finish_vanished(now)
            self._settle(self.config, now)
        except (VacFactoryError, OSError) as error:
            log.error("final accounting failed (it is retried at the next start): %s", error)

    def _finish_vanished(self, now: float) -> None:
        """Finish every started VM whose domain is gone (nothing if libvirt cannot be asked)."""
        try:
            present = {d.uuid for d in self.hypervisor.list_domains()}
        except HypervisorError as error:
            log.warning("cannot list the domains at shutdown; VMs that ended are finished at the next "
                        "start: %s", error)
            return
        for uuid, machine in list(self.machines.items()):
            if machine.live and machine.started is not None and uuid not in present:
                self._finish(machine, now)

    def _round(self) -> RoundReport:
        now = self.clock()
        report = RoundReport(time=now)
        self._notice_clock_step(now)
        self._forget_events_of_ended_vms()
        self._poll_config()
        config = self.config
        try:
            domains = self.hypervisor.list_domains()
        except HypervisorError as error:
            report.blind = True
            # What ends while we are blind ends unobserved: at its last sign of life, not when
            # we see again (a VM that died with libvirtd must not be charged for the outage).
            self._seen_running.clear()
            if not self._blind_logged:
                log.error("hypervisor unreachable, creating nothing until it is back: %s", error)
                self._blind_logged = True
            self._write_status(report)
            self.last_report = report
            return report
        if self._blind_logged:
            log.info("hypervisor reachable again")
            self._blind_logged = False
        by_uuid = {d.uuid: d for d in domains}
        self._reconcile(config, domains, by_uuid, now, report)
        self._enforce(config, by_uuid, now, report)
        self._settle(config, now)
        self._apply_drain(config)
        report.decision = self._decide(config, now)
        report.paused = self._creation_paused()
        if report.paused is None:
            self._create_all(config, report.decision, report)
        self._log_reason(report.decision, report)
        self._retention(config, now)
        self._write_status(report)
        self.last_report = report
        return report

    def _notice_clock_step(self, now: float) -> None:
        """A step of the wall clock is not time passing: move running VMs' start times with it.

        Their WallDuration then stays the time they really ran (no negative or clamped duration
        after a step back, no extra hour charged after a step forward), and heartbeats are
        judged afresh, as after a restart: a heartbeat written a minute ago is not an hour old
        because the clock was stepped forward (that killed every VM with a heartbeat_file).
        Shutdown times are absolute (the VM reads them from its MJF) and are not moved.
        """
        if self.monotonic is None:
            return
        tick = (now, self.monotonic())
        last, self._last_tick = self._last_tick, tick
        if last is None:
            return
        step = (tick[0] - last[0]) - (tick[1] - last[1])
        if abs(step) < CLOCK_STEP_SECONDS:
            return
        log.warning("the clock stepped %s by %.0f s: moving the start times of running VMs with it and "
                    "judging heartbeats afresh", "forward" if step > 0 else "back", abs(step))
        self._judge_heartbeats_from = now
        for uuid, machine in list(self.machines.items()):
            if machine.live and machine.started is not None:
                try:
                    self.machines[uuid] = self.store.mark_started(machine, machine.started.time + step)
                except OSError as error:
                    log.error("%s: cannot move its start time: %s", machine.name, error)

    def _forget_events_of_ended_vms(self) -> None:
        """Drop event facts about VMs that are not live: the stop event of a VM we destroyed
        arrives after it was finished, and other factories' VMs on the same libvirtd send
        events too. Kept, they piled up for ever (one entry per kill, found by the soak)."""
        with self._events_lock:
            for table in (self._stop_times, self._final_cpu):
                for uuid in [u for u in table if u not in self.machines or not self.machines[u].live]:
                    del table[uuid]

    def _poll_config(self) -> None:
        result = self.config_source.poll()
        if result.errors is not None:
            text = str(result.errors)
            if text != self._config_errors_logged:
                for line in text.splitlines():
                    log.error("configuration rejected, keeping the last good one: %s", line)
                self._config_errors_logged = text
        else:
            if self._config_errors_logged is not None:
                log.info("configuration accepted: the rejected edit was fixed (%d machinetypes)",
                         len((result.config or self.config).machinetypes))
            self._config_errors_logged = None
        if result.changed and result.config is not None:
            log.info("configuration reloaded: %d machinetypes", len(result.config.machinetypes))
            for warning in result.config.warnings:  # e.g. vacuum pipe entries that were skipped
                log.warning("configuration: %s", warning)
        if result.config is not None:
            self.config = result.config

    # -- reconcile ----------------------------------------------------------------------

    def _reconcile(self, config, domains: List[DomainInfo], by_uuid, now: float, report: RoundReport) -> None:
        pattern = naming.domain_pattern(config.settings.factory_name)
        live = {u for u, m in self.machines.items() if m.live}
        for domain in domains:
            if pattern.match(domain.name) and domain.uuid not in live:
                log.warning("%s: zombie domain (uuid %s is not a live VM of ours): destroying", domain.name, domain.uuid)
                self._destroy(domain.uuid, domain.name)
                report.zombies.append(domain.name)
        for uuid in sorted(live):
            machine = self.machines[uuid]
            domain = by_uuid.get(uuid)
            if machine.started is None:
                # this process started it but could not record that (a full disk): it ran
                started_here = uuid in self._seen_running
                if domain is None and not started_here:
                    log.info("%s: creation was interrupted; cleaning up", machine.name)
                    self._finish(machine, now, reason="create_failed")
                    continue
                log.info("%s: adopting a domain whose start was not recorded", machine.name)
                try:
                    machine = self.machines[uuid] = self.store.mark_started(machine, machine.record.created)
                except OSError as error:  # a full disk: adopted at a later round
                    log.error("%s: cannot record its start, will retry: %s", machine.name, error)
                    continue
                report.adopted.append(machine.name)
                if domain is not None:
                    continue
            if domain is None:
                self._finish(machine, now)
                report.finished.append(machine.name)
                continue
            self._seen_running.add(uuid)
            if domain.cpu_seconds and (
                machine.heartbeat is None or now - machine.heartbeat.time >= HEARTBEAT_WRITE_SECONDS
            ):
                self._observed_alive(uuid, now, domain.cpu_seconds)

    # -- enforce ------------------------------------------------------------------------

    def _enforce(self, config, by_uuid, now: float, report: RoundReport) -> None:
        settings = config.settings
        for uuid, machine in list(self.machines.items()):
            if not machine.live or machine.started is None or uuid not in by_uuid:
                continue
            mt = config.machinetypes.get(machine.record.machinetype)
            heartbeat_policy = None
            heartbeat_mtime = None
            if mt is not None:
                heartbeat_policy = enforce.HeartbeatPolicy(
                    heartbeat_file=mt.heartbeat_file,
                    heartbeat_seconds=mt.heartbeat_seconds or 0,
                    fizzle_seconds=mt.fizzle_seconds,
                )
                if mt.heartbeat_file:
                    heartbeat_mtime = self.boundary.heartbeat_mtime(machine, mt.heartbeat_file, now)
            facts = enforce.RunningVMFacts(
                uuid=uuid,
                name=machine.name,
                machinetype=machine.record.machinetype,
                started=machine.started.time,
                shutdown_time=self.shutdown_times.get(uuid, machine.record.shutdown_time),
                paused=by_uuid[uuid].state in (DomainState.PAUSED, DomainState.CRASHED),
                heartbeat_mtime=heartbeat_mtime,
            )
            kill = enforce.check_running_vm(
                facts,
                heartbeat_policy,
                settings.shutdown_time,
                settings.grace_seconds,
                now,
                self._judge_heartbeats_from,
            )
            if kill is not None:
                log.warning("%s: killing: %s", machine.name, kill.value)
                with self._events_lock:  # destroy reports no CPU time: keep this round's reading
                    self._final_cpu[uuid] = by_uuid[uuid].cpu_seconds
                checkpoint("destroy.before")
                self._destroy(uuid, machine.name)
                # The VM ran until the destroy returned (1-2 s for qemu, more on a busy host, and
                # later kills of a round wait for the earlier ones): that is its end, not the
                # round's start. Recorded as the last observation first, so a restart after a
                # crash right here ends it then too, not at an older heartbeat.
                stopped = max(self.clock(), now)
                self._observed_alive(uuid, stopped, by_uuid[uuid].cpu_seconds)
                checkpoint("destroy.after")
                self._finish(self.machines[uuid], stopped, kill=kill)
                report.killed.append(machine.name)

    def _observed_alive(self, uuid: str, time_: float, cpu_seconds: float) -> None:
        """Write the factory's last observation of a VM; a full disk only costs precision."""
        machine = self.machines[uuid]
        if machine.heartbeat is not None:
            cpu_seconds = max(cpu_seconds, machine.heartbeat.cpu_seconds)
        try:
            self.machines[uuid] = self.store.write_heartbeat(machine, time_, cpu_seconds)
        except OSError as error:
            log.error("%s: cannot record the last observation: %s", machine.name, error)

    def _destroy(self, uuid: str, name: str) -> None:
        try:
            self.hypervisor.destroy(uuid)
        except HypervisorError as error:
            log.error("%s: destroy failed: %s", name, error)

    # -- finish, account, clean ---------------------------------------------------------

    def _finish(
        self, machine: Machine, now: float, kill: Optional[KillReason] = None, reason: Optional[str] = None
    ) -> None:
        """Record how a VM ended; everything after (accounting, cleaning) reads this record.

        If the record cannot be written (a full disk) the VM stays live in memory and this
        same record is written at the next try (its domain is gone: the next round calls again).
        """
        finished = self._unrecorded.pop(machine.uuid, None)
        retry = finished is not None
        if finished is None:
            finished = self._ending(machine, now, kill, reason)
        try:
            machine = self.store.mark_finished(machine, finished)
        except OSError as error:
            self._unrecorded[machine.uuid] = finished
            log.log(logging.DEBUG if retry else logging.ERROR,
                    "%s: cannot record how it ended, will retry: %s", machine.name, error)
            return
        checkpoint("finish.recorded")
        self._finished(machine, finished)

    def _ending(
        self, machine: Machine, now: float, kill: Optional[KillReason], reason: Optional[str]
    ) -> Finished:
        """How and when a VM ended, from what the engine knows now."""
        with self._events_lock:
            stop_time = self._stop_times.pop(machine.uuid, None)
            final_cpu = self._final_cpu.pop(machine.uuid, None)
        started = machine.started.time if machine.started else None
        if kill is not None:
            end_time = now
        elif stop_time is not None:
            end_time = stop_time
        elif machine.uuid in self._seen_running:
            end_time = now  # running at the last round, gone now; its stop event is late
        else:
            # it ended unobserved (the daemon was down): its last sign of life
            signs = [machine.heartbeat.time if machine.heartbeat else None, console_mtime(machine)]
            end_time = min(max([t for t in signs if t is not None] or [started or now]), now)
        if started is not None:
            end_time = max(end_time, started)  # a clock step back must not give negative walls
        cpu = final_cpu if final_cpu is not None else (machine.heartbeat.cpu_seconds if machine.heartbeat else 0.0)
        if reason == "create_failed" or started is None:
            finished = Finished(time=now, end_time=end_time, cpu_seconds=0.0, outcome=Outcome.FAILED.value,
                                reason=reason or "create_failed")
        else:
            message = self.boundary.shutdown_message(machine)
            abort_on_700 = self.config.settings.abort_on_700
            classified = classify(message, end_time - started, machine.record.fizzle_seconds, kill, abort_on_700)
            shown: Optional[ShutdownMessage] = classified.message
            finished = Finished(
                time=now,
                end_time=end_time,
                cpu_seconds=float(cpu),
                outcome=classified.outcome.value,
                reason=kill.value if kill else ("shutdown_message" if message else "no_message"),
                code=shown.code if shown else None,
                text=shown.text if shown else "",
                cpu_efficiency=vm_efficiency(float(cpu), end_time - started, machine.record.processors),
            )
            log.info(
                "%s: finished after %ds: %s (%s)",
                machine.name, int(end_time - started), finished.message or "no shutdown_message", finished.outcome,
            )
            if finished.code is not None and 300 <= finished.code < 400:
                # Vac's hint for tuning fizzle_seconds
                log.info("%s: aborted after %ds, so a %s VM needs fizzle_seconds of at least that "
                         "to count as a fizzle (Vac's hint)", machine.name, int(end_time - started),
                         machine.record.machinetype)
        return finished

    def _finished(self, machine: Machine, finished: Finished) -> None:
        """The in-memory side of a VM's end, once its `finished` record is on disk."""
        self.machines[machine.uuid] = machine
        self._seen_running.discard(machine.uuid)
        if finished.outcome != Outcome.FAILED.value:
            self.recorder.finished(machine.record.machinetype, finished.code, finished.outcome)
            if self.on_finished is not None:
                self.on_finished(machine)
        self.shutdown_times.pop(machine.uuid, None)

    def _settle(self, config, now: float) -> None:
        """Account and clean every finished VM that still needs it (retried until done)."""
        self._settle_machines([u for u, m in self.machines.items()
                               if m.finished is not None and (m.accounted is None or m.cleaned is None)], now)

    def _settle_machines(self, uuids: List[str], now: float) -> None:
        unaccounted = [self.machines[u] for u in uuids if self.machines[u].accounted is None]
        if unaccounted:
            for machine, result in zip(unaccounted, self.accountant.account(unaccounted, now)):
                if isinstance(result, AccountingError):
                    if machine.uuid not in self._unaccountable:
                        log.error("%s: accounting failed, will retry: %s", machine.name, result)
                        self._unaccountable.add(machine.uuid)
                    continue
                self._unaccountable.discard(machine.uuid)
                checkpoint("account.written")
                try:
                    self.machines[machine.uuid] = self.store.mark_accounted(machine, result)
                except OSError as error:  # a full disk: the record is rewritten in place later
                    log.error("%s: cannot mark it accounted, will retry: %s", machine.name, error)
                    continue
                checkpoint("account.marked")
        for uuid in uuids:
            if self.machines[uuid].cleaned is None:
                try:
                    self._clean(self.machines[uuid], now)
                except OSError as error:  # a full disk: one VM's failure does not stop the round
                    log.error("%s: cleaning failed, will retry: %s", self.machines[uuid].name, error)

    def _clean(self, machine: Machine, now: float) -> None:
        try:
            self.boundary.withdraw(machine)
        except VacFactoryError as error:
            log.error("%s: withdrawing exports failed, will retry: %s", machine.name, error)
            return
        checkpoint("clean.withdrawn")
        if not self._keep_evidence(machine, now):
            return  # retried next round: evidence is never deleted by a failed move
        self.hypervisor.remove_disks(machine.disks_dir)
        checkpoint("clean.disks_removed")
        self.machines[machine.uuid] = self.store.mark_cleaned(machine, now)

    def _keep_evidence(self, machine: Machine, now: float) -> bool:
        """With keep_on_abnormal_end, move an abnormally ended VM's disks aside (read-only)."""
        s = self.config.settings
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

    # -- drain --------------------------------------------------------------------------

    def _apply_drain(self, config) -> None:
        """Publish an earlier factory shutdown_time in running VMs' MJF (Vac does this too)."""
        factory_shutdown = config.settings.shutdown_time
        if factory_shutdown is None:
            return
        for uuid, machine in self.machines.items():
            if not machine.live:
                continue
            current = self.shutdown_times.get(uuid, machine.record.shutdown_time)
            new = enforce.drained_shutdown_time(current, factory_shutdown)
            if new is None:
                continue
            machinefeatures, jobfeatures = mjf.shutdown_keys(int(new), config.settings.grace_seconds)
            try:
                self.store.rewrite_features(machine, machinefeatures, jobfeatures)
            except OSError as error:
                log.error("%s: cannot publish the new shutdown time: %s", machine.name, error)
                continue
            self.shutdown_times[uuid] = new
            log.info("%s: shutdown time moved to %d (drain)", machine.name, int(new))

    # -- decide and create --------------------------------------------------------------

    def local_vms(self):
        return [
            policies.local_vm(m, self.shutdown_times.get(u, m.record.shutdown_time))
            for u, m in self.machines.items()
            if m.live
        ]

    def own_states(self, now: float) -> Dict[str, MachinetypeState]:
        """This factory's per-machinetype state right now (what it tells the space)."""
        mt_policies = policies.machinetype_policies(self.config)
        return core_status.machinetype_states(mt_policies, self.local_vms(), self.last_finishes, now)

    def _decide(self, config, now: float) -> Decision:
        mt_policies = policies.machinetype_policies(config)
        local = self.local_vms()
        own = core_status.machinetype_states(mt_policies, local, self.last_finishes, now)
        view = self.space_view(config, own, now) if self.space_view else own
        try:
            load = self.load_average()
        except OSError:
            load = 0.0
        return scheduler.decide(
            policies.factory_policy(config, self.host_processors), mt_policies, local, view, load, now, self.rng
        )

    def _log_reason(self, decision: Decision, report: Optional[RoundReport] = None) -> None:
        """Say why the factory stopped creating, once per change (not every round)."""
        reason = decision.reason
        if report is not None and report.failed and reason.startswith("all "):
            # the plan filled every processor but creations failed: that is not "in use"
            busy = sum(m.record.processors for m in self.machines.values() if m.live)
            reason = (f"{busy} of {self.config.settings.total_processors} processors in use; "
                      f"{len(report.failed)} creations failed this round")
        # the numbers in a reason change constantly; compare its words before the first digit
        key = reason.split(":")[0].split(";")[0].rstrip("0123456789 ")
        if report is not None and report.failed:
            key = "failed"
        if key != self._last_reason:
            log.info("decision: %s", reason)
            self._last_reason = key

    def _creation_paused(self) -> Optional[str]:
        """Why creation must wait for space in the state directory now, or None.

        Paused below MIN_FREE_STATE_MIB free, and after a creation ran out of space until the
        free space has grown by that much (or ENOSPC_PAUSE_SECONDS passed, for causes statvfs
        cannot show). Logged once per change, not every round.
        """
        state_dir = self.store.state_dir
        floor = MIN_FREE_STATE_MIB << 20
        try:
            free: Optional[int] = self.free_space(state_dir)
        except OSError as error:  # cannot tell: creating shows soon enough
            log.warning("cannot read the free space of %s: %s", state_dir, error)
            free = None
        kind, why = None, None
        if free is not None and free < floor:
            kind = "floor"
            why = (f"creation paused: state dir {state_dir} has {free >> 20} MiB free, "
                   f"needs {MIN_FREE_STATE_MIB}")
        elif self._out_of_space is not None:
            since, free_then = self._out_of_space
            grown = free is not None and free_then is not None and free >= free_then + floor
            if grown or self._elapsed() - since >= ENOSPC_PAUSE_SECONDS:
                self._out_of_space = None
            else:
                kind = "enospc"
                why = (f"creation paused: a creation ran out of space in state dir {state_dir} "
                       f"({(free_then or 0) >> 20} MiB free then); waiting for {MIN_FREE_STATE_MIB} "
                       f"MiB more or {ENOSPC_PAUSE_SECONDS:.0f} s")
        if kind != self._paused_kind:
            if why is not None:
                log.error("%s", why)
            else:
                log.info("creation resumed: state dir %s has %s MiB free", state_dir,
                         "?" if free is None else free >> 20)
            self._paused_kind = kind
        return why

    def _create_all(self, config, decision: Decision, report: RoundReport) -> None:
        failed_types: Set[str] = set()
        for create in decision.creates:
            if create.machinetype in failed_types:
                continue
            try:
                name = self._create(config, create)
            except ImageNotReady as waiting:  # not startable this round; not a failed creation
                failed_types.add(create.machinetype)
                report.waiting.append(create.machinetype)
                if create.machinetype not in self._waiting:  # the image cache logs its failures
                    log.info("machinetype %s: not startable yet: %s", create.machinetype, waiting)
                self._waiting[create.machinetype] = str(waiting)
                continue
            if name is not None and self._waiting.pop(create.machinetype, None) is not None:
                log.info("machinetype %s: its image is ready", create.machinetype)
            if name is None:
                failed_types.add(create.machinetype)
                report.failed.append(create.machinetype)
                if self._out_of_space is not None:  # the disk filled up: pause creation now
                    report.paused = self._creation_paused()
                    break
            else:
                report.created.append(name)

    def _free_slot(self, config) -> Optional[int]:
        busy = {m.record.slot for m in self.machines.values() if m.cleaned is None}
        for slot in range(config.settings.total_processors):
            if slot not in busy:
                return slot
        return None

    def _create(self, config, create: Create) -> Optional[str]:
        """Prepare, publish and start one VM; on failure leave no trace but its record."""
        settings = config.settings
        mt = config.machinetypes[create.machinetype]
        slot = self._free_slot(config)
        if slot is None:
            log.error("no free slot for a %s VM although processors are free", create.machinetype)
            return None
        now = self.clock()
        name = naming.domain_name(settings.factory_name, slot)
        try:
            record = self.builder.new_record(
                config, mt, uuid=str(uuidlib.uuid4()), slot=slot, name=name,
                processors=create.processors, created=now, shutdown_time=create.shutdown_time,
            )
            machinefeatures, jobfeatures = self.builder.features(config, record)
            user_data = self.builder.user_data(config, mt, record)
            machine = self.store.prepare(record, machinefeatures, jobfeatures, user_data)
        except ImageNotReady:
            raise  # nothing prepared yet: _create_all skips the machinetype this round
        except (VacFactoryError, OSError, ValueError) as error:
            self._creation_failed(name, create.machinetype, error)
            return None
        checkpoint("create.prepared")
        self.machines[record.uuid] = machine
        self.shutdown_times[record.uuid] = record.shutdown_time
        try:
            spec = self.builder.domain_spec(config, mt, machine)
            self.boundary.publish(machine)
            checkpoint("create.published")
            self.hypervisor.create(spec)
            checkpoint("create.domain_started")
        except (VacFactoryError, OSError, ValueError) as error:  # ValueError: a spec refused a value
            self._creation_failed(record.name, create.machinetype, error)
            self._finish(machine, self.clock(), reason="create_failed")
            if self.machines[machine.uuid].finished is not None:  # else retried next round
                self._settle_machines([machine.uuid], self.clock())
            return None
        try:
            self.machines[record.uuid] = self.store.mark_started(machine, self.clock())
        except OSError as error:  # a full disk: the next round adopts the running domain
            log.error("%s: cannot record its start, adopting it later: %s", record.name, error)
        self._seen_running.add(record.uuid)
        self.status.clear_error()
        self.creation_failures.pop(record.machinetype, None)
        self._failure_repeats.forget(record.machinetype)
        self.recorder.created(record.machinetype)
        log.info("%s: created %s with %d processors, uuid %s", record.name, record.machinetype,
                 record.processors, record.uuid)
        if self.on_created is not None:
            self.on_created(self.machines[record.uuid])
        return record.name

    def _creation_failed(self, name: str, machinetype: str, error: Exception) -> None:
        message = f"{name}: creation of a {machinetype} VM failed: {error}"
        reason = str(error).replace(name, "<name>")
        previous = self.creation_failures.get(machinetype)
        self.creation_failures[machinetype] = {
            "time": self.clock(), "reason": str(error), "vm": name,
            "count": (int(previous["count"]) + 1) if previous else 1,  # type: ignore[call-overload]
        }
        suppressed = self._failure_repeats.due((machinetype, reason))
        if suppressed is not None:
            log.error("%s%s", message, self._failure_repeats.suffix(suppressed))
        if out_of_space(error):  # pause creation rather than fail again every round
            try:
                free: Optional[int] = self.free_space(self.store.state_dir)
            except OSError:
                free = None
            self._out_of_space = (self._elapsed(), free)
        try:
            self.status.set_error(message)
        except OSError as status_error:  # the disk that made creation fail may be full
            log.error("cannot write factory-error: %s", status_error)
        self.recorder.creation_failed(machinetype)

    # -- retention and status -----------------------------------------------------------

    def _retention(self, config, now: float) -> None:
        """Delete done machine directories older than their machinetype's machines_dir_days."""
        # the interval on the monotonic clock: a step back of the wall clock stopped retention
        # for as long as the step (the ages below stay wall-clock times, as the records are)
        elapsed = self._elapsed()
        if self._last_retention is not None and elapsed - self._last_retention < RETENTION_SECONDS:
            return
        self._last_retention = elapsed
        for uuid, machine in list(self.machines.items()):
            if machine.state != "done" or machine.finished is None:
                continue
            mt = config.machinetypes.get(machine.record.machinetype)
            days = mt.machines_dir_days if mt is not None else DEFAULT_MACHINES_DIR_DAYS
            if days <= 0 or now - machine.finished.time < days * 86400:
                continue
            try:
                self.store.delete(machine)
            except StateError as error:
                log.error("%s", error)
                continue
            del self.machines[uuid]
            log.info("%s: machine directory deleted after %.1f days", machine.name, days)

    def _write_status(self, report: RoundReport) -> None:
        live = [m for m in self.machines.values() if m.live]
        processors = sum(m.record.processors for m in live)
        per_type: Dict[str, int] = {}
        for m in live:
            per_type[m.record.machinetype] = per_type.get(m.record.machinetype, 0) + m.record.processors
        status = {
            "time": report.time,
            "blind": report.blind,
            "running_machines": len(live),
            "running_processors": processors,
            "total_processors": self.config.settings.total_processors,
            "processors_by_machinetype": per_type,
            "decision": report.decision.reason if report.decision else None,
            "created": report.created,
            "failed": report.failed,
            "waiting_for_images": report.waiting,
            "creation_paused": report.paused,
            "creation_failures": self.creation_failures,
        }
        if self.status_extra is not None:
            try:
                status.update(self.status_extra())
            except (VacFactoryError, OSError) as error:
                log.error("cannot gather the daemon's status: %s", error)
        try:
            self.status.write_status(status)
            if not report.blind:
                self.status.beat(report.time)
        except OSError as error:
            log.error("cannot write status files: %s", error)
