"""One client connection of the VMs' HTTP server: its state, explicit, and its buffers.

A connection's life (each arrow is the only way into a state; any state can be CLOSED)::

    READING --(PUT/POST head)--> UPLOADING --(body stored or refused, keep-alive)--> READING
    READING --(GET/HEAD head with a small body)--> DISCARDING --(body dropped)--> READING
    READING | UPLOADING --(final response queued)--> CLOSING
    CLOSING --(response sent, our side shut)--> LINGERING --(client done or 2 s)--> CLOSED

Whether a connection waits in the round-robin (``queued``) is scheduling, not state: only a
READING connection with a complete head is queued.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

from vacfactory.vmio.http.upload import Upload


class ConnState(enum.Enum):
    """Each state with what the loop asks of it on every event (plain attributes: this is
    the server's hot path, and enum properties cost a call each)."""

    # (label, reads_requests, live)
    READING = ("reading", True, True)        # between requests: idle, or a head arriving
    UPLOADING = ("uploading", True, True)    # a PUT body is being stored into joboutputs
    DISCARDING = ("discarding", True, True)  # a GET/HEAD body (small, legal) is being dropped
    CLOSING = ("closing", False, True)       # a final response is queued: nothing more is read
    LINGERING = ("lingering", False, False)  # our side is shut; what the client sends is dropped
    CLOSED = ("closed", False, False)

    def __init__(self, label: str, reads_requests: bool, live: bool) -> None:
        self.label = label
        #: bytes from the client are part of requests (not yet the closing stage)
        self.reads_requests = reads_requests
        #: served by the loop: its responses are flushed and its interest updated
        self.live = live


# bound once: looking a member up on the enum class is slow on the hot path
READING, UPLOADING, DISCARDING = ConnState.READING, ConnState.UPLOADING, ConnState.DISCARDING
CLOSING, LINGERING, CLOSED = ConnState.CLOSING, ConnState.LINGERING, ConnState.CLOSED

#: stop reading from a client that does not read its responses
OUT_HIGH_WATER = 1024 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Per-connection deadlines (seconds): why a slow or silent client cannot hold us."""

    head: float = 10.0         # whole request head, from its first byte (slow loris)
    idle: float = 30.0         # keep-alive connection with no request
    body_idle: float = 20.0    # silence in the middle of a body
    body_min_rate: float = 65536.0  # bytes/s a body must average (plus body_idle of slack)
    write: float = 30.0        # client not reading its response


#: the transitions the server may make; moving into the current state changes nothing
TRANSITIONS: Dict[ConnState, FrozenSet[ConnState]] = {
    READING: frozenset({UPLOADING, DISCARDING, CLOSING, CLOSED}),
    UPLOADING: frozenset({READING, CLOSING, CLOSED}),
    DISCARDING: frozenset({READING, CLOSED}),
    CLOSING: frozenset({LINGERING, CLOSED}),
    LINGERING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug in the server: the loop's isolation boundary closes that one connection."""


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    peer: str
    #: whose share this connection counts against: ``vm:<uuid>`` (a registered address) or
    #: ``addr:<peer>`` (an unregistered one, only when that pool is open)
    owner: str
    state: ConnState = READING
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0
    head_started: Optional[float] = None
    upload: Optional[Upload] = None
    upload_keep_alive: bool = True
    #: body bytes still to drop (DISCARDING, or left over when a close cut the discard short)
    discard: int = 0
    lingered: int = 0
    events: int = 0
    queued: bool = False  # waiting in the round-robin with a request to serve

    def move(self, to: ConnState) -> None:
        if to is self.state:
            return
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.peer}: connection cannot go from {self.state.label} to {to.label}")
        self.state = to

    @property
    def idle(self) -> bool:
        """Between requests with nothing buffered either way: closing it loses nothing."""
        return self.state is READING and not (self.inbuf or self.out or self.queued)
