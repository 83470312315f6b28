"""Ask every factory of the space one question, with one overall deadline.

Vac's client sent to all factories, gathered until a 2 s silence, and repeated up to six rounds
with no overall limit ("NEED A LIMIT ON HOW LONG IN TOTAL TOO!?"), so a slow or chatty peer
could stall a factory's cycle. Here:

- :class:`Gatherer` is the whole algorithm as a sans-I/O state machine (datagrams out,
  datagrams in, ``now`` passed in). The socket driver :func:`query_space` and the in-process
  simulator both run it, so the simulator measures the real retry and validation logic.
- One deadline bounds everything, name resolution included: a dead, slow or unresolvable
  factory costs at most ``timeout`` and is reported as *unknown*, never waited for again.
- A factory answers with one datagram per slot or machinetype (Vac's format, ours too), and
  every one of them is read (``num_machines``/``num_machinetypes`` says how many to expect).
  Only factories whose answer is incomplete are asked again: first after
  :data:`FIRST_RETRY` seconds, then at doubling intervals up to ``timeout / 5``. A factory that
  sent part of a multi-datagram answer and then paused for :data:`CONTINUE_AFTER` (measured
  from its latest datagram, so a long answer still streaming in is not asked again) is asked
  again at once: a lost datagram is recovered without waiting a full interval (and an older
  vacfactory responder that cut its answer continues where it stopped).
- Replies are accepted as Vac accepts them (kind, space, a factory we asked, and the cookie
  ``sha256(salt + factory)`` we sent to that name), so real Vac factories are understood; with
  a space key, only replies signed with it count.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from vacfactory.errors import ProtocolError
from vacfactory.space import auth
from vacfactory.space.protocol import (
    CLIENT_VERSION,
    DEFAULT_PORT,
    MAX_DATAGRAM_BYTES,
    MAX_QUERY_BYTES,
    REPLY_TYPE,
    QueryType,
    Reply,
    check_reply,
    cookie_for,
    decode,
    make_salt,
    query_template,
)

logger = logging.getLogger(__name__)

#: first re-send to a silent factory, seconds (then doubling, up to timeout / 5)
FIRST_RETRY = 0.2
#: a factory that answered part and then went quiet this long is asked again at once
CONTINUE_AFTER = 0.1
#: queries are padded to these sizes: vacfactory responders before 2026-12 cut replies to
#: 10 x the query's size, so a bigger query got more of a big answer there; 1000 bytes still
#: fit the 1024 a Vac responder reads. Current responders answer whole whatever the size.
QUERY_PAD = {QueryType.MACHINES: 1000, QueryType.MACHINETYPES: 600, QueryType.FACTORY: 0}

Resolver = Callable[[str], Sequence[str]]


# --------------------------------------------------------------------------------------------
# Names and addresses


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def canonical_name(name: str, local_name: str) -> str:
    """Vac's ``canonicalFQDN``: ``.`` is this factory; a name without a dot gets this
    factory's domain appended. Replies must carry exactly this name (it is in the cookie)."""
    if name == ".":
        return local_name
    if "." not in name and not _is_ip(name) and "." in local_name:
        return name + "." + local_name.split(".", 1)[1]
    return name


def canonical_names(factories: Sequence[str], local_name: str) -> List[str]:
    """The factories to ask, canonical and without duplicates, in configuration order."""
    names: List[str] = []
    for raw in factories:
        name = canonical_name(raw.strip(), local_name)
        if name and name not in names:
            names.append(name)
    return names


