"""A space of factories on a simulated clock with a workload: Vac's policy against ours.

Each factory runs the real :func:`vacfactory.core.scheduler.decide`, the real outcome code
(:func:`vacfactory.core.outcomes.classify`, :func:`vacfactory.core.status.supersedes`: the
newest-created finished VM's outcome is what a factory reports) and, when enabled, the real
adaptive backoff and :func:`vacfactory.core.rebalance.plan`. The space view is exact and
instantaneous (every factory answers every query at once): what a lossy network does to the
view is measured by :mod:`vacfactory.space.simulator`; here the question is the policy.

Policies:

- **Vac 03.01**: one decision per factory per ``cycle_seconds`` while it has free processors,
  creating at most one VM (the most starved eligible machinetype); fixed ``backoff_seconds``
  after the newest abort anywhere in the space, plus the fizzle window (vac-anchor.md 2.3).
- **vacfactory**: a round whenever a VM ends and every cycle while processors are free, each
  creating as many VMs as fit; optionally adaptive backoff and graceful rebalancing (checked
  every ``rebalance_seconds`` at every factory).

A VM given notice by rebalancing finishes its current payload (its remainder drawn uniformly
up to ``payload_max_seconds``) and ends ``100`` then; if the remainder would pass the new
shutdown time the payload counts as killed (never, while notice >= the longest payload).
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from vacfactory.core import rebalance as core_rebalance
from vacfactory.core.adaptive_backoff import SpaceMemory
from vacfactory.core.outcomes import Outcome, classify, parse_shutdown_message
from vacfactory.core.scheduler import decide
from vacfactory.core.status import supersedes
from vacfactory.core.views import (
    AdaptiveBackoff,
    FactoryPolicy,
    FinishedVM,
    LocalVM,
    MachinetypePolicy,
    MachinetypeState,
)
from vacfactory.sim.workload import Workload

_WORK = "200 Intended work completed ok"
_NO_WORK = "300 Nothing to do"
_NOTICE = "100 Shutdown as requested by the VM's host/hypervisor"
#: points off target that count as converged (the issue's figure)
CONVERGED_POINTS = 2.0


@dataclass(frozen=True)
class SchedulingPolicy:
    """How factories decide: Vac's one VM per cycle, or rounds that fill, with the options."""

    name: str
    one_per_cycle: bool = False
    adaptive: Optional[AdaptiveBackoff] = None
    rebalance: Optional[core_rebalance.RebalancePolicy] = None


VAC = SchedulingPolicy("Vac 03.01", one_per_cycle=True)
DEFAULTS = SchedulingPolicy("vacfactory")


@dataclass(frozen=True)
class SpaceSetup:
    """The space: factories, their processors and the machinetype options both policies use."""

    factories: int = 100
    processors: int = 32
    cycle_seconds: float = 60.0
    backoff_seconds: float = 10.0
    fizzle_seconds: float = 600.0
    sample_seconds: float = 300.0
    rebalance_seconds: float = 300.0
    seed: int = 1


@dataclass(frozen=True)
class Figures:
    """One run's figures (after the warm-up)."""

    policy: str
    #: processor-hours in VMs that found work / available, while some machinetype had work
    occupancy: float
    #: processor-hours in VMs that found no work
    waste_hours: float
    #: time-averaged points off target, per machinetype, while it had work
    share_error: Mapping[str, float]
    #: the largest points off target of any machinetype, time-averaged over the times every
    #: machinetype had work (None: never)
    share_error_all_work: Optional[float]
    #: hours from the share change until every machinetype is within 2 points (counted only
    #: while every machinetype has work; None: no change, or never)
    convergence_hours: Optional[float]
    #: largest points off target of any machinetype after convergence, while all have work
    error_after_convergence: Optional[float]
    #: when the shares changed (None: they did not)
    share_change_hours: Optional[float]
    vms: int
    nowork_vms: int
    notices: int
    payloads_killed: int
    wall_seconds: float

    @property
    def max_share_error(self) -> float:
        return max(self.share_error.values(), default=0.0)


@dataclass
class _VM:
    uuid: str
    machinetype: str
    processors: int
    created: float
    ends: float
    original_shutdown: float
    shutdown: float
    work: bool
    message: str


@dataclass
class _Factory:
    index: int
    vms: Dict[str, _VM] = field(default_factory=dict)
    latest: Dict[str, FinishedVM] = field(default_factory=dict)
    tick_pending: bool = False

    def busy(self) -> int:
        return sum(vm.processors for vm in self.vms.values())


