"""The built-in sender against real STOMP brokers: Debian's RabbitMQ (STOMP plugin, plain and
TLS with client certificates) and coilmq. Records go out S/MIME-signed (checked with
``openssl smime -verify``), receipts are honoured, a broker killed mid-send loses nothing and
the next run completes.

RabbitMQ runs as its own node ``vfacct@localhost`` on loopback with private ports and its own
epmd, started once for this module and stopped in the finalizer. If rabbitmq-server, epmd or
coilmq is missing the tests fail: they do not skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Dict, List, Optional

import pytest
import stomp

from tests.unit.test_apel_support import NOW, Pki, broker_settings, make_pki, make_settings, make_usage, read_queue
from tests.waiting import scaled
from vacfactory.accounting import account_vm, send_queued
from vacfactory.core.apel import parse_message

RABBIT_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
NODE = "vfacct@localhost"
AMQP_PORT = 5682
DIST_PORT = 25682
EPMD_PORT = 4372
STOMP_PORT = 61623
STOMP_TLS_PORT = 61624
COILMQ_PORT = 61625
JOB_DEST = "/queue/apel.test"
CLOUD_DEST = "/queue/apel.cloud.test"


def wait_for_port(port: int, seconds: float, process: Optional[subprocess.Popen] = None, log: str = "") -> None:
    deadline = time.monotonic() + scaled(seconds)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode} before listening on {port}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s; see {log}")


class Rabbit:
    """A private RabbitMQ node with the STOMP plugin (plain and TLS listeners)."""

    def __init__(self, base: str, pki: Pki) -> None:
        self.base = base
        self.pki = pki
        self.process: Optional[subprocess.Popen] = None
        self.epmd: Optional[subprocess.Popen] = None
        os.makedirs(base, exist_ok=True)
        with open(os.path.join(base, "rabbitmq.conf"), "w") as f:
            f.write(
                f"listeners.tcp.default = 127.0.0.1:{AMQP_PORT}\n"
                f"stomp.listeners.tcp.1 = 127.0.0.1:{STOMP_PORT}\n"
                f"stomp.listeners.ssl.1 = 127.0.0.1:{STOMP_TLS_PORT}\n"
                f"ssl_options.cacertfile = {pki.ca_cert}\n"
                f"ssl_options.certfile = {pki.server_cert}\n"
                f"ssl_options.keyfile = {pki.server_key}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = true\n"
                "stomp.default_user = guest\n"
                "stomp.default_pass = guest\n"
                "loopback_users = none\n"
            )
        with open(os.path.join(base, "enabled_plugins"), "w") as f:
            f.write("[rabbitmq_stomp].\n")

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_CONFIG_FILE=os.path.join(self.base, "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.base, "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=os.path.join(self.base, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.base, "log"),
            RABBITMQ_NODENAME=NODE,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(AMQP_PORT),
            RABBITMQ_DIST_PORT=str(DIST_PORT),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(EPMD_PORT),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            HOME=self.base,
        )
        return env

    def start(self) -> None:
        for program in (RABBIT_SERVER, shutil.which("epmd")):
            if not program or not os.path.exists(program):
                raise RuntimeError("Debian rabbitmq-server (and its epmd) must be installed for these tests")
        if self.epmd is None:
            self.epmd = subprocess.Popen(["epmd", "-port", str(EPMD_PORT), "-address", "127.0.0.1"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(EPMD_PORT, 10, self.epmd)
        log = os.path.join(self.base, "server.out")
        with open(log, "ab") as out:
            self.process = subprocess.Popen([RABBIT_SERVER], env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_for_port(STOMP_PORT, 90, self.process, log)
        wait_for_port(STOMP_TLS_PORT, 30, self.process, log)

    def kill(self) -> None:
        """kill -9 the whole node (beam and its helpers), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self.epmd is not None:
            self.epmd.terminate()
            self.epmd.wait(10)
            self.epmd = None


class Consumer(stomp.ConnectionListener):
    """Subscribes to destinations and keeps every message (headers, body)."""

    def __init__(self, port: int, destinations: List[str], login: bool = True) -> None:
        self.messages: List[Dict[str, object]] = []
        self.condition = threading.Condition()
        self.on_each = None
        self.conn = stomp.Connection([("127.0.0.1", port)], heartbeats=(0, 0), reconnect_attempts_max=1)
        self.conn.set_listener("consumer", self)
        if login:
            self.conn.connect("guest", "guest", wait=True)
        else:
            self.conn.connect(wait=True)
        for n, destination in enumerate(destinations):
            self.conn.subscribe(destination, id=str(n + 1), ack="auto")

    def on_message(self, frame: stomp.utils.Frame) -> None:
        with self.condition:
            self.messages.append({"headers": dict(frame.headers), "body": frame.body})
            self.condition.notify_all()
        if self.on_each is not None:
            self.on_each(len(self.messages))

    def wait_for(self, count: int, seconds: float) -> bool:
        deadline = time.monotonic() + scaled(seconds)
        with self.condition:
            while len(self.messages) < count and time.monotonic() < deadline:
                self.condition.wait(0.2)
            return len(self.messages) >= count

    def empa_ids(self) -> List[str]:
        return [str(m["headers"]["empa-id"]) for m in self.messages]

    def close(self) -> None:
        try:
            self.conn.disconnect()
        except (stomp.exception.StompException, OSError):
            pass


