"""Turn the space's ``machinetype_status`` replies into the scheduler's :data:`SpaceView`.

This is Vac's ``pollFactories`` minus the decision (that is ``core.scheduler``): per
machinetype, running HS06/processors/machines and ``num_before_fizzle`` are summed over the
answering factories, and the newest abort any of them reports becomes ``last_abort_time`` -
backoff is space-wide, as in Vac. Each factory reports only its newest-created finished VM of
a type, so the success of a VM created later on that factory clears its abort (Vac's semantics).

A factory that misses a query round (one lost datagram, a busy peer, a restart) has not stopped
running its VMs, so :class:`SpaceMemory` keeps each factory's last answer and uses it for
``max_age`` seconds (the space watcher: :data:`~vacfactory.engine.spacewatch.STALE_INTERVALS`
query intervals). Only a factory silent for longer - or never heard from - is *unknown*.

What unknown means for the shares: nothing is known about what that factory runs, and the
sums cannot hold a guess, so it adds nothing to them. The scheduler then computes every
machinetype's ``running_hs06 / target_share`` over the factories it *does* know: it aims at the
target shares among the known part of the space. The unknown factory's VMs are not counted, so
the machinetypes it runs look more starved than they are, and the known factories start more of
them than the space needs - right if it is really gone (its VMs ended with it), an overshoot for
as long as it is merely unreachable (it counts again from its first answer). Its
``num_before_fizzle`` and its aborts are missing too, so a backoff it alone was causing lapses.
Unknown factories are returned (and logged by the caller), never silently treated as empty.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Optional, Set, Tuple

from vacfactory.core.outcomes import is_abort_code, parse_shutdown_message
from vacfactory.core.status import merge_states
from vacfactory.core.views import MachinetypeState, SpaceView
from vacfactory.space.client import FactoryReplies, SpaceReplies
from vacfactory.space.protocol import QueryType
from vacfactory.space.snapshot import MachinetypeStatus


@functools.lru_cache(maxsize=1024)
def _code(shutdown_message: str) -> Optional[int]:
    """The code of a shutdown message (the same few texts arrive from every factory)."""
    message = parse_shutdown_message(shutdown_message)
    return None if message is None else message.code


def machinetype_state(status: MachinetypeStatus, abort_on_700: bool, now: float
                      ) -> MachinetypeState:
    """One factory's view of one machinetype.

    ``last_abort_time`` is the reply's ``shutdown_time`` when its ``shutdown_message`` code is
    an abort (Vac: ``int(message[0:3]) >= 300``, 7xx per ``abort_on_700``). A time in the
    future (a peer whose clock runs fast) is taken as ``now``, so one bad clock cannot hold a
    machinetype back across the space for longer than one backoff.
    """
    last_abort = None
    if status.shutdown_message and status.shutdown_time is not None:
        code = _code(status.shutdown_message[:200])
        if code is not None and is_abort_code(code, abort_on_700):
            last_abort = min(float(status.shutdown_time), now)
    return MachinetypeState(
        running_hs06=float(status.running_hs06),
        running_processors=int(status.running_processors),
        running_machines=int(status.running_machines),
        num_before_fizzle=int(status.num_before_fizzle),
        last_abort_time=last_abort,
        abort_times=() if last_abort is None else (last_abort,),
    )


def factory_states(replies: FactoryReplies, abort_on_700: bool, now: float
                   ) -> Dict[str, MachinetypeState]:
    """Machinetype name -> state, from one factory's machinetype_status replies."""
    states: Dict[str, MachinetypeState] = {}
    for reply in replies.replies:
        status = reply.status
        if isinstance(status, MachinetypeStatus):
            states[status.machinetype] = machinetype_state(status, abort_on_700, now)
    return states


def space_view(replies: SpaceReplies, abort_on_700: bool, now: float
               ) -> Tuple[SpaceView, Set[str]]:
    """(the merged space view, the factories that did not answer).

    A factory whose answer is incomplete contributes the machinetypes it did report.
    """
    if replies.query_type is not QueryType.MACHINETYPES:
        raise ValueError(f"a space view needs machinetypes_query replies, not "
                         f"{replies.query_type.value}")
    per_factory = [
        factory_states(replies.answered[name], abort_on_700, now)
        for name in replies.factories if name in replies.answered
    ]
    return merge_states(per_factory), set(replies.unknown)


@dataclass(frozen=True)
class SpaceState:
    """The space as known after one query round (see :meth:`SpaceMemory.update`).

    ``held``: factories that did not answer this round but whose last answer, younger than the
    memory's ``max_age``, is still counted (name -> its age in seconds). ``unknown``: factories
    with no answer that young - they add nothing to ``view``.
    """

    view: Mapping[str, MachinetypeState]
    answered: FrozenSet[str]
    held: Mapping[str, float]
    unknown: FrozenSet[str]


class SpaceMemory:
    """Each factory's last machinetypes answer, used for ``max_age`` seconds after it.

    Sans-I/O: :meth:`update` takes one round's replies and ``now``. A complete answer replaces
    what was remembered of that factory; an incomplete one replaces the machinetypes it did
    report and keeps the others from the last answer (while that is young enough). Factories
    no longer asked are forgotten.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        #: factory -> (its machinetype states, when they were received)
        self._last: Dict[str, Tuple[Dict[str, MachinetypeState], float]] = {}

    def update(self, replies: SpaceReplies, abort_on_700: bool, now: float) -> SpaceState:
        if replies.query_type is not QueryType.MACHINETYPES:
            raise ValueError(f"a space view needs machinetypes_query replies, not "
                             f"{replies.query_type.value}")
        asked = set(replies.factories)
        for name in [n for n in self._last if n not in asked]:
            del self._last[name]
        incomplete = set(replies.incomplete)
        for name, answer in replies.answered.items():
            states = factory_states(answer, abort_on_700, now)
            if name in incomplete and self._young(name, now):
                states = {**self._last[name][0], **states}
            self._last[name] = (states, now)
        held: Dict[str, float] = {}
        unknown: Set[str] = set()
        counted = []
        for name in replies.factories:
            if name not in replies.answered:
                if not self._young(name, now):
                    unknown.add(name)
                    continue
                held[name] = now - self._last[name][1]
            counted.append(self._last[name][0])
        return SpaceState(merge_states(counted), frozenset(replies.answered), held,
                          frozenset(unknown))

    def _young(self, name: str, now: float) -> bool:
        last = self._last.get(name)
        return last is not None and now - last[1] <= self.max_age

    def answers(self) -> Dict[str, Tuple[Dict[str, MachinetypeState], float]]:
        """factory -> (its machinetype states, when received): a copy, for the status page."""
        return dict(self._last)

    def age(self, name: str, now: float) -> float:
        """Seconds since ``name`` last answered (infinite if never)."""
        last = self._last.get(name)
        return math.inf if last is None else now - last[1]
