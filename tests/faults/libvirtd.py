"""libvirt daemons the fault suite may stop: a private test-driver libvirtd, and a relay.

The system libvirtd (qemu:///system) is shared with other people and must never be stopped
or restarted. So:

- :class:`PrivateLibvirtd` is an unprivileged libvirtd that this suite starts and stops by
  its own PID. It loads no hypervisor driver, only serves libvirt's *test driver*, and is
  reached as root through ``test+unix:///default?socket=...``. Its domains live in that
  daemon, not in the factory process, so they outlive a ``kill -9`` of the factory, exactly
  as real VMs do. Stopping it loses its domains (the test driver keeps them in memory).
- :class:`SocketRelay` sits between a factory and the *system* libvirtd's socket. ``cut()``
  closes every relayed connection and removes the relay's socket, ``restore()`` listens
  again: to the factory that is a libvirtd stop and restart, while the real daemon and the
  real TCG VMs keep running, as they do across a real libvirtd restart (qemu processes
  survive it; a VM that powers off meanwhile is gone when the factory looks again).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import List, Optional, Tuple

SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"


def searchable_tempdir(prefix: str, mode: int = 0o755) -> str:
    """A directory under /tmp that libvirt-qemu and nobody can traverse."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, mode)
    return path


class PrivateLibvirtd:
    """An unprivileged libvirtd serving only the test driver, started and stopped by PID."""

    def __init__(self, base: Optional[str] = None) -> None:
        self.base = base or searchable_tempdir("vffault-libvirtd-")
        self.runtime = os.path.join(self.base, "run")
        self.socket = os.path.join(self.runtime, "libvirt", "libvirt-sock")
        self.uri = f"test+unix:///default?socket={self.socket}"
        self.log_path = os.path.join(self.base, "libvirtd.log")
        self.process: Optional[subprocess.Popen] = None
        for sub in ("run", "home", "drivers"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        subprocess.run(["chown", "-R", "nobody:nogroup", self.runtime, os.path.join(self.base, "home")],
                       check=True)

    def start(self) -> None:
        home = os.path.join(self.base, "home")
        env = {
            "PATH": os.defpath, "HOME": home, "XDG_RUNTIME_DIR": self.runtime,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
            # an empty driver directory: no qemu driver, so no capability probing
            "LIBVIRT_DRIVER_DIR": os.path.join(self.base, "drivers"),
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/sbin/libvirtd"],
            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"private libvirtd exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"private libvirtd did not answer on {self.socket}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socket)
                return True
            except OSError:
                return False

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 15 s) this daemon only; its domains are gone with it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if os.path.exists(self.socket):  # a killed daemon leaves it; the next start replaces it
            os.unlink(self.socket)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class SocketRelay:
    """A unix-socket relay that can go dark like a stopped libvirtd (see the module doc)."""

    def __init__(self, path: str, target: str = SYSTEM_SOCKET) -> None:
        self.path = path
        self.target = target
        self._listener: Optional[socket.socket] = None
        self._pairs: List[Tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.accepted = 0

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def restore(self) -> None:
        """Listen (again)."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="relay-accept", daemon=True).start()

    start = restore

    def cut(self) -> None:
        """Drop every relayed connection and stop accepting, as a libvirtd that stopped."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    stop = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
                self.accepted += 1
            pair = (client, upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, pair), name="relay-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:  # the first pump to finish closes the pair
            if pair not in self._pairs:
                return
            self._pairs.remove(pair)
        for s in pair:
            s.close()