def verify(pki: Pki, signed: str) -> str:
    """What ssmreceive gets out of a message: ``openssl smime -verify`` against the CA."""
    out = subprocess.run(["openssl", "smime", "-verify", "-CAfile", pki.ca_cert, "-text"],
                         input=signed.encode("ascii"), capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode("ascii").replace("\r\n", "\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory, pki):
    broker = Rabbit(str(tmp_path_factory.mktemp("rabbit")), pki)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


def no_threads_left_behind(before: set, seconds: float = 3.0) -> bool:
    """The sender's stomp.py threads (I/O, heart-beat, teardown) are all gone."""
    deadline = time.monotonic() + scaled(seconds)
    while time.monotonic() < deadline:
        if not set(threading.enumerate()) - before:
            return True
        time.sleep(0.1)
    return False


def fill(settings, count: int, first: int = 1) -> Dict[str, str]:
    for i in range(first, first + count):
        account_vm(make_usage(i), settings, NOW)
    return read_queue(settings.outgoing_dir)


def test_records_go_out_signed_and_each_leaves_the_queue_after_its_receipt(tmp_path, pki, rabbit):
    settings = make_settings(str(tmp_path), cloud_records=True,
                             broker=broker_settings(pki, "127.0.0.1", STOMP_PORT, False, JOB_DEST,
                                                    cloud_destination=CLOUD_DEST))
    queued = fill(settings, 20)
    cloud_queued = read_queue(settings.cloud_queue_dir)
    consumer = Consumer(STOMP_PORT, [JOB_DEST, CLOUD_DEST])
    try:
        threads = set(threading.enumerate())
        result = send_queued(settings, 30, now=time.time())
        assert (result.sent, result.failed, result.remaining, result.error) == (40, 0, 0, None)
        assert no_threads_left_behind(threads)
        assert consumer.wait_for(40, 15)
    finally:
        consumer.close()
    assert read_queue(settings.outgoing_dir) == {} and read_queue(settings.cloud_queue_dir) == {}
    by_id = {str(m["headers"]["empa-id"]): m for m in consumer.messages}
    assert set(by_id) == set(queued) | set(cloud_queued)
    for name, message in by_id.items():
        headers = message["headers"]
        assert headers["receipt"] == name
        assert headers["destination"] == (JOB_DEST if name in queued else CLOUD_DEST)
        body = verify(pki, str(message["body"]))
        assert body == (queued.get(name) or cloud_queued[name])
        parse_message(body)


def test_tls_with_the_host_certificate_as_client_certificate(tmp_path, pki, rabbit):
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "localhost", STOMP_TLS_PORT, True, JOB_DEST))
    queued = fill(settings, 5)
    consumer = Consumer(STOMP_PORT, [JOB_DEST])
    try:
        result = send_queued(settings, 30, now=time.time())
        assert (result.sent, result.remaining, result.error) == (5, 0, None)
        assert consumer.wait_for(5, 15)
    finally:
        consumer.close()
    assert sorted(consumer.empa_ids()) == sorted(queued)
    assert {verify(pki, str(m["body"])) for m in consumer.messages} == set(queued.values())


def test_tls_refused_client_certificate_or_unknown_broker_ca_leaves_everything_queued(tmp_path, pki, rabbit):
    stranger = make_pki(str(tmp_path / "stranger"))  # a CA the broker does not trust, and vice versa
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "localhost", STOMP_TLS_PORT, True, JOB_DEST))
    queued = fill(settings, 3)
    untrusted_client = replace(settings, broker=replace(settings.broker, host_cert=stranger.host_cert,
                                                        host_key=stranger.host_key))
    unknown_server = replace(settings, broker=replace(settings.broker, capath=stranger.ca_cert))
    for bad in (untrusted_client, unknown_server):
        started = time.monotonic()
        result = send_queued(bad, 10, now=time.time())
        assert time.monotonic() - started < 12
        assert result.unreachable and result.sent == 0 and result.remaining == 3, result
        assert read_queue(settings.outgoing_dir) == queued


