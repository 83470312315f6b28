"""How long a machinetype waits after an abort: Vac's fixed rule, or adaptive backoff.

Vac waits ``backoff_seconds`` after the newest abort anywhere in the space, whatever the
history, so a machinetype whose experiment has no work is probed again every few minutes for
as long as the drought lasts, each probe a VM that finds nothing.

Adaptive backoff learns the chance of finding work from the space's recent outcomes: every
factory reports the outcome of its latest finished VM (VacQuery ``shutdown_message``), so the
space view carries the end time of every latest finish that aborted. Each of those within
``window_seconds`` doubles the wait, from ``base_seconds`` (or ``backoff_seconds`` if larger)
up to ``max_seconds``: exponential backoff with probing, and stateless, because the evidence
ages out of the window by itself. One success ends it: the probe that finds work survives its
fizzle window and the machinetype is eligible again at once (Vac's fizzle rule is unchanged).
"""

from __future__ import annotations

from typing import Optional

from vacfactory.core.views import AdaptiveBackoff, MachinetypePolicy, MachinetypeState

#: never double more often than this (2**30 is far beyond any max_seconds)
_MAX_DOUBLINGS = 30


def recent_aborts(state: MachinetypeState, now: float, window_seconds: float) -> int:
    """Latest finishes in the space that aborted within the last ``window_seconds``.

    A time ahead of ``now`` (a peer whose clock runs fast) counts as now."""
    since = now - window_seconds
    return sum(1 for t in state.abort_times if t > since)


def backoff_seconds(
    mt: MachinetypePolicy,
    state: MachinetypeState,
    now: float,
    adaptive: Optional[AdaptiveBackoff],
) -> float:
    """The wait after the newest abort before ``mt`` may start a VM (fizzle window not added).

    Without ``adaptive`` this is Vac's fixed ``backoff_seconds``.
    """
    if adaptive is None:
        return mt.backoff_seconds
    base = max(mt.backoff_seconds, adaptive.base_seconds)
    aborts = recent_aborts(state, now, adaptive.window_seconds)
    doublings = min(max(aborts - 1, 0), _MAX_DOUBLINGS)
    return max(min(base * 2.0 ** doublings, adaptive.max_seconds), mt.backoff_seconds)
