"""Waiting in tests: poll for an event, with a deadline that stretches when the machine is busy.

Tests wait for things that happen (a file appears, a log line is written, a daemon answers),
never for a fixed time. Each wait still needs a deadline, so that a broken build fails instead
of hanging; that deadline is the time the event takes on an idle machine with a wide margin,
multiplied by :func:`slowdown`, a measure of how loaded the machine is right now. A loaded
machine (other test runs, `make test-loaded`'s CPU hogs) then makes a test slower, never red.

``VACFACTORY_TEST_SLOWDOWN`` sets a floor for the factor (e.g. 3 on a slow CI runner).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

#: the factor is never above this: a deadline must still end a run that hangs
MAX_SLOWDOWN = 8.0
#: how long one measurement spins, and how long it stays valid
_PROBE_SECONDS = 0.05
_VALID_SECONDS = 5.0

_lock = threading.Lock()
_measured: Optional[tuple] = None  # (factor, monotonic time of the measurement)


def _cpu_share() -> float:
    """Wall time over this thread's CPU time while it spins: about 1 on an idle machine,
    ~ runnable threads / cores when the cores are contended."""
    wall0, cpu0 = time.monotonic(), time.thread_time()
    while time.monotonic() - wall0 < _PROBE_SECONDS:
        pass
    wall, cpu = time.monotonic() - wall0, time.thread_time() - cpu0
    return wall / max(cpu, 1e-4)


def _load_per_core() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no /proc/loadavg: only the spin counts
        return 0.0


def _floor() -> float:
    try:
        return max(1.0, float(os.environ.get("VACFACTORY_TEST_SLOWDOWN", "1")))
    except ValueError:
        return 1.0


def slowdown() -> float:
    """How much slower than idle this machine runs now: >= 1, at most :data:`MAX_SLOWDOWN`.

    The larger of the CPU share a busy thread gets (measured by spinning briefly) and the
    1-minute load average per core; re-measured at most every few seconds.
    """
    global _measured
    with _lock:
        now = time.monotonic()
        if _measured is None or now - _measured[1] > _VALID_SECONDS:
            _measured = (max(_cpu_share(), _load_per_core()), now)
        return min(MAX_SLOWDOWN, max(_floor(), _measured[0]))


def scaled(seconds: float) -> float:
    """A deadline of ``seconds`` on an idle machine, stretched by the current :func:`slowdown`."""
    return seconds * slowdown()


def poll(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01) -> Optional[T]:
    """Poll ``predicate()`` until it returns something true and return that, or its last (false)
    value once the deadline (``timeout`` on an idle machine, see :func:`scaled`) has passed."""
    stretched = scaled(timeout)  # first: measuring the load takes time of its own
    deadline = time.monotonic() + stretched
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.1,
             details: Optional[Callable[[], str]] = None) -> T:
    """Poll ``predicate()`` until it returns something true, and return that.

    ``timeout`` is the deadline on an idle machine (see :func:`scaled`). On timeout the test
    fails with ``what``, the deadline used and, if given, ``details()`` (a log tail, a state dump).
    """
    started = time.monotonic()
    value = poll(predicate, timeout, interval)
    if value:
        return value
    message = f"timed out after {time.monotonic() - started:.1f} s waiting for {what}"
    if details is not None:
        message += "\n" + details()
    raise AssertionError(message)


def log_tail(path: str, lines: int = 30) -> Callable[[], str]:
    """A ``details`` callable for :func:`wait_for`: the last lines of a log file."""
    def tail() -> str:
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as error:
            return f"({path}: {error.strerror})"
    return tail
