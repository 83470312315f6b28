"""The space as the scheduler sees it: other factories' answers, gathered in the background.

A VacQuery round can take up to ``udp_timeout_seconds`` when a peer is dead, and the engine
must refill a slot within about a second, so queries never run inside a decision round. A
thread asks the other factories every few seconds and keeps the latest answers; each round
merges them with this factory's own *current* state (core.status.merge_states).

A factory that misses a round is still counted with its last answer for
:data:`STALE_INTERVALS` query intervals (:class:`~vacfactory.space.view.SpaceMemory`): one lost
datagram must not make its VMs vanish from the shares. Silent for longer, it is *unknown* and
adds nothing (what that means for the shares: space/view.py); both changes are logged.

The one exception is start-up: the daemon waits (at most one UDP deadline) for the first
query round before its first decision, so a factory (re)starting into a busy space does not
fill every free processor as if it were alone (:meth:`SpaceWatcher.wait_first_round`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, FrozenSet, Mapping, Optional

from vacfactory.core.status import merge_states
from vacfactory.core.views import MachinetypeState, SpaceView
from vacfactory.errors import ConfigError
from vacfactory.space.auth import load_space_key
from vacfactory.space.client import canonical_names, query_space
from vacfactory.space.protocol import QueryType
from vacfactory.space.view import SpaceMemory

log = logging.getLogger(__name__)

QUERY_SECONDS = 5.0
#: a factory's last answer is counted for this many query intervals (an interval is
#: QUERY_SECONDS, or the UDP deadline when that is longer: a round with a silent peer lasts
#: it), so a factory has to miss two or three rounds in a row before it is unknown
STALE_INTERVALS = 3


def stale_after(udp_timeout_seconds: float) -> float:
    """Seconds after its last answer that a silent factory becomes unknown."""
    return STALE_INTERVALS * max(QUERY_SECONDS, udp_timeout_seconds)


class SpaceWatcher:
    def __init__(self, config: Callable[[], object], clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._remote: Mapping[str, MachinetypeState] = {}
        self._remote_time = 0.0
        self._unknown: FrozenSet[str] = frozenset()
        self._held: FrozenSet[str] = frozenset()
        self.memory = SpaceMemory(stale_after(10.0))
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
            self._held = frozenset()
            return
        try:
            key = load_space_key(s.space_key, s.space_key_file)
        except ConfigError as error:
            log.error("space key: %s", error)
            return
        replies = query_space(others, QueryType.MACHINETYPES, s.vac_space, s.udp_timeout_seconds,
                              port=s.udp_port, space_key=key, local_name=s.factory_name)
        now = self.clock()
        self.memory.max_age = stale_after(s.udp_timeout_seconds)
        state = self.memory.update(replies, s.abort_on_700, now)
        self._log_changes(state.held, state.unknown)
        with self._lock:
            self._remote, self._unknown, self._remote_time = state.view, state.unknown, now

    def _log_changes(self, held: Mapping[str, float], unknown: FrozenSet[str]) -> None:
        """One line when the set of held or unknown factories changes (not every round)."""
        if frozenset(held) != self._held and held:
            log.info("space: no answer this round from %s; counting their last answers "
                     "(%s old) for up to %.0f s", ", ".join(sorted(held)),
                     ", ".join(f"{held[name]:.0f} s" for name in sorted(held)),
                     self.memory.max_age)
        if unknown != self._unknown:
            if unknown:
                log.warning("space: no answer from %s (counted as unknown)", ", ".join(sorted(unknown)))
            elif not held:
                log.info("space: every factory answered")
        self._held = frozenset(held)

    @property
    def unknown(self) -> FrozenSet[str]:
        """The factories the last round counted as unknown."""
        return self._unknown

    def view(self, config, own: SpaceView, now: float) -> SpaceView:
        """This factory's current state plus the others' answers as of the last round.

        The last round counted each factory's latest answer if it was young enough then; if
        no round has ended for a whole staleness window (a stuck query thread), the remote
        part is dropped altogether."""
        with self._lock:
            remote, when = self._remote, self._remote_time
        if not remote or now - when > stale_after(config.settings.udp_timeout_seconds):
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
