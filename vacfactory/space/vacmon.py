"""VacMon: status datagrams to the collectors named by ``vacmon_hostport``, as Vac sends them.

Vac sends, to every ``host:port`` of ``vacmon_hostport`` (the central service was
``vacmon.gridpp.ac.uk:8884``), one JSON object per UDP datagram:

- at the end of every factory cycle, one ``factory_status`` and one ``machinetype_status``
  per machinetype, with cookie ``"0"`` (they answer no query);
- when a VM finishes, one ``machine_status`` about it. Vac built that message before it had
  marked the VM finished, so it always said ``state: "Running"`` with no shutdown message;
  :func:`finished_message` sends the finished state (``"Shut down"``) and the message.

The messages are the VacQuery replies of :mod:`vacfactory.space.protocol` (the same fields,
so VacMon reads them as it read Vac's). Sending is best effort and never blocks the engine:
the sockets are non-blocking (a full buffer drops the datagram), and a collector's name is
resolved off the caller's thread with a short wait, then cached; a name that does not
resolve is logged once until it resolves again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from vacfactory import __version__
from vacfactory.space import protocol
from vacfactory.space.snapshot import STATE_SHUTDOWN, FactorySnapshot, MachineStatus

log = logging.getLogger(__name__)

#: Vac's cookie for messages that answer no query
COOKIE = "0"
#: what our messages say sent them (Vac: "Vac <version> vacd-factory")
SENDER_VERSION = f"vacfactory {__version__} factory"
RESOLVE_WAIT_SECONDS = 0.5
REFRESH_SECONDS = 600.0

Address = Tuple[int, Tuple[Any, ...]]  # (family, sockaddr)
Message = Union[Mapping[str, Any], bytes]


def _stamp(message: Dict[str, Any], now: float) -> Dict[str, Any]:
    message["cookie"] = COOKIE
    message["time_sent"] = int(now)
    message["vac_version"] = SENDER_VERSION
    message["daemon_version"] = SENDER_VERSION
    return message


def cycle_messages(snapshot: FactorySnapshot, now: float) -> List[Dict[str, Any]]:
    """What Vac sends after every cycle: factory_status, then every machinetype_status."""
    messages = [_stamp(protocol.factory_fields(snapshot), now)]
    messages += [_stamp(protocol.machinetype_fields(snapshot, status), now) for status in snapshot.machinetypes]
    return messages


def finished_message(snapshot: FactorySnapshot, machine: MachineStatus, now: float) -> Dict[str, Any]:
    """The machine_status of a VM that has just finished, in its finished state."""
    if machine.state != STATE_SHUTDOWN:
        machine = dataclasses.replace(machine, state=STATE_SHUTDOWN)
    return _stamp(protocol.machine_fields(snapshot, machine), now)


def encode(message: Message) -> bytes:
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return json.dumps(message, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")


def split_hostport(hostport: str) -> Tuple[str, int]:
    """``host:port`` (validated by the option table) as (host, port)."""
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{hostport!r} is not host:port")
    return host, int(port)


Resolver = Callable[..., List[Tuple[Any, ...]]]


class VacMonSender:
    """Sends datagrams to a fixed list of ``host:port`` collectors."""

    def __init__(self, hostports: Sequence[str], resolver: Resolver = socket.getaddrinfo,
                 resolve_wait: float = RESOLVE_WAIT_SECONDS, refresh_seconds: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hostports = tuple(hostports)
        self.resolver = resolver
        self.resolve_wait = resolve_wait
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._addresses: Dict[str, Tuple[Address, float]] = {}
        self._pending: Dict[str, threading.Thread] = {}
        self._unresolved: Set[str] = set()
        self._sockets: Dict[int, socket.socket] = {}
        #: datagrams sent and dropped (full buffer, unresolved name, network error)
        self.sent = 0
        self.dropped = 0

    def send(self, messages: Sequence[Message]) -> int:
        """Send every message to every collector; return how many datagrams left."""
        datagrams = [encode(m) for m in messages]
        sent = 0
        for hostport in self.hostports:
            address = self._address(hostport)
            if address is None:
                self.dropped += len(datagrams)
                continue
            family, sockaddr = address
            sock = self._socket(family)
            for datagram in datagrams:
                try:
                    sock.sendto(datagram, sockaddr)
                    sent += 1
                except BlockingIOError:
                    self.dropped += 1
                except OSError as error:
                    self.dropped += 1
                    log.debug("vacmon %s: %s", hostport, error)
        self.sent += sent
        return sent

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()

    def _socket(self, family: int) -> socket.socket:
        with self._lock:
            sock = self._sockets.get(family)
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sockets[family] = sock
            return sock

    def _address(self, hostport: str) -> Optional[Address]:
        """The cached address; (re)resolve in a helper thread, waiting at most resolve_wait."""
        now = self.clock()
        with self._lock:
            cached = self._addresses.get(hostport)
            fresh = cached is not None and now - cached[1] < self.refresh_seconds
            thread = self._pending.get(hostport)
            if not fresh and thread is None:
                thread = threading.Thread(target=self._resolve, args=(hostport,), name="vacmon-resolve", daemon=True)
                self._pending[hostport] = thread
                thread.start()
        if not fresh and thread is not None and cached is None:
            thread.join(self.resolve_wait)
        with self._lock:
            cached = self._addresses.get(hostport)
        return cached[0] if cached is not None else None

    def _resolve(self, hostport: str) -> None:
        try:
            host, port = split_hostport(hostport)
            infos = self.resolver(host, port, 0, socket.SOCK_DGRAM)
            if not infos:
                raise OSError("no address")
            family, _, _, _, sockaddr = infos[0]
            address: Optional[Address] = (family, tuple(sockaddr))
            error: Optional[str] = None
        except (OSError, ValueError, UnicodeError) as exc:
            address, error = None, str(exc)
        with self._lock:
            self._pending.pop(hostport, None)
            if address is not None:
                self._addresses[hostport] = (address, self.clock())
                if hostport in self._unresolved:
                    self._unresolved.discard(hostport)
                    log.info("vacmon %s: resolves again", hostport)
            elif hostport not in self._unresolved:
                self._unresolved.add(hostport)
                kept = " (keeping its previous address)" if hostport in self._addresses else ""
                log.warning("vacmon %s: cannot resolve: %s%s", hostport, error, kept)


_senders: Dict[Tuple[str, ...], VacMonSender] = {}
_senders_lock = threading.Lock()


def send_vacmon(hostports: Sequence[str], messages: Sequence[Message]) -> int:
    """Best-effort send of ``messages`` to every ``host:port``; never raises for network
    trouble. Senders (and their resolved addresses) are kept per list of collectors."""
    key = tuple(hostports)
    if not key or not messages:
        return 0
    with _senders_lock:
        sender = _senders.get(key)
        if sender is None:
            sender = _senders[key] = VacMonSender(key)
    return sender.send(messages)
