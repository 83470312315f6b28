"""One HTTP(S) GET that a hostile server can neither aim nor stretch.

:func:`open_url` is the only way vacfactory downloads pipes, root images and user_data
templates:

- the URL and every redirect go through :class:`vacfactory.fetch.urlpolicy.UrlPolicy`, which
  resolves the host once; the connection is made to exactly the approved address (the
  request still carries the name in ``Host`` and in TLS SNI, and the certificate is checked
  against the name), so DNS rebinding cannot swap the address between check and connect;
- redirects are followed by hand, at most ``max_redirects``, never from https to http;
- one deadline covers everything after the name lookup: connecting, the TLS handshake,
  sending, the status line and headers and the body. Every blocking socket call gets the
  time left as its timeout, so a server trickling header bytes is cut at the deadline in the
  caller's own thread: no helper thread is left behind, and the socket is closed on return;
- ``Accept-Encoding: identity``: bodies are never decompressed (no zip bombs), and the
  caller counts the bytes it stores.

TLS is verified against ``ca_path`` (a hashed directory or a PEM bundle), else the grid CA
directory if present, else the system CAs; verification is never switched off.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import ssl
import time
import urllib.parse
from typing import Dict, Iterator, Mapping, Optional

from vacfactory import __version__
from vacfactory.errors import VacFactoryError
from vacfactory.fetch.urlpolicy import HostNotFound, Target, UrlPolicy, UrlRefused

#: the grid's CA directory, used when no CA path is configured and it exists (as Vac did)
GRID_CA_PATH = "/etc/grid-security/certificates"
USER_AGENT = f"vacfactory/{__version__}"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5


class FetchError(VacFactoryError):
    """One download failed (network, HTTP, size, deadline); the message says why."""


class FetchRefused(FetchError):
    """The URL, or a redirect, names a host the policy refuses: waiting will not fix it."""


class Deadline:
    """The time left of one download; :meth:`left` raises FetchError once it is over."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise FetchError(self.message())
        return remaining

    def message(self) -> str:
        return f"took more than {self.seconds:g} s"


class _BoundedReader(io.RawIOBase):
    """The socket's read side; each read may wait only for the time left."""

    def __init__(self, owner: "_BoundedSocket") -> None:
        super().__init__()
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        sock = self._owner.sock
        sock.settimeout(self._owner.deadline.left())
        return sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._owner.release()


class _BoundedSocket:
    """What http.client needs of a socket (sendall, makefile, close), deadline-bounded.

    Like a real socket, it stays open until it and every file made from it are closed
    (http.client closes the connection while its response is still being read)."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self.sock = sock
        self.deadline = deadline
        self._files = 0
        self._closed = False

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.deadline.left())
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb", buffering: int = -1) -> io.BufferedReader:
        self._files += 1
        return io.BufferedReader(_BoundedReader(self))

    def release(self) -> None:
        self._files -= 1
        self._close_if_unused()

    def close(self) -> None:
        self._closed = True
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._closed and self._files <= 0:
            self.sock.close()


def tls_context(ca_path: Optional[str]) -> ssl.SSLContext:
    """A verifying client context: ``ca_path``, else the grid CAs if present, else the system's."""
    path = ca_path or (GRID_CA_PATH if os.path.isdir(GRID_CA_PATH) else None)
    try:
        if path is None:
            return ssl.create_default_context()
        if os.path.isdir(path):
            return ssl.create_default_context(capath=path)
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as error:
        raise FetchError(f"cannot load the CA certificates {path}: {error}") from None


