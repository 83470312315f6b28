"""A VM's ``joboutputs`` directory, read as hostile input.

The VM writes this directory itself (over NFS, or through the HTTP server's PUT), so every
entry may be a trap: a symlink to ``/etc/shadow`` or to another VM's files, a FIFO that
blocks a reader forever, a device node, a 10 GB sparse file, a million files, a directory
nested a thousand levels deep, a name with a newline in it, or a file swapped for a symlink
between our check and our open. The rules here:

- Every operation is relative to a directory file descriptor opened with ``O_NOFOLLOW``
  (``os.open(..., dir_fd=)``, ``os.stat(..., dir_fd=, follow_symlinks=False)``,
  ``os.unlink(..., dir_fd=)``, ``os.scandir(fd)``), so a VM that swaps a directory for a
  symlink mid-scan can never redirect us outside its directory.
- Files are opened in two steps: ``O_PATH|O_NOFOLLOW`` (which never opens a device or
  blocks on a FIFO), ``fstat`` to require a regular file with one link, then a re-open of that
  same inode through ``/proc/self/fd`` with ``O_NONBLOCK``. What we check is what we read.
- Reads are bounded prefixes; nothing is ever read whole.
- :func:`enforce_limits` deletes whatever breaks the rules or the caps, so disk stays bounded
  even when the VM writes over NFS behind the HTTP server's back.

Names: a VM-chosen name must match ``[A-Za-z0-9_][A-Za-z0-9_.,+=@-]*`` (at most 128
characters) and must not contain ``..``. That excludes ``/``, control characters, spaces,
non-ASCII and hidden files (our own temporary names start with ``.``).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

from vacfactory.core.outcomes import ShutdownMessage, parse_shutdown_message

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "shutdown_message"

#: how much of shutdown_message we ever read: the parser only looks at 4 x MAX_TEXT characters
MESSAGE_READ_BYTES = 1024

#: rejections kept in a report and logged in detail per call; the rest are only counted
MAX_REPORTED = 64
MAX_LOGGED = 16

#: deepest directory level removed in place; deeper subtrees are first moved up (bounded fds)
MAX_DEPTH = 32
#: subdirectory names gathered per directory listing while removing a tree (bounded memory)
REMOVE_BATCH = 512

#: a heartbeat dated further than this into the future is treated as invalid
HEARTBEAT_MAX_FUTURE = 300.0

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,+=@-]{0,127}")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = getattr(os, "O_PATH", 0) | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class JobOutputsLimits:
    """Caps on what one VM may leave in its joboutputs directory."""

    max_file_bytes: int = 10 * 1024 * 1024
    max_total_bytes: int = 100 * 1024 * 1024
    max_files: int = 256

    def __post_init__(self) -> None:
        if self.max_file_bytes < 0 or self.max_total_bytes < 0 or self.max_files < 0:
            raise ValueError("joboutputs limits must not be negative")


@dataclass(frozen=True)
class JobOutputsReport:
    """What a scan found: accepted files, rejected entries (with reasons) and bytes used.

    ``rejected`` names are made printable (``?`` for anything outside printable ASCII) and at
    most :data:`MAX_REPORTED` are kept; ``rejected_count`` counts all of them. ``removed`` is
    the number of filesystem entries :func:`enforce_limits` deleted (a directory tree counts
    every entry in it).
    """

    files: Tuple[Tuple[str, int], ...]
    rejected: Tuple[Tuple[str, str], ...]
    total_bytes: int
    rejected_count: int = 0
    removed: int = 0

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.files)


def valid_name(name: object) -> bool:
    """True if a VM may use ``name`` as a joboutputs file name (see the module rules)."""
    return (
        isinstance(name, str)
        and _NAME.fullmatch(name) is not None
        and ".." not in name
    )


def printable(name: str, limit: int = 80) -> str:
    """A log-safe rendering of a hostile name: printable ASCII only, bounded length."""
    shown = _UNPRINTABLE.sub("?", name[:limit])
    return shown + ("..." if len(name) > limit else "")


def machine_label(joboutputs_dir: str) -> str:
    """The machine directory that owns ``joboutputs_dir``: the prefix of our log lines."""
    return os.path.dirname(os.path.abspath(joboutputs_dir))


def open_directory(path: str) -> int:
    """Open ``path`` as a directory without following a final symlink; raise OSError."""
    return os.open(path, _DIR_FLAGS)


def _disk_bytes(st: os.stat_result) -> int:
    """Bytes a file may cost: apparent size or allocated blocks, whichever is larger."""
    return max(st.st_size, getattr(st, "st_blocks", 0) * 512)


def _kind(mode: int) -> Optional[str]:
    """Why an entry of this type is rejected, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


