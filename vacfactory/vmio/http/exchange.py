"""Requests on one connection (the HTTP part of the server, no sockets): the bytes a client
sent become requests, answers go into the connection's output buffer, PUT bodies into
joboutputs, and the connection's state and deadlines move with them.

:mod:`.server` reads and writes the sockets and decides whose turn it is; this module decides
what the bytes mean. Bodies need a Content-Length and are bounded by the joboutputs caps (no
chunked encoding); a GET/HEAD body up to MAX_DISCARD bytes is read and dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Dict

from vacfactory.vmio import joboutputs as jo
from vacfactory.vmio.http.connection import (CLOSING, DISCARDING, OUT_HIGH_WATER, READING, UPLOADING, Connection,
                                             Timeouts)
from vacfactory.vmio.http.fairness import unidentified
from vacfactory.vmio.http.routes import Router, UploadTarget, error_reply, shown
from vacfactory.vmio.http.upload import InFlight, Upload, open_upload_file
from vacfactory.vmio.http.wire import (MAX_DISCARD, MAX_HEAD, HTTPError, Request, head_ready, parse_head,
                                       response_bytes)
from vacfactory.vmio.joboutputs import JobOutputsLimits

log = logging.getLogger(__name__)

#: at most one warning about one address in this many seconds
WARN_EVERY_SECONDS = 10.0


class PeerWarnings:
    """Warnings about a VM's requests, at most one per address every WARN_EVERY_SECONDS."""

    def __init__(self) -> None:
        self._warned: Dict[str, float] = {}

    def warn(self, peer: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(peer, -1e9) >= WARN_EVERY_SECONDS:
            if len(self._warned) > 4096:
                self._warned.clear()
            self._warned[peer] = now
            log.warning("%s", message)

    def clear(self) -> None:
        """Forget who was warned about (tests that provoke one warning after another)."""
        self._warned.clear()


class Exchange:
    """What the server does with the bytes of every connection (one per server)."""

    def __init__(self, router: Router, limits: JobOutputsLimits, timeouts: Timeouts,
                 warnings: PeerWarnings) -> None:
        self.router = router
        self.limits = limits
        self.timeouts = timeouts
        self.warnings = warnings
        self._in_flight = InFlight()

    def feed(self, conn: Connection, data: bytes, now: float) -> None:
        """Bytes the client sent: into the body being stored or dropped, else the next head."""
        if conn.state is UPLOADING:
            data = self._feed_upload(conn, data, now)
        if conn.state is DISCARDING and data:
            take = min(conn.discard, len(data))
            conn.discard -= take
            data = data[take:]
            if not conn.discard:
                conn.move(READING)
        if data:
            conn.inbuf += data
            if conn.head_started is None and conn.state is READING:
                # any byte starts the clock of a request head, even blank lines (slow loris)
                self._start_head_clock(conn, now)

    def _start_head_clock(self, conn: Connection, now: float) -> None:
        conn.head_started = now
        conn.deadline = now + self.timeouts.head

    @staticmethod
    def has_work(conn: Connection) -> bool:
        """A complete request head (or an oversized one) to handle, and nothing that must
        happen first; a partial head waits for more bytes."""
        return conn.state is READING and bool(conn.inbuf) and \
            len(conn.out) <= OUT_HIGH_WATER and head_ready(conn.inbuf)

    def process(self, conn: Connection, now: float) -> None:
        """Serve the first request in ``conn.inbuf``, if it is complete."""
        # RFC 9112 2.2: ignore empty lines before a request line
        while conn.inbuf[:2] == b"\r\n":
            del conn.inbuf[:2]
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEAD:
                self._send_error(conn, HTTPError(431, close=True))
            elif conn.inbuf and conn.head_started is None:
                self._start_head_clock(conn, now)  # the rest of a pipelined batch
            return
        head = bytes(conn.inbuf[:end])
        del conn.inbuf[:end + 4]
        conn.head_started = None
        self._request(conn, head, now)
        if conn.state is not READING:
            return
        if conn.inbuf:
            # the next head of a pipelined batch: its clock starts now, as its turn may come
            # late under load (that wait is ours, not the client's)
            self._start_head_clock(conn, now)
        else:
            conn.deadline = now + self.timeouts.idle

    def _request(self, conn: Connection, head: bytes, now: float) -> None:
        try:
            request = parse_head(head)
        except HTTPError as e:
            self._send_error(conn, e)
            return
        result, note = self.router.route(conn.peer, request)
        if note:
            self.warnings.warn(conn.peer, f"{conn.peer}: {request.method} {shown(request.path)}"
                                  f" refused: {note}")
        if isinstance(result, UploadTarget):
            self._start_upload(conn, request, result, now)
            return
        body_pending = request.content_length or 0
        keep_alive = request.keep_alive
        if unidentified(conn.owner) and result.status == 403:
            keep_alive = False  # an unregistered address gets one try per connection
        if body_pending > MAX_DISCARD:
            keep_alive = False
        elif body_pending:
            # drop what of the body already arrived with the head, then the rest as it comes
            take = min(body_pending, len(conn.inbuf))
            del conn.inbuf[:take]
            conn.discard = body_pending - take
            if conn.discard:
                conn.deadline = now + self.timeouts.body_idle
        conn.out += response_bytes(result.status, result.body, result.content_type, keep_alive,
                                   head_only=request.method == "HEAD", extra=result.extra)
        if not keep_alive:
            conn.move(CLOSING)
        elif conn.discard:
            conn.move(DISCARDING)
        if request.method == "GET" and result.status >= 400:
            log.debug("%s: GET %s -> %d", conn.peer, shown(request.path), result.status)

    def _send_error(self, conn: Connection, error: HTTPError, keep_alive: bool = False) -> None:
        reply = error_reply(error.status, error.message)
        conn.out += response_bytes(reply.status, reply.body, keep_alive=keep_alive,
                                   extra=reply.extra)
        if not keep_alive:
            conn.move(CLOSING)
            conn.inbuf.clear()

    # uploads ---------------------------------------------------------------------------

    def _start_upload(self, conn: Connection, request: Request, target: UploadTarget,
                      now: float) -> None:
        vm = target.vm
        length = request.content_length
        if length is None:
            self._send_error(conn, HTTPError(411, "Content-Length required"))
            return
        limits = self.limits
        if length > limits.max_file_bytes:
            self.warnings.warn(conn.peer, f"{vm.name}: joboutputs/{shown(target.name)} of {length} bytes"
                                  f" refused: over max_file_bytes {limits.max_file_bytes}")
            self._send_error(conn, HTTPError(413, f"over the per-file limit of "
                                                  f"{limits.max_file_bytes} bytes"))
            return
        try:
            dir_fd = jo.open_directory(vm.joboutputs_dir)
        except OSError as e:
            log.error("%s: joboutputs directory unusable: %s", vm.name, e.strerror)
            self._send_error(conn, HTTPError(403, "joboutputs unavailable"))
            return
        try:
            refusal = self._in_flight.refusal(vm, target.name, length, dir_fd, limits)
            if refusal is not None:
                os.close(dir_fd)
                self.warnings.warn(conn.peer, f"{vm.name}: joboutputs/{shown(target.name)} refused: {refusal}")
                self._send_error(conn, HTTPError(413, refusal))
                return
            fd, temp = open_upload_file(dir_fd)
        except OSError as e:
            os.close(dir_fd)
            log.error("%s: cannot start joboutputs/%s: %s", vm.name, shown(target.name), e.strerror)
            self._send_error(conn, HTTPError(500, "cannot store the file"))
            return
        self._in_flight.reserve(vm.uuid, length)
        conn.upload = Upload(target, length, dir_fd, fd, temp)
        conn.upload_keep_alive = request.keep_alive
        conn.move(UPLOADING)
        conn.deadline = now + self.timeouts.body_idle
        if request.expect_continue and length > 0:
            conn.out += b"HTTP/1.1 100 Continue\r\n\r\n"
        if length == 0:
            self._finish_upload(conn)
        elif conn.inbuf:
            pending = bytes(conn.inbuf)
            conn.inbuf.clear()
            rest = self._feed_upload(conn, pending, now)
            conn.inbuf += rest

    def _feed_upload(self, conn: Connection, data: bytes, now: float) -> bytes:
        upload = conn.upload
        assert upload is not None
        take = min(len(data), upload.length - upload.received)
        try:
            upload.write(data[:take])
        except OSError as e:
            status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            log.error("%s: writing joboutputs/%s failed: %s", upload.target.vm.name,
                      shown(upload.target.name), e.strerror)
            self.end_upload(conn)
            self._send_error(conn, HTTPError(status, "cannot store the file"))
            return b""
        if upload.received >= upload.length:
            self._finish_upload(conn)
        else:
            allowed = upload.started + self.timeouts.body_idle + \
                upload.length / self.timeouts.body_min_rate
            conn.deadline = min(now + self.timeouts.body_idle, allowed)
        return data[take:]

    def _finish_upload(self, conn: Connection) -> None:
        upload = conn.upload
        assert upload is not None
        vm, name = upload.target.vm, upload.target.name
        try:
            upload.commit()
        except HTTPError as e:
            self.end_upload(conn)
            self.warnings.warn(conn.peer, f"{vm.name}: joboutputs/{shown(name)} refused: {e.message}")
            self._send_error(conn, e, keep_alive=conn.upload_keep_alive)
            return
        except OSError as e:
            self.end_upload(conn)
            log.error("%s: storing joboutputs/%s failed: %s", vm.name, shown(name), e.strerror)
            self._send_error(conn, HTTPError(403 if e.errno in (errno.EISDIR, errno.ENOTDIR)
                                             else 500, "cannot store the file"),
                             keep_alive=conn.upload_keep_alive)
            return
        size = upload.received
        self.end_upload(conn)
        # heartbeats and logs arrive all the time; only the final message is worth INFO
        log.log(logging.INFO if name == jo.SHUTDOWN_MESSAGE else logging.DEBUG,
                "%s: joboutputs/%s written (%d bytes)", vm.name, shown(name), size)
        conn.out += response_bytes(201, b"201 Created\n", keep_alive=conn.upload_keep_alive)
        if not conn.upload_keep_alive:
            conn.move(CLOSING)

    def end_upload(self, conn: Connection) -> None:
        """Abandon (or, after commit, release) the connection's upload, if any."""
        upload = conn.upload
        if upload is None:
            return
        conn.upload = None
        upload.abandon()
        upload.close()
        self._in_flight.release(upload.target.vm.uuid, upload.length)
        if conn.state is UPLOADING:
            conn.move(READING)
