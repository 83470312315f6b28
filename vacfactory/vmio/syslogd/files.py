"""A VM's syslog files on disk (the I/O part of filing): opening ``messages`` safely,
rotation at midnight UTC, listing, retention.

Files are opened relative to directory descriptors opened with ``O_NOFOLLOW``, the log file
with ``O_APPEND|O_NOFOLLOW|O_NONBLOCK`` and checked to be a regular file with one link: no
symlink, FIFO or device is ever written through.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from vacfactory.vmio.syslogd.message import is_hostname, printable_word

log = logging.getLogger(__name__)

SYSLOG_DIR = "syslog"
MESSAGES = "messages"
ROTATED = re.compile(r"messages-([0-9]{8})(?:\.([0-9]{1,3}))?\Z")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FILE_MODE = 0o640
_DIR_MODE = 0o750


def open_messages(machine_dir: str, day: int) -> Tuple[int, int]:
    """(an append descriptor of ``<machine_dir>/syslog/messages``, the bytes of all the VM's
    syslog files); the directory is made if missing and yesterday's file rotated first."""
    dir_fd = os.open(machine_dir, _DIR_FLAGS)
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
        return fd, _total_bytes(syslog_fd)
    finally:
        os.close(syslog_fd)


def vm_hostname(machine_dir: str) -> str:
    """The VM's name as the factory gave it (vm.json), else its UUID: never what it claims."""
    try:
        with open(os.path.join(machine_dir, "vm.json"), "rb") as f:
            name = json.loads(f.read(65536)).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and is_hostname(name):
        return name
    return printable_word(os.path.basename(machine_dir.rstrip("/"))) or "-"


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
