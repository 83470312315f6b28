"""The built-in sender without a broker: it never hangs and never loses a queued message.
(The real-broker tests are in tests/integration/test_apel_broker.py.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from tests.unit.test_apel_support import NOW, broker_settings, make_pki, make_settings, make_usage, read_queue
from vacfactory.accounting import account_vm, send_is_due, send_queued
from vacfactory.accounting.sender import _ca_bundle
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
    assert time.monotonic() - started < 5
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
    assert elapsed < 1.5 + 1.0, elapsed
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
