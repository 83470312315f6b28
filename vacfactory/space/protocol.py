"""VacQuery 01.03 as a pure protocol: bytes in, validated messages out, and back. No I/O.

Like h11 for HTTP, this module knows the wire format and nothing else: no sockets, no clock
(``now`` is passed in), no configuration. The responder, the client and the simulator all use
it, so a datagram means the same thing everywhere, and every rule is tested without a network.

The wire format is Vac 03.01's (``vac_version`` 03.01, ``vacquery_version`` ``VacQuery 01.03``):
one JSON object per UDP datagram.

Queries (client -> factory): ``message_type`` is ``machines_query``, ``machinetypes_query`` or
``factory_query`` (legacy ``method``: ``machines``, ``machinetypes``, ``factories``), with
``space``, ``cookie``, ``vacquery_version`` and ``vac_version`` (free text naming the client).
Our additive fields: ``time_sent`` (for the replay window of signed queries), ``padding``
(bytes that raised the reply budget at older vacfactory responders, see the client) and ``hmac`` (space key
signature, see :mod:`vacfactory.space.auth`). A Vac factory ignores all three.

Replies (factory -> client): one ``machine_status`` per slot, one ``machinetype_status`` per
configured machinetype, or one ``factory_status``, each echoing the query's ``cookie`` and
carrying ``space``, ``factory``, ``site``, ``time_sent``, ``vac_version`` and
``daemon_version``, plus the deprecated duplicates Vac still sends (``num_cpus``,
``running_cpus``, ``max_cpus``, ``total_*``, ``vac_disk_*``), so real Vac clients understand us.

Decoding is strict about what we use and lenient about everything else: unknown fields are
ignored, legacy names are mapped, numbers Vac sends as floats where we expect counts (Vac's
``running_processors`` is a float) are accepted when integral. Anything else that is wrong -
size, encoding, JSON, shape, a required field, a type - raises :class:`ProtocolError`, the one
exception of this module, and the datagram is dropped without a reply.

The cookie is Vac's: ``sha256(salt + factory_name).hexdigest()`` with a fresh random salt per
query round, so a reply is accepted only if it names a factory we asked and echoes the cookie
we sent to that name.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from vacfactory import __version__
from vacfactory.errors import ProtocolError
from vacfactory.space.snapshot import (
    FactorySnapshot,
    FactoryStatus,
    MachineStatus,
    MachinetypeStatus,
)

VACQUERY_VERSION = "01.03"
VACQUERY_VERSION_STRING = "VacQuery " + VACQUERY_VERSION
DEFAULT_PORT = 995

#: longest datagram we decode at all (Vac clients read replies with ``recvfrom(10240)``)
MAX_DATAGRAM_BYTES = 10240
#: longest reply a Vac client reads whole: it reads each reply with a 1024-byte buffer, so a
#: longer datagram arrives cut and is not JSON. Replies are fitted to it (:func:`fit_reply`).
MAX_REPLY_BYTES = 1024
#: the per-query part of a reply counted when fitting: ``{"cookie":"<64 hex>","time_sent":N,``
_FILL_BYTES = len('{"cookie":"","time_sent":1234567890,') + 64

#: longest query: Vac's responder reads ``recvfrom(1024)``, so no Vac client sends more, and
#: our own (padded, signed) queries stay below it so that Vac factories understand them too
MAX_QUERY_BYTES = 1024

#: what our replies and queries say they are (Vac: "Vac <version> <program>")
DAEMON_VERSION = f"vacfactory {__version__} responder"
CLIENT_VERSION = f"vacfactory {__version__}"

_IDENT = re.compile(r"\A[\x21-\x7e]{1,255}\Z")
_VERSION = re.compile(r"\AVacQuery ([0-9]{1,2})\.([0-9]{1,2})\Z")
_MAX_TEXT = 4096
_MAX_COUNT = 1_000_000
_MAX_SIZE = 2**63


class QueryType(str, enum.Enum):
    """The three questions a client can ask a factory."""

    MACHINES = "machines_query"
    MACHINETYPES = "machinetypes_query"
    FACTORY = "factory_query"


class ReplyType(str, enum.Enum):
    """The three kinds of answer a factory sends."""

    MACHINE = "machine_status"
    MACHINETYPE = "machinetype_status"
    FACTORY = "factory_status"


#: the reply type that answers each query type
REPLY_TYPE = {
    QueryType.MACHINES: ReplyType.MACHINE,
    QueryType.MACHINETYPES: ReplyType.MACHINETYPE,
    QueryType.FACTORY: ReplyType.FACTORY,
}

#: Vac's legacy ``method`` field (VacQuery before 01.00) -> message type
LEGACY_METHODS: Mapping[str, Union[QueryType, ReplyType]] = {
    "machines": QueryType.MACHINES,
    "machinetypes": QueryType.MACHINETYPES,
    "factories": QueryType.FACTORY,
    "machine": ReplyType.MACHINE,
    "machinetype": ReplyType.MACHINETYPE,
    "factory": ReplyType.FACTORY,
}
_METHOD_OF = {QueryType.MACHINES: "machines", QueryType.MACHINETYPES: "machinetypes",
              QueryType.FACTORY: "factories"}


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Query:
    """A validated query. ``time_sent`` is ours (None from Vac clients)."""

    query_type: QueryType
    space: str
    cookie: str
    vacquery_version: str = VACQUERY_VERSION_STRING
    client_version: str = ""
    time_sent: Optional[float] = None


Status = Union[MachineStatus, MachinetypeStatus, FactoryStatus]


@dataclass(frozen=True)
class Reply:
    """A validated reply: the common header plus the status record it carries.

    ``count`` is ``num_machines`` / ``num_machinetypes`` (how many replies of this kind the
    factory sends for one query; 1 for ``factory_status``). ``fields`` is the whole decoded
    JSON object, unknown fields included, for ``--json`` output.
    """

    reply_type: ReplyType
    factory: str
    space: str
    cookie: str
    count: int
    status: Status
    site: str = ""
    daemon_version: str = ""
    vacquery_version: str = VACQUERY_VERSION_STRING
    time_sent: Optional[float] = None
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        """What distinguishes this reply among a factory's replies to one query."""
        status = self.status
        if isinstance(status, MachineStatus):
            return status.machine
        if isinstance(status, MachinetypeStatus):
            return status.machinetype
        return self.factory


