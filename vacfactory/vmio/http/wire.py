"""HTTP/1.1 on the wire, as the VMs' server speaks it: bytes in, a :class:`Request` out, and
complete responses back as bytes. No sockets, no files (like h11's parser).

A request head is bounded (8 KiB request line, 16 KiB head, 64 header fields), must carry a
Content-Length for any body (no chunked encoding), and may not hold control characters; every
malformed head is an :class:`HTTPError` with the status to answer and whether the connection
can go on.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Dict, List, Optional, Sequence, Tuple, Union

SERVER_NAME = "vacfactory"

MAX_REQUEST_LINE = 8192
MAX_HEAD = 16384
MAX_HEADERS = 64
#: a GET/HEAD body (pointless but legal) up to this size is read and dropped, not refused
MAX_DISCARD = 65536

STATUS = {
    100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Payload Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}

_METHOD = re.compile(r"[A-Z]{1,16}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HTTPError(Exception):
    """A request we answer with an error status; ``close`` if the connection cannot continue."""

    def __init__(self, status: int, message: str = "", close: bool = False) -> None:
        super().__init__(f"{status} {message or STATUS.get(status, '')}")
        self.status = status
        self.message = message
        self.close = close


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    version: str
    headers: Dict[str, str]
    content_length: Optional[int]
    keep_alive: bool
    expect_continue: bool


def parse_head(head: bytes) -> Request:
    """Parse a request head (without its final CRLFCRLF); raise HTTPError if malformed."""
    if len(head) > MAX_HEAD:
        raise HTTPError(431, "request head too large", close=True)
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HTTPError(414, close=True)
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line", close=True)
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        raise HTTPError(400, "malformed method", close=True)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
            raise HTTPError(505, close=True)
        raise HTTPError(400, "malformed version", close=True)
    path = _origin_path(target)
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, "too many header fields", close=True)
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise HTTPError(400, "malformed header field", close=True)
        value = value.strip(" \t")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise HTTPError(400, "control character in header field", close=True)
        key = name.lower()
        if key == "content-length" and key in headers and headers[key] != value:
            raise HTTPError(400, "conflicting Content-Length", close=True)
        headers[key] = value if key not in headers or key == "content-length" \
            else headers[key] + ", " + value
    if "transfer-encoding" in headers:
        raise HTTPError(501, "Transfer-Encoding is not supported; send Content-Length",
                        close=True)
    content_length: Optional[int] = None
    if "content-length" in headers:
        raw = headers["content-length"]
        if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
            raise HTTPError(400, "malformed Content-Length", close=True)
        content_length = int(raw)
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    expect = headers.get("expect", "").lower()
    if expect and expect != "100-continue":
        raise HTTPError(417, close=True)
    return Request(method, path, version, headers, content_length, keep_alive,
                   expect == "100-continue" and version == "HTTP/1.1")


def _origin_path(target: str) -> str:
    """The path of a request target; absolute-form is reduced to its path; query dropped."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    if not target.startswith("/"):
        raise HTTPError(400, "request target must be a path", close=True)
    return target.split("?", 1)[0].split("#", 1)[0]


_date_cache: List[Union[int, str]] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return str(_date_cache[1])


def response_bytes(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain",
    keep_alive: bool = True,
    head_only: bool = False,
    extra: Sequence[Tuple[str, str]] = (),
) -> bytes:
    """A complete HTTP/1.1 response."""
    lines = [
        f"HTTP/1.1 {status} {STATUS.get(status, 'Unknown')}",
        f"Date: {_http_date()}",
        f"Server: {SERVER_NAME}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{k}: {v}" for k, v in extra)
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body



def head_ready(buffer: bytearray) -> bool:
    """Whether ``buffer`` holds a complete request head (or more than any head may be: that
    is answered at once, with 431); a shorter partial head waits for more bytes."""
    return buffer.find(b"\r\n\r\n") >= 0 or len(buffer) > MAX_HEAD
