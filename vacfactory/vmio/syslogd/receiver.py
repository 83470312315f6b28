"""The syslog receiver itself (the I/O part): UDP sockets, one receive thread, each VM's
open file and counters, and forwarding to the site's central syslog.

A datagram is read into a bounded buffer (:attr:`SyslogLimits.max_datagram`, 8 KiB; more is
cut and counted as truncated); one over its VM's rate costs a lookup and a subtraction. Drops
for the rate are summarised in the VM's file (and logged) at most once a minute; when a VM's
cap is reached one last line says so, filing stops and the drops are counted.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from vacfactory.vmio.registry import normalise_address
from vacfactory.vmio.syslogd.files import open_messages, vm_hostname
from vacfactory.vmio.syslogd.message import SyslogMessage, format_forward, format_line, note, parse_message
from vacfactory.vmio.syslogd.policy import CAP_NOTE_RESERVE, SyslogLimits, TokenBucket

log = logging.getLogger(__name__)

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
#: unknown source addresses logged by name; the rest are only counted
MAX_UNKNOWN_LOGGED = 32
#: a flooding VM is named in the log, and its drops summarised in its file, at most this often
RATE_NOTE_SECONDS = 60.0
#: how often an unresolvable forward target is looked up again
FORWARD_RESOLVE_SECONDS = 60.0

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

    __slots__ = ("address", "machine_dir", "bucket", "fd", "day", "bytes", "used",
                 "full", "rate_dropped", "rate_logged", "summarised", "error_logged", "hostname")

    def __init__(self, address: str, machine_dir: str, burst: int, now: float) -> None:
        self.address = address
        self.machine_dir = machine_dir
        self.bucket = TokenBucket(burst, now)
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
        address = normalise_address(address)
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
        if not vm.bucket.take(now, self.limits.rate_per_second, self.limits.burst):
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
            lines.append(format_line(note(
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
            cap_line = format_line(note(
                f"syslog of this VM reached {self.limits.max_bytes_per_vm} bytes; "
                "further messages are not filed"), now).encode("utf-8")
            try:
                vm.bytes += os.write(fd, cap_line[:CAP_NOTE_RESERVE])
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
        fd, vm.bytes = open_messages(vm.machine_dir, day)
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
            vm.hostname = vm_hostname(vm.machine_dir)
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