Message = Union[Query, Reply]


# --------------------------------------------------------------------------------------------
# Field converters: each takes a JSON value and returns the Python value or raises ValueError.
# They are on the hot path of every datagram (the simulator decodes millions), so they test
# types with ``type(x) is`` rather than isinstance (which would also let bool pass as int).

_ident_match = _IDENT.match


def _ident(value: Any) -> str:
    if type(value) is not str or _ident_match(value) is None:
        raise ValueError("must be 1-255 printable ASCII characters without spaces")
    return value


def _text(value: Any) -> str:
    if type(value) is not str or len(value) > _MAX_TEXT:
        raise ValueError(f"must be a string of at most {_MAX_TEXT} characters")
    return value


def _number(value: Any) -> float:
    kind = type(value)
    if kind is not float and kind is not int:
        raise ValueError("must be a number")
    if not -1e18 <= value <= 1e18:  # also false for NaN
        raise ValueError("must be a finite number")
    return value


def _bounded_int(limit: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        kind = type(value)
        if kind is int:
            if 0 <= value <= limit:
                return value
        elif kind is float:
            if 0 <= value <= limit and value == int(value):
                return int(value)
        raise ValueError(f"must be a whole number from 0 to {limit}")

    return convert


_count = _bounded_int(_MAX_COUNT)
_size = _bounded_int(_MAX_SIZE)


@dataclass(frozen=True)
class _Field:
    """One status attribute: the JSON names that may carry it (first wins), its converter,
    whether null is allowed, and whether Vac's client requires it to be present."""

    attr: str
    names: Tuple[str, ...]
    convert: Callable[[Any], Any]
    nullable: bool = False
    required: bool = False


def _f(attr: str, convert: Callable[[Any], Any], *legacy: str, null: bool = False,
       required: bool = False) -> _Field:
    return _Field(attr, (attr,) + legacy, convert, null, required)


# Vac's client (sendMachinesRequests) requires exactly these keys to be present in a
# machine_status; values may be null.
_MACHINE_FIELDS = (
    _f("machine", _ident, required=True),
    _f("state", _text, required=True),
    _f("uuid", _text, null=True, required=True),
    _f("machinetype", _text, null=True, required=True),
    _f("machine_model", _text, null=True),
    _f("created_time", _number, null=True, required=True),
    _f("started_time", _number, null=True, required=True),
    _f("heartbeat_time", _number, null=True, required=True),
    _f("num_processors", _count, "num_cpus"),
    _f("cpu_seconds", _number, null=True, required=True),
    _f("cpu_percentage", _number, null=True, required=True),
    _f("hs06", _number, null=True, required=True),
    _f("shutdown_message", _text, null=True, required=True),
    _f("shutdown_time", _number, null=True, required=True),
    _f("fqan", _text, null=True),
    _f("cpu_efficiency", _number, null=True),
)
# ... and these in a machinetype_status (running_hs06 was total_hs06 before VacQuery 01.00).
_MACHINETYPE_FIELDS = (
    _f("machinetype", _ident, required=True),
    _f("running_hs06", _number, "total_hs06", required=True),
    _f("running_machines", _count, "total_machines"),
    _f("running_processors", _count, "running_cpus"),
    _f("num_before_fizzle", _count, required=True),
    _f("shutdown_message", _text, null=True, required=True),
    _f("shutdown_time", _number, null=True, required=True),
    _f("shutdown_machine", _text, null=True, required=True),
    _f("fqan", _text, null=True),
    _f("max_wallclock_seconds", _number, null=True),
    _f("max_processors", _count, null=True),
    _f("bytes_per_processor", _size, null=True),
    _f("cpu_efficiency_1d", _number, null=True),
)
# A factory_status is accepted with any subset of these (Vac checks none of them); a null
# (a figure Vac could not measure) keeps our default.
_FACTORY_FIELDS = tuple(
    _Field(f.attr, f.names, f.convert, True, False) for f in (
        _f("running_processors", _count, "running_cpus"),
        _f("running_machines", _count),
        _f("running_hs06", _number),
        _f("max_processors", _count, "max_cpus", "total_cpus"),
        _f("max_machines", _count, "total_machines"),
        _f("max_hs06", _number, "total_hs06"),
        _f("root_disk_avail_kb", _size),
        _f("root_disk_avail_inodes", _size),
        _f("daemon_disk_avail_kb", _size, "vac_disk_avail_kb"),
        _f("daemon_disk_avail_inodes", _size, "vac_disk_avail_inodes"),
        _f("load_average", _number),
        _f("kernel_version", _text),
        _f("os_issue", _text),
        _f("boot_time", _number),
        _f("factory_heartbeat_time", _number),
        _f("responder_heartbeat_time", _number),
        _f("mjf_heartbeat_time", _number),
        _f("metadata_heartbeat_time", _number),
        _f("swap_used_kb", _size),
        _f("swap_free_kb", _size),
        _f("mem_used_kb", _size),
        _f("mem_total_kb", _size),
    )
)

_STATUS_SPEC = {
    ReplyType.MACHINE: (MachineStatus, _MACHINE_FIELDS, "num_machines"),
    ReplyType.MACHINETYPE: (MachinetypeStatus, _MACHINETYPE_FIELDS, "num_machinetypes"),
    ReplyType.FACTORY: (FactoryStatus, _FACTORY_FIELDS, None),
}
_TYPES: Mapping[str, Union[QueryType, ReplyType]] = {
    kind.value: kind for kind in (*QueryType, *ReplyType)
}


# --------------------------------------------------------------------------------------------
# Decoding

# A decoder without NaN/Infinity (not JSON) and without the per-call setup json.loads does
# when given keyword arguments.
_JSON = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(datagram: bytes, *, peer: str) -> Message:
    """Turn one datagram into a :class:`Query` or :class:`Reply`, or raise ProtocolError.

    ``peer`` (the sender's address) only labels the error. Signatures are not checked here:
    :mod:`vacfactory.space.auth` does that on the raw bytes first.
    """
    if not isinstance(datagram, (bytes, bytearray, memoryview)):
        raise ProtocolError("datagram is not bytes", peer=peer)
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise ProtocolError(f"datagram of {len(datagram)} bytes is too long", peer=peer)
    try:
        obj = _JSON.decode(bytes(datagram).decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("datagram is not UTF-8", peer=peer) from None
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"datagram is not JSON ({str(error)[:80]})", peer=peer) from None
    if type(obj) is not dict:
        raise ProtocolError("datagram is not a JSON object", peer=peer)
    kind = _message_type(obj, peer)
    version = obj.get("vacquery_version")
    if version != VACQUERY_VERSION_STRING:
        match = _VERSION.match(version) if type(version) is str else None
        if match is None or int(match.group(1)) > 1:
            shown = version[:40] if type(version) is str else version
            raise ProtocolError(f"unsupported vacquery_version {shown!r}", peer=peer)
    if kind.__class__ is QueryType:
        return _decode_query(kind, obj, version, peer)
    return _decode_reply(kind, obj, version, peer)


def _message_type(obj: Mapping[str, Any], peer: str) -> Union[QueryType, ReplyType]:
    """``message_type``, else the legacy ``method`` (a message_type we know wins)."""
    raw = obj.get("message_type")
    kind = _TYPES.get(raw) if type(raw) is str else None
    if kind is not None:
        return kind
    method = obj.get("method")
    if type(method) is str and method in LEGACY_METHODS:
        return LEGACY_METHODS[method]
    if raw is None and method is None:
        raise ProtocolError("no message_type", peer=peer)
    shown = raw if raw is not None else method
    raise ProtocolError(f"unknown message_type {str(shown)[:40]!r}", peer=peer)


def _get(obj: Mapping[str, Any], name: str, convert: Callable[[Any], Any], peer: str) -> Any:
    if name not in obj:
        raise ProtocolError(f"{name} missing", peer=peer)
    try:
        return convert(obj[name])
    except ValueError as error:
        raise ProtocolError(f"{name} {error}", peer=peer) from None


def _get_optional(
    obj: Mapping[str, Any], name: str, convert: Callable[[Any], Any], default: Any, peer: str
) -> Any:
    if obj.get(name) is None:
        return default
    return _get(obj, name, convert, peer)


def _decode_query(kind: QueryType, obj: Mapping[str, Any], version: str, peer: str) -> Query:
    return Query(
        query_type=kind,
        space=_get(obj, "space", _ident, peer),
        cookie=_get(obj, "cookie", _ident, peer),
        vacquery_version=version,
        client_version=_get_optional(obj, "vac_version", _text, "", peer),
        time_sent=_get_optional(obj, "time_sent", _number, None, peer),
    )


def _decode_reply(kind: ReplyType, obj: Mapping[str, Any], version: str, peer: str) -> Reply:
    status_class, spec, count_name = _STATUS_SPEC[kind]
    values: Dict[str, Any] = {}
    for item in spec:
        for name in item.names:
            if name in obj:
                value = obj[name]
                break
        else:
            if item.required:
                raise ProtocolError(f"{kind.value} without {item.attr}", peer=peer)
            continue
        if value is None:
            if item.nullable:
                continue  # the dataclass default (None, or ours for factory figures)
            raise ProtocolError(f"{kind.value} {name} must not be null", peer=peer)
        try:
            values[item.attr] = item.convert(value)
        except ValueError as error:
            raise ProtocolError(f"{kind.value} {name} {error}", peer=peer) from None
    count = 1 if count_name is None else _get(obj, count_name, _count, peer)
    if count < 1:
        raise ProtocolError(f"{count_name} must be at least 1", peer=peer)
    daemon = obj.get("daemon_version", obj.get("vac_version"))
    return Reply(
        reply_type=kind,
        factory=_get(obj, "factory", _ident, peer),
        space=_get(obj, "space", _ident, peer),
        cookie=_get(obj, "cookie", _ident, peer),
        count=count,
        status=status_class(**values),
        site=_get_optional(obj, "site", _text, "", peer),
        daemon_version=daemon if type(daemon) is str else "",
        vacquery_version=version,
        time_sent=_get_optional(obj, "time_sent", _number, None, peer),
        fields=obj,
    )


# --------------------------------------------------------------------------------------------
# Cookies


def make_salt(random_bytes: bytes) -> bytes:
    """Vac's salt: base64 of 32 random bytes (the caller supplies them: no I/O here)."""
    if len(random_bytes) < 16:
        raise ValueError("a salt needs at least 16 random bytes")
    return base64.b64encode(random_bytes)


def cookie_for(salt: bytes, factory: str) -> str:
    """Vac's cookie for one factory: ``sha256(salt + factory_name).hexdigest()``."""
    return hashlib.sha256(salt + factory.encode("utf-8")).hexdigest()


def check_reply(
    reply: Reply, *, reply_type: ReplyType, space: str, cookies: Mapping[str, str], peer: str
) -> None:
    """Accept a reply only if it is the kind we asked for, from our space, naming a factory
    we asked, and echoing the cookie we sent to that factory (Vac's test). Else ProtocolError."""
    if reply.reply_type is not reply_type:
        raise ProtocolError(f"unexpected {reply.reply_type.value}", peer=peer)
    if reply.space != space:
        raise ProtocolError(f"reply for space {reply.space!r}, not {space!r}", peer=peer)
    expected = cookies.get(reply.factory)
    if expected is None:
        raise ProtocolError(f"reply from unexpected factory {reply.factory!r}", peer=peer)
    if reply.cookie != expected:
        raise ProtocolError(f"reply from {reply.factory} with a wrong cookie", peer=peer)


# --------------------------------------------------------------------------------------------
# Encoding


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def query_template(
    query_type: QueryType,
    space: str,
    *,
    client_version: str = CLIENT_VERSION,
    pad_to: int = 0,
) -> "Template":
    """The part of a query that is the same for every factory asked (see :func:`encode_query`).

    ``pad_to`` adds a ``padding`` field so that the filled, timed query is about that long
    (never above :data:`MAX_QUERY_BYTES`): a bigger query earns a bigger reply budget at our
    responders.
    """
    message: Dict[str, Any] = {
        "message_type": QueryType(query_type).value,
        "method": _METHOD_OF[QueryType(query_type)],
        "vacquery_version": VACQUERY_VERSION_STRING,
        "vac_version": client_version,
        "space": space,
    }
    text = _dumps(message)
    # cookie (64 hex) and time_sent (epoch with milliseconds) are added by fill()
    filled = len(text) + len('"cookie":"","time_sent":1234567890.123,') + 64
    missing = min(pad_to, MAX_QUERY_BYTES) - filled - len(',"padding":""')
    if missing > 0:
        message["padding"] = "." * missing
        text = _dumps(message)
    return Template(text)


def encode_query(
    query_type: QueryType,
    space: str,
    cookie: str,
    *,
    client_version: str = CLIENT_VERSION,
    now: Optional[float] = None,
    pad_to: int = 0,
) -> bytes:
    """One query datagram, understood by Vac factories and ours.

    It carries both ``message_type`` and the legacy ``method`` (older Vac responders read
    only the latter). ``now`` adds our ``time_sent`` (needed when the query is signed).
    """
    template = query_template(query_type, space, client_version=client_version, pad_to=pad_to)
    return template.fill_query(cookie, now)


def _int_or_none(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value)


def _header(reply_type: ReplyType, snapshot: FactorySnapshot) -> Dict[str, Any]:
    """Fields every reply carries except ``cookie`` and ``time_sent`` (filled per query)."""
    return {
        "message_type": reply_type.value,
        "vac_version": DAEMON_VERSION,
        "daemon_version": DAEMON_VERSION,
        "vacquery_version": VACQUERY_VERSION_STRING,
        "space": snapshot.space,
        "factory": snapshot.factory,
        "site": snapshot.site_name,
    }


def machine_fields(snapshot: FactorySnapshot, machine: MachineStatus) -> Dict[str, Any]:
    """A ``machine_status`` as Vac 03.01 sends it (without cookie and time_sent), plus our
    additive ``cpu_efficiency`` when known. A slot never used has 0 processors and 0.0 HS06."""
    hs06 = machine.hs06 if machine.hs06 is not None else 1.0 * machine.num_processors
    message = _header(ReplyType.MACHINE, snapshot)
    message.update(
        num_machines=len(snapshot.machines),
        machine=machine.machine,
        state=machine.state,
        uuid=machine.uuid,
        created_time=_int_or_none(machine.created_time),
        started_time=_int_or_none(machine.started_time),
        heartbeat_time=_int_or_none(machine.heartbeat_time),
        num_cpus=machine.num_processors,
        num_processors=machine.num_processors,
        cpu_seconds=_int_or_none(machine.cpu_seconds),
        cpu_percentage=machine.cpu_percentage,
        hs06=hs06,
        machinetype=machine.machinetype,
        machine_model=machine.machine_model,
        shutdown_message=machine.shutdown_message,
        shutdown_time=_int_or_none(machine.shutdown_time),
    )
    if machine.fqan:
        message["fqan"] = machine.fqan
    if machine.cpu_efficiency is not None:
        message["cpu_efficiency"] = machine.cpu_efficiency
    return message


def machinetype_fields(snapshot: FactorySnapshot, status: MachinetypeStatus) -> Dict[str, Any]:
    """A ``machinetype_status`` as Vac 03.01 sends it (without cookie and time_sent)."""
    message = _header(ReplyType.MACHINETYPE, snapshot)
    message.update(
        num_machinetypes=len(snapshot.machinetypes),
        machinetype=status.machinetype,
        running_hs06=float(status.running_hs06),
        running_machines=status.running_machines,
        running_cpus=status.running_processors,
        running_processors=status.running_processors,
        num_before_fizzle=status.num_before_fizzle,
        shutdown_message=status.shutdown_message,
        shutdown_time=_int_or_none(status.shutdown_time),
        shutdown_machine=status.shutdown_machine,
    )
    for name in ("fqan", "max_wallclock_seconds", "max_processors", "bytes_per_processor",
                 "cpu_efficiency_1d"):
        value = getattr(status, name)
        if value is not None:
            message[name] = int(value) if name == "max_wallclock_seconds" else value
    return message


def factory_fields(snapshot: FactorySnapshot) -> Dict[str, Any]:
    """A ``factory_status`` as Vac 03.01 sends it, deprecated duplicates included."""
    s = snapshot.factory_status
    message = _header(ReplyType.FACTORY, snapshot)
    message.update(
        running_cpus=s.running_processors,
        running_processors=s.running_processors,
        running_machines=s.running_machines,
        running_hs06=float(s.running_hs06),
        max_cpus=s.max_processors,
        max_processors=s.max_processors,
        max_machines=s.max_machines,
        max_hs06=float(s.max_hs06),
        total_cpus=s.max_processors,
        total_machines=s.max_machines,
        total_hs06=float(s.max_hs06),
        root_disk_avail_kb=s.root_disk_avail_kb,
        root_disk_avail_inodes=s.root_disk_avail_inodes,
        vac_disk_avail_kb=s.daemon_disk_avail_kb,
        daemon_disk_avail_kb=s.daemon_disk_avail_kb,
        vac_disk_avail_inodes=s.daemon_disk_avail_inodes,
        daemon_disk_avail_inodes=s.daemon_disk_avail_inodes,
        load_average=s.load_average,
        kernel_version=s.kernel_version,
        os_issue=s.os_issue,
        boot_time=int(s.boot_time),
        factory_heartbeat_time=int(s.factory_heartbeat_time),
        responder_heartbeat_time=int(s.responder_heartbeat_time),
        mjf_heartbeat_time=int(s.mjf_heartbeat_time),
        metadata_heartbeat_time=int(s.metadata_heartbeat_time),
        swap_used_kb=s.swap_used_kb,
        swap_free_kb=s.swap_free_kb,
        mem_used_kb=s.mem_used_kb,
        mem_total_kb=s.mem_total_kb,
    )
    return message


@dataclass(frozen=True)
class Template:
    """A message rendered once; :meth:`fill` / :meth:`fill_query` add the cookie and time.

    Rendering JSON is most of a message's cost, and the same snapshot answers many queries
    (and the same query goes to many factories), so only the per-datagram parts are spliced
    in: ``{"cookie":...,"time_sent":...,`` followed by the rest of :attr:`body`.
    """

    body: str  # a JSON object without cookie and time_sent, starting with "{"

    def _fill(self, cookie: str, time_sent: Optional[str]) -> bytes:
        head = '{"cookie":' + json.dumps(cookie)
        if time_sent is not None:
            head += ',"time_sent":' + time_sent
        return (head + "," + self.body[1:]).encode("ascii")

    def fill(self, cookie: str, now: float) -> bytes:
        """A reply: ``time_sent`` in whole seconds, as Vac sends it."""
        return self._fill(cookie, str(int(now)))

    def fill_query(self, cookie: str, now: Optional[float]) -> bytes:
        """A query: ``time_sent`` (ours) with milliseconds, so every re-send differs."""
        return self._fill(cookie, None if now is None else f"{now:.3f}")


#: how :func:`fit_reply` makes a long reply shorter, step by step until it fits: first drop
#: the duplicates nobody needs (``vac factories`` reads ``total_*``, ``vac_disk_*`` and
#: ``running_cpus``; our decoder falls back to those too) and our additive fields (Vac clients
#: ignore them); then shorten free text no client matches on (a cut shutdown message keeps its
#: code, which is what schedulers read); the duplicates Vac clients may read go last.
_FIT_STEPS: Tuple[Tuple[str, str], ...] = (
    ("drop", "max_cpus"), ("drop", "daemon_disk_avail_kb"), ("drop", "daemon_disk_avail_inodes"),
    ("drop", "max_machines"), ("drop", "max_hs06"), ("drop", "cpu_efficiency"),
    ("drop", "cpu_efficiency_1d"), ("drop", "bytes_per_processor"),
    ("cut", "os_issue"), ("cut", "kernel_version"), ("cut", "shutdown_message"),
    ("cut", "fqan"), ("cut", "site"),
    ("drop", "num_cpus"), ("drop", "running_cpus"),
)


def fit_reply(message: Mapping[str, Any], limit: int = MAX_REPLY_BYTES) -> str:
    """``message`` as JSON that, filled with a Vac cookie and time, is at most ``limit`` bytes.

    Most replies fit as they are and are sent unchanged. A long one (a factory_status with a
    long ``os_issue``, a machine_status with a long shutdown message) is shortened by
    :data:`_FIT_STEPS`, never losing a field Vac's client requires. A reply that still does
    not fit (only possible with names near 255 characters) is sent as it is: our clients read
    up to :data:`MAX_DATAGRAM_BYTES`.
    """
    budget = limit - _FILL_BYTES
    text = _dumps(message)
    if len(text) <= budget:
        return text
    fitted = dict(message)
    for action, name in _FIT_STEPS:
        value = fitted.get(name)
        if name not in fitted:
            continue
        if action == "drop":
            del fitted[name]
            text = _dumps(fitted)
        elif type(value) is str:
            while len(text) > budget and len(value) > 3:
                # (escaped characters take more than one byte: cut again until it fits)
                value = value[:max(len(value) - (len(text) - budget), 3)]
                fitted[name] = value
                text = _dumps(fitted)
        if len(text) <= budget:
            return text
    return text


def render_replies(query_type: QueryType, snapshot: FactorySnapshot) -> Tuple[Template, ...]:
    """Every reply ``snapshot`` gives to a query of ``query_type``, in order, each fitted to
    the 1024 bytes a Vac client reads (:func:`fit_reply`)."""
    if query_type is QueryType.FACTORY:
        messages: Sequence[Mapping[str, Any]] = [factory_fields(snapshot)]
    elif query_type is QueryType.MACHINETYPES:
        messages = [machinetype_fields(snapshot, s) for s in snapshot.machinetypes]
    else:
        messages = [machine_fields(snapshot, m) for m in snapshot.machines]
    return tuple(Template(fit_reply(m)) for m in messages)


def replies_for(query: Query, snapshot: FactorySnapshot, now: float) -> List[bytes]:
    """The reply datagrams ``snapshot`` sends to ``query`` (none for another space).

    A factory with no machinetypes (or no slots) has nothing to say to that query, as in Vac.
    """
    if query.space != snapshot.space:
        return []
    return [t.fill(query.cookie, now) for t in render_replies(query.query_type, snapshot)]
