"""Limited X.509 proxies, checked by OpenSSL itself (openssl verify -allow_proxy_certs)."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator, List, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from vacfactory.vmio.proxy import (
    LIMITED_PROXY_OID,
    PROXY_CERT_INFO_OID,
    ProxyError,
    make_limited_proxy,
    proxy_cert_info_der,
)

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
SHUTDOWN = NOW + datetime.timedelta(hours=30)


def _name(*cns: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "UK"),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vfvmio test")]
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])


def _cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, ca: bool,
          days: float) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=1))
               .not_valid_after(NOW + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class PKI:
    dir: str
    ca: x509.Certificate
    intermediate: x509.Certificate
    user: x509.Certificate
    user_key: rsa.RSAPrivateKey

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, data: bytes) -> str:
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)


@pytest.fixture(scope="module")
def pki() -> Iterator[PKI]:
    d = tempfile.mkdtemp(prefix="vfvmio-pki-")
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _cert(_name("vfvmio root CA"), ca_key, _name("vfvmio root CA"), ca_key, True, 3650)
    int_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    intermediate = _cert(_name("vfvmio intermediate"), int_key, ca.subject, ca_key, True, 1000)
    user_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    user = _cert(_name("robot", "lhcb pilot"), user_key, intermediate.subject, int_key, False, 365)
    p = PKI(d, ca, intermediate, user, user_key)
    p.write("ca.pem", _pem(ca))
    yield p
    shutil.rmtree(d, ignore_errors=True)


def _split(bundle: bytes) -> List[bytes]:
    marker = b"-----END "
    parts, rest = [], bundle
    while marker in rest:
        end = rest.index(b"-----\n", rest.index(marker)) + 6
        parts.append(rest[:end])
        rest = rest[end:]
    return parts


def _verify(pki: PKI, proxy_pem: bytes, untrusted: bytes) -> subprocess.CompletedProcess:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to verify proxies"
    return subprocess.run(
        [openssl, "verify", "-allow_proxy_certs", "-CAfile", pki.path("ca.pem"),
         "-untrusted", pki.write("untrusted.pem", untrusted),
         pki.write("proxy.pem", proxy_pem)],
        capture_output=True, text=True, check=False)


def _proxy(pki: PKI, legacy: bool = False, not_after: Optional[datetime.datetime] = None
           ) -> List[bytes]:
    bundle = make_limited_proxy(_pem(pki.user) + _pem(pki.intermediate), _key_pem(pki.user_key),
                                not_after or SHUTDOWN, "lhcb-mt", legacy=legacy)
    return _split(bundle)


def test_rfc3820_proxy_verifies_with_openssl(pki: PKI) -> None:
    parts = _proxy(pki)
    result = _verify(pki, parts[0], _pem(pki.user) + _pem(pki.intermediate))
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().endswith(": OK")


def test_bundle_is_proxy_key_then_chain(pki: PKI) -> None:
    parts = _proxy(pki)
    assert len(parts) == 4
    proxy = x509.load_pem_x509_certificate(parts[0])
    key = serialization.load_pem_private_key(parts[1], password=None)
    assert parts[1].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert key.public_key().public_numbers() == proxy.public_key().public_numbers()
    assert x509.load_pem_x509_certificate(parts[2]) == pki.user
    assert x509.load_pem_x509_certificate(parts[3]) == pki.intermediate


def test_proxy_fields_follow_rfc3820_and_vac(pki: PKI) -> None:
    made_at = datetime.datetime.now(UTC)  # not NOW: a long (loaded) run imports this module minutes earlier
    proxy = x509.load_pem_x509_certificate(_proxy(pki)[0])
    assert proxy.not_valid_after_utc == SHUTDOWN
    assert proxy.not_valid_before_utc <= made_at
    assert proxy.issuer == pki.user.subject
    assert list(proxy.subject.rdns)[:-1] == list(pki.user.subject.rdns)
    assert proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value == "lhcb-mt"
    assert proxy.public_key().key_size == 2048
    assert isinstance(proxy.signature_hash_algorithm, hashes.SHA256)
    ext = proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    assert ext.critical
    assert ext.value.value == proxy_cert_info_der()
    usage = proxy.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment


def test_openssl_reads_the_limited_policy_language(pki: PKI) -> None:
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=_proxy(pki)[0],
                          capture_output=True, check=True).stdout.decode()
    assert "Proxy Certificate Information" in text
    assert LIMITED_PROXY_OID in text


def test_proxy_info_der_encodes_the_limited_language() -> None:
    # ProxyCertInfo ::= SEQUENCE { ProxyPolicy ::= SEQUENCE { OID 1.3.6.1.4.1.3536.1.1.1.9 } }
    assert proxy_cert_info_der() == bytes.fromhex("300f300d060b2b060104019b5001010109")
    parsed = subprocess.run(["openssl", "asn1parse", "-inform", "DER"], input=proxy_cert_info_der(),
                            capture_output=True, check=True).stdout.decode()
    assert "1.3.6.1.4.1.3536.1.1.1.9" in parsed


def test_legacy_proxy_has_limited_proxy_cn_and_no_proxy_cert_info(pki: PKI) -> None:
    proxy = x509.load_pem_x509_certificate(_proxy(pki, legacy=True)[0])
    assert proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value == "limited proxy"
    with pytest.raises(x509.ExtensionNotFound):
        proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    assert proxy.not_valid_after_utc == SHUTDOWN


def test_certificate_expiring_before_shutdown_is_refused(pki: PKI) -> None:
    with pytest.raises(ProxyError, match="before the VM's shutdown time"):
        _proxy(pki, not_after=NOW + datetime.timedelta(days=400))


def test_naive_shutdown_time_is_taken_as_utc(pki: PKI) -> None:
    proxy = x509.load_pem_x509_certificate(_proxy(pki, not_after=SHUTDOWN.replace(tzinfo=None))[0])
    assert proxy.not_valid_after_utc == SHUTDOWN


def test_mismatched_key_is_refused(pki: PKI) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ProxyError, match="does not match"):
        make_limited_proxy(_pem(pki.user), _key_pem(other), SHUTDOWN, "mt")


@pytest.mark.parametrize("cert,key", [(b"", b""), (b"not a cert", b"x"), (None, b"garbage")])
def test_unreadable_inputs_are_refused(pki: PKI, cert, key) -> None:
    with pytest.raises(ProxyError):
        make_limited_proxy(cert if cert is not None else _pem(pki.user), key, SHUTDOWN, "mt")


def test_encrypted_key_is_refused(pki: PKI) -> None:
    encrypted = pki.user_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ProxyError):
        make_limited_proxy(_pem(pki.user), encrypted, SHUTDOWN, "mt")
