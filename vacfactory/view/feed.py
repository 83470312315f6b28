"""The engine's side of the status page: what one round hands over, in a few microseconds.

:func:`engine_facts` runs in the engine thread after a round (one call from the daemon) and
only gathers references to frozen values (``Machine``, the ``Config``, the finishes) and
copies of a few small dicts into a frozen :class:`EngineFacts`; shares, backoffs and rows are
computed from them in the status page's own thread, so the page neither holds the engine up
nor races it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from vacfactory.core import scheduler
from vacfactory.core import status as core_status
from vacfactory.core.views import FinishedVM, MachinetypeState
from vacfactory.engine import policies
from vacfactory.state.machines import Machine
from vacfactory.view.metrics import MetricsSnapshot


@dataclass(frozen=True)
class MachinetypeFacts:
    """One configured machinetype at the end of a round."""

    name: str
    #: configured target_share normalised over the machinetypes configured here
    target_share: float
    running_hs06: float
    space_running_hs06: float
    backoff_remaining_seconds: float


@dataclass(frozen=True)
class FactoryFacts:
    """Another factory of the space as the space watcher knows it."""

    name: str
    #: answered (the last query round), held (silent, counted from an earlier answer), unknown
    state: str
    #: seconds since its last answer; None: never answered
    age: Optional[float]
    #: machinetype -> running processors, from its last answer
    processors: Mapping[str, int]


@dataclass(frozen=True)
class EngineFacts:
    """One round's facts: references to frozen values and copies of small dicts only."""

    time: float
    config: object
    machines: Tuple[Machine, ...]
    #: machine uuid -> its current shutdown time (a drain moves it)
    shutdown_times: Mapping[str, float]
    last_finishes: Mapping[str, FinishedVM]
    creation_failures: Mapping[str, dict]
    #: the other factories' machinetype states as the last query round left them (no own part)
    remote: Mapping[str, MachinetypeState]
    space: Tuple[FactoryFacts, ...]
    metrics: Optional[MetricsSnapshot]

    @property
    def factory(self) -> str:
        return self.config.settings.factory_name

    @property
    def total_processors(self) -> int:
        return self.config.settings.total_processors

    def machinetypes(self) -> Tuple[MachinetypeFacts, ...]:
        """Shares and backoff per configured machinetype (the page's thread computes them)."""
        local = [policies.local_vm(m, self.shutdown_times.get(m.uuid, m.record.shutdown_time))
                 for m in self.machines if m.live]
        own = core_status.machinetype_states(policies.machinetype_policies(self.config), local,
                                             self.last_finishes, self.time)
        space = core_status.merge_states([own, self.remote]) if self.remote else own
        return machinetype_facts(self.config, own, space, self.time)


def machinetype_facts(config, own: Mapping[str, MachinetypeState], space: Mapping[str, MachinetypeState],
                      now: float) -> Tuple[MachinetypeFacts, ...]:
    mts = policies.machinetype_policies(config)
    total_target = sum(max(0.0, mt.target_share) for mt in mts)
    result = []
    for mt in mts:
        state = own.get(mt.name, MachinetypeState())
        backoff = scheduler.backoff_remaining(mt, state, now)
        result.append(MachinetypeFacts(
            name=mt.name,
            target_share=max(0.0, mt.target_share) / total_target if total_target > 0 else 0.0,
            running_hs06=state.running_hs06,
            space_running_hs06=space.get(mt.name, state).running_hs06,
            backoff_remaining_seconds=backoff if math.isfinite(backoff) else 0.0,
        ))
    return tuple(result)


def space_facts(watcher, config, now: float) -> Tuple[FactoryFacts, ...]:
    """Every other configured factory: its state and its running processors per machinetype."""
    memory = watcher.memory
    last = getattr(memory, "last", None)
    answers = memory.answers()
    result = []
    for name in watcher.others(config):
        states, when = answers.get(name, ({}, None))
        age = None if when is None else max(0.0, now - when)
        if age is None or age > memory.max_age or last is None:
            state = "unknown"
        elif name in last.answered:
            state = "answered"
        elif name in last.held:
            state = "held"
        else:
            state = "unknown"
        result.append(FactoryFacts(name, state, age,
                                   {mt: s.running_processors for mt, s in states.items()}))
    return tuple(result)


def engine_facts(daemon) -> EngineFacts:
    """What the status page needs from the daemon after a round (engine thread: copies only)."""
    factory = daemon.factory
    config = factory.config
    now = factory.clock()
    return EngineFacts(
        time=now,
        config=config,
        machines=tuple(factory.machines.values()),
        shutdown_times={entry.machine.uuid: entry.shutdown_time for entry in factory.vms.live()},
        last_finishes=dict(factory.last_finishes),
        creation_failures=dict(factory.creation_failures),
        remote=daemon.space.view(config, {}, now),
        space=space_facts(daemon.space, config, daemon.space.clock()),
        metrics=daemon.metrics_snapshot,
    )
