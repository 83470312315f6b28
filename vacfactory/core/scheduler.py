"""What to create: Vac's target-share scheduler, many creations per decision round.

The engine calls :func:`decide` with plain values (policy, this factory's VMs, the space view,
the host load and ``now``) and carries out the :class:`Decision` it returns. Nothing here reads
a clock, a file or a socket, so every rule below is tested with plain values.

Semantics are Vac 03.01's (``vacd`` steps 13-15 and ``pollFactories``), with these changes:

- Vac creates at most one VM per 60 s cycle. Here one round creates as many VMs as fit. After
  each pick the round updates its working copies (free processors and memory, starting
  processors, superslot tallies, and the space view) so the next pick in the same round sees
  it. In particular ``num_before_fizzle`` grows with each create, so after a backoff exactly one
  VM gets its fizzle window, within a round as across rounds.
- A new superslot's shutdown time is capped at the factory ``shutdown_time`` when the VM is
  created. Vac applied that cap only one cycle later, after the VM had already read its MJF.
- Memory is checked: a machinetype whose VM would not fit in the free memory is skipped for
  that pick.
- ``max_starting_processors`` limits the processors in VMs younger than ``starting_seconds``.
  A VM is never made smaller to fit the remaining starting allowance: if the chosen VM does not
  fit, the round stops and that machinetype gets its turn when the young VMs age (making it
  smaller would fix the VM's size for its whole life because of a limit that lasts a minute).
- With ``FactoryPolicy.adaptive_backoff`` set (off by default, and for Vac files), the wait
  after an abort is learnt from the space's recent aborts (core.adaptive_backoff) instead of
  the fixed ``backoff_seconds``.
  Only a configuration whose ``max_starting_processors`` is below a VM's size caps the size.

The space view passed in must already include this factory's own VMs (the engine merges its
own :func:`vacfactory.core.status.machinetype_states` with the other factories' replies).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple, Union

from vacfactory.core.adaptive_backoff import backoff_seconds, probing
from vacfactory.core.views import (
    AdaptiveBackoff,
    Create,
    Decision,
    FactoryPolicy,
    LocalVM,
    MachinetypePolicy,
    MachinetypeState,
    SpaceView,
)

_EMPTY = MachinetypeState()


def clock(epoch: float) -> str:
    """``HH:MM:SS UTC`` of an epoch time, for reasons an operator reads in a log.

    UTC because the core does no I/O (local time needs the zone database); out-of-range
    values (only a corrupt input produces them) are shown as raw epoch seconds.
    """
    try:
        return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f}"


def round_veto(
    policy: FactoryPolicy, running_processors: int, load_average: float, now: float
) -> Optional[str]:
    """Why no VM at all may be created this round, or None. The first veto that applies wins.

    The order and the overload tests are Vac's: a busy host (load above
    ``overload_per_processor`` per running or per real processor) must not get more VMs.
    """
    opp = policy.overload_per_processor
    if running_processors > 4 and load_average > opp * running_processors:
        return (
            f"overloaded: load average {load_average:.2f} > {opp:g} x "
            f"{running_processors} running processors"
        )
    if load_average > opp * policy.host_processors:
        return (
            f"overloaded: load average {load_average:.2f} > {opp:g} x "
            f"{policy.host_processors} host processors"
        )
    if policy.shutdown_time is not None and now >= policy.shutdown_time:
        return f"factory shutdown_time {clock(policy.shutdown_time)} has passed"
    if policy.draining:
        return "draining"
    if running_processors >= policy.total_processors:
        return f"all {policy.total_processors} processors in use"
    return None


def decide(
    policy: FactoryPolicy,
    machinetypes: Sequence[MachinetypePolicy],
    local_vms: Sequence[LocalVM],
    space: SpaceView,
    load_average: float,
    now: float,
    rng: random.Random,
) -> Decision:
    """Decide every VM to create now, most starved machinetype first, and why the round stopped.

    ``load_average`` is the largest of the 1, 5 and 15 minute averages. ``rng`` breaks ties
    between equally starved machinetypes (one ``rng.random()`` per eligible machinetype per
    pick), so a fixed seed gives a fixed decision.
    """
    running = sum(vm.processors for vm in local_vms)
    veto = round_veto(policy, running, load_average, now)
    if veto is not None:
        return Decision((), veto)
    work = _Round.start(policy, machinetypes, local_vms, space, now)
    creates: List[Create] = []
    while True:
        picked = work.pick(rng)
        if isinstance(picked, str):
            return Decision(tuple(creates), picked)
        creates.append(picked)
        work.commit(picked)


@dataclass
class _Round:
    """Working copies of one decision round; each create updates them before the next pick."""

    policy: FactoryPolicy
    machinetypes: Sequence[MachinetypePolicy]
    now: float
    free: int
    free_memory: Optional[int]
    starting: int
    #: superslot key (a shutdown time) -> processors of VMs ending then
    superslots: Dict[float, int] = field(default_factory=dict)
    states: Dict[str, MachinetypeState] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        policy: FactoryPolicy,
        machinetypes: Sequence[MachinetypePolicy],
        local_vms: Sequence[LocalVM],
        space: SpaceView,
        now: float,
    ) -> "_Round":
        free_memory = None
        if policy.total_memory_mb is not None:
            free_memory = policy.total_memory_mb - sum(vm.memory_mb for vm in local_vms)
        superslots: Dict[float, int] = {}
        for vm in local_vms:
            superslots[vm.shutdown_time] = superslots.get(vm.shutdown_time, 0) + vm.processors
        young_after = now - policy.starting_seconds
        return cls(
            policy=policy,
            machinetypes=machinetypes,
            now=now,
            free=policy.total_processors - sum(vm.processors for vm in local_vms),
            free_memory=free_memory,
            starting=sum(vm.processors for vm in local_vms if vm.created > young_after),
            superslots=superslots,
            states=dict(space),
        )

    # -- one pick ---------------------------------------------------------------------------

    def pick(self, rng: random.Random) -> Union[Create, str]:
        """The next VM to create, or the reason the round stops here."""
        if self.free <= 0:
            return f"all {self.policy.total_processors} processors in use"
        room = self.policy.max_starting_processors - self.starting
        if room <= 0:
            return self._starting_full()
        eligible, refusals = self._eligible()
        if not eligible:
            if not refusals:
                return "no eligible machinetype: none configured"
            return "no eligible machinetype: " + ", ".join(refusals)
        placed = self._place(self._ordered(eligible, rng))
        if isinstance(placed, Create) and placed.processors > room:
            return self._starting_full()
        return placed

    def _starting_full(self) -> str:
        return (
            f"max_starting_processors ({self.policy.max_starting_processors}) reached: "
            f"{self.starting} processors starting"
        )

    def _eligible(self) -> Tuple[List[MachinetypePolicy], List[str]]:
        """Machinetypes that may start a VM now, and why each of the others may not."""
        eligible: List[MachinetypePolicy] = []
        refusals: List[str] = []
        shutdown = self.policy.shutdown_time
        for mt in self.machinetypes:
            state = self.states.get(mt.name, _EMPTY)
            if not mt.startable:
                refusals.append(f"{mt.name} not startable")
            elif mt.target_share <= 0:
                refusals.append(f"{mt.name} share 0")
            elif shutdown is not None and not self.now + mt.min_wallclock_seconds < shutdown:
                refusals.append(f"{mt.name} min_wallclock_seconds reaches shutdown_time")
            elif probing(state, self.policy.adaptive_backoff):
                refusals.append(f"{mt.name} probing: one VM at a time until it outlives "
                                f"fizzle_seconds")
            elif not _past_backoff(mt, state, self.now, self.policy.adaptive_backoff):
                until = _backoff_until(mt, state, self.now, self.policy.adaptive_backoff)
                refusals.append(f"{mt.name} backing off until {clock(until)}")
            else:
                eligible.append(mt)
        return eligible, refusals

    def _ordered(
        self, eligible: Sequence[MachinetypePolicy], rng: random.Random
    ) -> List[MachinetypePolicy]:
        """Most starved first: (machinegroup score, machinetype score, random) ascending."""
        scores: Dict[str, float] = {}
        group_scores: Dict[str, float] = {}
        for mt in self.machinetypes:
            if mt.target_share > 0:
                score = self.states.get(mt.name, _EMPTY).running_hs06 / mt.target_share
                scores[mt.name] = score
                group_scores[mt.machinegroup] = group_scores.get(mt.machinegroup, 0.0) + score
        keyed = [
            (group_scores[mt.machinegroup], scores[mt.name], rng.random(), index)
            for index, mt in enumerate(eligible)
        ]
        keyed.sort()
        return [eligible[key[3]] for key in keyed]

    def _place(self, ordered: Sequence[MachinetypePolicy]) -> Union[Create, str]:
        """Vac's superslot allocation: fill partly used superslots first, else open a new one.

        Processors a partly filled superslot still lacks are held for it (Vac's ``free -=
        freeSS``), so that superslot's processors end together and a bigger VM can later take
        the whole superslot.
        """
        pps = self.policy.processors_per_superslot
        shutdown = self.policy.shutdown_time
        avail = self.free
        for key in sorted(self.superslots):
            count = self.superslots[key]
            if count % pps == 0:
                continue
            free_ss = min(avail, pps - count % pps)
            avail -= free_ss
            ends = key if shutdown is None else min(key, shutdown)
            for mt in ordered:
                if free_ss < mt.min_processors or ends <= self.now:
                    continue
                if not mt.min_wallclock_seconds <= ends - self.now <= mt.max_wallclock_seconds:
                    continue
                create = self._sized(mt, free_ss, ends)
                if create is not None:
                    return create
        if avail > 0:
            for mt in ordered:
                if min(avail, pps) < mt.min_processors:
                    continue
                ends = self.now + mt.max_wallclock_seconds
                if shutdown is not None:
                    ends = min(ends, shutdown)
                if ends <= self.now:  # max_wallclock_seconds <= 0: a VM that must end now
                    continue
                create = self._sized(mt, avail, ends)
                if create is not None:
                    return create
        return self._nothing_fits(ordered, avail)

    def _sized(self, mt: MachinetypePolicy, avail: int, ends: float) -> Optional[Create]:
        """A VM of ``mt`` in ``avail`` processors ending at ``ends``, or None if it cannot fit."""
        processors = min(
            avail,
            mt.max_processors,
            self.policy.processors_per_superslot,
            self.policy.max_starting_processors,
        )
        if processors < mt.min_processors or processors < 1:
            return None
        if self.free_memory is not None:
            if processors * self.policy.mb_per_processor > self.free_memory:
                return None
        return Create(mt.name, processors, ends)

    def _nothing_fits(self, ordered: Sequence[MachinetypePolicy], avail: int) -> str:
        names = ", ".join(mt.name for mt in ordered)
        reason = f"no eligible machinetype ({names}) fits {avail} free processors"
        if avail < self.free:
            reason += f" ({self.free - avail} more held for partly filled superslots)"
        if self.free_memory is not None:
            reason += f" and {self.free_memory} MB free memory"
        return reason

    # -- after a pick -----------------------------------------------------------------------

    def commit(self, create: Create) -> None:
        """Account for ``create`` so the next pick of this round sees it."""
        n = create.processors
        self.free -= n
        if self.free_memory is not None:
            self.free_memory -= n * self.policy.mb_per_processor
        self.starting += n
        self.superslots[create.shutdown_time] = self.superslots.get(create.shutdown_time, 0) + n
        state = self.states.get(create.machinetype, _EMPTY)
        self.states[create.machinetype] = replace(
            state,
            running_hs06=state.running_hs06 + n * self.policy.hs06_per_processor,
            running_processors=state.running_processors + n,
            running_machines=state.running_machines + 1,
            num_before_fizzle=state.num_before_fizzle + 1,
        )


def _fizzle_window(mt: MachinetypePolicy, state: MachinetypeState) -> float:
    """Extra wait while a VM is inside its fizzle window: one VM proves the work is back."""
    return mt.fizzle_seconds if state.num_before_fizzle > 0 else 0.0


def _past_backoff(
    mt: MachinetypePolicy,
    state: MachinetypeState,
    now: float,
    adaptive: Optional[AdaptiveBackoff] = None,
) -> bool:
    """Vac's test: no abort, or the last abort is older than backoff (+ fizzle window).

    The backoff is ``backoff_seconds`` (Vac) or, with ``adaptive``, learnt from the space's
    recent aborts (core.adaptive_backoff)."""
    if state.last_abort_time is None:
        return True
    wait = backoff_seconds(mt, state, now, adaptive)
    if probing(state, adaptive):
        return False  # a probe is proving the work is back: one at a time
    return state.last_abort_time < now - wait - _fizzle_window(mt, state)


def _backoff_until(
    mt: MachinetypePolicy,
    state: MachinetypeState,
    now: float,
    adaptive: Optional[AdaptiveBackoff] = None,
) -> float:
    """When the backoff of a backed-off machinetype ends (for the reason text)."""
    last = state.last_abort_time if state.last_abort_time is not None else float("-inf")
    until = last + backoff_seconds(mt, state, now, adaptive) + _fizzle_window(mt, state)
    if probing(state, adaptive):
        until = max(until, now + 1.0)  # until the probe ends or outlives its fizzle window
    return until


def backed_off(
    mt: MachinetypePolicy,
    state: MachinetypeState,
    now: float,
    adaptive: Optional[AdaptiveBackoff] = None,
) -> bool:
    """True if ``mt`` may not start a VM now because of a recent abort (for status displays)."""
    return not _past_backoff(mt, state, now, adaptive)


def backoff_remaining(
    mt: MachinetypePolicy,
    state: MachinetypeState,
    now: float,
    adaptive: Optional[AdaptiveBackoff] = None,
) -> float:
    """Seconds until ``mt`` may start again after an abort; 0 when it is not backing off."""
    if _past_backoff(mt, state, now, adaptive):
        return 0.0
    return max(_backoff_until(mt, state, now, adaptive) - now, 0.0)
