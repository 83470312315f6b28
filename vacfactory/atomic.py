"""Crash-safe file writes: the one helper every state or record file goes through.

Maildir's rule: write a temporary file in the same directory, fsync it, rename it over the
final name, fsync the directory. A reader sees either the old file or the new one, never a
partial one, and a crash at any instant leaves at worst a stray ``.tmp-*`` file that
:func:`remove_stale_temporaries` cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

TEMP_PREFIX = ".tmp-"


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (same directory temp file + rename).

    ``sync=False`` skips the fsyncs: still atomic against a killed process, but not against
    a power cut. Use it only for files that are rewritten constantly (heartbeats, counters).
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    with removed_on_failure(tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    if sync:
        fsync_directory(directory)


@contextlib.contextmanager
def removed_on_failure(temp_path: str) -> Iterator[None]:
    """Delete ``temp_path`` (a file being written) if the block fails, whatever the failure
    (a signal too), and let the failure go on."""
    try:
        yield
    except BaseException:
        remove_if_present(temp_path)
        raise


def remove_if_present(path: str) -> None:
    """Unlink ``path``; one that is already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_text(path: str, text: str, mode: int = 0o644, sync: bool = True) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode, sync=sync)


def atomic_write_json(path: str, value: Any, mode: int = 0o644, sync: bool = True) -> None:
    """Replace ``path`` with ``value`` as sorted, indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, sort_keys=True, indent=1) + "\n", mode=mode, sync=sync)


def write_new_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (which must not exist) with ``data``, without a temp file or fsync.

    Only for files inside a directory that is itself still being prepared and will be
    renamed into place atomically (a VM's ``machines/.new-<uuid>``): nobody can see a half
    written file there, and a crash leaves the whole staging directory to be removed.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (large records, signals)
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def fsync_directory(directory: str) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str) -> int:
    """Delete temp files a crash left behind in ``directory``; return how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except (FileNotFoundError, IsADirectoryError):
                pass
    return removed
