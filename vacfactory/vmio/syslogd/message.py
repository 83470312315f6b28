"""Syslog datagrams into safe messages, and messages into lines (the parse part; pure).

A datagram is parsed leniently as RFC 5424 or RFC 3164 (anything else is kept whole as the
message), and every field is reduced to printable text: control characters, C1 controls,
Unicode format characters (bidi overrides) and line separators are written as rsyslog does,
``#ooo`` (or ``#uXXXX``), so one datagram is always one line and no log line can rewrite an
admin's terminal. The parser never raises.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from vacfactory import __version__

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



def note(text: str) -> SyslogMessage:
    """A line of the receiver's own, filed among the VM's messages (syslog.warning)."""
    return SyslogMessage(facility=5, severity=4, timestamp=None, hostname=None, app="vacfactory",
                         procid=None, msgid=None, structured_data=None, text=text, format="note")


def is_hostname(text: str) -> bool:
    """A DNS host name (labels of letters, digits and hyphens, at most 253 characters)."""
    return bool(_HOSTNAME.match(text))


def printable_word(text: str, limit: int = MAX_HOST) -> str:
    """``text`` cut to ``limit`` with every character but printable ASCII as ``?``."""
    return _TOKEN_BAD.sub("?", text)[:limit]
