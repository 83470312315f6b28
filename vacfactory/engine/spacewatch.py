"""The space as the scheduler sees it: other factories' answers, gathered in the background.

A VacQuery round can take up to ``udp_timeout_seconds`` when a peer is dead, and the engine
must refill a slot within about a second, so queries never run inside a decision round. A
thread asks the other factories every few seconds and keeps the latest answers; each round
merges them with this factory's own *current* state (core.status.merge_states). Answers
older than a few query intervals are dropped: a silent space is unknown, not empty.

The one exception is start-up: the daemon waits (at most one UDP deadline) for the first
query round before its first decision, so a factory (re)starting into a busy space does not
fill every free processor as if it were alone (:meth:`SpaceWatcher.wait_first_round`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, FrozenSet, Optional

from vacfactory.core.status import merge_states
from vacfactory.core.views import MachinetypeState, SpaceView
from vacfactory.errors import ConfigError
from vacfactory.space.auth import load_space_key
from vacfactory.space.client import canonical_names, query_space
from vacfactory.space.protocol import QueryType
from vacfactory.space.view import space_view

log = logging.getLogger(__name__)

QUERY_SECONDS = 5.0
#: remote answers older than this many query intervals are no longer used
STALE_INTERVALS = 4


class SpaceWatcher:
    def __init__(self, config: Callable[[], object], clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._remote: Dict[str, MachinetypeState] = {}
        self._remote_time = 0.0
        self._unknown: FrozenSet[str] = frozenset()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._first_round = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def others(self, config) -> list:
        """The configured factories except this one (its own state is always current)."""
        s = config.settings
        own = s.factory_name
        return [name for name in canonical_names(list(s.factories), own) if name != own]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vacfactory-space", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> None:
        """Stop asking. A query round in flight is not waited for beyond ``timeout``: it can
        last a whole UDP deadline when a peer is dead, it holds nothing but its own socket,
        and the thread is a daemon thread - so it must not hold up the daemon's exit."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wait_first_round(self, timeout: float) -> bool:
        """Wait until the first query round has ended (answered or not); False on timeout.

        A round ends by its UDP deadline, so ``udp_timeout_seconds`` plus a little is enough.
        """
        return self._first_round.wait(timeout)

    def query_once(self) -> None:
        config = self.config()
        s = config.settings
        others = self.others(config)
        if not others:
            with self._lock:
                self._remote, self._unknown, self._remote_time = {}, frozenset(), self.clock()
            return
        try:
            key = load_space_key(s.space_key, s.space_key_file)
        except ConfigError as error:
            log.error("space key: %s", error)
            return
        replies = query_space(others, QueryType.MACHINETYPES, s.vac_space, s.udp_timeout_seconds,
                              port=s.udp_port, space_key=key, local_name=s.factory_name)
        view, unknown = space_view(replies, s.abort_on_700, self.clock())
        unknown = frozenset(unknown)
        if unknown != self._unknown:
            if unknown:
                log.warning("space: no answer from %s (counted as unknown)", ", ".join(sorted(unknown)))
            else:
                log.info("space: every factory answered")
        with self._lock:
            self._remote, self._unknown, self._remote_time = dict(view), unknown, self.clock()

    def view(self, config, own: SpaceView, now: float) -> SpaceView:
        """This factory's current state plus the latest fresh answers of the others."""
        with self._lock:
            remote, when = self._remote, self._remote_time
        if not remote or now - when > STALE_INTERVALS * max(QUERY_SECONDS, config.settings.udp_timeout_seconds):
            return own
        return merge_states([own, remote])

    def _loop(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.query_once()
            except Exception:  # noqa: BLE001 - one bad round must not end space-awareness for good
                log.exception("space query failed; retrying next round")
            finally:
                self._first_round.set()
            self._stopping.wait(max(QUERY_SECONDS - (time.monotonic() - started), 0.5))
