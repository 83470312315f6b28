"""A limited X.509 proxy for the VM, made from the machinetype's certificate and key.

Vac's ``makeX509Proxy``, rebuilt on ``cryptography``: the machinetype directory holds
``x509cert.pem`` (the certificate, optionally followed by its chain) and ``x509key.pem``;
with ``user_data_proxy = true`` the VM receives a limited proxy in
``##user_data_option_x509_proxy##`` that expires at the VM's shutdown time, so a stolen
user_data is worth little.

Kept from Vac: the RFC 3820 form with proxyCertInfo (policy language *limited proxy*
1.3.6.1.4.1.3536.1.1.1.9) and the machinetype as the proxy's CN; the Globus legacy form
(CN=``limited proxy``, no proxyCertInfo); keyUsage (digitalSignature, keyEncipherment,
keyAgreement), sha256; refusal when the certificate expires before the VM's shutdown time;
output = proxy certificate + its private key (unencrypted) + the certificate chain, PEM.
Changed: a 2048-bit RSA key (Vac: 1024, which current OpenSSL security levels refuse), a
random 63-bit serial, and notBefore five minutes in the past to tolerate clock skew in the VM.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from typing import List

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from vacfactory.errors import VacFactoryError

log = logging.getLogger(__name__)

PROXY_CERT_INFO_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
LIMITED_PROXY_OID = "1.3.6.1.4.1.3536.1.1.1.9"
KEY_BITS = 2048
CLOCK_SKEW = datetime.timedelta(minutes=5)


class ProxyError(VacFactoryError):
    """The machinetype's certificate or key cannot make the proxy the VM needs."""


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body.extend(reversed(chunk))
    return b"\x06" + _der_length(len(body)) + bytes(body)


def proxy_cert_info_der(policy_language: str = LIMITED_PROXY_OID) -> bytes:
    """DER of RFC 3820 ``ProxyCertInfo ::= SEQUENCE { proxyPolicy ProxyPolicy }`` without a
    path length, where ``ProxyPolicy ::= SEQUENCE { policyLanguage OID }``."""
    policy = _der_oid(policy_language)
    proxy_policy = b"\x30" + _der_length(len(policy)) + policy
    return b"\x30" + _der_length(len(proxy_policy)) + proxy_policy


def _load_chain(cert_pem: bytes) -> List[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise ProxyError(f"x509cert.pem holds no readable certificate ({e})") from None
    if not chain:
        raise ProxyError("x509cert.pem holds no certificate")
    return chain


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc if hasattr(cert, "not_valid_after_utc") else \
        cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def make_limited_proxy(
    cert_pem: bytes,
    key_pem: bytes,
    not_after: datetime.datetime,
    machinetype: str,
    legacy: bool = False,
    *,
    now: "datetime.datetime | None" = None,
) -> bytes:
    """A limited proxy of ``cert_pem`` valid until ``not_after``, as PEM bytes.

    Raises ProxyError if the key does not load, does not match the certificate, or the
    certificate expires before ``not_after`` (the VM would be left with a dead proxy).
    ``not_after`` must be timezone-aware or UTC.
    """
    chain = _load_chain(cert_pem)
    issuer = chain[0]
    try:
        issuer_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ProxyError(f"x509key.pem is not an unencrypted private key ({e})") from None
    if issuer_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ProxyError("x509key.pem does not match x509cert.pem")

    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=datetime.timezone.utc)
    issuer_end = _not_after(issuer)
    if issuer_end < not_after:
        raise ProxyError(
            f"certificate {issuer.subject.rfc4514_string()} expires at {issuer_end.isoformat()},"
            f" before the VM's shutdown time {not_after.isoformat()}"
        )
    not_after = min(not_after, issuer_end)
    start = (now or datetime.datetime.now(datetime.timezone.utc)) - CLOCK_SKEW

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    cn = "limited proxy" if legacy else machinetype
    subject = x509.Name(
        list(issuer.subject.rdns)
        + [x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn)])]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(63) | 1)
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
    if not legacy:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(PROXY_CERT_INFO_OID, proxy_cert_info_der()), critical=True
        )
    proxy = builder.sign(issuer_key, hashes.SHA256())
    log.info("%s: made %s proxy of %s valid until %s", machinetype,
             "legacy" if legacy else "RFC 3820", issuer.subject.rfc4514_string(),
             not_after.isoformat())
    parts = [
        proxy.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    ]
    parts.extend(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return b"".join(parts)
