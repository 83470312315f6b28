"""The UDP responder: answers VacQuery datagrams from the engine's latest snapshot.

It runs in its own thread and never touches the disk or the hypervisor: the engine hands it a
ready :class:`~vacfactory.space.snapshot.FactorySnapshot` through ``snapshot_provider`` and
rendered replies are cached per snapshot, so answering costs a JSON parse, a dict lookup and
a ``sendto`` (about 80 us of interpreter time). What remains is waiting for the GIL after each
system call: CPython hands it over within its switch interval (5 ms), so with the engine's
thread busy in pure Python an answer takes a few ms (p99 ~10-20 ms measured), well inside the
50 ms goal; only several CPU-bound threads at once would add up to more.

Rules, in the order they are applied (cheapest first, so junk costs least):

1. ``oversize``: longer than :data:`~vacfactory.space.protocol.MAX_QUERY_BYTES` (no client
   sends more: Vac's responder reads 1024 bytes).
2. ``unknown_peer``: the source address is not one of the configured factories (resolved
   periodically by :class:`ResolvedPeers`; loopback counts as this host). Vac answered anyone.
3. ``unsigned`` / ``bad_signature``: with a space key, the query must be signed with it.
4. ``malformed`` / ``not_query``: :func:`~vacfactory.space.protocol.decode` refused it, or it
   is a reply (never answer a reply: two responders must not ping-pong).
5. ``wrong_space``: the query names another space (Vac's only check).
6. ``stale`` / ``replay``: a signed query outside the time window, or seen before.
7. ``rate_limited``: every query type has a token bucket per peer (:data:`DEFAULT_RATES`):
   a peer may ask each question ``burst`` times at once and ``rate`` times a second after
   that. This is the amplification defence; the answer itself is never cut. Loopback
   sources (this host's own tools and tests) are not limited: the kernel drops datagrams
   from outside that claim a loopback source, so an answer to loopback cannot be reflected
   at anybody.

A query that passes gets the whole answer, one datagram per slot (``machines_query``), per
machinetype (``machinetypes_query``) or one ``factory_status``, exactly as a Vac factory
sends it, each datagram fitted to the 1024 bytes a Vac client reads
(:func:`~vacfactory.space.protocol.fit_reply`): a Vac 03.01 client asking a factory with 128
slots and 40 machinetypes gets all of them for one ~240-byte query. (Before, replies were cut
to 10x the query's size, and Vac clients saw only part of a big factory.)

**Reflection bound.** An attacker who spoofs a listed factory's address can make this
responder send to that address, over any T seconds, at most ``(burst + rate x T)`` whole
answers of each query type, whatever it sends: with the defaults (:data:`DEFAULT_RATES`) and
T small, 3 machine answers, 6 machinetype answers and 6 factory_status. For a factory with
128 slots and 40 machinetypes (~108 kB for the machines, ~33 kB for the machinetypes) that is
~0.53 MB per spoofed address, while a burst of 300 spoofed Vac-sized (~230-byte) queries of
each type costs the attacker ~210 kB: **at most 3 bytes out per spoofed byte in** for such a
burst, less the longer it lasts or the bigger its queries (300 spoofed 910-byte
machinetypes_query now reflect ~0.2 MB, under 1 byte per byte; they reflected 2.67 MB in
0.4 s when only machines_query was limited). tests/unit/test_space_reflection.py measures
both figures with real sockets. Unlisted sources get nothing, so the addresses an attacker
can aim at are the space's own factories.

Every dropped datagram gets no reply and is counted by reason in :attr:`Responder.stats`. The
log names them too, without letting a flood flood the log: per reason, the first reject after a
quiet spell is logged at once, later ones are summed into one line per :data:`REJECT_LOG_SECONDS`
(count, the peers that sent them, one example), e.g.::

    responder: 2000 datagrams rejected as malformed (no reply) over 9.8 s, from
    10.0.0.7 x1990, 10.0.0.9 x10; e.g. 10.0.0.7: not JSON: Expecting value: line 1 column 1

A configuration reload reaches a running responder without a restart: :meth:`Responder.reconfigure`
swaps the space and the space key between two datagrams, and :meth:`Responder.rebind` moves it
to another port (the new socket serves before the old one closes).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Set, Tuple

from vacfactory.errors import ProtocolError
from vacfactory.space import auth
from vacfactory.space.client import canonical_names, normalise_address, resolve_factory
from vacfactory.space.protocol import (
    MAX_QUERY_BYTES,
    Query,
    QueryType,
    Template,
    decode,
    render_replies,
)
from vacfactory.space.snapshot import FactorySnapshot

logger = logging.getLogger(__name__)

#: per query type: (queries answered per peer per second sustained, burst). A Vac factory asks
#: machinetypes once per cycle (>= 60 s) plus at most 6 re-sends; ours every 5 s (engine) and
#: when an admin runs a command; machines_query only comes from commands. The burst covers a
#: whole round of re-sends; the rate keeps the reflection bound (module doc) small.
DEFAULT_RATES: Mapping[QueryType, Tuple[float, float]] = {
    QueryType.MACHINES: (0.2, 3.0),
    QueryType.MACHINETYPES: (1.0, 6.0),
    QueryType.FACTORY: (1.0, 6.0),
}

DROP_REASONS = (
    "oversize",
    "unknown_peer",
    "unsigned",
    "bad_signature",
    "malformed",
    "not_query",
    "wrong_space",
    "stale",
    "replay",
    "rate_limited",
    "no_snapshot",
    "internal_error",
    "send_error",
)

#: rejected datagrams are summed into at most one log line per reason per this many seconds
REJECT_LOG_SECONDS = 10.0
#: reasons that are normal operation (a busy peer, a starting engine): logged at INFO, the rest
#: (junk, strangers, wrong keys and spaces, replays) at WARNING
_ROUTINE_REASONS = frozenset({"rate_limited", "no_snapshot", "send_error"})
_PEERS_NAMED = 8
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class ResponderStats:
    """Counters since start: datagrams received and answered, and drops by reason."""

    received: int
    answered: int
    datagrams_sent: int
    bytes_received: int
    bytes_sent: int
    dropped: Mapping[str, int]

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class _TokenBuckets:
    """A token bucket per peer: ``rate`` tokens a second, at most ``burst`` saved."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: Dict[str, Tuple[float, float]] = {}

    def take(self, peer: str, now: float) -> bool:
        tokens, last = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + max(now - last, 0.0) * self.rate)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1.0, now)
        if len(self._buckets) > 4096:  # peers are allow-listed; this only bounds memory
            self._buckets.pop(next(iter(self._buckets)))
        return True


