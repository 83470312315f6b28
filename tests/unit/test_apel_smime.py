"""S/MIME signing: what ssmsend produces, checked with the real ``openssl smime -verify``."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.unit.test_apel_support import NOW, make_pki, make_usage
from vacfactory.accounting.smime import load_signer
from vacfactory.core.apel import RecordIdentity, job_message, parse_message
from vacfactory.errors import AccountingError

IDENTITY = RecordIdentity(site="UKI-TEST", space="vac01.example.com", factory="f1.example.com")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def openssl_verify(pki, signed: bytes, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "smime", "-verify", "-CAfile", pki.ca_cert, *extra],
                          input=signed, capture_output=True, timeout=30)


def test_openssl_verifies_the_signature_and_returns_the_record(pki):
    body = job_message(make_usage(), IDENTITY, NOW).encode("ascii")
    signed = load_signer(pki.host_cert, pki.host_key, time.time()).sign(body)
    assert signed.startswith(b"MIME-Version: 1.0")
    assert b'multipart/signed; protocol="application/x-pkcs7-signature"; micalg="sha-256"' in signed
    plain = openssl_verify(pki, signed, "-text")
    assert plain.returncode == 0, plain.stderr
    assert b"Verification successful" in plain.stderr
    assert plain.stdout.replace(b"\r\n", b"\n") == body


def test_ssmreceive_style_unpacking_yields_a_parseable_message(pki):
    # ssmreceive runs `openssl smime -verify` without -text and splits at the first blank line
    body = job_message(make_usage(), IDENTITY, NOW).encode("ascii")
    signed = load_signer(pki.host_cert, pki.host_key, time.time()).sign(body)
    out = openssl_verify(pki, signed)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode("ascii").strip().splitlines()
    blank = lines.index("")
    assert "text/plain" in "\n".join(lines[:blank])
    message = parse_message("\n".join(lines[blank + 1:]) + "\n")
    assert message.records[0]["LocalJobId"] == make_usage().uuid


def test_a_tampered_message_fails_verification(pki):
    body = job_message(make_usage(), IDENTITY, NOW).encode("ascii")
    signed = load_signer(pki.host_cert, pki.host_key, time.time()).sign(body)
    tampered = signed.replace(b"WallDuration: 85600", b"WallDuration: 95600")
    assert tampered != signed
    assert openssl_verify(pki, tampered).returncode != 0


def test_signer_dn_is_in_slash_form(pki):
    assert load_signer(pki.host_cert, pki.host_key, time.time()).subject_dn == pki.host_dn


def test_mismatched_key_and_certificate_are_refused(pki, tmp_path):
    other = make_pki(str(tmp_path / "other"))
    with pytest.raises(AccountingError, match="does not match"):
        load_signer(pki.host_cert, other.host_key, time.time())


def test_a_certificate_expiring_within_a_day_is_refused_like_ssmsend(tmp_path):
    short = make_pki(str(tmp_path), host_days=0.5)
    with pytest.raises(AccountingError, match="less than a day"):
        load_signer(short.host_cert, short.host_key, time.time())


def test_missing_files_are_an_accounting_error(pki, tmp_path):
    with pytest.raises(AccountingError, match="cannot load"):
        load_signer(str(tmp_path / "none.pem"), pki.host_key, time.time())
