"""A built-in ssmsend: sign queued messages and deliver them (STOMP or ARGO AMS), at least once.

It copies ssmsend's algorithm (apel/ssm ``Ssm2.send_all``) and fixes its hang (apel/ssm#29):

- nothing queued: return at once, never connect (so a frequent timer is cheap);
- check the host certificate and key before connecting (they sign every message);
- connect with the host certificate as TLS client certificate; wait for CONNECTED;
- per element: lock it, read it, check it is an ASCII APEL message, S/MIME-sign it, SEND it
  with ``empa-id`` and ``receipt`` = the element name, wait for *that* RECEIPT, and only then
  remove it from the queue;
- every wait is bounded by one overall deadline; on any failure stop, unlock the element and
  leave it and everything after it queued for the next run. Running out of time with messages
  still queued is a failure too (``SendResult.timed_out``; ``apel send`` exits 1), never a
  silent success: a backlog the timeout cannot clear must show.

A receipt that is lost after the broker took the message means the message is sent again
next time: APEL's REPLACE key makes that harmless. A message is never removed before its
receipt, so a broker that dies mid-send loses nothing.

Transports: STOMP (here) or ARGO AMS (:mod:`vacfactory.accounting.ams`), chosen by
``[sender] protocol`` of the site's ``sender.cfg`` (option ``apel_sender_cfg``). With
``apel_batch`` consecutive queued job records go out packed into one message (see
:mod:`vacfactory.accounting.batching`); all its elements are removed after its one
confirmation, or none. Every run's outcome is kept for ``apel status`` and ``vacfactory check``
(:mod:`vacfactory.accounting.send_state`).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Set, Tuple

import stomp
import stomp.exception

from vacfactory.accounting import send_state
from vacfactory.accounting.batching import Batch
from vacfactory.accounting.ams import AmsLink
from vacfactory.accounting.outgoing import OutgoingQueue, backlog_of
from vacfactory.accounting.send_errors import TimedOut as _TimedOut
from vacfactory.accounting.send_errors import Unreachable as _Unreachable
from vacfactory.accounting.sender_cfg import effective_broker
from vacfactory.accounting.settings import AMS, AccountingSettings, BrokerSettings
from vacfactory.accounting.smime import Signer, encrypt, load_signer
from vacfactory.core.apel import JOB, parse_message
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 60.0
#: socket-level timeout for TCP connect and the TLS handshake
CONNECT_TIMEOUT_SECONDS = 10.0
#: time kept back from the deadline to close the connection cleanly
CLOSE_BUDGET_SECONDS = 2.0
#: no SEND is started with less time than this left: its receipt could not be waited for,
#: so the broker might take it and we would send it again next run
SEND_RESERVE_SECONDS = 0.5
#: we ask the broker for a heart-beat this often (ms): a dead broker is noticed within 1.5x
#: that even over TLS, where stomp.py does not notice the end of the stream itself
HEARTBEAT_MS = 2000
LISTENER_NAME = "vacfactory-sender"


@dataclass(frozen=True)
class SendResult:
    """What one run of the sender did."""

    sent: int
    failed: int
    remaining: int
    #: queued elements that are not ASCII APEL messages: left in place, reported
    invalid: int = 0
    error: Optional[str] = None
    #: the broker could not be reached or the connection was lost (CLI exit 69)
    unreachable: bool = False
    #: the deadline came with messages still queued (an error, CLI exit 1)
    timed_out: bool = False
    #: messages on the wire (fewer than ``sent`` with apel_batch)
    messages: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and self.invalid == 0


class _Listener(stomp.ConnectionListener):
    """Turns stomp.py's callbacks (on its I/O thread) into state a bounded wait can test."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.connected = False
        self.disconnected = False
        self.errors: List[str] = []
        self.receipts: Set[str] = set()

    def on_connected(self, frame: stomp.utils.Frame) -> None:
        with self.condition:
            self.connected = True
            self.condition.notify_all()

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        with self.condition:
            self.receipts.add(frame.headers.get("receipt-id", ""))
            self.condition.notify_all()

    def on_error(self, frame: stomp.utils.Frame) -> None:
        message = frame.headers.get("message") or str(frame.body)[:200]
        with self.condition:
            self.errors.append(message.strip())
            self.condition.notify_all()

    def on_disconnected(self) -> None:
        with self.condition:
            self.disconnected = True
            self.condition.notify_all()

    def on_heartbeat_timeout(self) -> None:
        self.on_disconnected()

    def wait(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait until predicate() or the deadline; True if predicate() holds."""
        with self.condition:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.condition.wait(min(left, 1.0))
            return True


class _Link:
    """One STOMP connection with bounded connect, send-and-wait and close."""

    def __init__(self, broker: BrokerSettings, deadline: float) -> None:
        if not broker.host:
            raise AccountingError("apel_broker_host is not set")
        self.broker = broker
        self.where = f"{broker.host}:{broker.port}"
        self.listener = _Listener()
        self.conn = stomp.Connection(
            [(broker.host, broker.port)],
            prefer_localhost=False,
            try_loopback_connect=False,
            reconnect_attempts_max=1,
            reconnect_sleep_initial=0.1,
            reconnect_sleep_max=0.5,
            # bounds the TCP connect and the TLS handshake, which happen before any wait of ours
            timeout=max(0.5, min(CONNECT_TIMEOUT_SECONDS, deadline - time.monotonic())),
            heartbeats=(0, HEARTBEAT_MS),
        )
        self.conn.set_listener(LISTENER_NAME, self.listener)

    def open(self, deadline: float) -> None:
        """Connect (TLS with the host certificate if use_ssl) and wait for CONNECTED."""
        bundle = None
        try:
            if self.broker.use_ssl:
                bundle = _ca_bundle(self.broker.capath)
                self.conn.set_ssl(
                    for_hosts=[(self.broker.host, self.broker.port)],
                    cert_file=self.broker.host_cert,
                    key_file=self.broker.host_key,
                    ca_certs=bundle[0],
                )
            self.conn.connect(wait=False)
        except (stomp.exception.StompException, OSError) as error:
            raise _Unreachable(f"cannot connect to {self.where}: {str(error) or type(error).__name__}") from error
        finally:
            if bundle and bundle[1]:
                os.unlink(bundle[0])
        listener = self.listener
        if not listener.wait(lambda: listener.connected or listener.disconnected or bool(listener.errors), deadline):
            raise _Unreachable(f"{self.where}: no CONNECTED frame before the deadline")
        if not listener.connected:
            raise _Unreachable(f"{self.where}: connection refused: {'; '.join(listener.errors) or 'disconnected'}")

    def send(self, destination: str, body: str, name: str, deadline: float) -> None:
        """SEND one message and wait for its RECEIPT; AccountingError if it does not come."""
        listener = self.listener
        try:
            self.conn.send(
                destination=destination,
                body=body,
                headers={"empa-id": name, "receipt": name, "persistent": "true"},
            )
        except (stomp.exception.StompException, OSError) as error:
            reason = str(error) or type(error).__name__
            raise _Unreachable(f"{self.where}: lost while sending {name}: {reason}") from error
        listener.wait(lambda: name in listener.receipts or listener.disconnected or bool(listener.errors), deadline)
        if name in listener.receipts:
            return
        if listener.errors:
            raise AccountingError(f"{self.where}: broker refused {name}: {listener.errors[-1]}")
        if listener.disconnected:
            raise _Unreachable(f"{self.where}: connection lost before the receipt for {name}")
        raise _TimedOut(f"{self.where}: no receipt for {name} before the deadline")

    def close(self, budget: float) -> None:
        """DISCONNECT politely, then make sure the socket and stomp.py's thread are gone."""
        deadline = time.monotonic() + budget
        _bounded(self._disconnect, budget / 2)
        _bounded(self._drop_socket, max(0.1, deadline - time.monotonic()))
        transport = self.conn.transport
        sock = getattr(transport, "socket", None)
        if sock is not None:  # the polite ways hung: cut it
            transport.running = False
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _disconnect(self) -> None:
        if self.listener.connected and not self.listener.disconnected:
            self.conn.disconnect()
            self.listener.wait(lambda: self.listener.disconnected, time.monotonic() + 1.0)

    def _drop_socket(self) -> None:
        transport = self.conn.transport
        transport.running = False
        if getattr(transport, "socket", None) is not None:
            transport.disconnect_socket()


def _bounded(function: Callable[[], None], seconds: float) -> None:
    """Run a teardown step in a daemon thread and give up waiting after ``seconds``."""

    def run() -> None:
        try:
            function()
        except (stomp.exception.StompException, OSError, ValueError, AttributeError) as error:
            log.debug("sender teardown: %s: %s", function.__name__, error)

    thread = threading.Thread(target=run, name="vacfactory-stomp-close", daemon=True)
    thread.start()
    thread.join(seconds)


def _ca_bundle(capath: str) -> Tuple[Optional[str], bool]:
    """(file for ssl's cafile, whether it is a temporary we made).

    ssmsend takes a CA *directory* (``/etc/grid-security/certificates``); Python's ssl wants a
    file from stomp.py, so the directory's certificates are concatenated into a temporary one.
    """
    if not capath:
        return None, False
    if os.path.isfile(capath):
        return capath, False
    if not os.path.isdir(capath):
        raise AccountingError(f"apel_capath {capath} is neither a CA file nor a directory")
    seen: Set[bytes] = set()
    pems: List[bytes] = []
    for name in sorted(os.listdir(capath)):
        if not (name.endswith(".pem") or name.endswith(".crt") or _hash_name(name)):
            continue
        try:
            with open(os.path.join(capath, name), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if b"-----BEGIN CERTIFICATE-----" in data and data not in seen:
            seen.add(data)
            pems.append(data if data.endswith(b"\n") else data + b"\n")
    if not pems:
        raise AccountingError(f"apel_capath {capath} holds no CA certificates")
    fd, path = tempfile.mkstemp(prefix="vacfactory-ca-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(pems))
    return path, True


def _hash_name(name: str) -> bool:
    """OpenSSL's hashed names: ``1a2b3c4d.0``."""
    stem, dot, suffix = name.partition(".")
    return bool(dot) and len(stem) == 8 and suffix.isdigit() and all(c in "0123456789abcdef" for c in stem)


def send_queued(
    settings: AccountingSettings,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    *,
    now: Optional[float] = None,
) -> SendResult:
    """Deliver everything queued (job queue, and the cloud queue when enabled).

    Returns within about ``timeout_seconds`` whatever the broker or AMS does; what was not
    delivered stays queued for the next run.
    """
    started = time.monotonic()
    wall = time.time() if now is None else now
    close_budget = min(CLOSE_BUDGET_SECONDS, timeout_seconds / 4)
    deadline = started + max(0.1, timeout_seconds - close_budget)
    try:
        broker = effective_broker(settings)
    except AccountingError as error:  # an unusable sender.cfg
        log.error("APEL send: %s", error)
        return SendResult(sent=0, failed=0, remaining=_pending(settings), error=str(error))
    queues = _queues(settings, broker)
    for queue, _ in queues:
        queue.purge()
    pending = sum(queue.count() for queue, _ in queues)
    if pending == 0:
        log.debug("no APEL messages to send")
        return SendResult(sent=0, failed=0, remaining=0)
    try:
        signer = load_signer(broker.host_cert, broker.host_key, wall)
        link = _make_link(broker, deadline)
    except AccountingError as error:
        log.error("APEL send: %s", error)
        return _recorded(settings, broker, wall, SendResult(sent=0, failed=0, remaining=pending, error=str(error)))
    try:
        link.open(deadline)
    except AccountingError as error:  # _Unreachable, refused, or a CA directory without certificates
        log.error("APEL send: %s", error)
        link.close(close_budget)
        return _recorded(settings, broker, wall, SendResult(
            sent=0, failed=0, remaining=pending, error=str(error), unreachable=isinstance(error, _Unreachable)))
    sender = _Sender(link, signer, broker, broker.batch_records, deadline)
    failure = sender.send_all(queues)
    link.close(close_budget)
    remaining = sum(queue.count() for queue, _ in queues)
    in_flight = failure is not None and not (isinstance(failure, _TimedOut) and failure.between_messages)
    result = SendResult(
        sent=sender.sent,
        failed=1 if in_flight else 0,
        remaining=remaining,
        invalid=sender.invalid,
        error=str(failure) if failure else None,
        unreachable=isinstance(failure, _Unreachable),
        timed_out=isinstance(failure, _TimedOut),
        messages=sender.messages,
    )
    level = logging.INFO if result.ok else logging.ERROR
    log.log(level, "APEL send to %s: %d sent in %d messages, %d failed, %d invalid, %d left queued%s", link.where,
            sender.sent, sender.messages, result.failed, sender.invalid, remaining, f": {failure}" if failure else "")
    return _recorded(settings, broker, wall, result)


def _pending(settings: AccountingSettings) -> int:
    return sum(backlog_of(path).count for path in (settings.outgoing_dir, settings.cloud_queue_dir))


def _recorded(settings: AccountingSettings, broker: BrokerSettings, now: float, result: SendResult) -> SendResult:
    send_state.record_run(os.path.dirname(os.path.abspath(settings.outgoing_dir)), now,
                          protocol=broker.protocol, destination=broker.destination, sent=result.sent,
                          remaining=result.remaining, error=result.error)
    return result


def _make_link(broker: BrokerSettings, deadline: float) -> "_Link | AmsLink":
    if broker.protocol == AMS:
        return AmsLink(broker, deadline)
    return _Link(broker, deadline)


def _queues(settings: AccountingSettings, broker: BrokerSettings) -> List[Tuple[OutgoingQueue, str]]:
    queues = [(OutgoingQueue(settings.outgoing_dir), broker.destination)]
    if settings.cloud_records or os.path.isdir(settings.cloud_queue_dir):
        queues.append((OutgoingQueue(settings.cloud_queue_dir), broker.cloud_destination))
    return queues


class _Sender:
    """One run over the queues: element after element (or batch after batch); stop at the
    first failure or at the deadline. Stopping at the deadline with elements left is a
    failure (:class:`_TimedOut`)."""

    def __init__(self, link: "_Link | AmsLink", signer: Signer, broker: BrokerSettings, batch_records: int,
                 deadline: float) -> None:
        self.link = link
        self.signer = signer
        self.broker = broker
        self.batch_records = batch_records
        self.deadline = deadline
        self.sent = self.invalid = self.messages = 0

    def send_all(self, queues: List[Tuple[OutgoingQueue, str]]) -> Optional[AccountingError]:
        for queue, destination in queues:
            batch = Batch(self.batch_records) if self.batch_records else None
            for name in queue.names():
                if self.deadline - time.monotonic() < SEND_RESERVE_SECONDS:
                    self._release(queue, batch)
                    return _TimedOut(f"{self.link.where}: timeout reached after {self.sent} sent; the rest stays "
                                     "queued", between_messages=True)
                if not queue.lock(name):
                    continue  # another sender has it
                try:
                    body = queue.get_locked(name)
                    text = body.decode("ascii")
                    message = parse_message(text)
                except (OSError, UnicodeDecodeError, RecordInvalid) as error:
                    log.error("%s/%s: not an APEL message, left in the queue (republish from the archive"
                              " and remove it): %s", queue.path, name, error)
                    queue.unlock(name)
                    self.invalid += 1
                    continue
                if batch is not None and message.kind == JOB:
                    if not batch.fits(text, len(message.records)):
                        failure = self._flush(queue, destination, batch)
                        if failure:
                            queue.unlock(name)
                            return failure
                        batch = Batch(self.batch_records)
                    batch.add(name, text, len(message.records))
                    if batch.full():
                        failure = self._flush(queue, destination, batch)
                        batch = Batch(self.batch_records)
                        if failure:
                            return failure
                    continue
                if batch is not None and batch.names:  # keep the queue's order: the batch first
                    failure = self._flush(queue, destination, batch)
                    batch = Batch(self.batch_records)
                    if failure:
                        queue.unlock(name)
                        return failure
                failure = self._deliver(queue, destination, [name], body)
                if failure:
                    return failure
            if batch is not None and batch.names:
                failure = self._flush(queue, destination, batch)
                if failure:
                    return failure
        return None

    def _flush(self, queue: OutgoingQueue, destination: str, batch: Batch) -> Optional[AccountingError]:
        names = list(batch.names)
        batch.names.clear()
        if len(names) == 1:
            return self._deliver(queue, destination, names, batch.bodies[0].encode("ascii"))
        return self._deliver(queue, destination, names, batch.text().encode("ascii"))

    def _deliver(self, queue: OutgoingQueue, destination: str, names: List[str], body: bytes) -> Optional[AccountingError]:
        """Sign (and encrypt), send under the first element's name, then remove all of them."""
        try:
            signed = self.signer.sign(body)
            if self.broker.server_cert:
                signed = encrypt(signed, self.broker.server_cert)
            self.link.send(destination, signed.decode("ascii"), names[0], self.deadline)
        except AccountingError as error:
            for name in names:
                queue.unlock(name)
            return error
        for name in names:
            queue.remove_locked(name)
        self.sent += len(names)
        self.messages += 1
        log.debug("%s: sent to %s and removed%s", names[0], destination,
                  f" with {len(names) - 1} more in one message" if len(names) > 1 else "")
        return None

    @staticmethod
    def _release(queue: OutgoingQueue, batch: Optional[Batch]) -> None:
        if batch is not None:
            for name in batch.names:
                queue.unlock(name)
            batch.names.clear()


def send_is_due(settings: AccountingSettings, last_attempt: Optional[float], now: float) -> bool:
    """The daemon's timer: is the built-in sender on and its interval over?"""
    if not settings.broker.send_enabled:
        return False
    return last_attempt is None or now - last_attempt >= settings.broker.send_interval_seconds
