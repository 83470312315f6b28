"""The MJF and metadata HTTP server that VMs talk to (Vac's 169.254.169.253/.254 servers).

What a VM can do (Vac paths, plus the OpenStack and token forms):

- ``GET /machinefeatures[/]``, ``/jobfeatures[/]``: Vac's HTML listing; ``GET
  /{machinefeatures,jobfeatures}/KEY``: the value, text/plain. Read from disk per request,
  because a drain rewrites ``shutdowntime`` while the VM runs.
- ``PUT /joboutputs/NAME`` (or ``POST``, for busybox wget): stores the body as
  ``joboutputs/NAME`` atomically, 201. Never readable back (``GET`` is 405, as in Vac).
- Metadata: ``/latest/`` is ``/0000-00-00/``; ``/<ver>/user-data``,
  ``/openstack/<ver>/user_data`` (and Vac's ``user-data``); EC2 ``/<ver>/meta-data/...``;
  ``/openstack/<ver>/meta_data.json`` (and Vac's ``meta-data.json`` forms).

Who is asking: the source address on the private network (``VMRegistry.by_address``), or a
per-VM token as an ``X-Vacfactory-Token`` header or a ``/vm/<token>/`` path prefix. If an
address match and a token are both present they must name the same VM; otherwise, and for
unknown callers, 403. A VM can only ever reach its own directories. A connection from an
address no VM holds is closed at accept, unless the caller opens a pool for token-only
clients (``max_unidentified_connections``). No log line shows a token (:func:`shown`).

Everything a VM sends is hostile. The server is one thread running a ``selectors`` loop over
non-blocking sockets (the stdlib ThreadingHTTPServer measured far slower per core and needs a
thread per idle keep-alive connection): request heads are bounded (8 KiB request line, 16 KiB
head, 64 headers), bodies need a Content-Length and are bounded by the joboutputs caps (no
chunked encoding), every connection has deadlines (a slow-loris head gets 10 s in total),
connections are counted against the VM that holds their source address (each VM's share fits
in the overall cap), requests are served round-robin over VMs (see :class:`MetadataServer`),
and one bad connection can only ever close itself. Paths are never percent-decoded: an encoded ``/`` or ``..`` is just an
unknown name (404).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from collections import deque
from typing import Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from vacfactory.errors import ExportError
from vacfactory.vmio import joboutputs as jo
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.registry import VMEndpoint, VMRegistry, valid_token

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-vacfactory-token"
SERVER_NAME = "vacfactory"

#: the factory's addresses on the VM network: MJF and joboutputs; metadata (and NFS)
MJF_ADDRESS = "169.254.169.253"
METADATA_ADDRESS = "169.254.169.254"
#: the key name of the root public key (OpenStack ``public_keys``, EC2 ``public-keys/0=NAME``)
PUBLIC_KEY_NAME = "vacfactory"

MAX_REQUEST_LINE = 8192
MAX_HEAD = 16384
MAX_HEADERS = 64
#: a GET/HEAD body (pointless but legal) up to this size is read and dropped, not refused
MAX_DISCARD = 65536
#: MJF values and listings are small; user_data may carry a proxy and a payload
MAX_VALUE_BYTES = 65536
MAX_USER_DATA_BYTES = 16 * 1024 * 1024
MAX_LISTING = 1024
RECV_BYTES = 65536
#: stop reading from a client that does not read its responses
OUT_HIGH_WATER = 1024 * 1024

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
_MJF_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_VERSION_DIR = re.compile(r"latest|1\.0|[0-9]{4}-[0-9]{2}-[0-9]{2}")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PATH_TOKEN = re.compile(r"^/vm/[^/]*")
#: a run this long could be (part of) a token wherever a VM put it in a path or name
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{16,}")
REDACTED = "<redacted>"


def shown(text: str) -> str:
    """A request path or name as our log lines show it: no token (the ``/vm/<token>/``
    segment and any long hex run are replaced: a log reader must never learn one), printable
    ASCII only, bounded length."""
    return jo.printable(_HEX_RUN.sub(REDACTED, _PATH_TOKEN.sub("/vm/" + REDACTED, text)))


@dataclass(frozen=True)
class Timeouts:
    """Per-connection deadlines (seconds): why a slow or silent client cannot hold us."""

    head: float = 10.0         # whole request head, from its first byte (slow loris)
    idle: float = 30.0         # keep-alive connection with no request
    body_idle: float = 20.0    # silence in the middle of a body
    body_min_rate: float = 65536.0  # bytes/s a body must average (plus body_idle of slack)
    write: float = 30.0        # client not reading its response


# --------------------------------------------------------------------------------------------
# HTTP/1.1 request heads: bytes in, a Request out (no sockets)


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


# --------------------------------------------------------------------------------------------
# routing: which VM, which file


@dataclass(frozen=True)
class Reply:
    """A response to send: status, body, type and extra headers."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    extra: Tuple[Tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UploadTarget:
    """A joboutputs file a VM asked to write."""

    vm: VMEndpoint
    name: str


