"""Turn the space's ``machinetype_status`` replies into the scheduler's :data:`SpaceView`.

This is Vac's ``pollFactories`` minus the decision (that is ``core.scheduler``): per
machinetype, running HS06/processors/machines and ``num_before_fizzle`` are summed over the
answering factories, and the newest abort any of them reports becomes ``last_abort_time`` -
backoff is space-wide, as in Vac. Each factory reports only its latest finished VM of a type,
so a later success on that factory clears its abort (Vac's semantics).

Factories that did not answer are *unknown*: they add nothing to the sums, and they are
returned so the caller can log them and judge the view (a view built from a fraction of the
space is still the best one available; treating silence as "runs nothing" would look the same
numerically, so the distinction is kept explicit for the operator and for ``check``).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Set, Tuple

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
