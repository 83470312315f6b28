"""A space of many factories in one process, on a simulated clock, to measure share accuracy.

Each simulated factory runs the real code paths of a factory's space side: its
:class:`~vacfactory.space.responder.Responder` answers with ``handle`` (allow-list, budget,
rendering) from a :class:`~vacfactory.space.snapshot.FactorySnapshot` of its VMs; when it
decides, it asks every factory through a real :class:`~vacfactory.space.client.Gatherer`
(encode, sign-free datagrams, decode, cookie checks, re-sends on the simulated clock), builds
the view with :func:`~vacfactory.space.view.space_view` and calls the real
:func:`vacfactory.core.scheduler.decide`. Only the network is simulated: datagrams are
handed over in-process, each lost with probability ``loss``, and "unreachable" factories are
partitioned (nothing reaches them or leaves them, but they keep running and deciding from the
only view they have: their own).

VMs get random lifetimes (lognormal or exponential per machinetype, seeded), capped at
``max_wallclock_seconds``. A factory starts a decision round when one of its VMs ends (as the
engine does) and every ``tick_seconds`` while it has free processors. A round asks the other
factories at once; each answers from its state at that moment; the round ends when all have
answered or at the deadline (so with unreachable factories every round lasts
``udp_timeout`` and decides on a view that old), and only then does the scheduler run, with
the others' answers merged with the factory's own current state. Rounds of one factory never
overlap; rounds of different factories do. The result is the time-averaged share of busy
processors each machinetype held after the warm-up, against its target share.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from vacfactory.core.scheduler import decide
from vacfactory.core.status import merge_states
from vacfactory.core.views import FactoryPolicy, LocalVM, MachinetypePolicy, MachinetypeState
from vacfactory.space.client import Gatherer, SpaceReplies
from vacfactory.space.protocol import QueryType
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, FactoryStatus, MachinetypeStatus
from vacfactory.space.view import space_view

logger = logging.getLogger(__name__)

SPACE = "sim.example.org"
_SUCCESS = "200 Intended work completed ok"


@dataclass(frozen=True)
class SimMachinetype:
    """A machinetype of the simulation: its share and how long its VMs live."""

    name: str
    share: float
    #: "lognormal" or "exponential"
    lifetime: str = "lognormal"
    mean_seconds: float = 3 * 3600.0
    #: sigma of the underlying normal (lognormal only)
    sigma: float = 0.8
    max_wallclock_seconds: float = 48 * 3600.0


DEFAULT_MACHINETYPES = (
    SimMachinetype("alpha", 5, "lognormal", 3 * 3600.0, 0.8),
    SimMachinetype("beta", 3, "exponential", 2 * 3600.0),
    SimMachinetype("gamma", 2, "lognormal", 1 * 3600.0, 1.0),
)


@dataclass(frozen=True)
class SimConfig:
    """One simulation run."""

    factories: int = 100
    processors: int = 32
    machinetypes: Tuple[SimMachinetype, ...] = DEFAULT_MACHINETYPES
    hours: float = 12.0
    warmup_hours: float = 3.0
    tick_seconds: float = 60.0
    #: probability that any one datagram is lost
    loss: float = 0.0
    #: fraction of factories nobody can reach (and that reach nobody)
    unreachable: float = 0.0
    udp_timeout: float = 10.0
    #: round-trip time of a datagram between two factories, seconds
    rtt_seconds: float = 0.002
    seed: int = 1


@dataclass(frozen=True)
class SimResult:
    """Achieved vs target processor shares after the warm-up, and what it took."""

    config: SimConfig
    target: Mapping[str, float]
    achieved: Mapping[str, float]
    utilisation: float
    decisions: int
    queries: int
    datagrams: int
    answered_fraction: float
    wall_seconds: float

    @property
    def max_deviation_points(self) -> float:
        return max(abs(self.achieved[n] - self.target[n]) for n in self.target) * 100.0


@dataclass
class _VM:
    uuid: str
    machinetype: str
    processors: int
    created: float
    ends: float
    shutdown_time: float


@dataclass
class _Factory:
    index: int
    name: str
    address: str
    reachable: bool
    vms: Dict[str, _VM] = field(default_factory=dict)
    last_finished: Dict[str, float] = field(default_factory=dict)
    snapshot: Optional[FactorySnapshot] = None
    snapshot_valid_until: float = -math.inf
    responder: Optional[Responder] = None
    #: a query round is under way; its decision is an event in the future
    deciding: bool = False
    #: something changed while deciding: decide again afterwards
    again: bool = False

    @property
    def busy(self) -> int:
        return sum(vm.processors for vm in self.vms.values())


class Simulation:
    """Build with a :class:`SimConfig`, call :meth:`run`."""

    fizzle_seconds = 600.0

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.net_rng = random.Random(config.seed + 1)
        self.decide_rng = random.Random(config.seed + 2)
        self.now = 0.0
        self.warmup = config.warmup_hours * 3600.0
        self.end = config.hours * 3600.0
        self.policy = FactoryPolicy(total_processors=config.processors,
                                    host_processors=config.processors,
                                    max_starting_processors=config.processors)
        self.mt_policies = [
            MachinetypePolicy(name=m.name, target_share=m.share, machinegroup=m.name,
                              max_wallclock_seconds=m.max_wallclock_seconds,
                              min_wallclock_seconds=m.max_wallclock_seconds,
                              fizzle_seconds=self.fizzle_seconds)
            for m in config.machinetypes
        ]
        self.mt_by_name = {m.name: m for m in config.machinetypes}
        n_unreachable = int(round(config.unreachable * config.factories))
        unreachable = set(self.rng.sample(range(config.factories), n_unreachable))
        self.factories: List[_Factory] = []
        for i in range(config.factories):
            self.factories.append(_Factory(i, f"f{i:03d}.{SPACE}", f"10.{i // 250}.{i % 250}.1",
                                           i not in unreachable))
        addresses = frozenset(f.address for f in self.factories)
        for f in self.factories:
            f.responder = Responder(("0.0.0.0", 0), self._provider(f), SPACE,
                                    lambda: addresses)
        self.by_address = {f.address: f for f in self.factories}
        self.addresses = {f.name: f.address for f in self.factories}
        self.processor_seconds: Dict[str, float] = {m.name: 0.0 for m in config.machinetypes}
        self.decisions = self.queries = self.datagrams = 0
        self.answered = 0
        self._events: List[Tuple[float, int, str, int, str]] = []
        self._views: Dict[str, SpaceReplies] = {}
        self._seq = 0
        self._uuid = 0

    # -- events -----------------------------------------------------------------------------

    def _push(self, when: float, kind: str, factory: int, payload: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, factory, payload))

    def run(self) -> SimResult:
        started = time.monotonic()
        for f in self.factories:
            self._push(self.rng.uniform(0, self.config.tick_seconds), "tick", f.index)
        while self._events and self._events[0][0] <= self.end:
            when, _, kind, index, payload = heapq.heappop(self._events)
            self.now = when
            factory = self.factories[index]
            if kind == "end":
                self._finish(factory, payload)
                self._start_round(factory)
            elif kind == "decide":
                self._decide(factory, self._views.pop(payload))
            else:
                if factory.busy < self.config.processors:
                    self._start_round(factory)
                self._push(when + self.config.tick_seconds, "tick", index)
        for f in self.factories:
            for vm in f.vms.values():
                self._account(vm, self.end)
        return self._result(time.monotonic() - started)

    def _finish(self, factory: _Factory, uuid: str) -> None:
        vm = factory.vms.pop(uuid, None)
        if vm is None:
            return
        self._account(vm, vm.ends)
        factory.last_finished[vm.machinetype] = vm.ends
        factory.snapshot = None

    def _account(self, vm: _VM, until: float) -> None:
        overlap = min(until, self.end) - max(vm.created, self.warmup)
        if overlap > 0:
            self.processor_seconds[vm.machinetype] += overlap * vm.processors

    # -- the space side of one factory -------------------------------------------------------

    def _provider(self, factory: _Factory):
        def provide() -> FactorySnapshot:
            if factory.snapshot is None or self.now >= factory.snapshot_valid_until:
                factory.snapshot, factory.snapshot_valid_until = self._snapshot(factory)
            return factory.snapshot

        return provide

    def _snapshot(self, factory: _Factory) -> Tuple[FactorySnapshot, float]:
        """What the engine would publish; valid until the next VM leaves its fizzle window."""
        statuses = []
        valid_until = math.inf
        for m in self.config.machinetypes:
            vms = [vm for vm in factory.vms.values() if vm.machinetype == m.name]
            young = [vm.created + self.fizzle_seconds for vm in vms
                     if self.now < vm.created + self.fizzle_seconds]
            valid_until = min([valid_until] + young)
            finished = factory.last_finished.get(m.name)
            statuses.append(MachinetypeStatus(
                machinetype=m.name,
                running_hs06=float(sum(vm.processors for vm in vms)),
                running_machines=len(vms),
                running_processors=sum(vm.processors for vm in vms),
                num_before_fizzle=len(young),
                shutdown_message=_SUCCESS if finished is not None else None,
                shutdown_time=finished,
            ))
        busy = factory.busy
        status = FactoryStatus(running_processors=busy, running_machines=len(factory.vms),
                               running_hs06=float(busy), max_processors=self.config.processors,
                               max_machines=self.config.processors,
                               max_hs06=float(self.config.processors))
        snapshot = FactorySnapshot(space=SPACE, factory=factory.name,
                                   machinetypes=tuple(statuses), factory_status=status,
                                   time=self.now)
        return snapshot, valid_until

    def _delivered(self, source: _Factory, target: _Factory) -> bool:
        if source is target:
            return True  # asking oneself goes through loopback
        if not (source.reachable and target.reachable):
            return False
        return self.net_rng.random() >= self.config.loss

    def _query(self, factory: _Factory) -> Tuple[SpaceReplies, float]:
        """One machinetypes_query round over the space on the simulated clock: (what came
        back, when the round ended). Each factory answers from its state when the query
        reaches it; replies take ``rtt_seconds`` to come back."""
        others = {name: address for name, address in self.addresses.items()
                  if name != factory.name}
        gatherer = Gatherer(others, QueryType.MACHINETYPES, SPACE,
                            timeout=self.config.udp_timeout, start=self.now,
                            salt=self.rng.getrandbits(256).to_bytes(32, "big"))
        arrivals: List[Tuple[float, int, bytes, str]] = []
        clock = self.now
        seq = 0
        while not gatherer.done(clock):
            for _, address, datagram in gatherer.due(clock, clock):
                self.datagrams += 1
                target = self.by_address[address]
                if not self._delivered(factory, target):
                    continue
                assert target.responder is not None
                for reply in target.responder.handle(datagram, factory.address, clock):
                    self.datagrams += 1
                    if self._delivered(target, factory):
                        seq += 1
                        heapq.heappush(arrivals, (clock + self.config.rtt_seconds, seq, reply,
                                                  address))
            upcoming = gatherer.next_event()
            if arrivals and arrivals[0][0] <= upcoming:
                clock, _, reply, address = heapq.heappop(arrivals)
                gatherer.receive(reply, address, clock)
            else:
                clock = upcoming
        return gatherer.result(clock), clock

    def _start_round(self, factory: _Factory) -> None:
        """Ask the space now; decide when the answers are in (as the engine does, one round at
        a time: a change during a round triggers another round after it)."""
        if factory.deciding:
            factory.again = True
            return
        replies, ends = self._query(factory)
        self.queries += 1
        self.answered += len(replies.answered)
        factory.deciding = True
        self._seq += 1
        key = str(self._seq)
        self._views[key] = replies
        self._push(max(ends, self.now), "decide", factory.index, key)

    def _decide(self, factory: _Factory, replies: SpaceReplies) -> None:
        """The real scheduler on the space view: the other factories as they answered during
        the round, merged with this factory's own current state (as the engine does)."""
        factory.deciding = False
        others, _unknown = space_view(replies, abort_on_700=True, now=self.now)
        view = merge_states([others, self._own_states(factory)])
        local = [LocalVM(uuid=vm.uuid, machinetype=vm.machinetype, processors=vm.processors,
                         created=vm.created, shutdown_time=vm.shutdown_time, memory_mb=0,
                         hs06=float(vm.processors), started=vm.created)
                 for vm in factory.vms.values()]
        decision = decide(self.policy, self.mt_policies, local, view, 0.0, self.now,
                          self.decide_rng)
        self.decisions += 1
        for create in decision.creates:
            self._create(factory, create.machinetype, create.processors, create.shutdown_time)
        if factory.again:
            factory.again = False
            self._start_round(factory)

    def _own_states(self, factory: _Factory) -> Dict[str, MachinetypeState]:
        states: Dict[str, MachinetypeState] = {}
        for vm in factory.vms.values():
            old = states.get(vm.machinetype, MachinetypeState())
            young = 1 if self.now < vm.created + self.fizzle_seconds else 0
            states[vm.machinetype] = MachinetypeState(
                running_hs06=old.running_hs06 + vm.processors,
                running_processors=old.running_processors + vm.processors,
                running_machines=old.running_machines + 1,
                num_before_fizzle=old.num_before_fizzle + young)
        return states

    def _create(self, factory: _Factory, name: str, processors: int, shutdown: float) -> None:
        self._uuid += 1
        uuid = f"vm-{self._uuid}"
        lifetime = min(self._lifetime(self.mt_by_name[name]), shutdown - self.now)
        vm = _VM(uuid, name, processors, self.now, self.now + max(lifetime, 1.0), shutdown)
        factory.vms[uuid] = vm
        factory.snapshot = None
        self._push(vm.ends, "end", factory.index, uuid)

    def _lifetime(self, m: SimMachinetype) -> float:
        if m.lifetime == "exponential":
            return self.rng.expovariate(1.0 / m.mean_seconds)
        mu = math.log(m.mean_seconds) - m.sigma ** 2 / 2.0  # so the mean is mean_seconds
        return self.rng.lognormvariate(mu, m.sigma)

    def _result(self, wall: float) -> SimResult:
        total_share = sum(m.share for m in self.config.machinetypes)
        target = {m.name: m.share / total_share for m in self.config.machinetypes}
        busy = sum(self.processor_seconds.values())
        achieved = {n: (s / busy if busy else 0.0) for n, s in self.processor_seconds.items()}
        capacity = self.config.factories * self.config.processors * (self.end - self.warmup)
        return SimResult(
            config=self.config,
            target=target,
            achieved=achieved,
            utilisation=busy / capacity if capacity > 0 else 0.0,
            decisions=self.decisions,
            queries=self.queries,
            datagrams=self.datagrams,
            answered_fraction=(self.answered / (self.queries * (self.config.factories - 1))
                               if self.queries and self.config.factories > 1 else 1.0),
            wall_seconds=wall,
        )