class Responder:
    """Answer VacQuery datagrams on ``bind`` from ``snapshot_provider()`` (see module doc).

    ``snapshot_provider`` must return an already built snapshot (or None before the engine
    has one: then nothing is answered). ``allowed_peers`` returns the IP addresses allowed to
    ask, already resolved (see :class:`ResolvedPeers`); it is called for every datagram.
    """

    def __init__(
        self,
        bind: Tuple[str, int],
        snapshot_provider: Callable[[], Optional[FactorySnapshot]],
        space: str,
        allowed_peers: Callable[[], Set[str]],
        space_key: Optional[bytes] = None,
        rates: Optional[Mapping[QueryType, Tuple[float, float]]] = None,
        limit_loopback: bool = False,
        replay_window: float = auth.DEFAULT_WINDOW,
        reject_log_seconds: float = REJECT_LOG_SECONDS,
    ) -> None:
        self.bind = bind
        self.snapshot_provider = snapshot_provider
        #: (space, space key): replaced whole by reconfigure(), read once per datagram
        self._settings: Tuple[str, Optional[bytes]] = (space, space_key)
        self.allowed_peers = allowed_peers
        limits = {**DEFAULT_RATES, **(rates or {})}
        #: one token bucket per query type, each keyed by peer
        self._buckets = {kind: _TokenBuckets(*limits[kind]) for kind in QueryType}
        self.limit_loopback = limit_loopback
        self._replay = auth.ReplayGuard(replay_window)
        self._cache: Dict[QueryType, Tuple[FactorySnapshot, Tuple[Template, ...]]] = {}
        self._counts: Dict[str, int] = {reason: 0 for reason in DROP_REASONS}
        self._received = self._answered = self._sent = 0
        self._bytes_in = self._bytes_out = 0
        self._lock = threading.Lock()
        #: one datagram at a time through the replay guard, buckets and cursors (during a
        #: rebind the old and the new serving thread overlap for a moment)
        self._decide_lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.rejects = RejectLog(reject_log_seconds)

    @property
    def space(self) -> str:
        return self._settings[0]

    @property
    def space_key(self) -> Optional[bytes]:
        return self._settings[1]

    def reconfigure(self, space: str, space_key: Optional[bytes]) -> bool:
        """Answer for ``space`` with ``space_key`` from the next datagram on (a configuration
        reload). Returns whether anything changed."""
        if (space, space_key) == self._settings:
            return False
        old_space, old_key = self._settings
        self._settings = (space, space_key)  # one reference swap: never half old, half new
        changes = []
        if space != old_space:
            changes.append(f"space {old_space} -> {space}")
        if space_key != old_key:
            changes.append("space key " + ("removed" if space_key is None else
                                          "set" if old_key is None else "changed"))
        logger.info("responder reconfigured: %s", ", ".join(changes))
        return True

    # -- the decision, without I/O ----------------------------------------------------------

    def handle(self, datagram: bytes, peer: str, now: float) -> List[bytes]:
        """The reply datagrams for one received datagram (usually none). Counts everything."""
        with self._lock:
            self._received += 1
            self._bytes_in += len(datagram)
        try:
            with self._decide_lock:
                replies = self._decide(datagram, peer, now)
        except _Drop as drop:
            self._drop(drop.reason, peer, drop.detail)
            return []
        with self._lock:
            self._answered += 1
        return replies

    def _decide(self, datagram: bytes, peer: str, now: float) -> List[bytes]:
        space, space_key = self._settings
        if len(datagram) > MAX_QUERY_BYTES:
            raise _Drop("oversize", f"{len(datagram)} bytes (at most {MAX_QUERY_BYTES})")
        if peer not in self.allowed_peers():
            raise _Drop("unknown_peer", "not a configured factory")
        body, signature = datagram, None
        if space_key is not None:
            try:
                body, signature = auth.verify(datagram, space_key, peer=peer)
            except ProtocolError as error:
                raise _Drop("unsigned" if "unsigned" in str(error) else "bad_signature",
                            str(error)) from None
        try:
            query = decode(body, peer=peer)
        except ProtocolError as error:
            raise _Drop("malformed", str(error)) from None
        if not isinstance(query, Query):
            raise _Drop("not_query", query.reply_type.value)
        if query.space != space:
            raise _Drop("wrong_space", f"asks for space {query.space}")
        if signature is not None:
            try:
                self._replay.check(signature, query.time_sent, now, peer=peer)
            except ProtocolError as error:
                raise _Drop("replay" if "replayed" in str(error) else "stale",
                            str(error)) from None
        if ((self.limit_loopback or not _is_loopback(peer))
                and not self._buckets[query.query_type].take(peer, now)):
            raise _Drop("rate_limited", query.query_type.value)
        snapshot = self.snapshot_provider()
        if snapshot is None or snapshot.space != space:
            raise _Drop("no_snapshot", "the engine has not published a snapshot (of this space) yet")
        templates = self._templates(query.query_type, snapshot)
        replies = [t.fill(query.cookie, now) for t in templates]
        if space_key is not None:
            replies = [auth.sign(r, space_key) for r in replies]
        return replies

    def _templates(self, query_type: QueryType, snapshot: FactorySnapshot
                   ) -> Tuple[Template, ...]:
        cached = self._cache.get(query_type)
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        templates = render_replies(query_type, snapshot)
        self._cache[query_type] = (snapshot, templates)
        return templates

    def _drop(self, reason: str, peer: str, detail: str) -> None:
        with self._lock:
            self._counts[reason] += 1
        logger.debug("%s: dropped (%s): %s", peer, reason, detail)
        self.rejects.add(reason, peer, detail, time.monotonic())

    @property
    def stats(self) -> ResponderStats:
        with self._lock:
            return ResponderStats(self._received, self._answered, self._sent, self._bytes_in,
                                  self._bytes_out, dict(self._counts))

    # -- the socket and the thread ----------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """The bound (address, port) - useful when ``bind`` asked for port 0."""
        if self._sock is None:
            raise RuntimeError("the responder is not started")
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def start(self) -> None:
        """Bind (errors such as EADDRINUSE raise OSError here) and serve in a daemon thread."""
        self._serve_on(self._open(self.bind))
        logger.info("responder listening on %s:%d for space %s%s", *self.address, self.space,
                    " (signed)" if self.space_key else "")

    def rebind(self, bind: Tuple[str, int]) -> None:
        """Serve on ``bind`` instead (a changed udp_port). The new socket is bound and served
        before the old one closes, so the service never stops; if the bind fails (OSError),
        the responder goes on serving where it was."""
        sock = self._open(bind)
        old = (self._sock, self._thread, self._stopping)
        self.bind = bind
        self._serve_on(sock)
        self._retire(*old)
        logger.info("responder moved to %s:%d", *self.address)

    def stop(self) -> None:
        """Stop serving and close the socket (waits for the thread, at most a second)."""
        self._retire(self._sock, self._thread, self._stopping)
        self._sock = self._thread = None
        self.flush_rejects(force=True)

    @staticmethod
    def _open(bind: Tuple[str, int]) -> socket.socket:
        host, port = bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.2)  # how quickly stop() is noticed, and pending rejects logged
        return sock

    def _serve_on(self, sock: socket.socket) -> None:
        stopping = threading.Event()
        thread = threading.Thread(target=self._serve, args=(sock, stopping),
                                  name="vacfactory-responder", daemon=True)
        self._sock, self._stopping, self._thread = sock, stopping, thread
        thread.start()

    @staticmethod
    def _retire(sock: Optional[socket.socket], thread: Optional[threading.Thread],
                stopping: threading.Event) -> None:
        stopping.set()
        if thread is not None:
            thread.join(timeout=1.0)
        if sock is not None:
            sock.close()

    def flush_rejects(self, force: bool = False) -> None:
        """Log the rejects summed since the last report of their reason, if one is due."""
        for level, line in self.rejects.due(time.monotonic(), force):
            logger.log(level, "%s", line)

    def _serve(self, sock: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self.flush_rejects()
            try:
                datagram, source = sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError as error:
                if stopping.is_set():
                    break
                logger.warning("responder receive failed: %s", error)
                time.sleep(0.01)
                continue
            peer = normalise_address(str(source[0]))
            try:
                replies = self.handle(datagram, peer, time.time())
            except Exception as error:  # noqa: BLE001 - a bug must cost one answer, not the responder
                logger.exception("%s: responder failed on a datagram", peer)
                self._drop("internal_error", peer, f"{type(error).__name__}: {error}")
                continue
            for reply in replies:
                self._sendto(sock, reply, source)

    def _sendto(self, sock: socket.socket, datagram: bytes, address: Tuple) -> None:
        """Send one reply (a seam: the loss-simulating bench overrides it)."""
        try:
            sock.sendto(datagram, address)
        except OSError as error:
            self._drop("send_error", str(address[0]), f"reply not sent: {error}")
            return
        with self._lock:
            self._sent += 1
            self._bytes_out += len(datagram)


class RejectLog:
    """Rejected datagrams, summed per reason into log lines (see the module doc).

    :meth:`add` counts one reject; :meth:`due` returns the lines to log now: a reason not
    reported within ``interval`` seconds is reported at once, otherwise its rejects wait until
    ``interval`` has passed since its last report. Memory is bounded: per reason, at most
    :data:`_PEERS_NAMED` peers are counted by name (others only in the total).
    """

    def __init__(self, interval: float = REJECT_LOG_SECONDS) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        #: reason -> [count, first reject time, {peer: count}, example (peer, detail)]
        self._pending: Dict[str, list] = {}
        self._reported: Dict[str, float] = {}

    def add(self, reason: str, peer: str, detail: str, now: float) -> None:
        with self._lock:
            entry = self._pending.get(reason)
            if entry is None:
                if detail.startswith(peer + ": "):  # (ProtocolError names the peer too)
                    detail = detail[len(peer) + 2:]
                entry = self._pending[reason] = [0, now, {}, (peer, detail)]
            entry[0] += 1
            peers = entry[2]
            if peer in peers or len(peers) < _PEERS_NAMED:
                peers[peer] = peers.get(peer, 0) + 1

    def due(self, now: float, force: bool = False) -> List[Tuple[int, str]]:
        """(log level, line) for every reason whose report is due (all pending if ``force``)."""
        lines = []
        with self._lock:
            for reason in list(self._pending):
                if not force and now - self._reported.get(reason, -math.inf) < self.interval:
                    continue
                count, first, peers, (peer, detail) = self._pending.pop(reason)
                self._reported[reason] = now
                lines.append((logging.INFO if reason in _ROUTINE_REASONS else logging.WARNING,
                              _reject_line(reason, count, now - first, peers, peer, detail)))
        return lines


def _reject_line(reason: str, count: int, seconds: float, peers: Dict[str, int], peer: str,
                 detail: str) -> str:
    named = sorted(peers.items(), key=lambda item: -item[1])
    sources = ", ".join(f"{address} x{n}" for address, n in named)
    others = count - sum(peers.values())
    if others:
        sources += f", other peers x{others}"
    over = f" over {seconds:.1f} s" if count > 1 else ""
    example = _UNPRINTABLE.sub("?", detail)[:160]
    noun = "datagram" if count == 1 else "datagrams"
    return (f"responder: {count} {noun} rejected as {reason} (no reply){over}, from {sources}; "
            f"e.g. {peer}: {example}")


def _is_loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


class _Drop(Exception):
    """Internal: why a datagram gets no answer (never leaves this module)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ResolvedPeers:
    """The source addresses allowed to query: the configured factories, resolved.

    Resolution (DNS) can block, so it happens in :meth:`refresh` - called by the engine or by
    the background thread of :meth:`start` - never on the responder's thread. A name that
    fails to resolve keeps its previous addresses. Loopback addresses are allowed when
    ``allow_loopback`` (this host's own tools; the kernel drops loopback sources from outside).
    """

    def __init__(
        self,
        factories: Iterable[str],
        *,
        local_name: str,
        resolver: Callable[[str], Iterable[str]] = resolve_factory,
        refresh_seconds: float = 300.0,
        allow_loopback: bool = True,
    ) -> None:
        self.names = canonical_names(list(factories), local_name)
        self.local_name = local_name
        self.resolver = resolver
        self.refresh_seconds = refresh_seconds
        self.allow_loopback = allow_loopback
        self._by_name: Dict[str, FrozenSet[str]] = {}
        self._current: FrozenSet[str] = frozenset()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __call__(self) -> FrozenSet[str]:
        return self._current

    def refresh(self) -> FrozenSet[str]:
        """Resolve every name now; returns the new set."""
        for name in self.names:
            try:
                addresses = frozenset(normalise_address(a) for a in self.resolver(name))
            except (OSError, ValueError) as error:
                logger.info("%s: cannot resolve: %s", name, error)
                addresses = frozenset()
            if addresses:
                self._by_name[name] = addresses
            elif name not in self._by_name and name != self.local_name:
                # (this factory's own tools ask on loopback, which is always allowed)
                logger.warning("%s: factory does not resolve; its queries are not answered", name)
        current: Set[str] = set()
        for addresses in self._by_name.values():
            current |= addresses
        if self.allow_loopback:
            current |= {"127.0.0.1", "::1"}
        self._current = frozenset(current)
        return self._current

    def start(self) -> None:
        """Resolve now, then again every ``refresh_seconds`` in a daemon thread."""
        self.refresh()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="vacfactory-peers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping.wait(self.refresh_seconds):
            self.refresh()