class Response:
    """A response being read: status, headers, the final URL, and the body in pieces."""

    def __init__(self, url: str, raw: http.client.HTTPResponse, deadline: Deadline) -> None:
        self.url = url
        self.status = raw.status
        self.reason = raw.reason
        self.headers = raw.headers
        self._raw = raw
        self._deadline = deadline

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name)

    def iter_body(self, chunk_size: int) -> Iterator[bytes]:
        """The body as it arrives (``read1``); FetchError at the deadline or if it ends
        before its Content-Length."""
        while True:
            self._deadline.left()
            with _errors(self._deadline):
                data = self._raw.read1(chunk_size)
            if not data:
                if self._raw.length:  # bytes announced but never sent
                    raise FetchError(f"the body ended {self._raw.length} bytes before its Content-Length")
                return
            yield data


@contextlib.contextmanager
def _errors(deadline: Deadline) -> Iterator[None]:
    """Socket, TLS and HTTP errors as one short FetchError line."""
    try:
        yield
    except (TimeoutError, socket.timeout):
        raise FetchError(deadline.message()) from None
    except ssl.SSLCertVerificationError as error:
        raise FetchError(f"TLS verification failed ({error.verify_message or error})") from None
    except (ssl.SSLError, http.client.HTTPException) as error:
        raise FetchError(f"bad response ({type(error).__name__}: {str(error)[:160]})") from None
    except OSError as error:
        raise FetchError(f"cannot connect ({error.strerror or error})") from None


def _connect(target: Target, deadline: Deadline, ca_path: Optional[str]) -> socket.socket:
    """A connected (and for https, handshaken) socket to one of the approved addresses."""
    last: Optional[OSError] = None
    for address in target.addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.left())
            sock.connect((address, target.port))
        except OSError as error:
            sock.close()
            last = error
            continue
        except FetchError:
            sock.close()
            raise
        if target.scheme != "https":
            return sock
        try:
            tls = tls_context(ca_path).wrap_socket(sock, server_hostname=target.host,
                                                   do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        try:
            tls.settimeout(deadline.left())
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls
    assert last is not None
    raise last


def _request(target: Target, headers: Mapping[str, str], deadline: Deadline,
             ca_path: Optional[str]) -> "tuple[http.client.HTTPConnection, http.client.HTTPResponse]":
    with _errors(deadline):
        sock = _connect(target, deadline, ca_path)
        kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        conn = kind(target.host, target.port)
        conn.sock = _BoundedSocket(sock, deadline)  # type: ignore[assignment]
        try:
            conn.request("GET", target.request_target, headers=dict(headers))
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise


@contextlib.contextmanager
def open_url(url: str, policy: UrlPolicy, timeout: float, ca_path: Optional[str] = None,
             headers: Optional[Mapping[str, str]] = None, checked: bool = True,
             max_redirects: int = MAX_REDIRECTS) -> Iterator[Response]:
    """GET ``url`` and yield the first response that is not a redirect; the connection is
    closed when the block ends.

    ``checked`` False trusts the first URL's host (the admin configured it); redirects are
    always checked. FetchRefused for a refused URL or redirect; FetchError for the rest.
    """
    deadline = Deadline(timeout)
    sent: Dict[str, str] = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    sent.update(headers or {})
    current, check = url, checked
    for hop in range(max_redirects + 1):
        try:
            target = policy.target(current, checked=check)
        except UrlRefused as error:
            raise FetchRefused(f"redirect to {current} refused: {error}" if hop else str(error)) from None
        except HostNotFound as error:
            raise FetchError(f"redirect to {current}: {error}" if hop else str(error)) from None
        conn, raw = _request(target, sent, deadline, ca_path)
        try:
            if raw.status in REDIRECT_STATUSES:
                location = raw.getheader("Location")
                if not location:
                    raise FetchError(f"HTTP {raw.status} without a Location")
                following = urllib.parse.urljoin(current, location.strip())
                if target.scheme == "https" and not following.lower().startswith("https:"):
                    raise FetchRefused(f"redirect from https to {following} refused (never https -> http)")
                current, check = following, True
                continue
            yield Response(current, raw, deadline)
            return
        finally:
            raw.close()
            conn.close()
    raise FetchError(f"more than {max_redirects} redirects")
