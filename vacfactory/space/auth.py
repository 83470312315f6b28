"""Optional space key: HMAC-SHA256 signatures on VacQuery datagrams (beyond Vac).

Vac trusts any datagram that names the space. With ``space_key`` set, a factory answers only
queries signed with the key, and its client accepts only replies signed with it, so a host
that merely knows the space name can neither read the space nor feed it false load figures.

Wire format. A signed datagram is an ordinary VacQuery JSON object whose *last* member is

    "hmac":"<64 lowercase hex digits>"

written exactly as ``,"hmac":"`` + hex + ``"}`` at the very end of the datagram. The MAC is
HMAC-SHA256 with the space key over the datagram with that trailer replaced by ``}`` - that is,
over the exact bytes of the unsigned message, so no canonical JSON form is needed and any
implementation can sign by appending and verify by stripping. A Vac factory (or one of ours
without a key) parses a signed query as JSON with one unknown field and answers it normally:
signing never breaks a mixed space, it only stops keyed factories from trusting unkeyed ones.

Replay. A signed query must carry ``time_sent`` within ``window`` seconds of the responder's
clock, and each signature is accepted once within that window (:class:`ReplayGuard`), so a
captured query cannot be re-sent later to make a factory talk to a spoofed address. Replies
need no window: they echo the cookie, which is fresh for every query round.

Keys are compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections import OrderedDict
from typing import Optional, Tuple

from vacfactory.errors import ConfigError, ProtocolError

logger = logging.getLogger(__name__)

_TRAILER = re.compile(rb',"hmac":"([0-9a-f]{64})"\}\Z')
#: bytes a signature adds to a datagram
SIGNATURE_BYTES = len(b',"hmac":""') + 64
#: how far a signed query's time_sent may be from the responder's clock, in seconds
DEFAULT_WINDOW = 30.0


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def sign(datagram: bytes, key: bytes) -> bytes:
    """Append the signature member to a JSON-object datagram."""
    body = bytes(datagram).rstrip()
    if not body.endswith(b"}") or body == b"{}":
        raise ValueError("only a non-empty JSON object can be signed")
    return body[:-1] + b',"hmac":"' + _mac(key, body).encode("ascii") + b'"}'


def split(datagram: bytes) -> Tuple[bytes, Optional[str]]:
    """(the unsigned datagram, the hex signature) - or (datagram, None) if it is unsigned."""
    match = _TRAILER.search(datagram)
    if match is None:
        return datagram, None
    return datagram[: match.start()] + b"}", match.group(1).decode("ascii")


def verify(datagram: bytes, key: bytes, *, peer: str) -> Tuple[bytes, str]:
    """Check a signed datagram; return (the unsigned datagram, its signature).

    Raises ProtocolError if the datagram is unsigned or the signature is wrong.
    """
    body, signature = split(datagram)
    if signature is None:
        raise ProtocolError("unsigned datagram", peer=peer)
    if not hmac.compare_digest(_mac(key, body), signature):
        raise ProtocolError("wrong signature", peer=peer)
    return body, signature


class ReplayGuard:
    """Accept each signed query once, and only near the responder's clock.

    Remembers the signatures seen in the last ``window`` seconds (at most ``capacity`` of
    them; when full, the oldest are forgotten first - an attacker cannot replay one of those
    anyway unless it is still inside the window, and filling the memory needs signed queries).
    """

    def __init__(self, window: float = DEFAULT_WINDOW, capacity: int = 65536) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: "OrderedDict[str, float]" = OrderedDict()

    def check(self, signature: str, time_sent: Optional[float], now: float, *, peer: str) -> None:
        """Raise ProtocolError for a stale, future or repeated query; else remember it."""
        if time_sent is None:
            raise ProtocolError("signed query without time_sent", peer=peer)
        if abs(now - time_sent) > self.window:
            raise ProtocolError(f"query time_sent {now - time_sent:+.0f} s from now", peer=peer)
        self._expire(now)
        if signature in self._seen:
            raise ProtocolError("replayed query", peer=peer)
        self._seen[signature] = now
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        horizon = now - 2 * self.window
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                break
            del self._seen[oldest]


def load_space_key(space_key: Optional[str], space_key_file: Optional[str]) -> Optional[bytes]:
    """The space key from the configuration: ``space_key`` itself, or the first line of
    ``space_key_file`` (preferred: keeps the secret out of a world-readable config).

    Returns None when neither is set (Vac behaviour: no signatures).
    """
    if space_key_file:
        try:
            with open(space_key_file, "rb") as handle:
                lines = handle.read(4096).splitlines()
        except OSError as error:
            raise ConfigError(f"cannot read the space key: {error}", option="space_key_file",
                              source=space_key_file) from None
        key = lines[0].strip() if lines else b""
        if not key:
            raise ConfigError("the space key file is empty", option="space_key_file",
                              source=space_key_file)
        return key
    if space_key:
        return space_key.encode("utf-8")
    return None
