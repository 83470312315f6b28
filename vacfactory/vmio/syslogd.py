"""The syslog receiver: VMs' syslog messages, filed under each VM's machine directory.

Why: to investigate what happened inside a VM (a security incident, a misbehaving pilot) a site
needs the VM's own logs after the VM is gone. VMs learn the server from ``machinefeatures/syslog``
or ``##user_data_syslog_server##`` (default ``169.254.169.254:514``, the factory itself on the
private network) and point rsyslog at it early in boot.

This module is part of the VM boundary, so it opens UDP sockets (as ``space/`` does for
VacQuery) and treats every datagram as hostile:

- Who sent it is decided by the source address only (``resolver``: source IP -> the VM's
  machine directory, from the VM registry); the hostname a message claims is kept as text but
  never trusted. Datagrams from unknown addresses are dropped and counted.
- A datagram is read into a bounded buffer (:attr:`SyslogLimits.max_datagram`, 8 KiB; more is
  cut and counted as truncated), parsed leniently as RFC 5424 or RFC 3164 (anything else is
  kept whole as the message), and every field is reduced to printable text: control
  characters, C1 controls, Unicode format characters (bidi overrides) and line separators are
  written as rsyslog does, ``#ooo`` (or ``#uXXXX``), so one datagram is always one line and no
  log line can rewrite an admin's terminal. The parser never raises.
- Each VM has its own token bucket (``rate_per_second`` with ``burst``): the receive loop is
  one thread and a datagram over the limit costs a lookup and a subtraction, so a VM flooding
  the receiver cannot starve another VM's messages (nor fill the disk, nor the forward link).
  Drops for the rate are summarised in the VM's file (and logged) at most once a minute.
- Each VM's files are capped at ``max_bytes_per_vm`` in total; when the cap is reached one last
  line says so, filing stops and the drops are counted (logged once per VM).
- Files are opened relative to directory descriptors opened with ``O_NOFOLLOW``, the log file
  with ``O_APPEND|O_NOFOLLOW|O_NONBLOCK`` and checked to be a regular file with one link: no
  symlink, FIFO or device is ever written through.

Files: ``<machine_dir>/syslog/messages``, rotated at midnight UTC (while the receiver writes) to
``messages-YYYYMMDD`` (the UTC day of its last line). One line per message::

    RECEIVED FACILITY.SEVERITY VM_TIME HOST APP[PROCID]: [msgid=ID ][STRUCTURED-DATA ]MESSAGE

``RECEIVED`` is the factory's clock (RFC 3339 UTC, milliseconds) and the one to trust;
``VM_TIME`` is the time the message claims (RFC 3339 as sent, or an RFC 3164 time with the year
inferred; ``-`` if none): rsyslog replays messages queued before the network came up with
their original times, so both matter for a timeline. ``HOST``, ``APP`` and ``PROCID`` are what
the VM claims (``-`` when absent). Every field before the colon is free of spaces.

Retention: :func:`expire` (called by the daemon) deletes files whose last line is older than
``syslog_days``; a machine directory deleted earlier (``machines_dir_days``) takes its syslog
with it. Open files are closed after :data:`IDLE_CLOSE_SECONDS` without messages, and as soon
as the resolver no longer knows the VM, so a deleted directory is never written to for long.

Forwarding (``syslog_forward``): every message that passes the rate limit (also after the local
cap is reached: the central syslog is where long-term evidence lives) is sent on as RFC 5424,
with the receive time, the VM's hostname as the factory named it (vm.json), the VM's
facility/severity/app/procid/msgid, ``[origin ip="<VM address>" software="vacfactory"]``, and
the same sanitised text as the local line.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import selectors
import socket
import stat
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from vacfactory import __version__

log = logging.getLogger(__name__)

SYSLOG_DIR = "syslog"
MESSAGES = "messages"
ROTATED = re.compile(r"messages-([0-9]{8})(?:\.([0-9]{1,3}))?\Z")

#: default server published to VMs: the factory's metadata address on the private network
DEFAULT_SERVER = "169.254.169.254:514"
#: addresses the factory holds on the private network (hypervisor.network / daemon)
FACTORY_ADDRESSES = ("169.254.169.254", "169.254.169.253")

#: a file not written for this long is closed (and reopened, re-counted, on the next message)
IDLE_CLOSE_SECONDS = 60.0
#: a VM's rate and cap state is forgotten after this long without messages
STATE_IDLE_SECONDS = 600.0
#: files held open at once; the least recently used is closed beyond this
MAX_OPEN_FILES = 256
#: datagrams read from one socket before looking at the others (and at stop())
RECEIVE_BATCH = 256
#: asked for each socket's receive buffer (root may exceed net.core.rmem_max)
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
#: room kept below the per-VM cap for the line that says the cap was reached
CAP_NOTE_RESERVE = 256
#: unknown source addresses logged by name; the rest are only counted
MAX_UNKNOWN_LOGGED = 32
#: a flooding VM is named in the log, and its drops summarised in its file, at most this often
RATE_NOTE_SECONDS = 60.0
#: how often an unresolvable forward target is looked up again
FORWARD_RESOLVE_SECONDS = 60.0

MAX_HOST = 255
MAX_APP = 48
MAX_PROCID = 128
MAX_MSGID = 32
MAX_TIME = 64
MAX_SD = 2048
#: characters of escaped message text kept per line
MAX_TEXT = 16384

FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
#: RFC 3164 4.3.3: a message without a valid PRI is user.notice
DEFAULT_PRI = 13

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FILE_MODE = 0o640
_DIR_MODE = 0o750

_PRI = re.compile(r"<([0-9]{1,3})>")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:Z|[+-][0-9]{2}:[0-9]{2})?\Z")
_BSD_TIME = re.compile(r"([A-Z][a-z]{2}) +([0-9]{1,2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})(?: |\Z)")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_TAG = re.compile(r"([^\s\[\]:]{1,48})(?:\[([^\]\s]{0,128})\])?:(?: |\Z)")
_TOKEN_BAD = re.compile(r"[^\x21-\x7e]")
_TAG_BAD = re.compile(r"[^\x21-\x7e]|[\[\]:]")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")
_PLAIN = re.compile(r"[\x20-\x7e]*\Z")
_ESCAPED_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")


# --------------------------------------------------------------------------------------------
# parsing (pure)


@dataclass(frozen=True)
class SyslogMessage:
    """One datagram, parsed and made safe: every field is printable text without newlines."""

    facility: int
    severity: int
    #: the time the message claims, normalised when recognised; None when it has none
    timestamp: Optional[str]
    hostname: Optional[str]
    app: Optional[str]
    procid: Optional[str]
    msgid: Optional[str]
    #: RFC 5424 structured data as sent (escaped), None for "-" or RFC 3164
    structured_data: Optional[str]
    text: str
    #: "rfc5424", "rfc3164" or "raw" (no PRI at all)
    format: str
    truncated: bool = False

    @property
    def priority(self) -> str:
        """``facility.severity`` in the names rsyslog uses."""
        return f"{FACILITIES[self.facility]}.{SEVERITIES[self.severity]}"


def escape_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` as one safe line: control and format characters as ``#ooo`` / ``#uXXXX``.

    rsyslog's escaping (``#012`` for a newline), extended to C1 controls, bidi overrides and
    Unicode line separators, which terminals and ``str.splitlines`` treat as control too.
    """
    if _PLAIN.match(text):
        return text[:limit]
    out: List[str] = []
    size = 0
    for char in text:
        code = ord(char)
        if code < 0x20 or code == 0x7f or (code >= 0x80 and unicodedata.category(char) in _ESCAPED_CATEGORIES):
            piece = f"#{code:03o}" if code < 0x100 else f"#u{code:04x}"
        else:
            piece = char
        size += len(piece)
        if size > limit:
            break
        out.append(piece)
    return "".join(out)


