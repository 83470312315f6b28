"""The built-in sender without a real broker: it never hangs, never loses a queued message, and
never reports success with messages left behind. (A minimal STOMP broker stands in where one
must answer; the real-broker tests are in tests/integration/test_apel_broker.py.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from tests.unit.test_apel_support import (
    NOW,
    StompStub,
    broker_settings,
    make_pki,
    make_settings,
    make_usage,
    read_queue,
)
from tests.waiting import scaled
from vacfactory.accounting import account_vm, send_is_due, send_queued
from vacfactory.accounting.sender import SEND_RESERVE_SECONDS, _ca_bundle
from vacfactory.cli import apel as cli
from vacfactory.cli.common import EXIT_FAILURE, EXIT_OK
from vacfactory.accounting import AccountingSettings
from vacfactory.accounting.settings import DEFAULT_CLOUD_DESTINATION
from vacfactory.cli.main import build_parser
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config
from vacfactory.core.apel import parse_message
from vacfactory.errors import AccountingError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queued_settings(tmp_path, pki, port, use_ssl=False, count=3):
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", port, use_ssl))
    for i in range(1, count + 1):
        account_vm(make_usage(i), settings, NOW)
    return settings


def no_locks(path: str) -> bool:
    return not [f for _, _, files in os.walk(path) for f in files if f.endswith(".lck")]


def test_nothing_queued_means_no_connection_at_all(tmp_path, pki):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1",
                                                                       listener.getsockname()[1], False))
        result = send_queued(settings, 5)
        assert (result.sent, result.failed, result.remaining, result.error) == (0, 0, 0, None)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_refused_connection_is_unreachable_and_keeps_everything(tmp_path, pki):
    settings = queued_settings(tmp_path, pki, free_port())
    before = read_queue(settings.outgoing_dir)
    started = time.monotonic()
    result = send_queued(settings, 10)
    assert time.monotonic() - started < scaled(5)
    assert result.unreachable and result.sent == 0 and result.remaining == 3 and not result.ok
    assert read_queue(settings.outgoing_dir) == before
    assert no_locks(settings.outgoing_dir)


@pytest.mark.parametrize("use_ssl", [False, True])
def test_a_peer_that_never_answers_cannot_make_the_sender_hang(tmp_path, pki, use_ssl):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    accepted = []
    stop = threading.Event()

    def accept_and_say_nothing():
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except socket.timeout:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        settings = queued_settings(tmp_path, pki, silent.getsockname()[1], use_ssl=use_ssl)
        started = time.monotonic()
        result = send_queued(settings, 1.5)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        silent.close()
    assert accepted, "the sender never connected: the test proved nothing"
    assert elapsed < 1.5 + scaled(1.0), elapsed
    assert result.unreachable and result.sent == 0 and result.remaining == 3
    assert no_locks(settings.outgoing_dir)


def test_missing_broker_host_or_certificate_is_a_plain_failure(tmp_path, pki):
    settings = queued_settings(tmp_path, pki, free_port())
    no_host = replace(settings, broker=replace(settings.broker, host=None))
    result = send_queued(no_host, 5)
    assert result.error and "apel_broker_host" in result.error and not result.unreachable and result.remaining == 3
    no_cert = replace(settings, broker=replace(settings.broker, host_cert=str(tmp_path / "missing.pem")))
    result = send_queued(no_cert, 5)
    assert result.error and "cannot load" in result.error and result.remaining == 3


def test_ca_directory_is_turned_into_a_bundle(tmp_path, pki):
    capath = tmp_path / "certificates"
    capath.mkdir()
    ca = open(pki.ca_cert, "rb").read()
    (capath / "1a2b3c4d.0").write_bytes(ca)
    (capath / "testca.pem").write_bytes(ca)  # the same CA twice: kept once
    (capath / "1a2b3c4d.signing_policy").write_text("access_id_CA X509 '/CN=x'\n")
    path, temporary = _ca_bundle(str(capath))
    try:
        assert temporary and open(path, "rb").read() == ca
    finally:
        os.unlink(path)
    assert _ca_bundle(pki.ca_cert) == (pki.ca_cert, False)
    (capath / "1a2b3c4d.0").unlink()
    (capath / "testca.pem").unlink()
    with pytest.raises(AccountingError):
        _ca_bundle(str(capath))


def test_send_timer(tmp_path):
    settings = make_settings(str(tmp_path))
    assert not send_is_due(settings, None, NOW)  # built-in sender off by default
    on = replace(settings, broker=replace(settings.broker, send_enabled=True, send_interval_seconds=600))
    assert send_is_due(on, None, NOW)
    assert not send_is_due(on, NOW - 599, NOW)
    assert send_is_due(on, NOW - 600, NOW)


def local_jobs(bodies):
    """LocalJobId of each message body (signed or not: the record is in the text)."""
    found = []
    for body in bodies:
        start = body.index("APEL-individual-job-message")
        text = body[start:body.index("%%", start) + 2]
        found.append(parse_message(text).records[0]["LocalJobId"])
    return found


def test_timeout_with_messages_left_is_a_failure_and_loses_nothing(tmp_path, pki, capsys):
    """A slow broker and a backlog the timeout cannot clear: ``apel send`` exits 1 (not 0), the
    broker got exactly the messages removed from the queue (none left unconfirmed in flight),
    and the next run sends the rest."""
    delay = 0.25
    with StompStub(receipt_delay=lambda i: delay) as broker:
        settings = queued_settings(tmp_path, pki, broker.port, count=20)
        queued = read_queue(settings.outgoing_dir)
        args = build_parser().parse_args(["apel", "send", "--timeout", "3", "--json"])
        started = time.monotonic()
        code = cli.run_action(cli.do_send, args, settings, time.time())
        elapsed = time.monotonic() - started
        out = json.loads(capsys.readouterr().out)
        assert code == EXIT_FAILURE, out
        assert 0 < out["sent"] < 20 and out["remaining"] == 20 - out["sent"], out
        assert out["failed"] == 0 and "timeout" in out["error"] and not out["unreachable"], out
        assert elapsed < 3 + scaled(1.0), elapsed
        received = local_jobs(broker.bodies())
        left = read_queue(settings.outgoing_dir)
        assert len(received) == out["sent"], "a SEND was started that could not be confirmed in time"
        assert sorted(received + local_jobs(left.values())) == sorted(local_jobs(queued.values()))
        assert no_locks(settings.outgoing_dir)

        result = send_queued(settings, 3)
        assert result.timed_out and not result.ok and result.failed == 0 and result.remaining > 0

    with StompStub() as fast:
        settings = replace(settings, broker=replace(settings.broker, port=fast.port))
        assert send_queued(settings, 10).ok
        assert read_queue(settings.outgoing_dir) == {}
        code = cli.run_action(cli.do_send, args, settings, time.time())
        assert code == EXIT_OK  # nothing left: success
    assert sorted(received + local_jobs(broker.bodies()[len(received):]) + local_jobs(fast.bodies())) == \
        sorted(local_jobs(queued.values()))


def test_no_send_is_started_without_time_for_its_receipt(tmp_path, pki):
    """The first receipt comes just inside the deadline but inside the reserve: the sender stops
    there (a timeout, exit 1) rather than start a SEND it could not wait for."""
    timeout = 3.0
    close_budget = timeout / 4
    begin = {}
    # hold the first receipt until the reserve is all that is left of the deadline (sleeps only
    # ever overrun, and an overrun up to the reserve keeps the receipt before the deadline)
    hold = timeout - close_budget - SEND_RESERVE_SECONDS + 0.05

    def delay(i):
        return max(0.0, begin["t"] + hold - time.monotonic()) if i == 0 else 0.0

    with StompStub(receipt_delay=delay) as broker:
        settings = queued_settings(tmp_path, pki, broker.port, count=3)
        begin["t"] = time.monotonic()
        result = send_queued(settings, timeout)
        assert (result.sent, result.remaining, result.failed) == (1, 2, 0), result
        assert result.timed_out and not result.ok and not result.unreachable
        assert len(broker.bodies()) == 1
        assert len(read_queue(settings.outgoing_dir)) == 2


def settings_from_file(tmp_path, text: str) -> AccountingSettings:
    path = tmp_path / "vacfactory.conf"
    path.write_text(text)
    config = load_config(ConfigSources.for_main_file(str(path)),
                         host_facts=HostFacts(fqdn="factory07.example.com", cpu_count=8, mem_total_mb=65536))
    return AccountingSettings.from_config(config)


def test_cloud_records_go_to_apel_cloud_destination_from_the_configuration(tmp_path, pki):
    """apel_cloud_destination is an option: a configuration setting it loads (it used to be
    rejected as unknown), and the sender delivers cloud records there, job records to
    apel_destination."""
    with StompStub() as broker:
        base = (
            "[settings]\n"
            "vac_space = vac01.example.com\n"
            f"state_dir = {tmp_path / 'state'}\n"
            "factory_name = factory07.example.com\n"
            "gocdb_sitename = UKI-TEST\nhs06_per_processor = 10\n"
            "apel_cloud_records = yes\n"
            f"apel_broker_host = localhost\napel_broker_port = {broker.port}\napel_use_ssl = no\n"
            f"apel_host_cert = {pki.host_cert}\napel_host_key = {pki.host_key}\napel_capath = {pki.ca_cert}\n"
            "apel_destination = /queue/test.grid\n"
        )
        default = settings_from_file(tmp_path, base)
        assert default.broker.cloud_destination == DEFAULT_CLOUD_DESTINATION == "/queue/global.accounting.cloud.CENTRAL"
        settings = settings_from_file(tmp_path, base + "apel_cloud_destination = /queue/test.cloud\n")
        assert settings.broker.cloud_destination == "/queue/test.cloud"
        account_vm(make_usage(1, end_time=int(time.time()) - 60, start_time=int(time.time()) - 3600), settings,
                   time.time())
        result = send_queued(settings, 10)
        assert result.ok and result.sent == 2, result
        by_destination = {headers["destination"]: body for headers, body in broker.messages}
        assert set(by_destination) == {"/queue/test.grid", "/queue/test.cloud"}
        assert "APEL-cloud-message" in by_destination["/queue/test.cloud"]
        assert "APEL-individual-job-message" in by_destination["/queue/test.grid"]