def normalise_address(address: str) -> str:
    """An IP address as the kernel reports datagram sources (IPv4-mapped IPv6 unwrapped)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def resolve_factory(name: str) -> List[str]:
    """The addresses of a factory name (IPv4 first), [] if it does not resolve."""
    if _is_ip(name):
        return [normalise_address(name)]
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_UDP)
    except (OSError, UnicodeError) as error:
        logger.info("%s: does not resolve: %s", name, error)
        return []
    found: List[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            address = normalise_address(str(info[4][0]))
            if info[0] == family and address not in found:
                found.append(address)
    return found


def _local_first(resolver: Resolver, local_name: str) -> Resolver:
    """This factory's own name falls back to loopback when it does not resolve: a test or demo
    factory's name need not be in DNS, and the responder always answers this host's tools."""

    def resolve(name: str) -> List[str]:
        found = resolver(name)
        return found if found or name != local_name else ["127.0.0.1"]

    return resolve


class Resolutions:
    """Names being resolved in background threads while the query round goes on.

    IP literals need no lookup. The others are resolved by up to 16 daemon threads;
    :meth:`finished` hands over the ones that completed since the last call. Nobody waits for
    a lookup: a hung DNS server makes its factory unknown at the deadline, like a dead one,
    the others are asked as soon as their own names resolve, and (daemon threads) a hung
    lookup cannot even delay the exit of the ``vacfactory`` command.
    """

    def __init__(self, names: Sequence[str], resolver: Resolver) -> None:
        self.known: Dict[str, Optional[str]] = {}
        for name in names:
            if _is_ip(name):
                self.known[name] = normalise_address(name)
        self._todo: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self._pending = [name for name in names if name not in self.known]
        self._done: Dict[str, Optional[str]] = {}
        self._lock = threading.Lock()
        self._resolver = resolver
        for name in self._pending:
            self._todo.put(name)
        for i in range(min(16, len(self._pending))):
            threading.Thread(target=self._work, name=f"vacfactory-resolve-{i}",
                             daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                name = self._todo.get_nowait()
            except queue.Empty:
                return
            try:
                addresses = list(self._resolver(name))
            except (OSError, ValueError, UnicodeError) as error:
                logger.info("%s: resolving failed: %s", name, error)
                addresses = []
            with self._lock:
                self._done[name] = normalise_address(str(addresses[0])) if addresses else None

    @property
    def pending(self) -> List[str]:
        with self._lock:
            return list(self._pending)

    def finished(self) -> Dict[str, Optional[str]]:
        """name -> first address (None when it does not resolve), for lookups just done."""
        with self._lock:
            done, self._done = self._done, {}
            self._pending = [name for name in self._pending if name not in done]
        return done


def resolve_all(
    names: Sequence[str], resolver: Resolver, timeout: float
) -> Dict[str, Optional[str]]:
    """First address of every name; None for names that fail or are still resolving after
    ``timeout`` seconds."""
    resolutions = Resolutions(names, resolver)
    result: Dict[str, Optional[str]] = {name: None for name in names}
    result.update(resolutions.known)
    deadline = time.monotonic() + max(timeout, 0.0)
    while resolutions.pending and time.monotonic() < deadline:
        result.update(resolutions.finished())
        time.sleep(0.005)
    result.update(resolutions.finished())
    return result


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class FactoryReplies:
    """What one factory answered: distinct replies (by machine/machinetype name), the count it
    announced, and how long its first reply took."""

    factory: str
    address: Optional[str]
    replies: Tuple[Reply, ...]
    expected: int
    first_reply_seconds: Optional[float] = None

    @property
    def complete(self) -> bool:
        return self.expected > 0 and len(self.replies) >= self.expected


@dataclass(frozen=True)
class SpaceReplies:
    """The outcome of one query round over the space.

    ``answered`` has every factory that sent at least one valid reply; ``unknown`` the ones
    that sent none before the deadline (dead, slow, unresolvable, wrong key or wrong name) -
    they are unknown, not empty; ``incomplete`` the answered ones that announced more replies
    than arrived.
    """

    query_type: QueryType
    space: str
    factories: Tuple[str, ...]
    answered: Mapping[str, FactoryReplies]
    unknown: Tuple[str, ...]
    incomplete: Tuple[str, ...]
    elapsed: float
    datagrams_sent: int = 0
    rejected: int = 0
    #: the unknown ones whose name did not resolve (never asked), and whose lookup was still
    #: running at the deadline (a slow DNS server)
    unresolved: Tuple[str, ...] = ()
    resolving: Tuple[str, ...] = ()

    def replies(self) -> List[Reply]:
        """Every accepted reply, factory by factory in configuration order."""
        return [r for name in self.factories if name in self.answered
                for r in self.answered[name].replies]


# --------------------------------------------------------------------------------------------
# The sans-I/O gatherer


@dataclass
class _Target:
    name: str
    address: Optional[str]
    cookie: str
    next_send: float
    interval: float
    replies: Dict[str, Reply] = field(default_factory=dict)
    expected: int = 0
    first_reply: Optional[float] = None
    complete: bool = False


class Gatherer:
    """One query round as a state machine: :meth:`due` says what to send now, :meth:`receive`
    takes what arrived, :meth:`next_event` says when to look again, :meth:`result` sums up.

    ``now`` is a monotonic clock (deadline and re-sends); ``wall`` in :meth:`due` is the epoch
    time written into signed queries. ``salt`` must be fresh random bytes for every round.
    ``addresses`` maps every factory name to its address, or None when it is unknown; names in
    ``pending`` are still being resolved and get their address through :meth:`resolved`.
    """

    def __init__(
        self,
        addresses: Mapping[str, Optional[str]],
        query_type: QueryType,
        space: str,
        *,
        timeout: float,
        start: float,
        salt: bytes,
        space_key: Optional[bytes] = None,
        client_version: str = CLIENT_VERSION,
        pad_to: Optional[int] = None,
        first_retry: float = FIRST_RETRY,
        pending: Sequence[str] = (),
    ) -> None:
        self.query_type = QueryType(query_type)
        self.reply_type = REPLY_TYPE[self.query_type]
        self.space = space
        self.start = start
        self.deadline = start + max(timeout, 0.0)
        self.space_key = space_key
        self.client_version = client_version
        if pad_to is None:
            pad_to = QUERY_PAD[self.query_type]
        self._template = query_template(
            self.query_type, space, client_version=client_version,
            pad_to=min(pad_to, MAX_QUERY_BYTES - auth.SIGNATURE_BYTES))
        self.max_interval = max(timeout / 5.0, 0.01)
        self.first_retry = min(first_retry, self.max_interval)
        self.sent = 0
        self.rejected = 0
        self._pending = set(pending)
        self._targets: Dict[str, _Target] = {}
        self._cookies: Dict[str, str] = {}
        #: targets that can still be asked and are not complete (done when empty)
        self._open: Set[str] = set()
        #: (send time, name) of every scheduled send; stale entries are skipped when popped
        self._schedule: List[Tuple[float, str]] = []
        salt = make_salt(salt)
        for name, address in addresses.items():
            cookie = cookie_for(salt, name)
            self._cookies[name] = cookie
            self._targets[name] = _Target(name, address, cookie, start, self.first_retry)
            if address is not None:
                self._open.add(name)
                self._schedule.append((start, name))
        heapq.heapify(self._schedule)

    def _reschedule(self, target: _Target, when: float) -> None:
        target.next_send = when
        heapq.heappush(self._schedule, (when, target.name))

    def _next_entry(self) -> Optional[Tuple[float, str]]:
        """The earliest live schedule entry (dropping stale ones)."""
        schedule = self._schedule
        while schedule:
            when, name = schedule[0]
            target = self._targets[name]
            if name in self._open and when == target.next_send:
                return schedule[0]
            heapq.heappop(schedule)
        return None

    def _datagram(self, target: _Target, wall: float) -> bytes:
        data = self._template.fill_query(target.cookie, wall)
        return auth.sign(data, self.space_key) if self.space_key else data

    def due(self, now: float, wall: float) -> List[Tuple[str, str, bytes]]:
        """(factory, address, datagram) to send now; each is then scheduled for a re-send."""
        out: List[Tuple[str, str, bytes]] = []
        if now >= self.deadline:
            return out
        while True:
            entry = self._next_entry()
            if entry is None or entry[0] > now:
                break
            heapq.heappop(self._schedule)
            target = self._targets[entry[1]]
            assert target.address is not None
            out.append((target.name, target.address, self._datagram(target, wall)))
            self._reschedule(target, now + target.interval)
            target.interval = min(target.interval * 2.0, self.max_interval)
        self.sent += len(out)
        return out

    def receive(self, datagram: bytes, peer: str, now: float) -> bool:
        """Take one datagram; True if it was a new valid reply."""
        try:
            if self.space_key:
                datagram, _ = auth.verify(datagram, self.space_key, peer=peer)
            reply = decode(datagram, peer=peer)
            if not isinstance(reply, Reply):
                raise ProtocolError("a query, not a reply", peer=peer)
            check_reply(reply, reply_type=self.reply_type, space=self.space,
                        cookies=self._cookies, peer=peer)
        except ProtocolError as error:
            self.rejected += 1
            logger.debug("reply rejected: %s", error)
            return False
        target = self._targets[reply.factory]
        if target.first_reply is None:
            target.first_reply = now - self.start
        target.expected = reply.count
        is_new = reply.key not in target.replies
        target.replies[reply.key] = reply
        target.complete = len(target.replies) >= target.expected
        if target.complete:
            self._open.discard(target.name)
        elif is_new:
            # it is talking but not finished: ask again only once it pauses (each new
            # datagram moves the re-ask to CONTINUE_AFTER after it)
            self._reschedule(target, now + CONTINUE_AFTER)
            target.interval = self.first_retry
        return is_new

    def resolved(self, name: str, address: Optional[str], now: float) -> None:
        """A pending name resolved (None: it does not): ask it at once."""
        self._pending.discard(name)
        target = self._targets.get(name)
        if target is not None and address is not None and target.address is None:
            target.address = address
            self._open.add(name)
            self._reschedule(target, now)

    def done(self, now: float) -> bool:
        return now >= self.deadline or not (self._open or self._pending)

    def next_event(self) -> float:
        """When :meth:`due` may next have something to send, or the deadline."""
        entry = self._next_entry()
        return self.deadline if entry is None else min(entry[0], self.deadline)

    def result(self, now: float) -> SpaceReplies:
        answered = {
            t.name: FactoryReplies(t.name, t.address, tuple(t.replies.values()), t.expected,
                                   t.first_reply)
            for t in self._targets.values() if t.replies
        }
        return SpaceReplies(
            query_type=self.query_type,
            space=self.space,
            factories=tuple(self._targets),
            answered=answered,
            unknown=tuple(name for name in self._targets if name not in answered),
            incomplete=tuple(name for name, r in answered.items() if not r.complete),
            elapsed=now - self.start,
            datagrams_sent=self.sent,
            rejected=self.rejected,
            unresolved=tuple(name for name, t in self._targets.items()
                             if t.address is None and name not in self._pending),
            resolving=tuple(name for name in self._targets if name in self._pending),
        )


# --------------------------------------------------------------------------------------------
# The socket driver


def query_space(
    factories: Sequence[str],
    message_type: QueryType,
    space: str,
    timeout: float,
    *,
    port: int = DEFAULT_PORT,
    space_key: Optional[bytes] = None,
    local_name: str,
    resolver: Resolver = resolve_factory,
    client_version: str = CLIENT_VERSION,
    first_retry: float = FIRST_RETRY,
) -> SpaceReplies:
    """Ask every factory in ``factories`` (``.`` = ``local_name``) and gather the answers.

    Returns within ``timeout`` seconds (plus scheduling noise) whatever the peers do.
    """
    start = time.monotonic()
    names = canonical_names(factories, local_name)
    resolutions = Resolutions(names, _local_first(resolver, local_name))
    addresses = {name: resolutions.known.get(name) for name in names}
    gatherer = Gatherer(addresses, message_type, space, timeout=timeout, start=start,
                        salt=os.urandom(32), space_key=space_key,
                        client_version=client_version, first_retry=first_retry,
                        pending=resolutions.pending)
    with _Sockets() as sockets:
        while True:
            now = time.monotonic()
            for name, address in resolutions.finished().items():
                gatherer.resolved(name, address, now)
            for name, address, datagram in gatherer.due(now, time.time()):
                sockets.send(datagram, address, port, name)
            if gatherer.done(now):
                break
            wait = gatherer.next_event() - now
            if resolutions.pending:
                wait = min(wait, 0.01)  # look at the lookups again soon
            for datagram, peer in sockets.receive(wait):
                gatherer.receive(datagram, peer, time.monotonic())
            if gatherer.done(time.monotonic()):
                break
    result = gatherer.result(time.monotonic())
    logger.debug("%s to %d factories: %d answered, %d unknown in %.3f s", message_type,
                 len(names), len(result.answered), len(result.unknown), result.elapsed)
    return result


#: a factory answers with a datagram per slot: 128 slots of several factories at once must
#: fit while we read (the kernel counts ~2 kB per small datagram; Vac's client asks 16 MiB)
RECEIVE_BUFFER_BYTES = 16 * 1024 * 1024


def grow_receive_buffer(sock: socket.socket) -> None:
    """A receive buffer big enough for whole answers: as root past net.core.rmem_max (as Vac,
    which raises rmem_max), otherwise up to it."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, RECEIVE_BUFFER_BYTES)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        except OSError as error:
            logger.debug("VacQuery receive buffer left at its default: %s", error)


