"""What a request means: which VM is asking, and what it may read or write (policy; reads
files, writes none).

Who is asking: the source address on the private network (``VMRegistry.by_address``), or a
per-VM token as an ``X-Vacfactory-Token`` header or a ``/vm/<token>/`` path prefix. If an
address match and a token are both present they must name the same VM; otherwise, and for
unknown callers, 403. A VM can only ever reach its own directories. Paths are never
percent-decoded: an encoded ``/`` or ``..`` is just an unknown name (404). No log line shows
a token (:func:`shown`).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from vacfactory.vmio import joboutputs as jo
from vacfactory.vmio.http.wire import STATUS, Request
from vacfactory.vmio.registry import VMEndpoint, VMRegistry, valid_token

TOKEN_HEADER = "x-vacfactory-token"

#: the factory's addresses on the VM network: MJF and joboutputs; metadata (and NFS)
MJF_ADDRESS = "169.254.169.253"
METADATA_ADDRESS = "169.254.169.254"
#: the key name of the root public key (OpenStack ``public_keys``, EC2 ``public-keys/0=NAME``)
PUBLIC_KEY_NAME = "vacfactory"

#: MJF values and listings are small; user_data may carry a proxy and a payload
MAX_VALUE_BYTES = 65536
MAX_USER_DATA_BYTES = 16 * 1024 * 1024
MAX_LISTING = 1024

_MJF_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_VERSION_DIR = re.compile(r"latest|1\.0|[0-9]{4}-[0-9]{2}-[0-9]{2}")
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


def error_reply(status: int, message: str = "") -> Reply:
    """A short text/plain error: ``"403 Forbidden: unknown VM"``."""
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
                return error_reply(404), ""
            path_token = segments[1]
            segments = segments[2:]
        vm, why = self.identify(peer, request.headers.get(TOKEN_HEADER), path_token)
        if vm is None:
            return error_reply(403, "unknown VM"), why
        method = request.method
        if segments and segments[0] == "joboutputs":
            if method in ("PUT", "POST"):
                if len(segments) != 2 or not jo.valid_name(segments[1]):
                    return error_reply(403, "invalid joboutputs name"), \
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
            return error_reply(404)
        if head == "openstack":
            return self._openstack(vm, seg[1:])
        if _VERSION_DIR.fullmatch(head) or head == "0000-00-00":
            return self._ec2(vm, seg[1:])
        return error_reply(404)

    def _user_data(self, vm: VMEndpoint) -> Reply:
        data = read_value(os.path.dirname(vm.user_data_path) or ".",
                          os.path.basename(vm.user_data_path), MAX_USER_DATA_BYTES)
        if data is None:
            return error_reply(404, "no user_data")
        return Reply(200, data, "application/octet-stream")

    def _openstack(self, vm: VMEndpoint, seg: List[str]) -> Reply:
        if not seg or seg == [""]:
            return Reply(200, b"2012-08-10\nlatest\n")
        if not _VERSION_DIR.fullmatch(seg[0]) and seg[0] != "0000-00-00":
            return error_reply(404)
        rest = seg[1:]
        if not rest or rest == [""]:
            return Reply(200, b"meta_data.json\nuser_data\n")
        if len(rest) == 1 and rest[0] in ("user_data", "user-data"):
            return self._user_data(vm)
        if len(rest) == 1 and rest[0] in ("meta_data.json", "meta-data.json"):
            return self._meta_json(vm)
        return error_reply(404)

    def _ec2(self, vm: VMEndpoint, seg: List[str]) -> Reply:
        if not seg or seg == [""]:
            return Reply(200, b"meta-data\nuser-data\n")
        if seg == ["user-data"]:
            return self._user_data(vm)
        if seg == ["meta-data.json"]:
            return self._meta_json(vm)
        if seg[0] != "meta-data":
            return error_reply(404)
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
        return error_reply(404)

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

