"""The ``root_public_key`` file: which OpenSSH public keys VMs are offered for root.

Vac's rule, kept: a key file that cannot be read never stops a VM; Vac logged "no ssh
access" and created the VM without a key, and so do we (``example.vac.conf`` names
``/root/.ssh/id_rsa.pub``, which many hosts lack). The file may hold several keys, written
as in ``authorized_keys``: blank lines and ``#`` comments are skipped, a line may start with
options (``from="10.0.0.0/8",no-pty ssh-ed25519 AAAA... comment``). Every valid line is offered,
options kept (dropping a ``from=`` restriction would widen access); a line that is not a key
is skipped with a warning naming ``file:line``.

:func:`read_public_keys` only reads (it never raises and never logs), :func:`key_file_problems`
says what is wrong in words ``config check`` can print too, and :class:`KeyFileNotices` logs
those words once per file and change, not at every VM creation.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

#: OpenSSH public key types (``ssh-keygen -t``), as the first field of a key
KEY_TYPE = re.compile(r"ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)"
                      r"|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com")
#: ``authorized_keys`` options before the key: ``name`` or ``name="value"``, comma-separated
_OPTION = r'[A-Za-z0-9-]+(?:="(?:[^"\\]|\\.)*")?'
_OPTIONS = re.compile(rf"{_OPTION}(?:,{_OPTION})*(?=[ \t])")
#: an authorized_keys file of a few dozen RSA-4096 keys fits easily
MAX_KEY_FILE = 65536


@dataclass(frozen=True)
class KeyFile:
    """What a key file offers: its valid key lines, and why anything else was left out."""

    path: str
    #: each valid line, stripped, options kept
    keys: Tuple[str, ...] = ()
    #: (line number, why) of each non-blank, non-comment line that is not a key
    skipped: Tuple[Tuple[int, str], ...] = ()
    #: why the file offers nothing at all ("no such file", ...); None if it could be read
    unreadable: Optional[str] = None


def read_public_keys(path: str) -> KeyFile:
    """The keys in ``path``; never raises (a file that cannot be read offers no key)."""
    try:
        data = _read_small_regular_file(path)
    except _Unreadable as why:
        return KeyFile(path, unreadable=str(why))
    keys: List[str] = []
    skipped: List[Tuple[int, str]] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            continue
        why = public_key_line_problem(line)
        if why:
            skipped.append((number, why))
        else:
            keys.append(line.decode("utf-8"))
    return KeyFile(path, tuple(keys), tuple(skipped))


def public_key_line_problem(line: bytes) -> str:
    """Why ``line`` is not an ``authorized_keys`` key line (``[OPTIONS] TYPE BASE64
    [COMMENT]``); "" if it is one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if any(ord(c) < 32 and c != "\t" or 127 <= ord(c) < 160 for c in text):
        return "control characters"
    fields = text.split(None, 1)
    if not KEY_TYPE.fullmatch(fields[0]):
        options = _OPTIONS.match(text)
        fields = text[options.end():].split(None, 1) if options else []
        if not fields or not KEY_TYPE.fullmatch(fields[0]):
            return "it must start with a key type such as ssh-ed25519 or ssh-rsa (after any options)"
    key_type = fields[0]
    rest = fields[1].split(None, 1) if len(fields) > 1 else []
    if not rest:
        return "no key data after the key type"
    try:
        blob = base64.b64decode(rest[0], validate=True)
    except (binascii.Error, ValueError):
        return "the key is not base64"
    # the key blob starts with its own type name (RFC 4253 6.6)
    if len(blob) < 4 or blob[4:4 + struct.unpack(">I", blob[:4])[0]] != key_type.encode():
        return f"the key data is not a {key_type} key"
    return ""


def key_file_problems(keys: KeyFile, origin: str = "default") -> List[str]:
    """Warnings about ``keys`` (empty if every line is a key), each naming the file and
    where ``root_public_key`` was set (``origin``: "file:line" or "default")."""
    where = _where(origin)
    problems = [f"{keys.path}:{number}: skipped, not an OpenSSH public key line ({why}) ({where})"
                for number, why in keys.skipped]
    if keys.unreadable is not None:
        problems.append(f"no ssh access: cannot read {keys.path}: {keys.unreadable} ({where})")
    elif not keys.keys:
        problems.append(f"no ssh access: no public key in {keys.path} ({where})")
    return problems


def _where(origin: str) -> str:
    return "root_public_key default" if origin == "default" else f"root_public_key from {origin}"


class KeyFileNotices:
    """Logs :func:`key_file_problems` once per file and change: a VM is created every few
    seconds on a busy factory, and the same missing file must not fill the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Dict[str, Tuple[str, ...]] = {}

    def report(self, keys: KeyFile, origin: str = "default") -> None:
        problems = tuple(key_file_problems(keys, origin))
        with self._lock:
            if self._last.get(keys.path) == problems:
                return
            self._last[keys.path] = problems
        for problem in problems:
            log.warning("%s", problem)
        if not problems and keys.keys:
            log.info("root_public_key %s: %d key(s) offered to VMs", keys.path, len(keys.keys))


class _Unreadable(Exception):
    pass


def _read_small_regular_file(path: str) -> bytes:
    """The bytes of ``path``, a regular file of at most MAX_KEY_FILE bytes (a FIFO or a
    device must not hang or flood the engine)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise _Unreadable("no such file" if error.errno == errno.ENOENT else error.strerror) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Unreadable("not a regular file")
        chunks = []
        size = 0
        while size <= MAX_KEY_FILE:
            chunk = os.read(fd, MAX_KEY_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_KEY_FILE:
            raise _Unreadable(f"over {MAX_KEY_FILE} bytes: not a public key file")
        return b"".join(chunks)
    except OSError as error:
        raise _Unreadable(error.strerror) from None
    finally:
        os.close(fd)