def _token(value: str, limit: int, pattern: "re.Pattern[str]" = _TOKEN_BAD) -> Optional[str]:
    """A header field as one printable word (None for empty or the NILVALUE ``-``)."""
    if not value or value == "-":
        return None
    return pattern.sub("?", value[:limit]) or None


def _bsd_time(match: "re.Match[str]", received: float) -> Optional[str]:
    """``Mmm dd hh:mm:ss`` with the year inferred: the receive year, or the one before it
    when that would put the message in a later month than now (December read in January)."""
    month = _MONTHS.get(match.group(1))
    day = int(match.group(2))
    if month is None or not 1 <= day <= 31:
        return None
    now = time.gmtime(received)
    year = now.tm_year - 1 if month > now.tm_mon + 1 else now.tm_year
    return f"{year:04d}-{month:02d}-{day:02d}T{match.group(3)}:{match.group(4)}:{match.group(5)}"


def _split_sd(rest: str) -> Tuple[Optional[str], str]:
    """(structured data, message) of the text after an RFC 5424 MSGID; lenient."""
    if rest.startswith("-"):
        return None, rest[2:] if rest.startswith("- ") else rest[1:]
    if not rest.startswith("["):
        return None, rest
    i, n, quoted = 0, len(rest), False
    while i < n:
        char = rest[i]
        if char == "\\" and quoted:
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "]" and not quoted:
            if i + 1 < n and rest[i + 1] == "[":
                i += 1
                continue
            sd = rest[: i + 1]
            message = rest[i + 1:]
            return sd, message[1:] if message.startswith(" ") else message
        i += 1
    return None, rest  # unterminated: keep it all as the message


