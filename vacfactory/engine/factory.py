"""The engine: keeps the hypervisor full of VMs, one decision round at a time.

A round gathers facts (the configuration, the hypervisor's domains, the VMs' limits), turns
them into lifecycle events for each VM (core.lifecycle: adopt, finish, kill, account, clean,
expire) and hands each to engine.transitions, which carries out what the table says; then it
asks the core scheduler what to create and creates all of it (engine.creation, in parallel).
The collaborators each do one step: engine.transitions (every VM transition, with its crash
checkpoints), engine.ending (how a VM ended), engine.settling (accounting and cleaning),
engine.creation, engine.pause (creation waits for disk space), engine.report (status.json).

Rounds run whenever a libvirt lifecycle event arrives (so a VM that powers off is replaced
within about a second) and at least every ``cycle_seconds``. Unlike Vac (one creation per
60 s cycle) a round creates as many VMs as there are free processors.

Crash safety comes from the state directory: everything the engine knows is on disk before
it acts on it, and at start-up the engine rebuilds its view from disk plus the hypervisor.
While the hypervisor cannot be reached the engine is *blind*: it finishes nothing and creates
nothing until it can see again (a libvirtd restart must not look like every VM ending).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Dict, List, Optional

from vacfactory.core import enforce, scheduler, status as core_status
from vacfactory.core.lifecycle import Event
from vacfactory.core.outcomes import KillReason
from vacfactory.core.views import Decision, FinishedVM, MachinetypeState
from vacfactory.engine import naming, policies, rebalance
from vacfactory.engine.clockstep import ClockStepWatch
from vacfactory.engine.configpoll import ConfigPoller
from vacfactory.engine.creation import Creator
from vacfactory.engine.ending import Finisher, console_mtime
from vacfactory.engine.entries import VMEntry, VMTable
from vacfactory.engine.pause import ENOSPC_PAUSE_SECONDS, MIN_FREE_STATE_MIB, CreationPause
from vacfactory.engine.drain import apply_drain
from vacfactory.engine.parts import EngineParts, Environment
from vacfactory.engine.report import DecisionLog, RoundReport, write_status
from vacfactory.engine.retention import RETENTION_SECONDS, Retention
from vacfactory.engine.settling import Settler
from vacfactory.engine.transitions import Facts, Transitions, destroy_domain
from vacfactory.errors import HypervisorError, VacFactoryError
from vacfactory.hypervisor.base import DomainEvent, DomainInfo, DomainState
from vacfactory.view.metrics import MetricsRecorder
from vacfactory.state.machines import Machine
from vacfactory.state.status import StatusFiles

__all__ = ["Factory", "EngineParts", "Environment", "RoundReport", "MIN_FREE_STATE_MIB", "ENOSPC_PAUSE_SECONDS",
           "RETENTION_SECONDS"]

log = logging.getLogger(__name__)

#: the factory's own heartbeat record of a VM is rewritten at most this often
HEARTBEAT_WRITE_SECONDS = 10.0


def started_unrecorded(entry: VMEntry) -> bool:
    """Whether a VM whose start was never recorded and whose domain is gone did start: this
    process saw it running (it could not record that: a full disk), the hypervisor reported
    its stop (a container that exited while the daemon was down), or its console log exists
    (qemu creates it when the domain starts). A VM that ran is accounted like any other; the
    daemon killed between the start and its record must not lose it."""
    return entry.seen_running or entry.stop_time is not None or console_mtime(entry.machine) is not None


class Factory:
    """The lifecycle engine, built from its parts (engine.parts: collaborators injected, so
    tests use real but local ones) in an environment (clocks, host, hooks; real by default)."""

    def __init__(self, parts: EngineParts, env: Environment = Environment()) -> None:
        self.config_source, self.hypervisor, self.store = parts.config_source, parts.hypervisor, parts.store
        self.boundary = parts.boundary
        clock = self.clock = env.clock
        self.host_processors, self.load_average = env.host_processors, env.load_average
        self.space_view, self.rng = env.space_view, env.rng or random.Random()
        self.rebalancer = rebalance.Rebalancer()  # adaptive backoff's memory; graceful rebalancing
        self.status = StatusFiles(self.store.state_dir)
        self.recorder = MetricsRecorder(clock())
        self.config_poller = ConfigPoller(self.config_source)
        self.config = self.config_poller.config
        self.vms = VMTable()
        self.started_at = clock()
        #: elapsed time, to tell a step of the wall clock from time passing: time.monotonic for
        #: the real clock; an injected (test) clock brings its own partner, or none
        monotonic = env.monotonic if env.monotonic is not None else (time.monotonic if clock is time.time else None)
        self.clock_steps = ClockStepWatch(monotonic)
        #: measures intervals (retention): a step of the wall clock must not stop them
        self._elapsed: Callable[[], float] = monotonic or clock
        #: heartbeats are judged from fizzle_seconds after this (the start, or a clock step)
        self._judge_heartbeats_from = self.started_at
        self.last_report: Optional[RoundReport] = None
        self._blind_logged = False
        self.decision_log = DecisionLog()
        #: the daemon's additions to status.json (itself, the configuration, the space)
        self.status_extra: Optional[Callable[[], Dict[str, object]]] = None
        self.pause = CreationPause(self.store.state_dir, self.elapsed, env.free_space)
        self.finisher = Finisher(self.vms, self.recorder, self.boundary.shutdown_message, self._abort_on_700,
                                 env.on_finished)
        self.transitions = Transitions(self.store, self.vms, self.hypervisor, self.boundary, self.finisher,
                                       self._settings, clock)
        self.settler = Settler(self.transitions, parts.accountant)
        self.creator = Creator(self.vms, parts.builder, self.transitions, self.settler, self.pause, self.recorder,
                               self.status, clock, self.elapsed, env.on_created)
        self.retention = Retention(self.vms, self.transitions, self.elapsed)
        self.wake = env.wake or threading.Event()
        self.stopping = threading.Event()

    # -- what others read ---------------------------------------------------------------

    @property
    def machines(self) -> Dict[str, Machine]:
        """Every VM's machine directory by UUID (a copy)."""
        return self.vms.machines()

    @property
    def last_finishes(self) -> Dict[str, FinishedVM]:
        """The newest-created finished VM of each machinetype (kept by the store)."""
        return self.store.latest if self.store.latest is not None else {}

    @property
    def creation_failures(self) -> Dict[str, Dict[str, object]]:
        return self.creator.failures

    @property
    def free_space(self) -> Callable[[str], int]:
        return self.pause.free_space

    @free_space.setter
    def free_space(self, value: Callable[[str], int]) -> None:
        self.pause.free_space = value

    def elapsed(self) -> float:
        return self._elapsed()

    def _settings(self):
        return self.config.settings

    def _abort_on_700(self) -> bool:
        return bool(self.config.settings.abort_on_700)

    # -- start-up and the loop ----------------------------------------------------------

    def start(self) -> None:
        """Rebuild the in-memory view from disk; the first round reconciles with libvirt."""
        machines = self.store.load_all(recover=True)
        self.store.repair_last_finishes(machines.values())
        self.vms.load(machines, self.store.current_shutdown_time)
        self.boundary.start(self.config, [m for m in machines.values() if m.live and m.cleaned is None])
        self.hypervisor.set_event_callback(self.on_event)
        log.info("engine started: %d machine directories, %d live", len(machines), len(self.vms.live()))

    def run(self, until: Optional[Callable[[], bool]] = None, after_round: Optional[Callable[[], None]] = None) -> None:
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
        in a VM's record comes from one source; only an event found late carries its time.
        """
        if event.kind in ("shutdown", "stopped", "crashed"):
            # an event found late (a container that exited while the daemon was down) says when
            # it happened, by the runtime's record on this host's clock
            stamp = self.clock() if event.at is None else min(event.at, self.clock())
            self.vms.note_stop(event.uuid, None if event.kind == "shutdown" else stamp, event.cpu_seconds)
        if event.kind in ("stopped", "crashed", "suspended"):
            self.wake.set()

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
            try:
                present = {d.uuid for d in self.hypervisor.list_domains()}
            except HypervisorError as error:
                log.warning("cannot list the domains at shutdown; VMs that ended are finished at the next "
                            "start: %s", error)
                present = None
            for entry in self.vms.live():
                if present is not None and entry.machine.started is not None and entry.uuid not in present:
                    self.transitions.apply(entry, Event.DOMAIN_GONE, Facts(time=now))
            self.settler.settle(list(self.vms), now)
        except (VacFactoryError, OSError) as error:
            log.error("final accounting failed (it is retried at the next start): %s", error)

    # -- one round ----------------------------------------------------------------------

    def _round(self) -> RoundReport:
        now = self.clock()
        report = RoundReport(time=now)
        self._notice_clock_step(now)
        config = self.config = self.config_poller.poll()
        try:
            domains = self.hypervisor.list_domains()
        except HypervisorError as error:
            report.blind = True
            # What ends while we are blind ends unobserved: at its last sign of life, not when
            # we see again (a VM that died with libvirtd must not be charged for the outage).
            for entry in self.vms:
                entry.seen_running = False
            if not self._blind_logged:
                log.error("hypervisor unreachable, creating nothing until it is back: %s", error)
                self._blind_logged = True
            return self._done(report)
        if self._blind_logged:
            log.info("hypervisor reachable again")
            self._blind_logged = False
        by_uuid = {d.uuid: d for d in domains}
        self._reconcile(config, domains, by_uuid, now, report)
        self._enforce(config, by_uuid, now, report)
        self.settler.settle([e for e in self.vms if e.machine.finished is not None], now)
        apply_drain(self.store, self.vms.live(), config.settings)
        report.decision = self._decide(config, now)
        report.paused = self.pause.why()
        if report.paused is None:
            self.creator.create_all(config, report.decision, report)
        self.decision_log.say(report, sum(e.machine.record.processors for e in self.vms.live()),
                              config.settings.total_processors)
        self.retention.run(config, now)
        return self._done(report)

    def _done(self, report: RoundReport) -> RoundReport:
        write_status(self.status, report, self.machines.values(), self.config.settings.total_processors,
                     self.creator.failures, self.status_extra)
        self.last_report = report
        return report

    def _notice_clock_step(self, now: float) -> None:
        """A step of the wall clock is not time passing: (running, clock_stepped) moves running
        VMs' start times with it, so their WallDuration stays the time they really ran, and
        heartbeats are judged afresh, as after a restart (a heartbeat written a minute ago is
        not an hour old because the clock was stepped forward). Shutdown times are absolute
        (the VM reads them from its MJF) and are not moved."""
        step = self.clock_steps.step(now)
        if step is None:
            return
        self._judge_heartbeats_from = now
        for entry in self.vms.live():
            started = entry.machine.started
            if started is not None:
                try:
                    self.transitions.apply(entry, Event.CLOCK_STEPPED, Facts(time=started.time + step))
                except OSError as error:
                    log.error("%s: cannot move its start time: %s", entry.name, error)

    # -- facts about live VMs -> lifecycle events ---------------------------------------

    def _reconcile(self, config, domains: List[DomainInfo], by_uuid, now: float, report: RoundReport) -> None:
        """Zombies destroyed; each live VM's domain found, missing or gone."""
        pattern = naming.domain_pattern(config.settings.factory_name)
        live = {entry.uuid for entry in self.vms.live()}
        for domain in domains:
            if pattern.match(domain.name) and domain.uuid not in live:
                log.warning("%s: zombie domain (uuid %s is not a live VM of ours): destroying", domain.name, domain.uuid)
                destroy_domain(self.hypervisor, domain.uuid, domain.name)
                report.zombies.append(domain.name)
        for entry in sorted(self.vms.live(), key=lambda e: e.uuid):
            domain = by_uuid.get(entry.uuid)
            if entry.machine.started is None:
                if not self._adopt(entry, domain, now, report) or domain is not None:
                    continue  # an adopted domain is watched from the next round
            if domain is None:
                self.transitions.apply(entry, Event.DOMAIN_GONE, Facts(time=now))
                report.finished.append(entry.name)
                continue
            entry.seen_running = True
            if domain.cpu_seconds:
                entry.seen_cpu = domain.cpu_seconds
                heartbeat = entry.machine.heartbeat
                if heartbeat is None or now - heartbeat.time >= HEARTBEAT_WRITE_SECONDS:
                    self.transitions.apply(entry, Event.OBSERVED, Facts(time=now, cpu_seconds=domain.cpu_seconds))

    def _adopt(self, entry: VMEntry, domain: Optional[DomainInfo], now: float, report: RoundReport) -> bool:
        """A VM whose start was never recorded: (created, domain_found) adopts it when its
        domain runs or did run, (created, domain_missing) finishes it as failed. True if it was
        adopted (the caller then finishes one whose domain is gone, as any VM that ended)."""
        if domain is None and not started_unrecorded(entry):
            log.info("%s: creation was interrupted; cleaning up", entry.name)
            self.transitions.apply(entry, Event.DOMAIN_MISSING, Facts(time=now, reason="create_failed"))
            return False
        if domain is None:
            log.info("%s: its domain started, unrecorded, and has ended meanwhile: adopting it to account it",
                     entry.name)
        else:
            log.info("%s: adopting a domain whose start was not recorded", entry.name)
        try:
            adopted = self.transitions.apply(entry, Event.DOMAIN_FOUND, Facts(time=entry.machine.record.created))
        except OSError as error:  # a full disk: adopted at a later round
            log.error("%s: cannot record its start, will retry: %s", entry.name, error)
            return False
        if adopted is None:
            return False
        report.adopted.append(entry.name)
        return True

    def _enforce(self, config, by_uuid: Dict[str, DomainInfo], now: float, report: RoundReport) -> None:
        """(running, limit_reached) -> destroy, record the last observation, record_finished."""
        settings = config.settings
        for entry in self.vms.live():
            machine = entry.machine
            domain = by_uuid.get(entry.uuid)
            if machine.started is None or domain is None:
                continue
            mt = config.machinetypes.get(machine.record.machinetype)
            heartbeat_policy, heartbeat_mtime = None, None
            if mt is not None:
                heartbeat_policy = enforce.HeartbeatPolicy(heartbeat_file=mt.heartbeat_file,
                                                           heartbeat_seconds=mt.heartbeat_seconds or 0,
                                                           fizzle_seconds=mt.fizzle_seconds)
                if mt.heartbeat_file:
                    heartbeat_mtime = self.boundary.heartbeat_mtime(machine, mt.heartbeat_file, now)
            facts = enforce.RunningVMFacts(
                uuid=entry.uuid, name=machine.name, machinetype=machine.record.machinetype,
                started=machine.started.time, shutdown_time=entry.shutdown_time,
                paused=domain.state in (DomainState.PAUSED, DomainState.CRASHED), heartbeat_mtime=heartbeat_mtime,
            )
            kill = enforce.check_running_vm(facts, heartbeat_policy, settings.shutdown_time, settings.grace_seconds,
                                            now, self._judge_heartbeats_from)
            if kill is not None:
                self._kill(entry, domain, kill, now)
                report.killed.append(machine.name)

    def _kill(self, entry: VMEntry, domain: DomainInfo, kill: KillReason, now: float) -> None:
        log.warning("%s: killing: %s", entry.name, kill.value)
        self.transitions.apply(entry, Event.LIMIT_REACHED, Facts(time=now, cpu_seconds=domain.cpu_seconds, kill=kill))

    # -- decide -------------------------------------------------------------------------

    def local_vms(self):
        return [policies.local_vm(entry.machine, entry.shutdown_time) for entry in self.vms.live()]

    def own_states(self, now: float) -> Dict[str, MachinetypeState]:
        """This factory's per-machinetype state right now (what it tells the space)."""
        mt_policies = policies.machinetype_policies(self.config)
        return core_status.machinetype_states(mt_policies, self.local_vms(), self.last_finishes, now)

    def _decide(self, config, now: float) -> Decision:
        mt_policies = policies.machinetype_policies(config)
        local = self.local_vms()
        own = core_status.machinetype_states(mt_policies, local, self.last_finishes, now)
        view = self.space_view(config, own, now) if self.space_view else own
        view = self.rebalancer.decide_view(self.store, self.vms.live(), config, local, view, now, self.rng)
        try:
            load = self.load_average()
        except OSError:
            load = 0.0
        return scheduler.decide(
            policies.factory_policy(config, self.host_processors), mt_policies, local, view, load, now, self.rng
        )
