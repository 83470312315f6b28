"""The outgoing queue: a dirq ``QueueSimple`` directory that the real ``ssmsend`` consumes.

``ssmsend`` (``path_type: dirq``) reads exactly this layout: ``<8 hex>/<14 hex>`` element
files; any other name is silently ignored by it, so every name is checked here.
A body is written to a temporary file and hard-linked to its final name (dirq's
``add_path``): a reader (or a crash) never sees a partial element under a valid name.

Durability: a queued job record is a hard link to its archive file, which was fsynced
before, so its content survives a power cut; the new directory entry is not fsynced (dirq
does not either). After a power cut ``vacfactory apel republish --since DATE`` re-queues
what the queue may have lost. A kill of the process loses nothing: link/rename are atomic.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

from dirq.QueueSimple import QueueSimple

from vacfactory.atomic import TEMP_PREFIX, remove_if_present, write_new_file
from vacfactory.errors import AccountingError

log = logging.getLogger(__name__)

ELEMENT_NAME = re.compile(r"[0-9a-f]{8}/[0-9a-f]{14}")
_CANNOT_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
_DIRECTORY = re.compile(r"[0-9a-f]{8}")
_ELEMENT_FILE = re.compile(r"[0-9a-f]{14}")
#: stale temporaries and locks older than these are cleared (ssmsend's own values)
MAX_TEMP_SECONDS = 300
MAX_LOCK_SECONDS = 600


@dataclass(frozen=True)
class Backlog:
    """How much is waiting: for ``apel status`` and monitoring."""

    count: int
    locked: int
    #: enqueue time of the oldest element (epoch seconds, from its name), None if empty
    oldest: Optional[int]


def is_element_name(name: str) -> bool:
    """True if ssmsend would see this element (``8hex/14hex``)."""
    return bool(ELEMENT_NAME.fullmatch(name))


class OutgoingQueue:
    """A dirq QueueSimple at ``path``, created on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
            self._queue = QueueSimple(path)
        except OSError as error:
            raise AccountingError(f"cannot open outgoing queue {path}: {error}") from error

    def add(self, body: str, link_from: Optional[str] = None) -> str:
        """Queue one message body; return its element name (``8hex/14hex``).

        The body goes into a temporary file beside the queue's directories, and dirq's
        ``add_path`` links that under a fresh element name and removes the temporary. With
        ``link_from`` (the archive file holding exactly ``body``) the temporary is a hard
        link to it instead of a copy: no second inode or data write, the queued body *is*
        the archived one, and it is as durable as the fsynced archive file. A copy is made
        when linking is impossible (another file system).

        (Not ``QueueSimple.add``: it retries forever when creating its file fails with
        anything but ENOENT, e.g. on a full disk, which would hang the daemon.)
        """
        try:
            data = body.encode("ascii")  # ssmsend decodes bodies as ASCII
        except UnicodeEncodeError as error:
            raise AccountingError(f"refusing to queue a non-ASCII message into {self.path}: {error}") from None
        tmp = os.path.join(self.path, TEMP_PREFIX + secrets.token_hex(8))
        try:
            try:
                self._stage(tmp, data, link_from)
            except FileNotFoundError:  # the queue directory was removed under us
                os.makedirs(self.path, mode=0o755, exist_ok=True)
                self._stage(tmp, data, link_from)
            name = self._queue.add_path(tmp)
        except OSError as error:
            remove_if_present(tmp)
            raise AccountingError(f"cannot queue into {self.path}: {error}") from error
        if not is_element_name(name):
            raise AccountingError(f"dirq produced {name!r}, which ssmsend would never send")
        return name

    @staticmethod
    def _stage(tmp: str, data: bytes, link_from: Optional[str]) -> None:
        if link_from is not None:
            try:
                os.link(link_from, tmp)
                return
            except OSError as error:
                if error.errno not in _CANNOT_LINK:
                    raise
        write_new_file(tmp, data)

    def names(self) -> Iterator[str]:
        """Element names, oldest first (dirq's own iteration)."""
        for name in self._queue:
            yield name

    def element_path(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read(self, name: str) -> bytes:
        """Read an element without locking it (status, tests)."""
        with open(self.element_path(name), "rb") as f:
            return f.read()

    def lock(self, name: str) -> bool:
        return bool(self._queue.lock(name, permissive=True))

    def unlock(self, name: str) -> None:
        self._queue.unlock(name, permissive=True)

    def get_locked(self, name: str) -> bytes:
        return self._queue.get(name)

    def remove_locked(self, name: str) -> None:
        self._queue.remove(name)

    def count(self) -> int:
        return self._queue.count()

    def purge(self) -> None:
        """Clear stale ``.tmp`` and ``.lck`` files and empty directories, like ssmsend does,
        and our own temporaries that a killed producer left beside the directories."""
        try:
            self._queue.purge(maxtemp=MAX_TEMP_SECONDS, maxlock=MAX_LOCK_SECONDS)
            with os.scandir(self.path) as entries:
                stale = [e.path for e in entries if e.name.startswith(TEMP_PREFIX)
                         and time.time() - e.stat().st_mtime > MAX_TEMP_SECONDS]
            for path in stale:
                remove_if_present(path)
        except OSError as error:
            log.warning("%s: purge failed: %s", self.path, error)

    def backlog(self) -> Backlog:
        return backlog_of(self.path)


def backlog_of(path: str) -> Backlog:
    """Count a queue directory without creating or locking anything (``apel status``)."""
    count = locked = 0
    oldest: Optional[int] = None
    for directory in _hex_dirs(path):
        for entry in os.listdir(os.path.join(path, directory)):
            if _ELEMENT_FILE.fullmatch(entry):
                count += 1
                stamp = int(entry[:8], 16)
                oldest = stamp if oldest is None else min(oldest, stamp)
            elif entry.endswith(".lck"):
                locked += 1
    return Backlog(count=count, locked=locked, oldest=oldest)


_producers: Dict[str, OutgoingQueue] = {}
_producers_lock = threading.Lock()


def producer(path: str) -> OutgoingQueue:
    """A shared queue object for adding at ``path`` (one per process: opening costs syscalls).

    Safe to share between threads: dirq's add() keeps no state between calls, and it
    re-creates directories that disappeared.
    """
    with _producers_lock:
        queue = _producers.get(path)
        if queue is None:
            queue = _producers[path] = OutgoingQueue(path)
        return queue


def _hex_dirs(path: str) -> Iterator[str]:
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in sorted(names):
        if _DIRECTORY.fullmatch(name):
            yield name


def age_seconds(stamp: Optional[int], now: Optional[float] = None) -> Optional[float]:
    """Age of an element stamp; None for an empty queue."""
    if stamp is None:
        return None
    return max(0.0, (time.time() if now is None else now) - stamp)