def _parse_5424(pri: int, body: str) -> Optional[SyslogMessage]:
    parts = body.split(" ", 6)
    if len(parts) < 6 or parts[0] != "1":
        return None
    _, stamp, host, app, procid, msgid = parts[:6]
    rest = parts[6] if len(parts) == 7 else "-"
    sd, message = _split_sd(rest)
    if message.startswith("\ufeff"):
        message = message[1:]
    return SyslogMessage(
        facility=pri >> 3, severity=pri & 7,
        timestamp=stamp if _RFC3339.match(stamp[:MAX_TIME]) else None,
        hostname=_token(host, MAX_HOST), app=_token(app, MAX_APP, _TAG_BAD),
        procid=_token(procid, MAX_PROCID, _TAG_BAD), msgid=_token(msgid, MAX_MSGID, _TAG_BAD),
        structured_data=escape_text(sd, MAX_SD) if sd else None,
        text=escape_text(message), format="rfc5424",
    )


def _parse_3164(pri: int, body: str, received: float, fmt: str) -> SyslogMessage:
    stamp: Optional[str] = None
    host: Optional[str] = None
    rest = body
    bsd = _BSD_TIME.match(rest)
    first, _, after = rest.partition(" ")
    if bsd:
        stamp = _bsd_time(bsd, received)
        rest = rest[bsd.end():]
    elif _RFC3339.match(first[:MAX_TIME]):
        stamp, rest = first, after
    if stamp is not None or bsd:
        word, space, after = rest.partition(" ")
        # the word after the time is the host, unless it is already the tag ("sshd[1]:")
        if word and space and not word.endswith(":") and "[" not in word:
            host, rest = word, after
    app = procid = None
    tag = _TAG.match(rest)
    if tag:
        app, procid = tag.group(1), tag.group(2)
        rest = rest[tag.end():]
    return SyslogMessage(
        facility=pri >> 3, severity=pri & 7, timestamp=stamp,
        hostname=_token(host or "", MAX_HOST), app=_token(app or "", MAX_APP, _TAG_BAD),
        procid=_token(procid or "", MAX_PROCID, _TAG_BAD), msgid=None, structured_data=None,
        text=escape_text(rest), format=fmt,
    )


def parse_message(datagram: bytes, received: float, max_bytes: int = 8192) -> SyslogMessage:
    """Parse one datagram leniently; never raises, whatever the bytes.

    RFC 5424 (``<PRI>1 TIME HOST APP PROCID MSGID SD MSG``) when it has that shape, else RFC
    3164 (``<PRI>Mmm dd hh:mm:ss HOST TAG[PID]: MSG``, also with an RFC 3339 time as rsyslog's
    forward format sends), each part optional. Without a valid PRI the whole datagram is the
    message, as user.notice (RFC 3164 4.3.3). Bytes that are not UTF-8 are kept as ``\\xNN``.
    """
    truncated = len(datagram) > max_bytes
    text = datagram[:max_bytes].decode("utf-8", errors="backslashreplace")
    text = text.rstrip("\r\n\x00")
    pri_match = _PRI.match(text)
    pri = int(pri_match.group(1)) if pri_match else -1
    if pri_match is None or pri > 191:
        message = SyslogMessage(
            facility=DEFAULT_PRI >> 3, severity=DEFAULT_PRI & 7, timestamp=None, hostname=None, app=None,
            procid=None, msgid=None, structured_data=None, text=escape_text(text), format="raw")
    else:
        body = text[pri_match.end():]
        message = _parse_5424(pri, body) or _parse_3164(pri, body, received, "rfc3164")
    return replace(message, truncated=True) if truncated else message


