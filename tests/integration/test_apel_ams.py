"""The built-in sender over ARGO AMS: the real ``argo-ams-library`` against a test AMS over
real HTTPS (tests/integration/ams_server.py) on ports 443 and 8443 of a private loopback
address, with certificates made by the openssl command line.

What arrives must be what SSM's AMS path sends: the S/MIME-signed record (checked with
``openssl smime -verify``) base64-encoded as ``data``, with attribute ``empaid`` = the dirq
element name; and every failure (401, 409, 500, a cut connection, a timeout, a refused
certificate, a kill -9) must leave exactly the unconfirmed messages queued.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import Dict, List

import pytest

from tests.integration.ams_server import AmsServer
from tests.unit.test_apel_support import NOW, make_settings, make_usage, read_queue
from vacfactory.accounting import account_vm, send_queued
from vacfactory.accounting.send_state import read_state
from vacfactory.accounting.settings import AMS, BrokerSettings
from vacfactory.core.apel import parse_message

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST_DN = "/C=UK/O=eScience/CN=factory07.tier2.hep.manchester.ac.uk"


def openssl(*args: str, data: bytes = b"") -> bytes:
    done = subprocess.run(["openssl", *args], input=data, capture_output=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Dict[str, str]:
    """A CA, the factory's host certificate (TLS client + S/MIME) and the AMS server's, by openssl."""
    d = str(tmp_path_factory.mktemp("ams-pki"))
    p = {n: os.path.join(d, n) for n in ("ca.pem", "ca.key", "host.pem", "host.key", "server.pem", "server.key",
                                          "ext.cnf")}
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca.key"], "-out", p["ca.pem"],
            "-days", "2", "-subj", "/O=vacfactory test/CN=vacfactory AMS test CA")
    with open(p["ext.cnf"], "w") as f:
        f.write("[host]\nextendedKeyUsage = clientAuth, emailProtection\n"
                f"[server]\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:{address}\n")
    for name, subject, section in (("host", HOST_DN, "host"), ("server", f"/CN={address}", "server")):
        csr = openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", p[f"{name}.key"], "-subj", subject)
        with open(p[f"{name}.pem"], "wb") as f:
            f.write(openssl("x509", "-req", "-CA", p["ca.pem"], "-CAkey", p["ca.key"], "-CAcreateserial",
                            "-days", "2", "-extfile", p["ext.cnf"], "-extensions", section, data=csr))
    p["address"] = address
    return p


@pytest.fixture
def ams(certs, monkeypatch):
    # as with SSM, the server is checked against the requests CA bundle, not capath
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certs["ca.pem"])
    server = AmsServer(certs["address"], certs["server.pem"], certs["server.key"], certs["ca.pem"],
                       allowed_dns=(HOST_DN,))
    yield server
    server.close()


def ams_settings(tmp_path, certs, **broker_changes):
    broker = BrokerSettings(protocol=AMS, host=certs["address"], destination="gLite-APEL", ams_project="accounting",
                            host_cert=certs["host.pem"], host_key=certs["host.key"], capath=certs["ca.pem"],
                            ams_timeout_seconds=1.0, ams_retry=0, ams_retry_sleep_seconds=0.2)
    return make_settings(str(tmp_path / "state"), broker=replace(broker, **broker_changes))


def fill(settings, count: int) -> Dict[str, str]:
    """Account ``count`` VMs; {element name: queued body}."""
    for i in range(1, count + 1):
        account_vm(make_usage(i), settings, NOW)
    return read_queue(settings.outgoing_dir)


def verified(certs, data: bytes) -> str:
    """The record of an S/MIME message whose signature and signer openssl accept, taken as
    ssmreceive takes it: the verified text after its first blank line (``-text`` headers)."""
    out = openssl("smime", "-verify", "-CAfile", certs["ca.pem"], "-purpose", "any", data=data)
    headers, blank, body = out.decode("ascii").replace("\r\n", "\n").partition("\n\n")
    assert blank and headers == "Content-Type: text/plain", headers
    return body


def test_published_signed_with_empaid_after_the_x509_token_exchange(tmp_path, certs, ams):
    settings = ams_settings(tmp_path, certs)
    queued = fill(settings, 3)
    result = send_queued(settings, 20, now=time.time())
    assert result.ok and result.sent == 3 and result.remaining == 0
    assert ams.requests[0] == ("GET", f"/v1/service-types/ams/hosts/{certs['address']}:authx509")
    assert ams.requests[1:] == [("POST", "/v1/projects/accounting/topics/gLite-APEL:publish")] * 3
    assert {m.attributes["empaid"]: verified(certs, m.data) for m in ams.published} == queued
    assert all(m.data.startswith(b"MIME-Version: 1.0") and b"multipart/signed" in m.data for m in ams.published)
    assert read_queue(settings.outgoing_dir) == {}
    state = read_state(str(tmp_path / "state"))
    assert state["protocol"] == "AMS" and state["destination"] == "gLite-APEL" and state["last_error"] is None
    assert state["last_success"] == state["last_attempt"]


def test_a_token_from_sender_cfg_skips_the_exchange(tmp_path, certs, ams):
    settings = ams_settings(tmp_path, certs)
    cfg = tmp_path / "sender.cfg"
    cfg.write_text(f"[sender]\nprotocol: AMS\n[broker]\nhost: {certs['address']}\nport: 61613\n"
                   f"[certificates]\ncertificate: {certs['host.pem']}\nkey: {certs['host.key']}\n"
                   f"capath: /etc/grid-security/certificates\n"
                   f"[messaging]\ndestination: gLite-APEL\nams_project: accounting\ntoken: {ams.token}\n"
                   f"path: {settings.outgoing_dir}\npath_type: dirq\n")
    settings = replace(settings, broker=replace(settings.broker, host="unused.invalid", sender_cfg=str(cfg)))
    queued = fill(settings, 2)
    result = send_queued(settings, 20, now=time.time())
    assert result.ok and result.sent == 2
    assert all(method == "POST" for method, _ in ams.requests)
    assert {m.attributes["empaid"] for m in ams.published} == set(queued)


def test_a_certificate_ams_does_not_know_sends_nothing_and_says_why(tmp_path, certs, ams):
    ams.allowed_dns = ("/CN=someone else",)
    settings = ams_settings(tmp_path, certs)
    queued = fill(settings, 2)
    result = send_queued(settings, 20, now=time.time())
    assert not result.ok and result.sent == 0 and result.remaining == 2
    assert "401" in (result.error or "") and "GOCDB" in (result.error or "")
    assert [m for m, _ in ams.requests] == ["GET"]
    assert read_queue(settings.outgoing_dir) == queued
    assert read_state(str(tmp_path / "state"))["last_error"] == result.error


def test_an_ams_server_the_ca_bundle_does_not_trust_gets_nothing(tmp_path, certs, ams, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certs["host.pem"])  # not the CA that signed the server
    settings = ams_settings(tmp_path, certs, ams_token=ams.token)
    queued = fill(settings, 2)
    result = send_queued(settings, 20, now=time.time())
    assert not result.ok and result.unreachable and "CERTIFICATE_VERIFY_FAILED" in (result.error or "")
    assert ams.published == [] and read_queue(settings.outgoing_dir) == queued


@pytest.mark.parametrize("step,retry", [
    (("status", 401), 0), (("status", 409), 0), (("status", 500), 0), ("cut", 0), (("slow", 3.0), 0),
    (("status", 500), 1),
])
def test_a_failure_leaves_exactly_the_unconfirmed_messages_and_the_next_run_sends_them_once(
        tmp_path, certs, ams, step, retry):
    settings = ams_settings(tmp_path, certs, ams_retry=retry)
    queued = fill(settings, 4)
    names = sorted(queued)
    ams.plan = [None, step]  # type: ignore[list-item]  # the second publish fails
    first = send_queued(settings, 20, now=time.time())
    confirmed = {m.attributes["empaid"] for m in ams.published}
    if retry:  # the library re-sends after a 500 and the re-send succeeds
        assert first.ok and first.sent == 4 and read_queue(settings.outgoing_dir) == {}
        return
    assert not first.ok and first.sent == 1 and first.remaining == 3
    assert set(read_queue(settings.outgoing_dir)) == set(names[1:])
    assert first.unreachable == (step in ("cut", ("slow", 3.0), ("status", 500)))
    # a slow answer still stored the message: it is left queued and goes again (a duplicate)
    assert confirmed == ({names[0], names[1]} if step == ("slow", 3.0) else {names[0]})
    second = send_queued(settings, 20, now=time.time())
    assert second.ok and second.sent == 3 and read_queue(settings.outgoing_dir) == {}
    arrived = [m.attributes["empaid"] for m in ams.published]
    assert sorted(set(arrived)) == names
    assert len(arrived) == 4 + (1 if step == ("slow", 3.0) else 0)


@pytest.mark.parametrize("answer", ["not json", "{}", '{"messageIds": []}', '{"messageIds": [1, 2]}',
                                    '{"messageIds": ["1", "2"]}', '["1"]'])
def test_an_answer_without_exactly_one_message_id_leaves_the_message_queued(tmp_path, certs, ams, answer):
    settings = ams_settings(tmp_path, certs)
    queued = fill(settings, 2)
    ams.plan = [("body", answer)]
    result = send_queued(settings, 20, now=time.time())
    assert not result.ok and result.sent == 0 and result.remaining == 2
    assert "no message id" in (result.error or "")
    assert read_queue(settings.outgoing_dir) == queued


def test_a_lost_answer_means_a_duplicate_never_a_loss(tmp_path, certs, ams):
    settings = ams_settings(tmp_path, certs, ams_retry=1)
    queued = fill(settings, 3)
    ams.plan = [("stored-then", 503)]
    result = send_queued(settings, 20, now=time.time())
    assert result.ok and result.sent == 3 and read_queue(settings.outgoing_dir) == {}
    arrived = [m.attributes["empaid"] for m in ams.published]
    assert sorted(set(arrived)) == sorted(queued) and len(arrived) == 4


def test_encrypted_to_server_cert_as_ssmsend_does(tmp_path, certs, ams):
    settings = ams_settings(tmp_path, certs, server_cert=certs["server.pem"])
    queued = fill(settings, 1)
    assert send_queued(settings, 20, now=time.time()).ok
    (message,) = ams.published
    assert b"application/pkcs7-mime" in message.data or b"application/x-pkcs7-mime" in message.data
    signed = openssl("smime", "-decrypt", "-recip", certs["server.pem"], "-inkey", certs["server.key"],
                     data=message.data)
    assert verified(certs, signed) == queued[message.attributes["empaid"]]


def test_batches_pack_records_into_fewer_messages_and_empty_the_queue(tmp_path, certs, ams):
    settings = ams_settings(tmp_path, certs, batch_records=3)
    queued = fill(settings, 7)
    result = send_queued(settings, 20, now=time.time())
    assert result.ok and result.sent == 7 and result.messages == 3
    jobs = [r["LocalJobId"] for m in ams.published for r in parse_message(verified(certs, m.data)).records]
    expected = [parse_message(queued[name]).records[0]["LocalJobId"] for name in sorted(queued)]
    assert jobs == expected
    assert [len(parse_message(verified(certs, m.data)).records) for m in ams.published] == [3, 3, 1]
    assert read_queue(settings.outgoing_dir) == {}


WORKER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import pickle
from vacfactory.accounting import send_queued
settings = pickle.loads(bytes.fromhex(sys.argv[2]))
send_queued(settings, 60, now=time.time())
"""


