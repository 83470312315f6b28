"""One engine per state directory: an exclusive lock held for the daemon's lifetime.

Two engines on one state directory would each think the other's VMs are zombies, or create
duplicates. flock() is released by the kernel when the process dies, so a kill -9 never
leaves a stale lock behind (unlike a pid file alone).
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from vacfactory.errors import StateError


class StateLock:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "daemon.lock")
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateError(f"another vacfactory daemon (pid {holder}) is using this state directory",
                             path=self.path) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> Optional[int]:
        """The pid of the daemon holding the lock, or None if no daemon runs."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
