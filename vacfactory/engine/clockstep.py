"""Telling a step of the wall clock (NTP, `date -s`) from time passing.

From one round to the next the wall clock and the monotonic clock should move alike; a
difference of ``CLOCK_STEP_SECONDS`` or more is a step of the wall clock.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

log = logging.getLogger(__name__)

CLOCK_STEP_SECONDS = 10.0


class ClockStepWatch:
    """``monotonic`` None (an injected test clock without a partner): steps are never seen."""

    def __init__(self, monotonic: Optional[Callable[[], float]]) -> None:
        self.monotonic = monotonic
        self._last: Optional[Tuple[float, float]] = None

    def step(self, now: float) -> Optional[float]:
        """How far the wall clock stepped since the last call (+ forward), or None."""
        if self.monotonic is None:
            return None
        tick = (now, self.monotonic())
        last, self._last = self._last, tick
        if last is None:
            return None
        step = (tick[0] - last[0]) - (tick[1] - last[1])
        if abs(step) < CLOCK_STEP_SECONDS:
            return None
        log.warning("the clock stepped %s by %.0f s: moving the start times of running VMs with it and "
                    "judging heartbeats afresh", "forward" if step > 0 else "back", abs(step))
        return step