class SpaceSimulation:
    """Build with a workload, a setup and a policy; :meth:`run` returns the figures."""

    def __init__(self, workload: Workload, setup: SpaceSetup, policy: SchedulingPolicy) -> None:
        self.workload = workload
        self.setup = setup
        self.policy = policy
        self.types = {t.name: t for t in workload.types}
        self.rng = random.Random(setup.seed)
        self.decide_rng = random.Random(setup.seed + 1)
        self.notice_rng = random.Random(setup.seed + 2)
        self.now = 0.0
        self.warmup = workload.warmup_hours * 3600.0
        self.end = workload.hours * 3600.0
        self.factory_policy = FactoryPolicy(
            total_processors=setup.processors, host_processors=setup.processors,
            max_starting_processors=setup.processors, adaptive_backoff=policy.adaptive)
        self.shares = {t.name: t.share for t in workload.types}
        self.fizzle = {t.name: _given(t.fizzle_seconds, setup.fizzle_seconds)
                       for t in workload.types}
        self.mt_policies = self._mt_policies()
        self.factories = [_Factory(i) for i in range(setup.factories)]
        self.phase = [self.rng.uniform(0, setup.cycle_seconds) for _ in self.factories]
        names = list(self.types)
        self.running = {n: 0 for n in names}
        self.running_work = {n: 0 for n in names}
        self.machines = {n: 0 for n in names}
        self.young: Dict[str, Dict[str, float]] = {n: {} for n in names}
        self.aborts: Dict[str, Dict[int, float]] = {n: {} for n in names}
        self._events: List[Tuple[float, int, str, int, str]] = []
        self._seq = self._uuid = 0
        self.vms = self.nowork_vms = self.notices = self.killed = 0
        self.waste = 0.0
        self.available = self.busy_seconds = 0.0
        self.error_seconds = {n: 0.0 for n in names}
        self.work_seconds = {n: 0.0 for n in names}
        self.all_error = self.all_seconds = 0.0
        #: (time, worst points off target) of the samples in which every machinetype had work
        self.series: List[Tuple[float, float]] = []
        #: what every factory learns by watching the (here exact, shared) space view
        self.memory: Optional[SpaceMemory] = None
        if policy.adaptive is not None or policy.rebalance is not None:
            horizon = max(7200.0, policy.adaptive.window_seconds if policy.adaptive else 0.0)
            self.memory = SpaceMemory(horizon)

    def _mt_policies(self) -> List[MachinetypePolicy]:
        s = self.setup
        return [MachinetypePolicy(name=t.name, target_share=self.shares[t.name],
                                  machinegroup=t.name,
                                  max_wallclock_seconds=t.max_wallclock_seconds,
                                  min_wallclock_seconds=t.max_wallclock_seconds,
                                  backoff_seconds=_given(t.backoff_seconds, s.backoff_seconds),
                                  fizzle_seconds=self.fizzle[t.name])
                for t in self.workload.types]

    # -- the event loop ---------------------------------------------------------------------

    def _push(self, when: float, kind: str, factory: int = -1, payload: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, factory, payload))

    def run(self) -> Figures:
        started = time.monotonic()
        for f in self.factories:
            self._schedule_tick(f, 0.0)
        self._push(self.warmup, "sample")
        if self.policy.rebalance is not None:
            self._push(self.setup.rebalance_seconds, "rebalance")
        change = self.workload.share_change
        if change is not None:
            self._push(change.at_hours * 3600.0, "share")
        while self._events and self._events[0][0] <= self.end:
            when, _, kind, index, payload = heapq.heappop(self._events)
            self.now = when
            if kind == "end":
                self._on_end(self.factories[index], payload, when)
            elif kind == "tick":
                self._on_tick(self.factories[index])
            elif kind == "sample":
                self._sample()
                self._push(when + self.setup.sample_seconds, "sample")
            elif kind == "rebalance":
                self._rebalance()
                self._push(when + self.setup.rebalance_seconds, "rebalance")
            else:
                assert change is not None
                self.shares.update(change.shares)
                self.mt_policies = self._mt_policies()
        for f in self.factories:
            for vm in f.vms.values():
                if not vm.work:
                    self._waste(vm, self.end)
        return self._figures(time.monotonic() - started)

    def _schedule_tick(self, factory: _Factory, after: float) -> None:
        """The factory's next cycle (Vac's fixed 60 s cycles, each factory its own phase)."""
        if factory.tick_pending:
            return
        cycle = self.setup.cycle_seconds
        phase = self.phase[factory.index]
        cycles = max(0, int((after - phase) // cycle) + 1)
        factory.tick_pending = True
        self._push(phase + cycles * cycle, "tick", factory.index)

    def _on_tick(self, factory: _Factory) -> None:
        factory.tick_pending = False
        if factory.busy() < self.setup.processors:
            self._round(factory)
        if factory.busy() < self.setup.processors:
            self._schedule_tick(factory, self.now)

    def _on_end(self, factory: _Factory, uuid: str, when: float) -> None:
        vm = factory.vms.get(uuid)
        if vm is None or vm.ends != when:
            return  # ended already (an earlier end after a notice)
        self._finish(factory, vm)
        if not self.policy.one_per_cycle:
            self._round(factory)
        if factory.busy() < self.setup.processors:
            self._schedule_tick(factory, self.now)

    # -- deciding and creating --------------------------------------------------------------

    def view(self) -> Dict[str, MachinetypeState]:
        """The space's state of every machinetype right now (as merged VacQuery answers)."""
        view = {}
        for name in self.types:
            young = self.young[name]
            for uuid in [u for u, until in young.items() if until <= self.now]:
                del young[uuid]
            aborts = self.aborts[name]
            view[name] = MachinetypeState(
                running_hs06=float(self.running[name]),
                running_processors=self.running[name],
                running_machines=self.machines[name],
                num_before_fizzle=len(young),
                last_abort_time=max(aborts.values()) if aborts else None,
                abort_times=tuple(aborts.values()))
        if self.memory is not None:
            self.memory.observe(view, self.now)
            if self.policy.adaptive is not None:
                view = self.memory.remembered(view, self.fizzle, self.now)
        return view

    def _local(self, factory: _Factory) -> List[LocalVM]:
        return [LocalVM(uuid=vm.uuid, machinetype=vm.machinetype, processors=vm.processors,
                        created=vm.created, shutdown_time=vm.shutdown, memory_mb=0,
                        hs06=float(vm.processors), started=vm.created)
                for vm in factory.vms.values()]

    def _round(self, factory: _Factory) -> None:
        decision = decide(self.factory_policy, self.mt_policies, self._local(factory),
                          self.view(), 0.0, self.now, self.decide_rng)
        creates = decision.creates[:1] if self.policy.one_per_cycle else decision.creates
        for create in creates:
            self._create(factory, create.machinetype, create.processors, create.shutdown_time)

    def _create(self, factory: _Factory, name: str, processors: int, shutdown: float) -> None:
        kind = self.types[name]
        self._uuid += 1
        uuid = f"vm-{self._uuid}"
        work = kind.supply.has_work(self.now)
        if work:
            life, message = kind.lifetime(self.rng), _WORK
        else:
            life = kind.nowork_seconds * self.rng.uniform(0.8, 1.2)
            message = _NO_WORK if kind.nowork_ends == "300" else ""  # "": no message, a fizzle
            self.nowork_vms += 1
        ends = self.now + max(min(life, shutdown - self.now), 1.0)
        vm = _VM(uuid, name, processors, self.now, ends, shutdown, shutdown, work, message)
        factory.vms[uuid] = vm
        self.vms += 1
        self.running[name] += processors
        self.machines[name] += 1
        if work:
            self.running_work[name] += processors
        self.young[name][uuid] = self.now + self.fizzle[name]
        self._push(ends, "end", factory.index, uuid)

    def _finish(self, factory: _Factory, vm: _VM) -> None:
        del factory.vms[vm.uuid]
        name = vm.machinetype
        self.running[name] -= vm.processors
        self.machines[name] -= 1
        if vm.work:
            self.running_work[name] -= vm.processors
        else:
            self._waste(vm, vm.ends)
        self.young[name].pop(vm.uuid, None)
        message = parse_shutdown_message(vm.message) if vm.message else None
        outcome = classify(message, vm.ends - vm.created, self.fizzle[name])
        finished = FinishedVM(vm.uuid, name, vm.ends, message.code if message else None,
                              vm.message, outcome.outcome.value, vm.created)
        if supersedes(finished, factory.latest.get(name)):
            factory.latest[name] = finished
            if outcome.outcome in (Outcome.ABORT, Outcome.FIZZLE):
                self.aborts[name][factory.index] = vm.ends
                if self.memory is not None:
                    self.memory.observe({name: MachinetypeState(
                        last_abort_time=vm.ends, abort_times=(vm.ends,))}, self.now)
            else:
                self.aborts[name].pop(factory.index, None)

    def _waste(self, vm: _VM, until: float) -> None:
        self.waste += max(0.0, min(until, self.end) - max(vm.created, self.warmup)) * vm.processors

    # -- rebalancing ------------------------------------------------------------------------

    def _rebalance(self) -> None:
        policy = self.policy.rebalance
        assert policy is not None
        view = self.view()
        assert self.memory is not None
        shown = {mt.name for mt in self.mt_policies
                 if self.memory.shown_work(mt.name, view[mt.name], mt.fizzle_seconds, self.now)}
        for factory in self.factories:
            local = self._local(factory)
            original = {vm.uuid: vm.original_shutdown for vm in factory.vms.values()}
            for rewrite in core_rebalance.plan(policy, self.setup.processors, self.mt_policies,
                                               local, original, view, shown, self.now,
                                               self.notice_rng):
                self._notice(factory, factory.vms[rewrite.uuid], rewrite.shutdown_time)

    def _notice(self, factory: _Factory, vm: _VM, shutdown: float) -> None:
        """The pilot finishes its payload and takes no new one (it reads shutdowntime_job)."""
        self.notices += 1
        vm.shutdown = shutdown
        if not vm.work:
            return  # it ends soon with nothing to do anyway
        remaining = self.notice_rng.uniform(0.0, self.types[vm.machinetype].payload_max_seconds)
        ends = self.now + remaining
        if ends > shutdown:
            self.killed += 1
            ends = shutdown
        if ends < vm.ends:
            vm.ends = ends
            vm.message = _NOTICE
            self._push(ends, "end", factory.index, vm.uuid)

    # -- figures ----------------------------------------------------------------------------

    def _sample(self) -> None:
        dt = self.setup.sample_seconds
        with_work = [t.name for t in self.workload.types if t.supply.has_work(self.now)]
        if not with_work:
            return
        self.available += self.setup.factories * self.setup.processors * dt
        self.busy_seconds += sum(self.running_work.values()) * dt
        total_share = sum(self.shares[n] for n in with_work)
        total_busy = sum(self.running_work[n] for n in with_work)
        worst = 0.0
        for name in with_work:
            target = self.shares[name] / total_share if total_share else 0.0
            achieved = self.running_work[name] / total_busy if total_busy else 0.0
            error = abs(achieved - target) * 100.0
            self.error_seconds[name] += error * dt
            self.work_seconds[name] += dt
            worst = max(worst, error)
        if len(with_work) == len(self.types):
            self.all_error += worst * dt
            self.all_seconds += dt
            self.series.append((self.now, worst))

    def _figures(self, wall: float) -> Figures:
        convergence = after = None
        change = self.workload.share_change
        if change is not None:
            at = change.at_hours * 3600.0
            later = [(t, e) for t, e in self.series if t >= at]
            for i, (t, error) in enumerate(later):
                if error <= CONVERGED_POINTS:
                    convergence = (t - at) / 3600.0
                    after = max(e for _, e in later[i:])
                    break
        return Figures(
            policy=self.policy.name,
            occupancy=self.busy_seconds / self.available if self.available else 0.0,
            waste_hours=self.waste / 3600.0,
            share_error={n: self.error_seconds[n] / self.work_seconds[n]
                         for n in self.types if self.work_seconds[n] > 0},
            share_error_all_work=self.all_error / self.all_seconds if self.all_seconds else None,
            convergence_hours=convergence,
            error_after_convergence=after,
            share_change_hours=change.at_hours if change is not None else None,
            vms=self.vms,
            nowork_vms=self.nowork_vms,
            notices=self.notices,
            payloads_killed=self.killed,
            wall_seconds=wall,
        )


def _given(value: Optional[float], default: float) -> float:
    return default if value is None else value


def simulate(workload: Workload, setup: SpaceSetup, policy: SchedulingPolicy) -> Figures:
    """Run one policy on one workload."""
    return SpaceSimulation(workload, setup, policy).run()


def compare(workload: Workload, setup: SpaceSetup,
            policies: Sequence[SchedulingPolicy]) -> List[Figures]:
    """Every policy on the same seeded workload (Vac's first, as the baseline)."""
    return [simulate(workload, setup, policy) for policy in policies]