def iso_utc(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds: the receive time of every line and forward."""
    whole = int(epoch // 1)
    millis = int(round((epoch - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _tag(message: SyslogMessage) -> str:
    tag = message.app or "-"
    return f"{tag}[{message.procid}]" if message.procid else tag


def _body(message: SyslogMessage, with_msgid: bool) -> str:
    parts = []
    if with_msgid and message.msgid:
        parts.append(f"msgid={message.msgid}")
    if message.structured_data:
        parts.append(message.structured_data)
    parts.append(message.text + (" #truncated" if message.truncated else ""))
    return " ".join(parts)


def format_line(message: SyslogMessage, received: float) -> str:
    """The line filed for ``message`` (see the module docstring), newline included."""
    return (f"{iso_utc(received)} {message.priority} {message.timestamp or '-'} "
            f"{message.hostname or '-'} {_tag(message)}: {_body(message, True)}\n")


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_forward(message: SyslogMessage, received: float, hostname: str, address: str) -> bytes:
    """``message`` as the RFC 5424 datagram sent to the site's central syslog."""
    pri = message.facility * 8 + message.severity
    sd = f'[origin ip="{_sd_value(address)}" software="vacfactory" swVersion="{_sd_value(__version__)}"]'
    head = (f"<{pri}>1 {iso_utc(received)} {hostname} {message.app or '-'} {message.procid or '-'} "
            f"{message.msgid or '-'} {sd} ")
    return (head + _body(message, False)).encode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# settings helpers


def parse_hostport(text: str) -> Tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); ValueError for anything else."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return host, number


def receiver_address(syslog_server: Optional[str],
                     own_addresses: Iterable[str] = FACTORY_ADDRESSES) -> Optional[Tuple[str, int]]:
    """Where the factory's receiver binds: ``syslog_server`` when it names one of the factory's
    own private-network addresses; None when syslog is off or VMs log to another host."""
    if not syslog_server:
        return None
    host, port = parse_hostport(syslog_server)
    return (host, port) if host in set(own_addresses) else None


def registry_resolver(registry) -> Callable[[str], Optional[str]]:
    """The resolver for a :class:`vacfactory.vmio.registry.VMRegistry`: address -> machine dir.

    A VM leaves the registry when it is cleaned, so its late messages are then dropped as
    unknown, and a new VM that gets the same slot address is a different directory.
    """
    def resolve(address: str) -> Optional[str]:
        vm = registry.by_address(address)
        return os.path.dirname(vm.joboutputs_dir) if vm is not None else None

    return resolve


def _normalise_address(address: str) -> str:
    """IPv4-mapped IPv6 sources (a dual-stack socket) as the plain IPv4 the registry knows."""
    if address.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(address).ipv4_mapped
        except ValueError:
            return address
        if mapped is not None:
            return str(mapped)
    return address


# --------------------------------------------------------------------------------------------
# the receiver


@dataclass(frozen=True)
class SyslogLimits:
    """Per-VM caps: total bytes of its syslog files, messages a second (with a burst)."""

    max_bytes_per_vm: int = 20 * 1024 * 1024
    rate_per_second: float = 50.0
    burst: int = 500
    max_datagram: int = 8192

    def __post_init__(self) -> None:
        if self.max_bytes_per_vm < CAP_NOTE_RESERVE * 2 or self.rate_per_second <= 0 or self.burst < 1:
            raise ValueError("syslog limits: max_bytes_per_vm >= 512, rate > 0 and burst >= 1")
        if not 512 <= self.max_datagram <= 65507:
            raise ValueError("syslog limits: max_datagram must be 512-65507 bytes")


@dataclass(frozen=True)
class SyslogStats:
    """Counters since start (datagrams): each received one is filed or dropped for one reason.

    ``received = filed + dropped_unknown + dropped_rate + dropped_size + dropped_error``.
    ``forwarded`` and ``forward_errors`` count sends to ``syslog_forward``; ``truncated``
    datagrams were longer than ``max_datagram`` (and were filed cut).
    """

    received: int = 0
    filed: int = 0
    dropped_unknown: int = 0
    dropped_rate: int = 0
    dropped_size: int = 0
    dropped_error: int = 0
    forwarded: int = 0
    forward_errors: int = 0
    truncated: int = 0