class _Sockets:
    """One UDP socket per address family in use, read through one selector."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._by_family: Dict[int, socket.socket] = {}

    def __enter__(self) -> "_Sockets":
        return self

    def __exit__(self, *exc: object) -> None:
        self._selector.close()
        for sock in self._by_family.values():
            sock.close()

    def _socket(self, family: int) -> socket.socket:
        sock = self._by_family.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            grow_receive_buffer(sock)
            self._by_family[family] = sock
            self._selector.register(sock, selectors.EVENT_READ)
        return sock

    def send(self, datagram: bytes, address: str, port: int, name: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            self._socket(family).sendto(datagram, (address, port))
        except OSError as error:
            logger.debug("%s: sending to %s failed: %s", name, address, error)

    def receive(self, wait: float) -> List[Tuple[bytes, str]]:
        """Every datagram available within ``wait`` seconds (drains each ready socket)."""
        got: List[Tuple[bytes, str]] = []
        if not self._by_family:
            time.sleep(max(wait, 0.0))
            return got
        for key, _ in self._selector.select(max(wait, 0.0)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    data, peer = sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:  # e.g. ICMP errors reported on some platforms
                    logger.debug("receive failed: %s", error)
                    break
                got.append((data, normalise_address(str(peer[0]))))
        return got
