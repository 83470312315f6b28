"""A thread that follows a container runtime's event stream and survives the runtime.

The stream ends when the runtime stops or restarts; the thread opens it again, with a growing
pause while the runtime cannot be reached. Events that happen meanwhile are lost (the engine's
periodic reconcile covers them, as after a libvirtd outage). A handler that fails on one event
is logged and the next event is read; a stream that is not JSON any more is opened again.
No docker here: the caller passes a function that opens the stream (an iterator of decoded
events with a ``close()``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

__all__ = ["EventFollower"]


class EventFollower:
    """Calls ``handle(event)`` for every event of the stream ``open_stream()`` returns."""

    def __init__(self, name: str, open_stream: Callable[[], Iterator[Any]], handle: Callable[[Any], None],
                 retry_seconds: float = 0.5, max_retry_seconds: float = 10.0) -> None:
        self.name = name
        self._open = open_stream
        self._handle = handle
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: Optional[Any] = None
        self._thread: Optional[threading.Thread] = None
        #: set each time the stream is (re)opened; tests wait on it
        self.connected = threading.Event()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            stream, thread = self._stream, self._thread
        if stream is not None:
            _close(stream)  # unblocks the thread's read
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            self._thread = None

    def _run(self) -> None:
        delay = self.retry_seconds
        failing = False
        while not self._stop.is_set():
            try:
                stream = self._open()
            except Exception as exc:  # noqa: BLE001 - an unreachable runtime: try again later
                if not failing:
                    log.warning("%s: cannot follow events: %s", self.name, exc)
                failing = True
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_retry_seconds)
                continue
            with self._lock:
                self._stream = stream
            if failing:
                log.info("%s: following events again", self.name)
            failing, delay = False, self.retry_seconds
            self.connected.set()
            try:
                for event in stream:
                    if self._stop.is_set():
                        break
                    try:
                        self._handle(event)
                    except Exception:  # noqa: BLE001 - one bad event must not end the thread
                        log.exception("%s: event not handled: %.200r", self.name, event)
            except Exception as exc:  # noqa: BLE001 - runtime gone or garbage on the stream
                if not self._stop.is_set():
                    log.warning("%s: event stream broken: %s", self.name, exc)
            finally:
                with self._lock:
                    self._stream = None
                self.connected.clear()
                _close(stream)
            if not self._stop.is_set():
                self._stop.wait(self.retry_seconds)  # a stream that ends at once is no busy loop


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exc:  # noqa: BLE001 - closing a dead stream
        log.debug("closing an event stream: %s", exc)
