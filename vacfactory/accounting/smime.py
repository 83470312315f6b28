"""S/MIME signing of APEL messages with the host certificate, as ssmsend does it.

ssmsend runs ``openssl smime -sign -inkey KEY -signer CERT -text``: a clear-signed
``multipart/signed`` (protocol ``application/x-pkcs7-signature``, micalg ``sha-256``) whose
first part is ``Content-Type: text/plain`` plus the record, and whose second part is the
detached base64 ``smime.p7s``. ``ssmreceive`` verifies it with ``openssl smime -verify``,
splits the output at the first blank line and checks the signer's DN against its list. We
produce the same structure with ``cryptography`` instead of a subprocess per message.
"""

from __future__ import annotations

import datetime
import logging
import subprocess
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from vacfactory.errors import AccountingError

log = logging.getLogger(__name__)

#: ssmsend refuses a certificate that expires within a day (openssl x509 -checkend 86400)
MIN_VALIDITY_SECONDS = 86400


@dataclass(frozen=True)
class Signer:
    """A loaded host certificate and key that sign message bodies."""

    certificate: x509.Certificate
    key: object
    #: the signer's DN in the slash form APEL's ``dns`` file uses
    subject_dn: str

    def sign(self, body: bytes) -> bytes:
        """Clear-sign ``body`` (``openssl smime -sign -text`` equivalent)."""
        return (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(body)
            .add_signer(self.certificate, self.key, hashes.SHA256())  # type: ignore[arg-type]
            .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Text])
        )


#: how long one ``openssl smime -encrypt`` may take (a message is at most ~1 MB)
ENCRYPT_TIMEOUT_SECONDS = 30.0


def encrypt(signed: bytes, server_cert: str) -> bytes:
    """Encrypt a signed message to ``server_cert`` exactly as ssmsend does
    (``openssl smime -encrypt -aes128 SERVER_CERT``), for sites with ``server_cert`` set."""
    try:
        done = subprocess.run(["openssl", "smime", "-encrypt", "-aes128", server_cert], input=signed,
                              capture_output=True, timeout=ENCRYPT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AccountingError(f"cannot encrypt to server_cert {server_cert}: {error}") from error
    if done.returncode != 0:
        reason = done.stderr.decode("ascii", "replace").strip().splitlines()[:1]
        raise AccountingError(f"cannot encrypt to server_cert {server_cert}: {' '.join(reason) or 'openssl failed'}")
    return done.stdout


def load_signer(cert_path: str, key_path: str, now: float) -> Signer:
    """Load and check the host certificate and key, as ssmsend checks them before sending.

    AccountingError if a file is unreadable, the key does not belong to the certificate, or
    the certificate is not valid from now until at least a day from now.
    """
    try:
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise AccountingError(f"cannot load host certificate {cert_path} / key {key_path}: {error}") from error
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise AccountingError(f"host key {key_path} does not match certificate {cert_path}")
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
    not_before, not_after = _validity(certificate)
    if not_before > moment:
        raise AccountingError(f"host certificate {cert_path} is not valid before {not_before}")
    if not_after < moment + datetime.timedelta(seconds=MIN_VALIDITY_SECONDS):
        raise AccountingError(f"host certificate {cert_path} expires {not_after}: less than a day left")
    return Signer(certificate=certificate, key=key, subject_dn=slash_dn(certificate.subject))


def _validity(certificate: x509.Certificate) -> "tuple[datetime.datetime, datetime.datetime]":
    """Aware validity bounds (``*_utc`` since cryptography 42; naive UTC before)."""
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    utc = datetime.timezone.utc
    return certificate.not_valid_before.replace(tzinfo=utc), certificate.not_valid_after.replace(tzinfo=utc)


def slash_dn(name: x509.Name) -> str:
    """``/C=UK/O=eScience/CN=host.example.org``: the DN form GOCDB and APEL's dns file use."""
    parts = []
    for rdn in name.rdns:
        for attribute in rdn:
            label = attribute.rfc4514_attribute_name
            if attribute.oid == NameOID.EMAIL_ADDRESS:
                label = "emailAddress"
            parts.append(f"/{label}={attribute.value}")
    return "".join(parts)
