"""How long a machinetype waits after an abort: Vac's fixed rule, or adaptive backoff.

Vac waits ``backoff_seconds`` after the newest abort anywhere in the space, whatever the
history, so a machinetype whose experiment has no work is probed again every few minutes for
as long as the drought lasts, each probe a VM that finds nothing.

Adaptive backoff learns the chance of finding work from the space's recent outcomes: every
factory reports the outcome of its latest finished VM (VacQuery ``shutdown_message``), so the
space view carries the end time of every latest finish that aborted. Each of those within
``window_seconds`` doubles the wait, from ``base_seconds`` (or ``backoff_seconds`` if larger)
up to ``max_seconds``: exponential backoff with probing, and stateless, because the evidence
ages out of the window by itself. A VacQuery answer carries only each factory's latest finish,
so the engine keeps a :class:`SpaceMemory` of every abort it has seen in earlier rounds.

Probing is one VM at a time: while a VM started after the newest abort is inside its fizzle
window, no other starts (Vac lets more start once ``backoff + fizzle_seconds`` have passed
since the abort, which with a long backoff would start several probes at once). One success
ends it: the probe that finds work outlives its fizzle window, the memory marks the
machinetype ``work_shown`` and it fills as fast as under Vac's rule.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Mapping, Optional, Set, Tuple

from vacfactory.core.views import AdaptiveBackoff, MachinetypePolicy, MachinetypeState

#: never double more often than this (2**30 is far beyond any max_seconds)
_MAX_DOUBLINGS = 30

#: abort times remembered per machinetype: the newest this many (more never change the wait,
#: and a peer that reports a new abort time in every answer cannot grow the memory)
MAX_REMEMBERED = 256


def probing(state: MachinetypeState, adaptive: Optional[AdaptiveBackoff]) -> bool:
    """True while a VM started after the newest abort is inside its fizzle window (adaptive
    backoff starts no other VM of the machinetype until it ends or outlives the window)."""
    return (adaptive is not None and state.last_abort_time is not None
            and state.work_shown is False and state.num_before_fizzle > 0)


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


class SpaceMemory:
    """What a factory learns by watching the space view round after round (pure: fed views).

    A VacQuery answer carries only each factory's *latest* finish, so a factory that hosts
    probe after probe shows one abort, not many. The memory keeps every abort time it has seen
    for ``horizon_seconds`` (so adaptive backoff counts them all), and notes when a VM of a
    machinetype was first seen starting after its newest abort: once that VM has outlived its
    fizzle window with no newer abort, the machinetype has *shown* it has work again
    (graceful rebalancing acts only for such machinetypes).
    """

    def __init__(self, horizon_seconds: float = 7200.0) -> None:
        self.horizon_seconds = horizon_seconds
        self._aborts: Dict[str, Set[float]] = {}
        #: machinetype -> (newest abort, when a VM was first seen starting after it)
        self._probe: Dict[str, Tuple[Optional[float], Optional[float]]] = {}

    def observe(self, view: Mapping[str, MachinetypeState], now: float) -> None:
        since = now - self.horizon_seconds
        for name, state in view.items():
            aborts = self._aborts.setdefault(name, set())
            aborts.update(t for t in state.abort_times if t > since)
            if state.last_abort_time is not None and state.last_abort_time > since:
                aborts.add(state.last_abort_time)
            for t in [t for t in aborts if t <= since]:
                aborts.discard(t)
            if len(aborts) > MAX_REMEMBERED:
                for t in sorted(aborts)[:len(aborts) - MAX_REMEMBERED]:
                    aborts.discard(t)
            last, seen = self._probe.get(name, (None, None))
            if state.last_abort_time != last:
                last, seen = state.last_abort_time, None
            if seen is None and state.num_before_fizzle > 0:
                seen = now
            self._probe[name] = (last, seen)

    def remembered(self, view: Mapping[str, MachinetypeState], fizzle_seconds: Mapping[str, float],
                   now: float) -> Dict[str, MachinetypeState]:
        """``view`` with every remembered abort time in ``abort_times`` and ``work_shown`` set
        (``fizzle_seconds`` per machinetype; unknown ones get Vac's 600)."""
        return {name: replace(
                    state,
                    abort_times=tuple(sorted(self._aborts.get(name, set()).union(state.abort_times))),
                    work_shown=self.shown_work(name, state, fizzle_seconds.get(name, 600.0), now))
                for name, state in view.items()}

    def shown_work(self, name: str, state: MachinetypeState, fizzle_seconds: float,
                   now: float) -> bool:
        """True if ``name`` has no abort, or a VM seen starting after its newest abort has
        outlived ``fizzle_seconds`` with no newer abort."""
        if state.last_abort_time is None:
            return True
        last, seen = self._probe.get(name, (None, None))
        return last == state.last_abort_time and seen is not None and now >= seen + fizzle_seconds