def _error(status: int, message: str = "") -> Reply:
    text = f"{status} {STATUS.get(status, '')}" + (f": {message}" if message else "")
    return Reply(status, (text + "\n").encode("utf-8", "replace"))


def read_value(directory: str, key: str, max_bytes: int) -> Optional[bytes]:
    """A small regular file ``directory/key``; None if absent, unsafe or too big."""
    try:
        fd = os.open(os.path.join(directory, key),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        chunks = []
        remaining = st.st_size
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def listing(directory: str) -> List[str]:
    """The keys of an MJF directory: regular files with valid key names, sorted."""
    keys: List[str] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if len(keys) >= MAX_LISTING:
                    break
                if _MJF_KEY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    keys.append(entry.name)
    except OSError:
        return []
    return sorted(keys)


def listing_html(keys: Sequence[str]) -> bytes:
    """Vac's listing format."""
    items = "".join(f'<li><a href="{k}">{k}</a></li>' for k in keys)
    return f"<html><body><ul>{items}</ul></body></html>\n".encode("ascii")


def base_url(address: str, port: int) -> str:
    """``http://ADDRESS`` with ``:PORT`` unless it is 80: the base of every URL a VM is given."""
    return f"http://{address}" if port == 80 else f"http://{address}:{port}"


def meta_data_document(*, uuid: str, name: str, token: str, machinetype: str,
                       meta: Mapping[str, str], mjf_base_url: str, metadata_base_url: str
                       ) -> Dict[str, object]:
    """The OpenStack meta_data.json object of one VM: served over HTTP and written on its
    config drive (vmbuild), so both carry the same URLs, token forms and public key.

    ``meta`` is :attr:`VMEndpoint.meta`: ``public_key`` and ``availability_zone`` go to
    their own fields, every other entry into the ``meta`` object. For a VM whose MJF travel
    over NFS the engine puts where to mount them there (``nfs_server``,
    ``machinefeatures_nfs_path``, ``jobfeatures_nfs_path``, ``joboutputs_nfs_path``:
    engine.boundary.nfs_meta), since only the factory knows which exporter serves which path.
    """
    mjf = mjf_base_url.rstrip("/")
    token_base = f"{mjf}/vm/{token}"
    extra: Dict[str, str] = {
        k: str(v) for k, v in meta.items() if k not in ("public_key", "availability_zone")
    }
    extra.update({
        "machinefeatures": f"{mjf}/machinefeatures",
        "jobfeatures": f"{mjf}/jobfeatures",
        "joboutputs": f"{mjf}/joboutputs",
        "machinefeatures_token_url": f"{token_base}/machinefeatures",
        "jobfeatures_token_url": f"{token_base}/jobfeatures",
        "joboutputs_token_url": f"{token_base}/joboutputs",
        "metadata_token_url": f"{metadata_base_url.rstrip('/')}/vm/{token}",
        "vacfactory_token": token,
        "machinetype": machinetype,
    })
    public_key = meta.get("public_key")
    return {
        "uuid": uuid,
        "hostname": name,
        "name": name,
        "launch_index": 0,
        "availability_zone": meta.get("availability_zone", "vacfactory"),
        "public_keys": {PUBLIC_KEY_NAME: public_key} if public_key else {},
        "meta": extra,
    }


class Router:
    """Maps (peer address, request) to a Reply or an UploadTarget. Reads files, writes none."""

    def __init__(self, registry: VMRegistry, mjf_base_url: str, metadata_base_url: str) -> None:
        self.registry = registry
        self.mjf_base_url = mjf_base_url.rstrip("/")
        self.metadata_base_url = metadata_base_url.rstrip("/")

    # identification --------------------------------------------------------------------

    def identify(self, peer: str, header_token: Optional[str], path_token: Optional[str]
                 ) -> Tuple[Optional[VMEndpoint], str]:
        """(the VM, '') or (None, why not)."""
        tokens = {t for t in (header_token, path_token) if t is not None}
        if len(tokens) > 1:
            return None, "header token and path token differ"
        by_address = self.registry.by_address(peer)
        if tokens:
            token = tokens.pop()
            vm = self.registry.by_token(token) if valid_token(token) else None
            if vm is None:
                return None, "unknown token"
            if by_address is not None and by_address.uuid != vm.uuid:
                return None, f"token of {vm.uuid} used from the address of {by_address.uuid}"
            return vm, ""
        if by_address is None:
            return None, "unknown address and no token"
        return by_address, ""

    def route(self, peer: str, request: Request) -> Tuple[Union[Reply, UploadTarget], str]:
        """(what to do, log note). The note is non-empty for refusals worth a warning."""
        segments = request.path.split("/")[1:]
        path_token = None
        if segments and segments[0] == "vm":
            if len(segments) < 3:
                return _error(404), ""
            path_token = segments[1]
            segments = segments[2:]
        vm, why = self.identify(peer, request.headers.get(TOKEN_HEADER), path_token)
        if vm is None:
            return _error(403, "unknown VM"), why
        method = request.method
        if segments and segments[0] == "joboutputs":
            if method in ("PUT", "POST"):
                if len(segments) != 2 or not jo.valid_name(segments[1]):
                    return _error(403, "invalid joboutputs name"), \
                        f"{vm.name}: refused joboutputs name {shown(request.path)}"
                return UploadTarget(vm, segments[1]), ""
            return Reply(405, b"405 Method Not Allowed\n", extra=(("Allow", "PUT, POST"),)), ""
        if method not in ("GET", "HEAD"):
            return Reply(405, b"405 Method Not Allowed\n", extra=(("Allow", "GET, HEAD"),)), ""
        return self._get(vm, segments), ""

    # GET -------------------------------------------------------------------------------

    def _get(self, vm: VMEndpoint, seg: List[str]) -> Reply:
        if not seg or seg == [""]:
            return Reply(200, b"0000-00-00\nlatest\nopenstack\n")
        head = seg[0]
        if head in ("machinefeatures", "jobfeatures"):
            directory = vm.machinefeatures_dir if head == "machinefeatures" else vm.jobfeatures_dir
            if len(seg) == 1 or seg[1:] == [""]:
                return Reply(200, listing_html(listing(directory)), "text/html")
            if len(seg) == 2 and _MJF_KEY.fullmatch(seg[1]):
                value = read_value(directory, seg[1], MAX_VALUE_BYTES)
                if value is not None:
                    return Reply(200, value)
            return _error(404)
        if head == "openstack":
            return self._openstack(vm, seg[1:])
        if _VERSION_DIR.fullmatch(head) or head == "0000-00-00":
            return self._ec2(vm, seg[1:])
        return _error(404)

    def _user_data(self, vm: VMEndpoint) -> Reply:
        data = read_value(os.path.dirname(vm.user_data_path) or ".",
                          os.path.basename(vm.user_data_path), MAX_USER_DATA_BYTES)
        if data is None:
            return _error(404, "no user_data")
        return Reply(200, data, "application/octet-stream")

    def _openstack(self, vm: VMEndpoint, seg: List[str]) -> Reply:
        if not seg or seg == [""]:
            return Reply(200, b"2012-08-10\nlatest\n")
        if not _VERSION_DIR.fullmatch(seg[0]) and seg[0] != "0000-00-00":
            return _error(404)
        rest = seg[1:]
        if not rest or rest == [""]:
            return Reply(200, b"meta_data.json\nuser_data\n")
        if len(rest) == 1 and rest[0] in ("user_data", "user-data"):
            return self._user_data(vm)
        if len(rest) == 1 and rest[0] in ("meta_data.json", "meta-data.json"):
            return self._meta_json(vm)
        return _error(404)

    def _ec2(self, vm: VMEndpoint, seg: List[str]) -> Reply:
        if not seg or seg == [""]:
            return Reply(200, b"meta-data\nuser-data\n")
        if seg == ["user-data"]:
            return self._user_data(vm)
        if seg == ["meta-data.json"]:
            return self._meta_json(vm)
        if seg[0] != "meta-data":
            return _error(404)
        key = "/".join(seg[1:])
        public_key = vm.meta.get("public_key")
        if key in ("", "/"):
            names = ["ami-id", "hostname", "instance-id", "local-hostname", "local-ipv4"]
            if public_key:
                names.insert(0, "public-keys/0/openssh-key")  # Vac lists it flat
            return Reply(200, ("\n".join(names) + "\n").encode("ascii"))
        values = {
            "instance-id": vm.uuid, "ami-id": vm.uuid, "hostname": vm.name,
            "local-hostname": vm.name, "local-ipv4": vm.address,
        }
        if key in values:
            return Reply(200, values[key].encode("utf-8"))
        if public_key:
            if key in ("public-keys", "public-keys/"):
                return Reply(200, f"0={PUBLIC_KEY_NAME}\n".encode("ascii"))
            if key in ("public-keys/0", "public-keys/0/"):
                return Reply(200, b"openssh-key\n")
            if key == "public-keys/0/openssh-key":
                return Reply(200, public_key.encode("utf-8"))
        return _error(404)

    def meta_data(self, vm: VMEndpoint) -> Dict[str, object]:
        """The OpenStack meta_data.json object for ``vm`` (the config drive carries the same,
        see :func:`meta_data_document`)."""
        return meta_data_document(uuid=vm.uuid, name=vm.name, token=vm.token,
                                  machinetype=vm.machinetype, meta=vm.meta,
                                  mjf_base_url=self.mjf_base_url,
                                  metadata_base_url=self.metadata_base_url)

    def _meta_json(self, vm: VMEndpoint) -> Reply:
        body = json.dumps(self.meta_data(vm), sort_keys=True, indent=1).encode("utf-8")
        return Reply(200, body + b"\n", "application/json")


# --------------------------------------------------------------------------------------------
# uploads into joboutputs


class _Upload:
    """One PUT in progress: an anonymous file in the VM's joboutputs, linked in when complete.

    ``O_TMPFILE`` makes the partial body invisible (to the VM over NFS, to scans) and makes
    it vanish by itself if the client disconnects or we crash.
    """

    def __init__(self, target: UploadTarget, length: int, dir_fd: int, fd: int,
                 temp_name: Optional[str]) -> None:
        self.target = target
        self.length = length
        self.received = 0
        self.dir_fd = dir_fd
        self.fd = fd
        self.temp_name = temp_name  # only when O_TMPFILE was unavailable
        self.started = time.monotonic()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.received += len(data)

    def commit(self) -> None:
        """Put the complete body in place as joboutputs/NAME, atomically."""
        name = self.target.name
        try:
            st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(403, "refusing to replace a non-regular file")
        except FileNotFoundError:
            pass
        os.fchmod(self.fd, 0o644)
        temp = self.temp_name
        if temp is None:
            temp = f".vfput-{secrets.token_hex(8)}"
            os.link(f"/proc/self/fd/{self.fd}", temp, dst_dir_fd=self.dir_fd, follow_symlinks=True)
        try:
            os.rename(temp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError:
            _unlink_at(self.dir_fd, temp)
            raise
        self.temp_name = None

    def abandon(self) -> None:
        if self.temp_name is not None:
            _unlink_at(self.dir_fd, self.temp_name)
            self.temp_name = None

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _open_upload_file(dir_fd: int) -> Tuple[int, Optional[str]]:
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    if o_tmpfile:
        try:
            return os.open(".", os.O_WRONLY | o_tmpfile | os.O_CLOEXEC, 0o600, dir_fd=dir_fd), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    name = f".vfput-{secrets.token_hex(8)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    return fd, name


# --------------------------------------------------------------------------------------------
# the server


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    #: whose share this connection counts against: ``vm:<uuid>`` (a registered address) or
    #: ``addr:<peer>`` (an unregistered one, only when that pool is open)
    owner: str
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0
    head_started: Optional[float] = None
    upload: Optional[_Upload] = None
    upload_keep_alive: bool = True
    discard: int = 0
    closing: bool = False
    lingering: bool = False
    lingered: int = 0
    events: int = 0
    queued: bool = False  # waiting in the round-robin with a request to serve


class MetadataServer:
    """MJF + metadata + joboutputs over HTTP/1.1, on every address in ``bind``.

    ``start()`` binds (errors raise here, in the caller) and runs the loop in a daemon thread;
    ``stop()`` ends it and closes every socket. ``bound_addresses`` gives the real (host, port)
    pairs, useful with port 0. ``mjf_base_url``/``metadata_base_url`` are what meta_data.json
    tells VMs: :func:`base_url` of the two addresses and the port VMs reach (``http_port``).

    Fairness, so that no VM can deny HTTP to another (a refused heartbeat gets a VM killed):

    - A connection is counted at accept against the VM registered at its source address.
      Each VM's share is ``max_connections_per_vm``, lowered when needed so that every
      registered VM's share fits in ``max_connections`` (and a VM found over a share that
      shrank loses its idle connections at the next sweep).
    - A connection from an unregistered address is closed at accept, unless
      ``max_unidentified_connections`` opens a pool for token-only clients (at most
      ``max_connections_per_address`` each); that pool is apart from the VMs' shares, and a
      connection in it that fails to identify itself is closed after its answer.
    - Requests are served round-robin over VMs, one request per VM per turn (and one
      connection after another within a VM): a pipelined batch, or many connections, of one VM
      cannot make another VM's request wait for more than one request of each other VM.
    """

    def __init__(
        self,
        registry: VMRegistry,
        bind: Sequence[Tuple[str, int]],
        limits: JobOutputsLimits = JobOutputsLimits(),
        mjf_base_url: str = f"http://{MJF_ADDRESS}",
        metadata_base_url: str = f"http://{METADATA_ADDRESS}",
        *,
        max_connections: int = 512,
        max_connections_per_vm: int = 16,
        max_unidentified_connections: int = 0,
        max_connections_per_address: int = 4,
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.router = Router(registry, mjf_base_url, metadata_base_url)
        self.max_connections = max_connections
        self.max_per_vm = max_connections_per_vm
        self.max_unidentified = max_unidentified_connections
        self.max_per_address = max_connections_per_address
        self.timeouts = timeouts
        self._bind = list(bind)
        self._listeners: List[socket.socket] = []
        self._conns: Dict[int, _Conn] = {}
        self._per_owner: Dict[str, int] = {}
        self._unidentified = 0
        #: the round-robin: owners with a request waiting, each with its connections in order
        self._ring: Deque[str] = deque()
        self._waiting: Dict[str, Deque[_Conn]] = {}
        self._reserved: Dict[str, List[int]] = {}  # vm uuid -> [bytes, files] in flight
        self._warned: Dict[str, float] = {}
        self._sel: Optional[selectors.BaseSelector] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None

    # lifecycle -------------------------------------------------------------------------

    @property
    def bound_addresses(self) -> List[Tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    def start(self) -> None:
        if self._thread is not None:
            raise ExportError("metadata server already started")
        sel = selectors.DefaultSelector()
        try:
            for host, port in self._bind:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(1024)
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, None)
        except OSError as e:
            for sock in self._listeners:
                sock.close()
            self._listeners = []
            sel.close()
            raise ExportError(f"metadata server cannot listen on {self._bind}: {e}") from e
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel = sel
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="vmio-http", daemon=True)
        self._thread.start()
        log.info("metadata/MJF server listening on %s",
                 ", ".join(f"{h}:{p}" for h, p in self.bound_addresses))

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        self._thread.join(timeout=10)
        self._thread = None
        for conn in list(self._conns.values()):
            self._close(conn)
        self._ring.clear()
        self._waiting.clear()
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        log.info("metadata/MJF server stopped")

    def __enter__(self) -> "MetadataServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # event loop ------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        next_sweep = time.monotonic() + 0.5
        while not self._stopping.is_set():
            try:
                next_sweep = self._run_once(next_sweep)
            except Exception:  # noqa: BLE001 - the server must outlive any bug in one round
                log.exception("metadata server loop error; continuing")
                time.sleep(0.1)

    def _run_once(self, next_sweep: float) -> float:
        assert self._sel is not None
        for key, mask in self._sel.select(timeout=0 if self._ring else 0.5):
            if key.data is None:
                self._accept(key.fileobj)  # type: ignore[arg-type]
            elif key.data == "wake":
                try:
                    self._wake_r.recv(64)  # type: ignore[union-attr]
                except OSError:
                    pass
            else:
                self._serve_event(key.data, mask)
        self._serve_turn()
        now = time.monotonic()
        if now >= next_sweep:
            self._sweep(now)
            return now + 0.5
        return next_sweep

    def _serve_event(self, conn: _Conn, mask: int) -> None:
        # One connection's failure must never take the server down: anything unexpected is
        # logged with its traceback and costs only that connection.
        try:
            if conn.lingering:
                self._drain(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and not conn.closing and conn.sock.fileno() >= 0:
                self._readable(conn)
            if conn.sock.fileno() >= 0 and not conn.lingering:
                self._update(conn)
        except Exception:  # noqa: BLE001 - isolation boundary, see comment above
            log.exception("%s: internal error serving a connection; closed", conn.peer)
            self._close(conn)

    def vm_share(self) -> int:
        """How many connections one registered VM may hold now: ``max_connections_per_vm``,
        or less if that many for every registered VM would not fit in ``max_connections``."""
        room = self.max_connections - self.max_unidentified
        return max(1, min(self.max_per_vm, room // max(1, len(self.registry))))

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            peer = _normalise_peer(addr[0])
            vm = self.registry.by_address(peer)
            if vm is None:
                owner = "addr:" + peer
                if self.max_unidentified <= 0:
                    self._warn(peer, f"{peer}: connection from an unregistered address; closed")
                    sock.close()
                    continue
                full = self._unidentified >= self.max_unidentified or \
                    self._per_owner.get(owner, 0) >= self.max_per_address
            else:
                owner = "vm:" + vm.uuid
                full = self._per_owner.get(owner, 0) >= self.vm_share()
            if full or len(self._conns) >= self.max_connections:
                self._refuse(sock, peer, vm.name if vm is not None else peer)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer, owner, deadline=time.monotonic() + self.timeouts.idle)
            self._conns[sock.fileno()] = conn
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
            if vm is None:
                self._unidentified += 1
            self._set_events(conn, selectors.EVENT_READ)

    def _refuse(self, sock: socket.socket, peer: str, who: str) -> None:
        self._warn(peer, f"{who}: too many connections from {peer}; refused")
        try:
            sock.setblocking(False)
            sock.send(response_bytes(503, b"503 too many connections\n", keep_alive=False))
        except OSError:
            pass
        sock.close()

    def _set_events(self, conn: _Conn, wanted: int) -> None:
        """Watch ``conn`` for ``wanted`` (0: not at all, e.g. while it waits its turn)."""
        if wanted == conn.events or self._sel is None:
            return
        if wanted == 0:
            self._sel.unregister(conn.sock)
        elif conn.events == 0:
            self._sel.register(conn.sock, wanted, conn)
        else:
            self._sel.modify(conn.sock, wanted, conn)
        conn.events = wanted

    def _close(self, conn: _Conn) -> None:
        if conn.upload is not None:
            self._end_upload(conn)
        fd = conn.sock.fileno()
        if fd >= 0:
            if self._sel is not None and conn.events:
                try:
                    self._sel.unregister(conn.sock)
                except (KeyError, ValueError):
                    pass
            conn.events = 0
            self._conns.pop(fd, None)
            remaining = self._per_owner.get(conn.owner, 1) - 1
            if remaining > 0:
                self._per_owner[conn.owner] = remaining
            else:
                self._per_owner.pop(conn.owner, None)
            if conn.owner.startswith("addr:"):
                self._unidentified -= 1
            conn.sock.close()  # a queued conn is skipped when its turn comes

    def _linger(self, conn: _Conn) -> None:
        """Close politely after a final response: shut our side, then read and drop what
        the client still sends for a moment, so its unread data does not turn our response
        into a connection reset (the 'lingering close' of web servers)."""
        if conn.lingering:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering = True
        conn.deadline = time.monotonic() + 2.0
        self._set_events(conn, selectors.EVENT_READ)

    def _drain(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered > OUT_HIGH_WATER:
            self._close(conn)

    def _sweep(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if now > conn.deadline:
                log.debug("%s: connection timed out", conn.peer)
                self._close(conn)
        self._trim_to_share()

    def _trim_to_share(self) -> None:
        """Close the idle connections of a VM holding more than its share (which shrinks as
        VMs are registered), so that the newcomers' shares are really there."""
        share = self.vm_share()
        over = {owner for owner, n in self._per_owner.items()
                if n > share and owner.startswith("vm:")}
        for conn in list(self._conns.values()):
            if conn.owner in over and self._per_owner.get(conn.owner, 0) > share and \
                    not (conn.inbuf or conn.out or conn.upload or conn.queued or conn.lingering):
                log.debug("%s: idle connection over the VM's share closed", conn.peer)
                self._close(conn)

    def _warn(self, peer: str, message: str) -> None:
        """Warnings about a VM's requests, at most one per address every 10 s."""
        now = time.monotonic()
        if now - self._warned.get(peer, -1e9) >= 10.0:
            if len(self._warned) > 4096:
                self._warned.clear()
            self._warned[peer] = now
            log.warning("%s", message)

    # reading ---------------------------------------------------------------------------

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        self._feed(conn, data)

    def _feed(self, conn: _Conn, data: bytes) -> None:
        now = time.monotonic()
        if conn.upload is not None:
            data = self._feed_upload(conn, data, now)
        if conn.discard and data:
            take = min(conn.discard, len(data))
            conn.discard -= take
            data = data[take:]
        if data:
            conn.inbuf += data
            if conn.head_started is None and conn.upload is None and conn.discard == 0:
                # any byte starts the clock of a request head, even blank lines (slow loris)
                conn.head_started = now
                conn.deadline = now + self.timeouts.head

    @staticmethod
    def _has_work(conn: _Conn) -> bool:
        """A complete request head (or an oversized one) to handle, and nothing that must
        happen first; a partial head waits for more bytes."""
        return bool(conn.inbuf) and not conn.closing and conn.upload is None and \
            conn.discard == 0 and len(conn.out) <= OUT_HIGH_WATER and \
            conn.sock.fileno() >= 0 and \
            (conn.inbuf.find(b"\r\n\r\n") >= 0 or len(conn.inbuf) > MAX_HEAD)

    def _enqueue(self, conn: _Conn) -> None:
        if conn.queued:
            return
        conn.queued = True
        waiting = self._waiting.get(conn.owner)
        if waiting is None:
            waiting = self._waiting[conn.owner] = deque()
            self._ring.append(conn.owner)
        waiting.append(conn)

    def _serve_turn(self) -> None:
        """One turn of the round-robin: one request of each owner that has one waiting."""
        for _ in range(len(self._ring)):
            owner = self._ring.popleft()
            waiting = self._waiting[owner]
            conn = waiting.popleft()
            conn.queued = False
            if waiting:
                self._ring.append(owner)
            else:
                del self._waiting[owner]
            if not self._has_work(conn):
                if conn.sock.fileno() >= 0 and not conn.lingering:
                    self._update(conn)
                continue
            try:
                self._process(conn, time.monotonic())
                if conn.sock.fileno() >= 0 and not conn.lingering:
                    self._update(conn)
            except Exception:  # noqa: BLE001 - isolation boundary, as in _serve_event
                log.exception("%s: internal error serving a connection; closed", conn.peer)
                self._close(conn)

    def _process(self, conn: _Conn, now: float) -> None:
        """Serve the first request in ``conn.inbuf``, if it is complete."""
        # RFC 9112 2.2: ignore empty lines before a request line
        while conn.inbuf[:2] == b"\r\n":
            del conn.inbuf[:2]
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEAD:
                self._send_error(conn, HTTPError(431, close=True))
            elif conn.inbuf and conn.head_started is None:
                conn.head_started = now  # the rest of a pipelined batch
                conn.deadline = now + self.timeouts.head
            return
        head = bytes(conn.inbuf[:end])
        del conn.inbuf[:end + 4]
        conn.head_started = None
        self._request(conn, head, now)
        if conn.closing or conn.upload is not None or conn.discard:
            return
        if conn.inbuf:
            # the next head of a pipelined batch: its clock starts now, as its turn may come
            # late under load (that wait is ours, not the client's)
            conn.head_started = now
            conn.deadline = now + self.timeouts.head
        else:
            conn.deadline = now + self.timeouts.idle

    def _request(self, conn: _Conn, head: bytes, now: float) -> None:
        try:
            request = parse_head(head)
        except HTTPError as e:
            self._send_error(conn, e)
            return
        result, note = self.router.route(conn.peer, request)
        if note:
            self._warn(conn.peer, f"{conn.peer}: {request.method} {shown(request.path)}"
                                  f" refused: {note}")
        if isinstance(result, UploadTarget):
            self._start_upload(conn, request, result, now)
            return
        body_pending = request.content_length or 0
        keep_alive = request.keep_alive
        if conn.owner.startswith("addr:") and result.status == 403:
            keep_alive = False  # an unregistered address gets one try per connection
        if body_pending > MAX_DISCARD:
            keep_alive = False
        elif body_pending:
            # drop what of the body already arrived with the head, then the rest as it comes
            take = min(body_pending, len(conn.inbuf))
            del conn.inbuf[:take]
            conn.discard = body_pending - take
            if conn.discard:
                conn.deadline = now + self.timeouts.body_idle
        conn.out += response_bytes(result.status, result.body, result.content_type, keep_alive,
                                   head_only=request.method == "HEAD", extra=result.extra)
        if not keep_alive:
            conn.closing = True
        if request.method == "GET" and result.status >= 400:
            log.debug("%s: GET %s -> %d", conn.peer, shown(request.path), result.status)

    def _send_error(self, conn: _Conn, error: HTTPError, keep_alive: bool = False) -> None:
        reply = _error(error.status, error.message)
        conn.out += response_bytes(reply.status, reply.body, keep_alive=keep_alive,
                                   extra=reply.extra)
        if not keep_alive:
            conn.closing = True
            conn.inbuf.clear()

    # uploads ---------------------------------------------------------------------------

    def _start_upload(self, conn: _Conn, request: Request, target: UploadTarget,
                      now: float) -> None:
        vm = target.vm
        length = request.content_length
        if length is None:
            self._send_error(conn, HTTPError(411, "Content-Length required"))
            return
        limits = self.limits
        if length > limits.max_file_bytes:
            self._warn(conn.peer, f"{vm.name}: joboutputs/{shown(target.name)} of {length} bytes"
                                  f" refused: over max_file_bytes {limits.max_file_bytes}")
            self._send_error(conn, HTTPError(413, f"over the per-file limit of "
                                                  f"{limits.max_file_bytes} bytes"))
            return
        try:
            dir_fd = jo.open_directory(vm.joboutputs_dir)
        except OSError as e:
            log.error("%s: joboutputs directory unusable: %s", vm.name, e.strerror)
            self._send_error(conn, HTTPError(403, "joboutputs unavailable"))
            return
        try:
            refusal = self._check_caps(vm, target.name, length, dir_fd)
            if refusal is not None:
                os.close(dir_fd)
                self._warn(conn.peer, f"{vm.name}: joboutputs/{shown(target.name)} refused: {refusal}")
                self._send_error(conn, HTTPError(413, refusal))
                return
            fd, temp = _open_upload_file(dir_fd)
        except OSError as e:
            os.close(dir_fd)
            log.error("%s: cannot start joboutputs/%s: %s", vm.name, shown(target.name), e.strerror)
            self._send_error(conn, HTTPError(500, "cannot store the file"))
            return
        reserved = self._reserved.setdefault(vm.uuid, [0, 0])
        reserved[0] += length
        reserved[1] += 1
        conn.upload = _Upload(target, length, dir_fd, fd, temp)
        conn.upload_keep_alive = request.keep_alive
        conn.deadline = now + self.timeouts.body_idle
        if request.expect_continue and length > 0:
            conn.out += b"HTTP/1.1 100 Continue\r\n\r\n"
        if length == 0:
            self._finish_upload(conn)
        elif conn.inbuf:
            pending = bytes(conn.inbuf)
            conn.inbuf.clear()
            rest = self._feed_upload(conn, pending, now)
            conn.inbuf += rest

    def _check_caps(self, vm: VMEndpoint, name: str, length: int, dir_fd: int) -> Optional[str]:
        limits = self.limits
        in_flight = self._reserved.get(vm.uuid, [0, 0])
        usage = jo.usage_fd(dir_fd, name, limits.max_files + 16)
        if not usage.complete or usage.entries + in_flight[1] + 1 > limits.max_files:
            return f"over the limit of {limits.max_files} files"
        if usage.total_bytes + in_flight[0] + length > limits.max_total_bytes:
            return f"over the per-VM limit of {limits.max_total_bytes} bytes"
        return None

    def _feed_upload(self, conn: _Conn, data: bytes, now: float) -> bytes:
        upload = conn.upload
        assert upload is not None
        take = min(len(data), upload.length - upload.received)
        try:
            upload.write(data[:take])
        except OSError as e:
            status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            log.error("%s: writing joboutputs/%s failed: %s", upload.target.vm.name,
                      shown(upload.target.name), e.strerror)
            self._end_upload(conn)
            self._send_error(conn, HTTPError(status, "cannot store the file"))
            return b""
        if upload.received >= upload.length:
            self._finish_upload(conn)
        else:
            allowed = upload.started + self.timeouts.body_idle + \
                upload.length / self.timeouts.body_min_rate
            conn.deadline = min(now + self.timeouts.body_idle, allowed)
        return data[take:]

    def _finish_upload(self, conn: _Conn) -> None:
        upload = conn.upload
        assert upload is not None
        vm, name = upload.target.vm, upload.target.name
        try:
            upload.commit()
        except HTTPError as e:
            self._end_upload(conn)
            self._warn(conn.peer, f"{vm.name}: joboutputs/{shown(name)} refused: {e.message}")
            self._send_error(conn, e, keep_alive=conn.upload_keep_alive)
            return
        except OSError as e:
            self._end_upload(conn)
            log.error("%s: storing joboutputs/%s failed: %s", vm.name, shown(name), e.strerror)
            self._send_error(conn, HTTPError(403 if e.errno in (errno.EISDIR, errno.ENOTDIR)
                                             else 500, "cannot store the file"),
                             keep_alive=conn.upload_keep_alive)
            return
        size = upload.received
        self._end_upload(conn)
        # heartbeats and logs arrive all the time; only the final message is worth INFO
        log.log(logging.INFO if name == jo.SHUTDOWN_MESSAGE else logging.DEBUG,
                "%s: joboutputs/%s written (%d bytes)", vm.name, shown(name), size)
        conn.out += response_bytes(201, b"201 Created\n", keep_alive=conn.upload_keep_alive)
        if not conn.upload_keep_alive:
            conn.closing = True

    def _end_upload(self, conn: _Conn) -> None:
        upload = conn.upload
        if upload is None:
            return
        conn.upload = None
        upload.abandon()
        upload.close()
        reserved = self._reserved.get(upload.target.vm.uuid)
        if reserved is not None:
            reserved[0] -= upload.length
            reserved[1] -= 1
            if reserved[1] <= 0:
                self._reserved.pop(upload.target.vm.uuid, None)

    # writing ---------------------------------------------------------------------------

    def _flush(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent:
                del conn.out[:sent]
                if conn.out:
                    conn.deadline = time.monotonic() + self.timeouts.write
        if not conn.out and conn.closing:
            self._linger(conn)

    def _update(self, conn: _Conn) -> None:
        """Send what we can now; wait for writability only when something is left over."""
        if conn.out:
            self._flush(conn)
            if conn.sock.fileno() < 0 or conn.lingering:
                return
        if self._has_work(conn):
            self._enqueue(conn)  # a request (or more) to serve when its owner's turn comes
        if conn.closing and not conn.out:
            self._linger(conn)
            return
        wanted = 0
        if not conn.closing and not conn.queued and len(conn.out) <= OUT_HIGH_WATER:
            wanted |= selectors.EVENT_READ  # read no more while a request waits its turn
        if conn.out:
            wanted |= selectors.EVENT_WRITE
        if not wanted and not conn.queued:
            self._close(conn)
        else:
            self._set_events(conn, wanted)


def _normalise_peer(address: str) -> str:
    """``::ffff:1.2.3.4`` -> ``1.2.3.4``; other addresses unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(ip)