def test_kill_minus_nine_mid_publish_then_restart_loses_nothing(tmp_path, certs, ams):
    import pickle

    settings = ams_settings(tmp_path, certs, ams_timeout_seconds=30.0)
    queued = fill(settings, 5)
    names = sorted(queued)
    ams.plan = [None, None, ("slow", 30.0)]  # the third is stored, its answer never comes in time
    env = dict(os.environ, REQUESTS_CA_BUNDLE=certs["ca.pem"])
    worker = subprocess.Popen([sys.executable, "-c", WORKER, REPO, pickle.dumps(settings).hex()], env=env)
    deadline = time.monotonic() + 30
    while len(ams.published) < 3 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.02)
    assert len(ams.published) == 3
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    # the killed run left names[2] locked; ssmsend's rule frees a lock after 600 s: age it
    for root, _, files in os.walk(settings.outgoing_dir):
        for f in files:
            if f.endswith(".lck"):
                os.utime(os.path.join(root, f), (time.time() - 601, time.time() - 601))
    result = send_queued(settings, 20, now=time.time())
    assert result.ok and result.remaining == 0 and result.sent == 3
    arrived = [m.attributes["empaid"] for m in ams.published]
    assert sorted(set(arrived)) == names
    assert arrived.count(names[2]) == 2 and len(arrived) == 6  # only the message in flight twice