# --------------------------------------------------------------------------------------------
# reading single files


def read_regular_prefix(dir_fd: int, name: str, max_bytes: int, max_size: int) -> Optional[bytes]:
    """Read at most ``max_bytes`` from the regular file ``name`` in ``dir_fd``.

    None unless ``name`` is a valid name of a regular file with exactly one link and an
    apparent size of at most ``max_size``. Never follows a symlink, never opens a device,
    never blocks on a FIFO.
    """
    if not valid_name(name):
        return None
    try:
        pfd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > max_size:
            return None
        try:
            fd = os.open(f"/proc/self/fd/{pfd}", _READ_FLAGS)
        except OSError:
            return None
        try:
            st2 = os.fstat(fd)
            if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode):
                return None
            chunks: List[bytes] = []
            remaining = max_bytes
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            # Still the only link, and still under this name? (A link count of 1 at open time
            # can also mean our name was just renamed away from a hard-linked file.)
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or os.fstat(fd).st_nlink != 1:
                return None
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def read_shutdown_message(
    joboutputs_dir: str, limits: JobOutputsLimits = JobOutputsLimits()
) -> Optional[ShutdownMessage]:
    """The VM's ``shutdown_message``, parsed; None if absent, unsafe or without a valid code.

    Only the first :data:`MESSAGE_READ_BYTES` bytes are read. A file bigger than
    ``limits.max_file_bytes`` is refused like any other oversize joboutputs file.
    """
    try:
        dir_fd = open_directory(joboutputs_dir)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("%s: joboutputs not readable as a directory: %s",
                        machine_label(joboutputs_dir), e.strerror)
        return None
    try:
        data = read_regular_prefix(dir_fd, SHUTDOWN_MESSAGE, MESSAGE_READ_BYTES,
                                   limits.max_file_bytes)
    finally:
        os.close(dir_fd)
    if data is None:
        return None
    return parse_shutdown_message(data)


def heartbeat_mtime(
    joboutputs_dir: str,
    name: str,
    *,
    now: Optional[float] = None,
    max_future: float = HEARTBEAT_MAX_FUTURE,
) -> Optional[float]:
    """The mtime of the VM's heartbeat file ``name``; None if absent or invalid.

    lstat only (the file is never opened). Invalid: a bad name (it comes from configuration,
    but is treated as untrusted), anything but a regular file with one link, or an mtime more
    than ``max_future`` seconds after ``now`` (a VM must not be able to set its heartbeat far
    ahead with ``touch -d`` and never be judged stale).
    """
    if not valid_name(name):
        log.warning("%s: heartbeat file name %r is not a valid joboutputs name",
                    machine_label(joboutputs_dir), printable(str(name)))
        return None
    try:
        dir_fd = open_directory(joboutputs_dir)
    except OSError:
        return None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return None
    current = time.time() if now is None else now
    if st.st_mtime > current + max_future:
        log.warning("%s: joboutputs/%s has an mtime %.0f s in the future; ignored",
                    machine_label(joboutputs_dir), name, st.st_mtime - current)
        return None
    return st.st_mtime


# --------------------------------------------------------------------------------------------
# scanning and enforcing


@dataclass
class _Scan:
    """Mutable accumulator behind a report (kept private; reports are frozen)."""

    label: str
    files: List[Tuple[str, int]] = field(default_factory=list)
    rejected: List[Tuple[str, str]] = field(default_factory=list)
    rejected_count: int = 0
    total: int = 0
    removed: int = 0
    logged: int = 0

    def reject(self, name: str, reason: str, removed: bool) -> None:
        self.rejected_count += 1
        shown = printable(name)
        if len(self.rejected) < MAX_REPORTED:
            self.rejected.append((shown, reason))
        if self.logged < MAX_LOGGED:
            self.logged += 1
            log.warning("%s: joboutputs/%s rejected: %s%s", self.label, shown, reason,
                        " (removed)" if removed else "")

    def report(self) -> JobOutputsReport:
        if self.rejected_count > self.logged:
            log.warning("%s: %d more joboutputs entries rejected", self.label,
                        self.rejected_count - self.logged)
        return JobOutputsReport(tuple(self.files), tuple(self.rejected), self.total,
                                self.rejected_count, self.removed)


