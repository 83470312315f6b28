"""The VMs' HTTP server itself: sockets, the ``selectors`` loop, deadlines (the I/O part).

One thread runs a ``selectors`` loop over non-blocking sockets (the stdlib
ThreadingHTTPServer measured far slower per core and needs a thread per idle keep-alive
connection). What the bytes of a connection mean is :mod:`.exchange` (requests parsed by
:mod:`.wire`, answered by :mod:`.routes`, bodies stored by :mod:`.upload`); who may connect
and whose request goes next is :mod:`.fairness`; each connection's state is explicit
(:class:`~.connection.ConnState`). Every connection has deadlines (a slow-loris head gets
10 s in total), and one bad connection can only ever close itself.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from vacfactory.errors import ExportError
from vacfactory.vmio.http.connection import CLOSED, CLOSING, LINGERING, OUT_HIGH_WATER, Connection, Timeouts
from vacfactory.vmio.http.exchange import Exchange, PeerWarnings
from vacfactory.vmio.http.fairness import RoundRobin, Shares
from vacfactory.vmio.http.routes import METADATA_ADDRESS, MJF_ADDRESS, Router
from vacfactory.vmio.http.wire import response_bytes
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.registry import VMRegistry, normalise_address

log = logging.getLogger(__name__)

RECV_BYTES = 65536
#: how long a closed connection may go on sending before we stop draining it
LINGER_SECONDS = 2.0
SWEEP_SECONDS = 0.5


class MetadataServer:
    """MJF + metadata + joboutputs over HTTP/1.1, on every address in ``bind``.

    ``start()`` binds (errors raise here, in the caller) and runs the loop in a daemon thread;
    ``stop()`` ends it and closes every socket. ``bound_addresses`` gives the real (host, port)
    pairs, useful with port 0. ``mjf_base_url``/``metadata_base_url`` are what meta_data.json
    tells VMs: :func:`~.routes.base_url` of the two addresses and the port VMs reach
    (``http_port``).

    Fairness (:mod:`.fairness`): each registered VM may hold its share of ``max_connections``
    (at most ``max_connections_per_vm``); an unregistered address is closed at accept unless
    ``max_unidentified_connections`` opens a pool for token-only clients (at most
    ``max_connections_per_address`` each), and a connection in it that fails to identify
    itself is closed after its answer; requests are served round-robin over VMs.
    """

    def __init__(
        self,
        registry: VMRegistry,
        bind: Sequence[Tuple[str, int]],
        limits: JobOutputsLimits = JobOutputsLimits(),
        mjf_base_url: str = f"http://{MJF_ADDRESS}",
        metadata_base_url: str = f"http://{METADATA_ADDRESS}",
        *,
        max_connections: int = 512,
        max_connections_per_vm: int = 16,
        max_unidentified_connections: int = 0,
        max_connections_per_address: int = 4,
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.router = Router(registry, mjf_base_url, metadata_base_url)
        self.warnings = PeerWarnings()
        self.exchange = Exchange(self.router, limits, timeouts, self.warnings)
        self.shares = Shares(registry, max_connections, max_connections_per_vm,
                             max_unidentified_connections, max_connections_per_address)
        self.timeouts = timeouts
        self._bind = list(bind)
        self._listeners: List[socket.socket] = []
        self._conns: Dict[int, Connection] = {}
        self._turns = RoundRobin()
        self._sel: Optional[selectors.BaseSelector] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None

    # lifecycle -------------------------------------------------------------------------

    @property
    def bound_addresses(self) -> List[Tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    def start(self) -> None:
        if self._thread is not None:
            raise ExportError("metadata server already started")
        sel = selectors.DefaultSelector()
        try:
            for host, port in self._bind:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(1024)
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, None)
        except OSError as e:
            for sock in self._listeners:
                sock.close()
            self._listeners = []
            sel.close()
            raise ExportError(f"metadata server cannot listen on {self._bind}: {e}") from e
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel = sel
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="vmio-http", daemon=True)
        self._thread.start()
        log.info("metadata/MJF server listening on %s",
                 ", ".join(f"{h}:{p}" for h, p in self.bound_addresses))

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        self._thread.join(timeout=10)
        self._thread = None
        for conn in list(self._conns.values()):
            self._close(conn)
        self._turns.clear()
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        log.info("metadata/MJF server stopped")

    def __enter__(self) -> "MetadataServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def vm_share(self) -> int:
        """How many connections one registered VM may hold now (:meth:`.Shares.vm_share`)."""
        return self.shares.vm_share()

    # event loop ------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        next_sweep = time.monotonic() + SWEEP_SECONDS
        while not self._stopping.is_set():
            try:
                next_sweep = self._run_once(next_sweep)
            except Exception:  # noqa: BLE001 - the server must outlive any bug in one round
                log.exception("metadata server loop error; continuing")
                time.sleep(0.1)

    def _run_once(self, next_sweep: float) -> float:
        assert self._sel is not None
        for key, mask in self._sel.select(timeout=0 if self._turns else SWEEP_SECONDS):
            if key.data is None:
                self._accept(key.fileobj)  # type: ignore[arg-type]
            elif key.data == "wake":
                try:
                    self._wake_r.recv(64)  # type: ignore[union-attr]
                except OSError:
                    pass
            else:
                self._serve_event(key.data, mask)
        self._serve_turn()
        now = time.monotonic()
        if now >= next_sweep:
            self._sweep(now)
            return now + SWEEP_SECONDS
        return next_sweep

    def _serve_event(self, conn: Connection, mask: int) -> None:
        # One connection's failure must never take the server down: anything unexpected is
        # logged with its traceback and costs only that connection.
        try:
            if conn.state is LINGERING:
                self._drain(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and conn.state.reads_requests:
                self._readable(conn)
            self._update(conn)
        except Exception:  # noqa: BLE001 - isolation boundary, see comment above
            log.exception("%s: internal error serving a connection; closed", conn.peer)
            self._close(conn)

    def _serve_turn(self) -> None:
        """One turn of the round-robin: one request of each owner that has one waiting."""
        for conn in self._turns.turn():
            try:
                if self.exchange.has_work(conn):
                    self.exchange.process(conn, time.monotonic())
                self._update(conn)
            except Exception:  # noqa: BLE001 - isolation boundary, as in _serve_event
                log.exception("%s: internal error serving a connection; closed", conn.peer)
                self._close(conn)

    # connections -----------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            peer = normalise_address(addr[0])
            owner, vm = self.shares.owner_of(peer)
            if owner is None:
                self.warnings.warn(peer, f"{peer}: connection from an unregistered address; closed")
                sock.close()
                continue
            if self.shares.full(owner, len(self._conns)):
                self._refuse(sock, peer, vm.name if vm is not None else peer)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, peer, owner, deadline=time.monotonic() + self.timeouts.idle)
            self._conns[sock.fileno()] = conn
            self.shares.add(owner)
            self._set_events(conn, selectors.EVENT_READ)

    def _refuse(self, sock: socket.socket, peer: str, who: str) -> None:
        self.warnings.warn(peer, f"{who}: too many connections from {peer}; refused")
        try:
            sock.setblocking(False)
            sock.send(response_bytes(503, b"503 too many connections\n", keep_alive=False))
        except OSError:
            pass
        sock.close()

    def _set_events(self, conn: Connection, wanted: int) -> None:
        """Watch ``conn`` for ``wanted`` (0: not at all, e.g. while it waits its turn)."""
        if wanted == conn.events or self._sel is None:
            return
        if wanted == 0:
            self._sel.unregister(conn.sock)
        elif conn.events == 0:
            self._sel.register(conn.sock, wanted, conn)
        else:
            self._sel.modify(conn.sock, wanted, conn)
        conn.events = wanted

    def _close(self, conn: Connection) -> None:
        if conn.upload is not None:
            self.exchange.end_upload(conn)
        if conn.state is CLOSED:
            return
        if self._sel is not None and conn.events:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.events = 0
        self._conns.pop(conn.sock.fileno(), None)
        self.shares.remove(conn.owner)
        conn.move(CLOSED)
        conn.sock.close()  # a queued conn is skipped when its turn comes

    def _linger(self, conn: Connection) -> None:
        """Close politely after a final response: shut our side, then read and drop what
        the client still sends for a moment, so its unread data does not turn our response
        into a connection reset (the 'lingering close' of web servers)."""
        if conn.state is LINGERING:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.move(LINGERING)
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._set_events(conn, selectors.EVENT_READ)

    def _drain(self, conn: Connection) -> None:
        data = _receive(conn)
        if data is None:
            return
        conn.lingered += len(data)
        if not data or conn.lingered > OUT_HIGH_WATER:
            self._close(conn)

    def _sweep(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if now > conn.deadline:
                log.debug("%s: connection timed out", conn.peer)
                self._close(conn)
        self._trim_to_share()

    def _trim_to_share(self) -> None:
        """Close the idle connections of a VM holding more than its share (which shrinks as
        VMs are registered), so that the newcomers' shares are really there."""
        over = self.shares.over_share()
        for conn in list(self._conns.values()):
            if conn.owner in over and self.shares.still_over(conn.owner) and conn.idle:
                log.debug("%s: idle connection over the VM's share closed", conn.peer)
                self._close(conn)

    # reading ---------------------------------------------------------------------------

    def _readable(self, conn: Connection) -> None:
        data = _receive(conn)
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        self.exchange.feed(conn, data, time.monotonic())

    # writing ---------------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent:
                del conn.out[:sent]
                if conn.out:
                    conn.deadline = time.monotonic() + self.timeouts.write
        if not conn.out and conn.state is CLOSING:
            self._linger(conn)

    def _update(self, conn: Connection) -> None:
        """Send what we can now; wait for writability only when something is left over.
        Nothing to do for a connection that is lingering or closed."""
        if not conn.state.live:
            return
        if conn.out:
            self._flush(conn)
            if not conn.state.live:
                return
        if self.exchange.has_work(conn):
            self._turns.enqueue(conn)  # a request (or more) to serve when its owner's turn comes
        if conn.state is CLOSING and not conn.out:
            self._linger(conn)
            return
        wanted = 0
        if conn.state.reads_requests and not conn.queued and len(conn.out) <= OUT_HIGH_WATER:
            wanted |= selectors.EVENT_READ  # read no more while a request waits its turn
        if conn.out:
            wanted |= selectors.EVENT_WRITE
        if not wanted and not conn.queued:
            self._close(conn)
        else:
            self._set_events(conn, wanted)


def _receive(conn: Connection) -> Optional[bytes]:
    """What the client sent: None if nothing yet, ``b""`` at its end or on a socket error."""
    try:
        return conn.sock.recv(RECV_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