def test_a_message_the_broker_refuses_is_not_removed(tmp_path, pki, rabbit):
    # RabbitMQ answers SEND to an unknown destination type with ERROR, never a RECEIPT
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", STOMP_PORT, False,
                                                                   "/nonsense/apel"))
    queued = fill(settings, 4)
    result = send_queued(settings, 10, now=time.time())
    assert result.sent == 0 and result.failed == 1 and result.remaining == 4 and result.error
    assert read_queue(settings.outgoing_dir) == queued


def test_a_corrupt_queue_element_is_reported_and_the_rest_still_goes(tmp_path, pki, rabbit):
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", STOMP_PORT, False, JOB_DEST))
    queued = fill(settings, 3)
    first = sorted(queued)[0]
    with open(os.path.join(settings.outgoing_dir, first), "wb") as f:
        f.write(b"")  # what a power cut can leave behind
    consumer = Consumer(STOMP_PORT, [JOB_DEST])
    try:
        result = send_queued(settings, 20, now=time.time())
        assert consumer.wait_for(2, 10)
    finally:
        consumer.close()
    assert (result.sent, result.invalid, result.remaining) == (2, 1, 1) and not result.ok
    assert list(read_queue(settings.outgoing_dir)) == [first]
    assert sorted(consumer.empa_ids()) == sorted(queued)[1:]


def test_coilmq_sends_receipts_and_the_sender_works_with_it(tmp_path, pki):
    coilmq = os.path.join(os.path.dirname(sys.executable), "coilmq")
    assert os.path.exists(coilmq), "coilmq must be installed in the venv for this test"
    log = str(tmp_path / "coilmq.log")
    process = subprocess.Popen([coilmq, "-b", "127.0.0.1", "-p", str(COILMQ_PORT), "-l", log],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(COILMQ_PORT, 20, process, log)
        settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", COILMQ_PORT, False,
                                                                       JOB_DEST))
        queued = fill(settings, 10)
        consumer = Consumer(COILMQ_PORT, [JOB_DEST], login=False)
        try:
            result = send_queued(settings, 20, now=time.time())
            assert consumer.wait_for(10, 10)
        finally:
            consumer.close()
        # every element was removed, which happens only after its RECEIPT: coilmq sends them
        assert (result.sent, result.remaining, result.error) == (10, 0, None)
        assert sorted(consumer.empa_ids()) == sorted(queued)
        assert all(verify(pki, str(m["body"])) in queued.values() for m in consumer.messages)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


@pytest.mark.parametrize("use_ssl", [False, True])
def test_broker_killed_mid_send_loses_nothing_and_the_next_run_completes(tmp_path, pki, rabbit, use_ssl):
    total = 150
    destination = f"/queue/apel.kill.{'tls' if use_ssl else 'plain'}"
    settings = make_settings(str(tmp_path), broker=broker_settings(
        pki, "localhost" if use_ssl else "127.0.0.1", STOMP_TLS_PORT if use_ssl else STOMP_PORT, use_ssl, destination))
    queued = fill(settings, total)
    consumer = Consumer(STOMP_PORT, [destination])

    def kill_at_forty(count: int) -> None:
        if count == 40:
            rabbit.kill()

    consumer.on_each = kill_at_forty
    started = time.monotonic()
    threads = set(threading.enumerate())
    first = send_queued(settings, 10, now=time.time())
    assert time.monotonic() - started < 12
    consumer.close()
    assert no_threads_left_behind(threads)
    assert rabbit.process is not None and rabbit.process.poll() is not None, "the broker was never killed"
    assert first.failed == 1 and first.unreachable and 40 <= first.sent < total, first
    left = read_queue(settings.outgoing_dir)
    assert len(left) == first.remaining == total - first.sent
    assert set(left) <= set(queued) and all(left[n] == queued[n] for n in left)  # bodies untouched
    assert not [f for _, _, fs in os.walk(settings.outgoing_dir) for f in fs if f.endswith(".lck")]

    rabbit.start()
    again = Consumer(STOMP_PORT, [destination])
    try:
        second = send_queued(settings, 30, now=time.time())
        assert (second.sent, second.failed, second.remaining) == (first.remaining, 0, 0), second
        # every message the broker receipted survived the crash (persistent); nothing is missing
        expected = set(queued)
        deadline = time.monotonic() + scaled(20)
        while time.monotonic() < deadline and not expected <= set(consumer.empa_ids()) | set(again.empa_ids()):
            time.sleep(0.2)
    finally:
        again.close()
    received = set(consumer.empa_ids()) | set(again.empa_ids())
    assert expected <= received, f"{len(expected - received)} messages lost"
    assert read_queue(settings.outgoing_dir) == {}