def _judge(dir_fd: int, name: str, limits: JobOutputsLimits, acc: _Scan) -> Tuple[Optional[str], int, bool]:
    """(reason to reject or None, bytes, is_directory) for one entry; reason '' = vanished."""
    if not valid_name(name):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return "bad name", 0, False
        return "bad name", 0, stat.S_ISDIR(st.st_mode)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "", 0, False
    except OSError as e:
        return f"unreadable ({e.strerror})", 0, False
    kind = _kind(st.st_mode)
    if kind is not None:
        return kind, 0, stat.S_ISDIR(st.st_mode)
    if st.st_nlink != 1:
        return "hard link", 0, False
    size = _disk_bytes(st)
    if size > limits.max_file_bytes:
        return f"file too big ({size} > {limits.max_file_bytes} bytes)", size, False
    if len(acc.files) >= limits.max_files:
        return f"too many files (more than {limits.max_files})", size, False
    if acc.total + size > limits.max_total_bytes:
        return f"over the per-VM total of {limits.max_total_bytes} bytes", size, False
    return None, size, False


def _entries(dir_fd: int, protect: Sequence[str]) -> Iterable[str]:
    """Protected names first (so they win the count and total), then the rest, streamed."""
    for name in protect:
        yield name
    skip = set(protect)
    with os.scandir(dir_fd) as it:
        for entry in it:
            if entry.name not in skip:
                yield entry.name


def _scan_fd(dir_fd: int, limits: JobOutputsLimits, label: str, remove: bool,
             protect: Sequence[str]) -> JobOutputsReport:
    acc = _Scan(label)
    for name in _entries(dir_fd, protect):
        reason, size, is_dir = _judge(dir_fd, name, limits, acc)
        if reason is None:
            acc.files.append((name, size))
            acc.total += size
            continue
        if reason == "":
            continue  # protected name absent, or vanished under us
        removed = False
        if remove:
            count = _remove_entry(dir_fd, name, is_dir, label)
            acc.removed += count
            removed = count > 0
        acc.reject(name, reason, removed)
    return acc.report()


def _protect_list(protect: Iterable[str]) -> Tuple[str, ...]:
    names = [SHUTDOWN_MESSAGE]
    for name in protect:
        if valid_name(name) and name not in names:
            names.append(name)
    return tuple(names)


def _run(joboutputs_dir: str, limits: JobOutputsLimits, remove: bool,
         protect: Iterable[str]) -> JobOutputsReport:
    label = machine_label(joboutputs_dir)
    try:
        dir_fd = open_directory(joboutputs_dir)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return JobOutputsReport((), (), 0)
        log.error("%s: joboutputs is not a directory we can open (%s); left alone",
                  label, e.strerror)
        return JobOutputsReport((), ((".", f"not a directory ({e.strerror})"),), 0, 1)
    try:
        return _scan_fd(dir_fd, limits, label, remove, _protect_list(protect))
    finally:
        os.close(dir_fd)


def scan(joboutputs_dir: str, limits: JobOutputsLimits = JobOutputsLimits(),
         protect: Iterable[str] = ()) -> JobOutputsReport:
    """Classify every entry of ``joboutputs_dir`` without reading or changing anything.

    Files are accepted in this order until a cap is hit: ``shutdown_message``, the names in
    ``protect`` (e.g. the machinetype's heartbeat file), then directory order.
    """
    return _run(joboutputs_dir, limits, False, protect)


def enforce_limits(joboutputs_dir: str, limits: JobOutputsLimits = JobOutputsLimits(),
                   protect: Iterable[str] = ()) -> JobOutputsReport:
    """Like :func:`scan`, and delete every rejected entry so disk use stays within the caps.

    Symlinks are removed themselves (never their targets), subdirectories recursively without
    following links, and files beyond the count or total are removed in scan order.
    """
    return _run(joboutputs_dir, limits, True, protect)


# --------------------------------------------------------------------------------------------
# removal that never leaves the directory


def _remove_entry(dir_fd: int, name: str, is_dir: bool, label: str) -> int:
    """Remove one entry of ``dir_fd``; return how many filesystem entries went."""
    if not is_dir:
        try:
            os.unlink(name, dir_fd=dir_fd)
            return 1
        except FileNotFoundError:
            return 0
        except IsADirectoryError:
            pass  # swapped for a directory since we looked
        except OSError as e:
            log.error("%s: cannot remove joboutputs/%s: %s", label, printable(name), e.strerror)
            return 0
    return remove_tree(dir_fd, name, label)


@dataclass
class _Frame:
    parent_fd: int
    name: str
    fd: int
    batch: List[str] = field(default_factory=list)
    listed: bool = False
    more: bool = False
    attempts: int = 0


