"""Fuzzed datagrams never crash the responder and never get a reply.

11,000 cases in all: 10,000 straight into the decoder and the responder's decision
(``Responder.handle``: allow-list, signature, decode, space, budget) - arbitrary bytes, arbitrary
JSON, and valid queries broken in one place - and 1,000 over real UDP to a live responder,
which must stay silent and keep answering good queries afterwards.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vacfactory.errors import ProtocolError
from vacfactory.space import auth
from vacfactory.space.protocol import Query, QueryType, decode, encode_query
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, MachineStatus, MachinetypeStatus

SPACE = "vac01.example.ac.uk"
PEER = "127.0.0.1"
NOW = 1_700_000_000.0
_FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                 database=None)


def fuzz(examples: int) -> settings:
    """Reproducible runs (derandomized, no example database) of ``examples`` cases."""
    return settings(_FUZZ, max_examples=examples)

SNAPSHOT = FactorySnapshot(
    space=SPACE, factory="f1.example.ac.uk",
    machines=tuple(MachineStatus(machine=f"m{i}") for i in range(5)),
    machinetypes=(MachinetypeStatus("atlas"), MachinetypeStatus("lhcb")),
)


def responder(**kw) -> Responder:
    return Responder(("127.0.0.1", 0), lambda: SNAPSHOT, SPACE, lambda: {PEER}, **kw)


OPEN = responder()
KEYED = responder(space_key=b"k")


def check_silent(data: bytes) -> None:
    """The property: junk never crashes decode and never gets a reply from either responder.

    (A reply is allowed only for a datagram that really is a valid query for our space, which
    random generation essentially never produces - the check keeps the property honest.)"""
    try:
        message = decode(data, peer=PEER)
    except ProtocolError:
        message = None
    valid = isinstance(message, Query) and message.space == SPACE
    assert OPEN.handle(data, PEER, NOW) == [] or valid
    assert KEYED.handle(data, PEER, NOW) == []  # never signed with the right key


# -- 4,000 arbitrary byte strings --------------------------------------------------------------


def run_cases(examples: int, strategy, check) -> int:
    """Run ``check`` on ``examples`` generated cases; returns how many really ran."""
    ran = []

    @fuzz(examples)
    @given(strategy)
    def case(data):
        check(data)
        ran.append(1)

    case()
    return len(ran)


def test_arbitrary_bytes():
    assert run_cases(4000, st.binary(max_size=1200), check_silent) >= 4000


# -- 3,000 arbitrary JSON documents, mostly objects with VacQuery's own keys -----------------

_KEYS = st.sampled_from(["message_type", "method", "vacquery_version", "space", "cookie",
                         "vac_version", "time_sent", "hmac", "padding", "factory", "x"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=40),
                     st.sampled_from(["machines_query", "machinetypes_query", "factory_query",
                                      "machine_status", "factories", "VacQuery 01.03", SPACE]))
_SHALLOW = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3),
                     st.dictionaries(st.text(max_size=5), _SCALARS, max_size=3))
_DEEP = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
_JSON = st.one_of(st.dictionaries(st.one_of(_KEYS, st.text(max_size=8)), _SHALLOW, max_size=8),
                  _SHALLOW, _DEEP)


def test_arbitrary_json():
    def check(document) -> None:
        data = json.dumps(document).encode()
        if len(data) <= 10240:
            check_silent(data)

    assert run_cases(3000, _JSON, check) >= 3000


# -- 3,000 valid queries broken in exactly one place: must never be answered ----------------


def _valid() -> Dict[str, Any]:
    return json.loads(encode_query(QueryType.MACHINETYPES, SPACE, "c" * 64, now=NOW))


_WRONG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                          st.lists(st.integers(), max_size=2), st.dictionaries(
                              st.text(max_size=3), st.integers(), max_size=2),
                          st.just(""), st.just("has space"), st.just("x" * 300))


def _break(draw) -> bytes:
    message = _valid()
    how = draw(st.sampled_from(["drop", "retype", "space", "type", "version", "truncate",
                                "wrong_key", "garble"]))
    if how == "drop":
        field = draw(st.sampled_from(["space", "cookie", "vacquery_version", "type"]))
        if field == "type":
            del message["message_type"], message["method"]
        else:
            del message[field]
    elif how == "retype":
        field = draw(st.sampled_from(["space", "cookie", "vacquery_version", "time_sent",
                                      "vac_version"]))
        value = draw(_WRONG_VALUES)
        if field == "time_sent" and (value is None or (
                type(value) in (int, float) and abs(value) <= 1e18)):
            value = "now"  # null means "absent", and any number is a time: both are valid
        if field == "vac_version" and (value is None or isinstance(value, str)):
            value = 42  # any text is a valid client version
        if field in ("space", "cookie") and isinstance(value, str) and 0 < len(value) <= 255 \
                and " " not in value:
            value = value + " broken"
        message[field] = value
    elif how == "space":
        message["space"] = draw(st.from_regex(r"\A[a-z]{1,20}\.example\.org\Z"))
    elif how == "type":
        message["message_type"] = draw(st.sampled_from(
            ["machine_status", "machinetype_status", "factory_status", "query", "", "MACHINES"]))
        message["method"] = draw(st.sampled_from(["machine", "factory", "dance", None]))
        if message["message_type"] in ("query", "", "MACHINES") and message["method"] is None:
            del message["method"]
    elif how == "version":
        message["vacquery_version"] = draw(st.sampled_from(
            ["VacQuery 02.00", "VacQuery 99.1", "Vac 01.03", "01.03", "VacQuery", "VacQuery 1"]))
    data = json.dumps(message).encode()
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "wrong_key":
        data = auth.sign(json.dumps(message).encode(), b"not the key")
        message["space"] = "elsewhere.org"
        data = auth.sign(json.dumps(message).encode(), draw(st.sampled_from([b"k", b"other"])))
    elif how == "garble":
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + draw(st.sampled_from([b"\xff", b"\x00", b"{", b'"'])) + \
            data[position + 1:]
        try:
            decode(data, peer=PEER)
        except ProtocolError:
            pass
        else:  # the garbling happened to keep it valid (e.g. inside the vac_version text)
            data = data + b"}"
    return data


broken_queries = st.composite(_break)


def test_valid_queries_broken_in_one_place_are_never_answered():
    def check(data: bytes) -> None:
        assert OPEN.handle(data, PEER, NOW) == []
        assert KEYED.handle(data, PEER, NOW) == []

    assert run_cases(3000, broken_queries(), check) >= 3000


def test_the_broken_queries_are_really_broken_versions_of_an_answered_query():
    good = encode_query(QueryType.MACHINETYPES, SPACE, "c" * 64, now=NOW)
    assert len(responder().handle(good, PEER, NOW)) == 2
    assert len(responder(space_key=b"k").handle(auth.sign(good, b"k"), PEER, NOW)) == 2


# -- 1,000 over UDP to a live responder ----------------------------------------------------


@pytest.fixture
def live():
    live_responder = responder()
    live_responder.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield live_responder, sock
    sock.close()
    live_responder.stop()


def test_a_live_responder_stays_silent_and_alive_under_1000_fuzzed_datagrams(live):
    live_responder, sock = live
    sent = []

    @fuzz(1000)
    @given(st.one_of(st.binary(max_size=1500), broken_queries(),
                     _JSON.map(lambda doc: json.dumps(doc).encode()[:4000])))
    def send(data):
        sock.sendto(data, live_responder.address)
        sent.append(data)

    send()
    assert len(sent) >= 1000
    deadline = time.monotonic() + 10.0
    while live_responder.stats.received < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        sock.recvfrom(65535)  # not one reply
    stats = live_responder.stats
    assert stats.received == len(sent)
    assert stats.answered == 0 and stats.datagrams_sent == 0
    assert stats.dropped["internal_error"] == 0
    # still alive and answering
    sock.sendto(encode_query(QueryType.FACTORY, SPACE, "ok"), live_responder.address)
    sock.settimeout(2.0)
    assert decode(sock.recvfrom(65535)[0], peer="r").cookie == "ok"
