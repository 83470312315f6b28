"""Container images pulled in the background, at most one pull per reference at a time.

The engine asks every round whether a machinetype's image is ready and must never wait for a
registry, so a missing image starts a pull in a thread of its own and the answer is a reason
("being pulled", "pull failed: ..."). A failed pull is tried again after a back-off, so a
registry that is down is not hammered every round. No docker here: the hypervisor passes the
function that pulls (it raises on failure, returns once the image is present).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from vacfactory.errors import shorten

log = logging.getLogger(__name__)

__all__ = ["ImagePulls"]


@dataclass
class _Pull:
    running: bool = True
    error: str = ""
    retry_at: float = 0.0


class ImagePulls:
    """The pulls in flight and the failures still backing off, by image reference."""

    def __init__(self, pull: Callable[[str], None], retry_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pull = pull
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pulls: Dict[str, _Pull] = {}

    def status(self, reference: str) -> str:
        """Why ``reference`` (known to be missing) is not ready; starts a pull if none is due."""
        with self._lock:
            pull = self._pulls.get(reference)
            if pull is not None and pull.running:
                return "being pulled"
            if pull is not None and self._clock() < pull.retry_at:
                wait = max(1, round(pull.retry_at - self._clock()))
                return f"pull failed: {pull.error} (next try in {wait} s)"
            self._pulls[reference] = _Pull()
        thread = threading.Thread(target=self._run, args=(reference,), name=f"pull {reference}", daemon=True)
        thread.start()
        return "being pulled"

    def failure(self, reference: str) -> Optional[str]:
        """The last failure of a pull of ``reference`` still backing off, if any."""
        with self._lock:
            pull = self._pulls.get(reference)
            return pull.error if pull is not None and not pull.running else None

    def _run(self, reference: str) -> None:
        started = self._clock()
        try:
            self._pull(reference)
        except Exception as exc:  # noqa: BLE001 - any failure is reported through status()
            error = shorten(str(exc), 300)
            log.warning("image %s: pull failed: %s", reference, error)
            with self._lock:
                self._pulls[reference] = _Pull(running=False, error=error,
                                               retry_at=self._clock() + self.retry_seconds)
            return
        log.info("image %s: pulled in %.1f s", reference, self._clock() - started)
        with self._lock:
            self._pulls.pop(reference, None)
