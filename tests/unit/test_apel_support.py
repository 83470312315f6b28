"""Shared builders for the APEL tests: settings over a temporary state directory, VM usages,
a throw-away CA with host and server certificates, a dirq reader and a minimal STOMP broker.
(No tests here.)"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dirq.QueueSimple import QueueSimple

from vacfactory.accounting.settings import AccountingSettings, BrokerSettings
from vacfactory.core.apel import VMUsage

#: 2024-01-17T13:49:39Z: a fixed "now" for pure tests
NOW = 1705499379.0
UUID = "5d0c1a3e-7f7b-4c55-9a0e-1f1b6ad7c2e4"


def make_settings(state_dir: str, **changes: object) -> AccountingSettings:
    settings = AccountingSettings(
        site="UKI-NORTHGRID-MAN-HEP",
        space="vac01.tier2.hep.manchester.ac.uk",
        factory="factory07.tier2.hep.manchester.ac.uk",
        archive_dir=os.path.join(state_dir, "apel-archive"),
        outgoing_dir=os.path.join(state_dir, "apel-outgoing"),
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def make_usage(i: int = 0, **changes: object) -> VMUsage:
    usage = VMUsage(
        uuid=UUID if i == 0 else f"00000000-0000-4000-8000-{i:012x}",
        machinetype="lhcb-prod",
        hostname=f"factory07-{i % 100:02d}.tier2.hep.manchester.ac.uk",
        processors=8,
        start_time=1705413779,
        end_time=1705499379,
        cpu_seconds=81234,
        memory_mb=16384,
        hs06_per_processor=10.5,
        accounting_fqan="/lhcb/Role=NULL/Capability=NULL",
    )
    return replace(usage, **changes)  # type: ignore[arg-type]


def read_queue(path: str) -> Dict[str, str]:
    """Every element of a dirq QueueSimple, read back the way ssmsend reads it (lock, get)."""
    queue = QueueSimple(path)
    bodies = {}
    for name in queue:
        assert queue.lock(name), name
        bodies[name] = queue.get(name).decode("ascii")
        queue.unlock(name)
    return bodies


def archive_files(archive_dir: str, cloud: bool = False, queued: Optional[bool] = None) -> List[str]:
    """Job records (``YYYYMM/<identity>/<uuid>``, not queued: ``YYYYMM/not-queued/<identity>/<uuid>``)
    or cloud records (``cloud/YYYYMM/<uuid>``, ``cloud/not-queued/YYYYMM/<uuid>``); ``queued``
    None: both kinds."""
    found = []
    for root, _, files in os.walk(archive_dir):
        for name in files:
            path = os.path.join(root, name)
            parts = os.path.relpath(path, archive_dir).split(os.sep)
            if name.startswith(".") or (parts[0] == "cloud") != cloud:
                continue
            if len(parts) == 3:
                kind = True
            elif len(parts) == 4 and parts[1] == "not-queued":
                kind = False
            else:
                continue
            if queued is None or queued == kind:
                found.append(path)
    return sorted(found)


@dataclass(frozen=True)
class Pki:
    """A CA and two certificates signed by it, written as PEM files."""

    ca_cert: str
    host_cert: str
    host_key: str
    server_cert: str
    server_key: str
    host_dn: str


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: str, key: rsa.RSAPrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def issue(ca_key: rsa.RSAPrivateKey, ca_name: x509.Name, subject: x509.Name, key: rsa.RSAPrivateKey,
          days: float = 30, usages: Tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
          san: Optional[List[x509.GeneralName]] = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: str, host_days: float = 30) -> Pki:
    """A CA, a host certificate (client + S/MIME signer) and a broker certificate for localhost."""
    os.makedirs(directory, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vacfactory test"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "vacfactory test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    host_key, server_key = _key(), _key()
    host_name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "UK"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "eScience"),
                           x509.NameAttribute(NameOID.COMMON_NAME, "factory07.tier2.hep.manchester.ac.uk")])
    host = issue(ca_key, ca_name, host_name, host_key, days=host_days,
                 usages=(ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION))
    server = issue(ca_key, ca_name, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), server_key,
                   usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = {n: os.path.join(directory, n) for n in ("ca.pem", "hostcert.pem", "hostkey.pem", "server.pem",
                                                     "server.key")}
    _write_cert(paths["ca.pem"], ca)
    _write_cert(paths["hostcert.pem"], host)
    _write_key(paths["hostkey.pem"], host_key)
    _write_cert(paths["server.pem"], server)
    _write_key(paths["server.key"], server_key)
    return Pki(ca_cert=paths["ca.pem"], host_cert=paths["hostcert.pem"], host_key=paths["hostkey.pem"],
               server_cert=paths["server.pem"], server_key=paths["server.key"],
               host_dn="/C=UK/O=eScience/CN=factory07.tier2.hep.manchester.ac.uk")


def broker_settings(pki: Pki, host: str, port: int, use_ssl: bool, destination: str = "/queue/apel.test",
                    **changes: object) -> BrokerSettings:
    broker = BrokerSettings(host=host, port=port, destination=destination, use_ssl=use_ssl,
                            host_cert=pki.host_cert, host_key=pki.host_key, capath=pki.ca_cert)
    return replace(broker, **changes)  # type: ignore[arg-type]


class StompStub:
    """A minimal STOMP 1.1 broker on 127.0.0.1, for the unit tests (the real brokers are in
    tests/integration/test_apel_broker.py): CONNECTED for STOMP/CONNECT, one RECEIPT per SEND
    that asks for one, every SEND kept. ``receipt_delay`` (seconds, for the i-th SEND counted
    from 0) holds a receipt back, as a slow or distant broker does. Real sockets and threads."""

    def __init__(self, receipt_delay: Optional[Callable[[int], float]] = None) -> None:
        self.receipt_delay = receipt_delay or (lambda i: 0.0)
        self.messages: List[Tuple[Dict[str, str], str]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def bodies(self) -> List[str]:
        with self._lock:
            return [body for _, body in self.messages]

    def close(self) -> None:
        self._closing.set()
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    def __enter__(self) -> "StompStub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buffer = b""
        with conn:
            while not self._closing.is_set():
                frame = _next_frame(buffer)
                if frame is None:
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                    continue
                (command, headers, body), buffer = frame
                if not self._answer(conn, command, headers, body):
                    return

    def _answer(self, conn: socket.socket, command: str, headers: Dict[str, str], body: str) -> bool:
        """Reply to one frame; False when the connection is to end."""
        if command in ("STOMP", "CONNECT"):
            conn.sendall(b"CONNECTED\nversion:1.1\nheart-beat:0,0\n\n\x00")
        elif command == "SEND":
            with self._lock:
                index = len(self.messages)
                self.messages.append((headers, body))
            delay = self.receipt_delay(index)
            if delay > 0 and self._closing.wait(delay):
                return False
            if "receipt" in headers:
                conn.sendall(f"RECEIPT\nreceipt-id:{headers['receipt']}\n\n".encode() + b"\x00")
        elif command == "DISCONNECT":
            if "receipt" in headers:
                conn.sendall(f"RECEIPT\nreceipt-id:{headers['receipt']}\n\n".encode() + b"\x00")
            return False
        return True


def _next_frame(buffer: bytes) -> Optional[Tuple[Tuple[str, Dict[str, str], str], bytes]]:
    """One complete frame from the front of ``buffer`` (heart-beat EOLs skipped), or None."""
    buffer = buffer.lstrip(b"\r\n")
    head_end = buffer.find(b"\n\n")
    if head_end < 0:
        return None
    lines = buffer[:head_end].decode("utf-8").split("\n")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.rstrip("\r").partition(":")
        headers.setdefault(key, value)
    start = head_end + 2
    if "content-length" in headers:
        end = start + int(headers["content-length"])
        if len(buffer) < end + 1:
            return None
    else:
        end = buffer.find(b"\x00", start)
        if end < 0:
            return None
    return (lines[0].rstrip("\r"), headers, buffer[start:end].decode("utf-8")), buffer[end + 1:]