def _list_batch(frame: _Frame) -> int:
    """Unlink the non-directories of ``frame`` and gather up to REMOVE_BATCH subdirectories."""
    removed = 0
    frame.batch = []
    frame.more = False
    with os.scandir(frame.fd) as it:
        for entry in it:
            try:
                st = os.stat(entry.name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if len(frame.batch) < REMOVE_BATCH:
                    frame.batch.append(entry.name)
                else:
                    frame.more = True
                continue
            try:
                os.unlink(entry.name, dir_fd=frame.fd)
                removed += 1
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                frame.more = True
            except OSError as e:
                log.error("cannot remove joboutputs entry %s: %s", printable(entry.name),
                          e.strerror)
    frame.listed = True
    return removed


def remove_tree(top_fd: int, name: str, label: str = "") -> int:
    """Remove directory ``name`` of ``top_fd`` and all below it; never follow a symlink.

    Every step is relative to a directory fd opened with ``O_NOFOLLOW``; an entry that turns
    into a symlink under us is unlinked as a link. At most :data:`MAX_DEPTH` directory fds are
    held: a deeper subtree is first renamed up into ``top_fd`` and removed from there, so
    arbitrarily deep nesting costs neither recursion nor fds. Returns the entries removed.
    """
    pending = [name]
    removed = 0
    while pending:
        current = pending.pop()
        try:
            removed += _remove_one_tree(top_fd, current, pending, label)
        except OSError as e:
            log.error("%s: cannot remove joboutputs directory %s: %s", label,
                      printable(current), e.strerror)
    return removed


_moved_serial = itertools.count(1)


def _remove_one_tree(top_fd: int, name: str, pending: List[str], label: str) -> int:
    """Remove one subtree of ``top_fd``; parts deeper than MAX_DEPTH are moved onto ``pending``."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=top_fd)
    except FileNotFoundError:
        return 0
    except OSError:
        return _unlink_quietly(top_fd, name, label)  # became a symlink or a file
    removed = 0
    stack = [_Frame(top_fd, name, fd)]
    try:
        while stack:
            frame = stack[-1]
            if not frame.batch and (not frame.listed or frame.more):
                removed += _list_batch(frame)
            if frame.batch:
                sub = frame.batch.pop()
                if len(stack) >= MAX_DEPTH:
                    moved = f".vfdeep-{os.getpid()}-{next(_moved_serial)}"
                    os.rename(sub, moved, src_dir_fd=frame.fd, dst_dir_fd=top_fd)
                    pending.append(moved)
                    continue
                try:
                    child = os.open(sub, _DIR_FLAGS, dir_fd=frame.fd)
                except FileNotFoundError:
                    continue
                except OSError:
                    removed += _unlink_quietly(frame.fd, sub, label)
                    continue
                stack.append(_Frame(frame.fd, sub, child))
                continue
            stack.pop()
            os.close(frame.fd)
            removed += _rmdir_or_retry(frame, stack, label)
    finally:
        for frame in stack:
            os.close(frame.fd)
    return removed


def _rmdir_or_retry(frame: _Frame, stack: List[_Frame], label: str) -> int:
    """rmdir an emptied directory; if a live VM refilled it, list it again (3 times at most)."""
    try:
        os.rmdir(frame.name, dir_fd=frame.parent_fd)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as e:
        if e.errno == errno.ENOTEMPTY and frame.attempts < 3:
            try:
                again = os.open(frame.name, _DIR_FLAGS, dir_fd=frame.parent_fd)
            except OSError:
                return 0
            stack.append(_Frame(frame.parent_fd, frame.name, again, attempts=frame.attempts + 1))
            return 0
        log.error("%s: cannot remove joboutputs directory %s: %s", label,
                  printable(frame.name), e.strerror)
        return 0


def _unlink_quietly(dir_fd: int, name: str, label: str) -> int:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.error("%s: cannot remove joboutputs entry %s: %s", label, printable(name), e.strerror)
        return 0


# --------------------------------------------------------------------------------------------
# what the HTTP server needs before accepting an upload


@dataclass(frozen=True)
class Usage:
    """Entries and bytes already in a joboutputs directory, excluding one name."""

    entries: int
    total_bytes: int
    complete: bool  # False: more than ``max_entries`` entries, counting stopped


def usage_fd(dir_fd: int, exclude: str, max_entries: int) -> Usage:
    """Count the entries of ``dir_fd`` (except ``exclude``) and the bytes of its regular files.

    Bounded work: stops after ``max_entries`` entries, because a VM writing over NFS can make
    the directory arbitrarily large and the HTTP server must not stall on it.
    """
    entries = 0
    total = 0
    with os.scandir(dir_fd) as it:
        for entry in it:
            if entry.name == exclude:
                continue
            entries += 1
            if entries > max_entries:
                return Usage(entries, total, False)
            try:
                st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += _disk_bytes(st)
    return Usage(entries, total, True)
