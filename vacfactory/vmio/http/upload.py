"""Joboutputs uploads: a PUT's body goes into an anonymous file in the VM's ``joboutputs``
directory and is linked in under its name only when complete; uploads in flight count
against the VM's caps (files, bytes) before they land.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from typing import Dict, List, Optional, Tuple

from vacfactory.vmio import joboutputs as jo
from vacfactory.vmio.http.routes import UploadTarget
from vacfactory.vmio.http.wire import HTTPError
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.registry import VMEndpoint


class Upload:
    """One PUT in progress: an anonymous file in the VM's joboutputs, linked in when complete.

    ``O_TMPFILE`` makes the partial body invisible (to the VM over NFS, to scans) and makes
    it vanish by itself if the client disconnects or we crash.
    """

    def __init__(self, target: UploadTarget, length: int, dir_fd: int, fd: int,
                 temp_name: Optional[str]) -> None:
        self.target = target
        self.length = length
        self.received = 0
        self.dir_fd = dir_fd
        self.fd = fd
        self.temp_name = temp_name  # only when O_TMPFILE was unavailable
        self.started = time.monotonic()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.received += len(data)

    def commit(self) -> None:
        """Put the complete body in place as joboutputs/NAME, atomically."""
        name = self.target.name
        try:
            st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(403, "refusing to replace a non-regular file")
        except FileNotFoundError:
            pass
        os.fchmod(self.fd, 0o644)
        temp = self.temp_name
        if temp is None:
            temp = _temp_name()
            os.link(f"/proc/self/fd/{self.fd}", temp, dst_dir_fd=self.dir_fd, follow_symlinks=True)
        try:
            os.rename(temp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError:
            _unlink_at(self.dir_fd, temp)
            raise
        self.temp_name = None

    def abandon(self) -> None:
        if self.temp_name is not None:
            _unlink_at(self.dir_fd, self.temp_name)
            self.temp_name = None

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _temp_name() -> str:
    return f".vfput-{secrets.token_hex(8)}"


def open_upload_file(dir_fd: int) -> Tuple[int, Optional[str]]:
    """A new file in ``dir_fd`` for a body: anonymous (O_TMPFILE) if the filesystem can, else
    a hidden temporary name that :meth:`Upload.abandon` removes; (fd, that name or None)."""
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    if o_tmpfile:
        try:
            return os.open(".", os.O_WRONLY | o_tmpfile | os.O_CLOEXEC, 0o600, dir_fd=dir_fd), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    name = _temp_name()
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    return fd, name


class InFlight:
    """Bytes and files of the uploads in progress, per VM, so that parallel PUTs cannot
    together pass the caps that each alone would respect."""

    def __init__(self) -> None:
        self._reserved: Dict[str, List[int]] = {}  # vm uuid -> [bytes, files]

    def reserve(self, uuid: str, length: int) -> None:
        reserved = self._reserved.setdefault(uuid, [0, 0])
        reserved[0] += length
        reserved[1] += 1

    def release(self, uuid: str, length: int) -> None:
        reserved = self._reserved.get(uuid)
        if reserved is not None:
            reserved[0] -= length
            reserved[1] -= 1
            if reserved[1] <= 0:
                self._reserved.pop(uuid, None)

    def refusal(self, vm: VMEndpoint, name: str, length: int, dir_fd: int,
                limits: JobOutputsLimits) -> Optional[str]:
        """Why storing ``length`` more bytes as ``name`` would pass a cap, or None."""
        in_flight = self._reserved.get(vm.uuid, [0, 0])
        usage = jo.usage_fd(dir_fd, name, limits.max_files + 16)
        if not usage.complete or usage.entries + in_flight[1] + 1 > limits.max_files:
            return f"over the limit of {limits.max_files} files"
        if usage.total_bytes + in_flight[0] + length > limits.max_total_bytes:
            return f"over the per-VM limit of {limits.max_total_bytes} bytes"
        return None