def simulate(config: SimConfig) -> SimResult:
    """Run one simulation."""
    return Simulation(config).run()


def parse_shares(text: str, names: Sequence[str] = ("alpha", "beta", "gamma", "delta",
                                                     "epsilon", "zeta")) -> Tuple[SimMachinetype, ...]:
    """``5:3:2`` -> machinetypes with those shares and the default lifetimes (cycled)."""
    shares = [float(part) for part in text.split(":") if part.strip()]
    if not shares or any(s <= 0 for s in shares) or len(shares) > len(names):
        raise ValueError(f"shares must be 1 to {len(names)} positive numbers like 5:3:2")
    made = []
    for i, share in enumerate(shares):
        base = DEFAULT_MACHINETYPES[i % len(DEFAULT_MACHINETYPES)]
        made.append(SimMachinetype(names[i], share, base.lifetime, base.mean_seconds, base.sigma,
                                   base.max_wallclock_seconds))
    return tuple(made)


def format_result(result: SimResult) -> List[str]:
    """The small table ``vacfactory simulate`` prints."""
    c = result.config
    lines = [f"{'machinetype':<12} {'share':>6} {'target %':>9} {'achieved %':>11} {'diff':>6}"]
    shares = {m.name: m.share for m in c.machinetypes}
    for name, target in result.target.items():
        achieved = result.achieved[name]
        lines.append(f"{name:<12} {shares[name]:>6g} {target * 100:>9.1f} {achieved * 100:>11.1f} "
                     f"{(achieved - target) * 100:>+6.1f}")
    lines.append(
        f"max deviation {result.max_deviation_points:.2f} points; utilisation "
        f"{result.utilisation * 100:.1f}%; {c.factories} factories x {c.processors} processors, "
        f"{c.unreachable * 100:.0f}% unreachable, {c.loss * 100:.0f}% datagram loss")
    lines.append(
        f"{c.hours:g} h simulated ({c.warmup_hours:g} h warm-up), {result.decisions} decisions, "
        f"{result.datagrams} datagrams, {result.answered_fraction * 100:.1f}% of factories "
        f"answered each query; {result.wall_seconds:.1f} s")
    return lines