class _VM:
    """What the receiver keeps per VM: its token bucket, its open file and its byte count."""

    __slots__ = ("address", "machine_dir", "tokens", "refilled", "fd", "day", "bytes", "used",
                 "full", "rate_dropped", "rate_logged", "summarised", "error_logged", "hostname")

    def __init__(self, address: str, machine_dir: str, burst: int, now: float) -> None:
        self.address = address
        self.machine_dir = machine_dir
        self.tokens = float(burst)
        self.refilled = now
        self.fd: Optional[int] = None
        self.day = -1
        self.bytes = 0
        self.used = now
        self.full = False
        #: rate drops not yet summarised in the VM's file, and when the log / file last said so
        self.rate_dropped = 0
        self.rate_logged = float("-inf")
        self.summarised = float("-inf")
        self.error_logged = False
        self.hostname: Optional[str] = None

    def take(self, now: float, rate: float, burst: int) -> bool:
        elapsed = now - self.refilled
        self.refilled = now
        if elapsed > 0:  # a clock stepped back refills nothing, and blocks nothing either
            self.tokens = min(float(burst), self.tokens + elapsed * rate)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class SyslogReceiver:
    """Receive VMs' syslog datagrams on ``bind`` and file them per VM (see the module doc).

    ``start()`` binds every address (OSError, e.g. EADDRNOTAVAIL before the private network
    exists, raises there and nothing stays bound) and runs one receive thread; ``stop()``
    closes everything. ``handle()`` is the per-datagram work, callable directly by tests.
    """

    def __init__(
        self,
        bind: Sequence[Tuple[str, int]],
        resolver: Callable[[str], Optional[str]],
        limits: SyslogLimits = SyslogLimits(),
        forward: Optional[Tuple[str, int]] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bind = tuple(bind)
        self.resolver = resolver
        self.limits = limits
        self.forward = forward
        self.clock = clock
        self._vms: "OrderedDict[str, _VM]" = OrderedDict()
        self._open = 0
        self._unknown_logged: Set[str] = set()
        self._counts: Dict[str, int] = {name: 0 for name in SyslogStats.__dataclass_fields__}
        self._socks: List[socket.socket] = []
        self._forward_sock: Optional[socket.socket] = None
        self._forward_to: Optional[Tuple[str, int]] = None
        self._forward_resolved = 0.0
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._wake_r: Optional[int] = None
        self._wake_w: Optional[int] = None

    # -- statistics -------------------------------------------------------------------------

    @property
    def stats(self) -> SyslogStats:
        """A copy of the counters (only the receive thread writes them; reads need no lock)."""
        return SyslogStats(**self._counts)

    def _count(self, name: str) -> None:
        self._counts[name] += 1

    # -- the per-datagram work --------------------------------------------------------------

    def handle(self, datagram: bytes, address: str, now: float) -> str:
        """File (and forward) one datagram from ``address``; returns what became of it:
        ``filed``, or the ``dropped_*`` counter it went to."""
        self._count("received")
        address = _normalise_address(address)
        machine_dir = self.resolver(address)
        vm = self._vms.get(address)
        if machine_dir is None:
            if vm is not None:
                self._forget(address)
            return self._drop_unknown(address)
        if vm is None or vm.machine_dir != machine_dir:
            if vm is not None:
                self._forget(address)
            vm = self._vms[address] = _VM(address, machine_dir, self.limits.burst, now)
        else:
            self._vms.move_to_end(address)
        vm.used = now
        if not vm.take(now, self.limits.rate_per_second, self.limits.burst):
            vm.rate_dropped += 1
            if abs(now - vm.rate_logged) >= RATE_NOTE_SECONDS:
                vm.rate_logged = now
                log.warning("%s: syslog from %s over %g messages/s (burst %d): dropping the excess",
                            machine_dir, address, self.limits.rate_per_second, self.limits.burst)
            self._count("dropped_rate")
            return "dropped_rate"
        message = parse_message(datagram, now, self.limits.max_datagram)
        if message.truncated:
            self._count("truncated")
        if self.forward is not None:
            self._forward(vm, message, now)
        return self._file(vm, message, now)

    def _drop_unknown(self, address: str) -> str:
        if address not in self._unknown_logged and len(self._unknown_logged) < MAX_UNKNOWN_LOGGED:
            self._unknown_logged.add(address)
            log.warning("syslog from %s, which is not a VM of this factory: dropped (and counted)", address)
        self._count("dropped_unknown")
        return "dropped_unknown"

    def _file(self, vm: _VM, message: SyslogMessage, now: float) -> str:
        lines = []
        summary = vm.rate_dropped and abs(now - vm.summarised) >= RATE_NOTE_SECONDS
        if summary:
            lines.append(format_line(_note(
                f"{vm.rate_dropped} messages from this VM were dropped over the rate limit "
                f"({self.limits.rate_per_second:g}/s, burst {self.limits.burst})"), now))
        lines.append(format_line(message, now))
        data = "".join(lines).encode("utf-8", errors="replace")
        try:
            fd = self._file_fd(vm, now)
            if vm.full or vm.bytes + len(data) > self.limits.max_bytes_per_vm - CAP_NOTE_RESERVE:
                return self._refuse_full(vm, fd, now)
            written = os.write(fd, data)
        except OSError as error:
            self._close(vm)
            if not vm.error_logged:
                vm.error_logged = True
                log.error("%s: cannot file syslog from %s: %s", vm.machine_dir, vm.address,
                          error.strerror or error)
            self._count("dropped_error")
            return "dropped_error"
        vm.bytes += written
        if summary:
            vm.rate_dropped = 0
            vm.summarised = now
        self._count("filed")
        return "filed"

    def _refuse_full(self, vm: _VM, fd: int, now: float) -> str:
        if not vm.full:
            vm.full = True
            note = format_line(_note(
                f"syslog of this VM reached {self.limits.max_bytes_per_vm} bytes; "
                "further messages are not filed"), now).encode("utf-8")
            try:
                vm.bytes += os.write(fd, note[:CAP_NOTE_RESERVE])
            except OSError:
                pass  # the cap note is a courtesy; the drop is counted either way
            log.warning("%s: syslog reached its cap of %d bytes: no more messages filed for this VM",
                        vm.machine_dir, self.limits.max_bytes_per_vm)
        self._count("dropped_size")
        return "dropped_size"

    # -- files ------------------------------------------------------------------------------

    def _file_fd(self, vm: _VM, now: float) -> int:
        """The VM's open ``messages`` file, opened (and rotated at a new UTC day) as needed."""
        day = int(now // 86400)
        if vm.fd is not None and vm.day == day:
            return vm.fd
        self._close(vm)
        dir_fd = os.open(vm.machine_dir, _DIR_FLAGS)
        try:
            try:
                os.mkdir(SYSLOG_DIR, _DIR_MODE, dir_fd=dir_fd)
            except FileExistsError:
                pass
            syslog_fd = os.open(SYSLOG_DIR, _DIR_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            _rotate_if_older(syslog_fd, day)
            fd = os.open(MESSAGES, _APPEND_FLAGS, _FILE_MODE, dir_fd=syslog_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise OSError(errno.EPERM, "syslog/messages is not a plain file")
            vm.bytes = _total_bytes(syslog_fd)
        finally:
            os.close(syslog_fd)
        vm.full = vm.bytes > self.limits.max_bytes_per_vm - CAP_NOTE_RESERVE
        vm.fd, vm.day = fd, day
        self._open += 1
        while self._open > MAX_OPEN_FILES:
            oldest = next((v for v in self._vms.values() if v.fd is not None and v is not vm), None)
            if oldest is None:
                break
            self._close(oldest)
        return fd

    def _close(self, vm: _VM) -> None:
        if vm.fd is not None:
            try:
                os.close(vm.fd)
            except OSError:
                pass
            vm.fd = None
            self._open -= 1

    def _forget(self, address: str) -> None:
        vm = self._vms.pop(address, None)
        if vm is not None:
            self._close(vm)

    def sweep(self, now: float) -> None:
        """Close idle files and forget idle VMs (the receive thread calls it every second)."""
        for address, vm in list(self._vms.items()):
            idle = now - vm.used
            if vm.fd is not None and idle >= IDLE_CLOSE_SECONDS:
                self._close(vm)
            if idle >= STATE_IDLE_SECONDS or idle < -STATE_IDLE_SECONDS:
                self._forget(address)

    # -- forwarding -------------------------------------------------------------------------

    def _forward(self, vm: _VM, message: SyslogMessage, now: float) -> None:
        target = self._forward_target(now)
        if target is None or self._forward_sock is None:
            self._count("forward_errors")
            return
        if vm.hostname is None:
            vm.hostname = _vm_hostname(vm.machine_dir)
        try:
            self._forward_sock.sendto(format_forward(message, now, vm.hostname, vm.address), target)
        except OSError as error:
            log.debug("syslog forward to %s:%d failed: %s", target[0], target[1], error)
            self._count("forward_errors")
            return
        self._count("forwarded")

    def _forward_target(self, now: float) -> Optional[Tuple[str, int]]:
        if self._forward_to is not None or self.forward is None:
            return self._forward_to
        if now - self._forward_resolved < FORWARD_RESOLVE_SECONDS and self._forward_resolved:
            return None
        self._forward_resolved = now
        host, port = self.forward
        try:
            info = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as error:
            log.error("syslog_forward %s:%d does not resolve (%s); retrying in %d s", host, port, error,
                      FORWARD_RESOLVE_SECONDS)
            return None
        self._forward_to = (str(info[0][4][0]), int(info[0][4][1]))
        return self._forward_to

    # -- the socket and the thread ----------------------------------------------------------

    @property
    def addresses(self) -> List[Tuple[str, int]]:
        """The bound (address, port) pairs - useful when ``bind`` asked for port 0."""
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._socks]

    def start(self) -> None:
        if self._thread is not None:
            return
        socks: List[socket.socket] = []
        try:
            for host, port in self.bind:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                _grow_receive_buffer(sock)
                sock.bind((host, port))
                sock.setblocking(False)
            if self.forward is not None:
                forward_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                forward_sock.setblocking(False)
                socks.append(forward_sock)
                self._forward_sock = forward_sock
        except OSError:
            for sock in socks:
                sock.close()
            self._forward_sock = None
            raise
        self._socks = [s for s in socks if s is not self._forward_sock]
        if self.forward is not None:
            self._forward_target(self.clock())
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="vmio-syslog", daemon=True)
        self._thread.start()
        log.info("syslog receiver on %s%s", ", ".join(f"{h}:{p}" for h, p in self.addresses),
                 f", forwarding to {self.forward[0]}:{self.forward[1]}" if self.forward else "")

    def stop(self) -> None:
        """Stop the thread (if started), close the sockets and every VM's open file."""
        if self._thread is not None:
            self._stopping.set()
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass
            self._thread.join(timeout=10)
            self._thread = None
        for sock in self._socks:
            sock.close()
        self._socks = []
        if self._forward_sock is not None:
            self._forward_sock.close()
            self._forward_sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        for address in list(self._vms):
            self._forget(address)

    def __enter__(self) -> "SyslogReceiver":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in self._socks:
            sel.register(sock, selectors.EVENT_READ)
        assert self._wake_r is not None
        sel.register(self._wake_r, selectors.EVENT_READ)
        last_sweep = time.monotonic()
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        continue
                    self._drain(key.fileobj)  # type: ignore[arg-type]
                if time.monotonic() - last_sweep >= 1.0:
                    last_sweep = time.monotonic()
                    self.sweep(self.clock())
        finally:
            sel.close()

    def _drain(self, sock: socket.socket) -> None:
        """Read up to RECEIVE_BATCH datagrams, then let the other sockets have a turn."""
        size = self.limits.max_datagram + 1
        for _ in range(RECEIVE_BATCH):
            try:
                datagram, source = sock.recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("syslog receive failed: %s", error)
                return
            try:
                self.handle(datagram, str(source[0]), self.clock())
            except Exception:  # noqa: BLE001 - a bug must cost one message, never the receiver
                log.exception("syslog: failed on a datagram from %s", source[0])
                self._count("dropped_error")


def _note(text: str) -> SyslogMessage:
    """A line of the receiver's own, filed among the VM's messages (syslog.warning)."""
    return SyslogMessage(facility=5, severity=4, timestamp=None, hostname=None, app="vacfactory",
                         procid=None, msgid=None, structured_data=None, text=text, format="note")


def _grow_receive_buffer(sock: socket.socket) -> None:
    """A big receive buffer rides out bursts; root may go past net.core.rmem_max."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, RECEIVE_BUFFER_BYTES)
    except PermissionError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        except OSError as error:
            log.debug("syslog receive buffer left at its default: %s", error)


def _vm_hostname(machine_dir: str) -> str:
    """The VM's name as the factory gave it (vm.json), else its UUID: never what it claims."""
    try:
        with open(os.path.join(machine_dir, "vm.json"), "rb") as f:
            name = json.loads(f.read(65536)).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and _HOSTNAME.match(name):
        return name
    fallback = _TOKEN_BAD.sub("?", os.path.basename(machine_dir.rstrip("/")))[:MAX_HOST]
    return fallback or "-"


# --------------------------------------------------------------------------------------------
# files: rotation, listing, retention


def _day_name(day: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(day * 86400))


def _rotate_if_older(syslog_fd: int, day: int) -> None:
    """Rename ``messages`` to ``messages-YYYYMMDD`` if its last line is from an earlier day."""
    try:
        st = os.stat(MESSAGES, dir_fd=syslog_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        os.unlink(MESSAGES, dir_fd=syslog_fd)  # not ours (a link, a FIFO): never write through it
        return
    file_day = int(st.st_mtime // 86400)
    if st.st_size == 0 or file_day >= day:
        return
    base = f"{MESSAGES}-{_day_name(file_day)}"
    for suffix in [""] + [f".{n}" for n in range(1, 10)]:
        try:
            os.stat(base + suffix, dir_fd=syslog_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(MESSAGES, base + suffix, src_dir_fd=syslog_fd, dst_dir_fd=syslog_fd)
            return
    # ten rotations of one day already (a clock jumping about): keep appending instead


def _total_bytes(syslog_fd: int) -> int:
    total = 0
    with os.scandir(syslog_fd) as entries:
        for entry in entries:
            try:
                st = os.stat(entry.name, dir_fd=syslog_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += max(st.st_size, getattr(st, "st_blocks", 0) * 512)
    return total


@dataclass(frozen=True)
class SyslogFile:
    """One syslog file of a VM (``messages`` or a rotated ``messages-YYYYMMDD``)."""

    name: str
    path: str
    size: int
    mtime: float


def _open_syslog_dir(machine_dir: str) -> Optional[int]:
    """A descriptor of ``<machine_dir>/syslog``, neither opened through a symlink; else None."""
    try:
        dir_fd = os.open(machine_dir, _DIR_FLAGS)
    except OSError:
        return None
    try:
        return os.open(SYSLOG_DIR, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)


def _list(machine_dir: str, syslog_fd: int) -> List[SyslogFile]:
    found: List[SyslogFile] = []
    with os.scandir(syslog_fd) as entries:
        names = [e.name for e in entries if e.name == MESSAGES or ROTATED.match(e.name)]
    for name in names:
        try:
            st = os.stat(name, dir_fd=syslog_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append(SyslogFile(name, os.path.join(machine_dir, SYSLOG_DIR, name), st.st_size, st.st_mtime))
    return sorted(found, key=lambda f: (f.name == MESSAGES, f.name))


def syslog_files(machine_dir: str) -> List[SyslogFile]:
    """The VM's syslog files, oldest first, ``messages`` last; symlinks and strays ignored."""
    syslog_fd = _open_syslog_dir(machine_dir)
    if syslog_fd is None:
        return []
    try:
        return _list(machine_dir, syslog_fd)
    finally:
        os.close(syslog_fd)


@dataclass(frozen=True)
class ExpireResult:
    files_removed: int = 0
    bytes_removed: int = 0


def expire(machine_dirs: Iterable[str], days: float, now: float) -> ExpireResult:
    """Delete syslog files whose last line is more than ``days`` old; ``days <= 0`` keeps all.

    Cheap enough to call every few minutes (one directory listing per machine directory).
    A live VM's current file is only ever this old after ``days`` of silence, by which time
    the receiver has long closed it.
    """
    if days <= 0:
        return ExpireResult()
    cutoff = now - days * 86400
    files = removed_bytes = 0
    for machine_dir in machine_dirs:
        syslog_fd = _open_syslog_dir(machine_dir)
        if syslog_fd is None:
            continue
        try:
            for entry in _list(machine_dir, syslog_fd):
                if entry.mtime >= cutoff:
                    continue
                try:
                    os.unlink(entry.name, dir_fd=syslog_fd)
                except FileNotFoundError:
                    continue
                except OSError as error:
                    log.error("%s: cannot remove syslog/%s: %s", machine_dir, entry.name, error.strerror)
                    continue
                files += 1
                removed_bytes += entry.size
        finally:
            os.close(syslog_fd)
    if files:
        log.info("syslog retention: removed %d files (%d bytes) older than %g days", files, removed_bytes, days)
    return ExpireResult(files, removed_bytes)
