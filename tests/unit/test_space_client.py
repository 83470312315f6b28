"""space.client: the fan-out with one deadline - as a state machine, and over real UDP."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Dict, Iterator, List, Tuple

import pytest

from tests.system import vacpeer
from tests.waiting import scaled
from vacfactory.space import auth
from vacfactory.space.client import (
    CONTINUE_AFTER,
    Gatherer,
    canonical_name,
    canonical_names,
    query_space,
    resolve_all,
)
from vacfactory.space.protocol import Query, QueryType, decode, replies_for
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, MachinetypeStatus

SPACE = "vac01.example.ac.uk"
SALT = b"\x07" * 32


def snap(name: str, machinetypes: int = 2) -> FactorySnapshot:
    return FactorySnapshot(space=SPACE, factory=name, machinetypes=tuple(
        MachinetypeStatus(machinetype=f"mt{i}", running_hs06=float(i)) for i in range(machinetypes)))


def answer(datagram: bytes, snapshot: FactorySnapshot, key: bytes = None) -> List[bytes]:
    """What a factory would send back for a datagram the gatherer sent."""
    if key:
        datagram, _ = auth.verify(datagram, key, peer="test")
    query = decode(datagram, peer="test")
    assert isinstance(query, Query)
    replies = replies_for(query, snapshot, 1.7e9)
    return [auth.sign(r, key) for r in replies] if key else replies


def gatherer(names=("a.example.ac.uk", "b.example.ac.uk"), **kw) -> Gatherer:
    addresses = {name: f"10.0.0.{i + 1}" for i, name in enumerate(names)}
    addresses.update(kw.pop("addresses", {}))
    kw.setdefault("timeout", 10.0)
    return Gatherer(addresses, kw.pop("query_type", QueryType.MACHINETYPES), SPACE, start=0.0,
                    salt=SALT, **kw)


# -- the state machine -----------------------------------------------------------------------


def test_silent_factories_are_asked_again_at_doubling_intervals_until_the_deadline():
    g = gatherer(timeout=10.0)
    sends: Dict[float, int] = {}
    now = 0.0
    while not g.done(now):
        out = g.due(now, 1.7e9 + now)
        if out:
            sends[round(now, 3)] = len(out)
        now = g.next_event()
    assert list(sends) == [0.0, 0.2, 0.6, 1.4, 3.0, 5.0, 7.0, 9.0]  # doubling, capped at 2 s
    assert set(sends.values()) == {2}
    assert now == 10.0 and g.due(10.0, 0) == []
    result = g.result(now)
    assert result.unknown == ("a.example.ac.uk", "b.example.ac.uk") and not result.answered
    assert result.datagrams_sent == 16 and result.elapsed == 10.0


def test_only_factories_still_missing_answers_are_asked_again():
    g = gatherer()
    sent = {name: data for name, _, data in g.due(0.0, 1.7e9)}
    for reply in answer(sent["a.example.ac.uk"], snap("a.example.ac.uk")):
        assert g.receive(reply, "10.0.0.1", 0.01)
    assert [name for name, _, _ in g.due(0.2, 1.7e9 + 0.2)] == ["b.example.ac.uk"]
    for reply in answer(sent["b.example.ac.uk"], snap("b.example.ac.uk")):
        g.receive(reply, "10.0.0.2", 0.25)
    assert g.done(0.25)  # everything complete: no need to wait for the deadline
    result = g.result(0.25)
    assert result.unknown == () and result.incomplete == ()
    assert [len(r.replies) for r in result.answered.values()] == [2, 2]
    assert result.answered["a.example.ac.uk"].first_reply_seconds == 0.01


def test_a_factory_that_answered_in_part_is_asked_again_as_soon_as_it_pauses():
    g = gatherer(names=("a.example.ac.uk",))
    (_, _, data), = g.due(0.0, 1.7e9)
    first, _second, _third = answer(data, snap("a.example.ac.uk", machinetypes=3))
    g.receive(first, "10.0.0.1", 0.05)
    assert g.next_event() == pytest.approx(0.05 + CONTINUE_AFTER)
    assert len(g.due(0.05 + CONTINUE_AFTER, 1.7e9)) == 1
    result = g.result(0.1)
    assert result.incomplete == ("a.example.ac.uk",) and result.unknown == ()
    assert result.answered["a.example.ac.uk"].expected == 3


def test_duplicate_replies_count_once():
    g = gatherer(names=("a.example.ac.uk",))
    (_, _, data), = g.due(0.0, 1.7e9)
    replies = answer(data, snap("a.example.ac.uk"))
    assert g.receive(replies[0], "10.0.0.1", 0.1)
    assert not g.receive(replies[0], "10.0.0.1", 0.1)
    assert len(g.result(0.1).answered["a.example.ac.uk"].replies) == 1


def test_replies_with_wrong_cookie_space_kind_or_factory_are_rejected():
    g = gatherer()
    sent = {name: data for name, _, data in g.due(0.0, 1.7e9)}
    a_cookie = decode(sent["a.example.ac.uk"], peer="t").cookie
    bad = [
        # b's answer to the cookie we sent a: the cookie is per factory name
        replies_for(Query(QueryType.MACHINETYPES, SPACE, a_cookie), snap("b.example.ac.uk"), 0)[0],
        # a factory we never asked, echoing a's cookie
        replies_for(Query(QueryType.MACHINETYPES, SPACE, a_cookie), snap("c.example.ac.uk"), 0)[0],
        # another space
        replies_for(Query(QueryType.MACHINETYPES, "other.space", a_cookie),
                    FactorySnapshot(space="other.space", factory="a.example.ac.uk",
                                    machinetypes=(MachinetypeStatus("x"),)), 0)[0],
        # the right cookie but the wrong kind of answer
        replies_for(Query(QueryType.FACTORY, SPACE, a_cookie), snap("a.example.ac.uk"), 0)[0],
        sent["a.example.ac.uk"],  # a query is not a reply
        b"\x00garbage",
    ]
    for datagram in bad:
        assert not g.receive(datagram, "10.0.0.1", 0.1)
    assert g.rejected == len(bad)
    assert g.result(0.1).answered == {}


def test_with_a_space_key_queries_are_signed_and_only_signed_replies_count():
    key = b"k"
    g = gatherer(names=("a.example.ac.uk",), space_key=key)
    (_, _, data), = g.due(0.0, 1.7e9)
    unsigned = answer(data, snap("a.example.ac.uk"), key=key)  # checks the query's signature
    body, _ = auth.split(unsigned[0])
    assert not g.receive(body, "10.0.0.1", 0.1)
    assert not g.receive(auth.sign(body, b"other key"), "10.0.0.1", 0.1)
    assert g.receive(unsigned[0], "10.0.0.1", 0.1)


def test_every_resend_differs_so_a_replay_guard_accepts_it():
    g = gatherer(names=("a.example.ac.uk",), space_key=b"k")
    (_, _, first), = g.due(0.0, 1.7e9)
    (_, _, second), = g.due(0.2, 1.7e9 + 0.2)
    assert first != second and decode(auth.split(first)[0], peer="t").time_sent == 1.7e9


def test_unresolved_factories_are_unknown_and_not_waited_for():
    g = gatherer(names=("a.example.ac.uk",), addresses={"gone.example.ac.uk": None})
    assert [n for n, _, _ in g.due(0.0, 1.7e9)] == ["a.example.ac.uk"]
    (_, _, data), = [(None, None, d) for d in [g._datagram(g._targets["a.example.ac.uk"], 1.7e9)]]
    for reply in answer(data, snap("a.example.ac.uk")):
        g.receive(reply, "10.0.0.1", 0.1)
    assert g.done(0.1)
    assert g.result(0.1).unknown == ("gone.example.ac.uk",)


def test_queries_are_padded_to_earn_a_reply_budget_within_vacs_1024_bytes():
    for query_type, low in ((QueryType.MACHINES, 900), (QueryType.MACHINETYPES, 500),
                            (QueryType.FACTORY, 0)):
        for key in (None, b"k"):
            (_, _, data), = gatherer(names=("a.example.ac.uk",), query_type=query_type,
                                     space_key=key).due(0.0, 1.7e9)
            assert low <= len(data) <= 1024


# -- names -----------------------------------------------------------------------------------


def test_canonical_names_follow_vac():
    assert canonical_name(".", "f1.example.ac.uk") == "f1.example.ac.uk"
    assert canonical_name("f2", "f1.example.ac.uk") == "f2.example.ac.uk"
    assert canonical_name("f2.other.org", "f1.example.ac.uk") == "f2.other.org"
    assert canonical_name("10.0.0.1", "f1.example.ac.uk") == "10.0.0.1"
    assert canonical_name("::1", "f1.example.ac.uk") == "::1"
    assert canonical_names([".", "f1", "f2", " f2 "], "f1.example.ac.uk") == [
        "f1.example.ac.uk", "f2.example.ac.uk"]


def test_a_hanging_resolver_costs_at_most_the_timeout():
    def resolver(name: str) -> List[str]:
        if name.startswith("slow"):
            time.sleep(3)
        return ["10.0.0.5"]

    began = time.monotonic()
    result = resolve_all(["slow.example.org", "fast.example.org", "10.1.1.1"], resolver, 0.3)
    assert time.monotonic() - began < min(scaled(1.0), 2.5)  # the slow lookup takes 3 s
    assert result == {"slow.example.org": None, "fast.example.org": "10.0.0.5",
                      "10.1.1.1": "10.1.1.1"}


# -- over real UDP ---------------------------------------------------------------------------


@pytest.fixture
def space_of_three() -> Iterator[Tuple[int, Dict[str, str]]]:
    """Three responders on 127.0.0.2-4, one port; names resolve through a dict."""
    names = {f"f{i}.example.ac.uk": f"127.0.0.{i + 1}" for i in (1, 2, 3)}
    responders = []
    port = 0
    for name, address in names.items():
        responder = Responder((address, port), lambda n=name: snap(n), SPACE,
                              lambda: {"127.0.0.1"})
        responder.start()
        port = responder.address[1]
        responders.append(responder)
    yield port, names
    for responder in responders:
        responder.stop()


def test_query_space_gathers_every_factory_and_returns_as_soon_as_complete(space_of_three):
    port, names = space_of_three
    result = query_space(list(names), QueryType.MACHINETYPES, SPACE, 5.0, port=port,
                         local_name="f1.example.ac.uk", resolver=lambda n: [names[n]])
    assert sorted(result.answered) == sorted(names)
    assert result.unknown == () and result.incomplete == ()
    assert all(len(r.replies) == 2 for r in result.answered.values())
    assert result.elapsed < min(scaled(1.0), 4.0)  # complete: not the 5 s deadline


def test_dot_means_this_factory(space_of_three):
    port, names = space_of_three
    result = query_space(["."], QueryType.FACTORY, SPACE, 2.0, port=port,
                         local_name="f2.example.ac.uk", resolver=lambda n: [names[n]])
    assert list(result.answered) == ["f2.example.ac.uk"]


def test_dead_silent_and_unresolvable_factories_cost_at_most_the_deadline(space_of_three):
    port, names = space_of_three
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    black_hole.bind(("127.0.0.21", port))  # reads nothing, answers nothing
    try:
        table = dict(names, **{"dead.example.ac.uk": "127.0.0.20",
                               "silent.example.ac.uk": "127.0.0.21"})

        def resolver(name: str) -> List[str]:
            if name == "hung.example.ac.uk":
                time.sleep(5)
            return [table[name]] if name in table else []

        factories = list(table) + ["hung.example.ac.uk", "nxdomain.example.ac.uk"]
        began = time.monotonic()
        result = query_space(factories, QueryType.MACHINETYPES, SPACE, 1.0, port=port,
                             local_name="f1.example.ac.uk", resolver=resolver)
        took = time.monotonic() - began
    finally:
        black_hole.close()
    assert took < 1.0 + min(scaled(0.3), 3.0)  # not the hung lookup's 5 s
    assert sorted(result.answered) == sorted(names)
    assert set(result.unknown) == {"dead.example.ac.uk", "silent.example.ac.uk",
                                   "hung.example.ac.uk", "nxdomain.example.ac.uk"}


class VacResponder:
    """A stand-in for a real Vac 03.01 factory: its reply code, transcribed (Python 2 style
    json.dumps with default separators, no type checks on queries, uname as factory)."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.1)
        self.queries: List[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(1024)
            except socket.timeout:
                continue
            query = json.loads(data)
            self.queries.append(query)
            if "cookie" not in query or query.get("space") != SPACE:
                continue
            if query.get("message_type") == "machinetypes_query":
                for name, hs06 in (("atlas", 12.5), ("lhcb", 0.0)):
                    self.sock.sendto(json.dumps({
                        "message_type": "machinetype_status",
                        "vac_version": "Vac 03.01 -", "daemon_version": "Vac 03.01 -",
                        "vacquery_version": "VacQuery 01.03", "cookie": query["cookie"],
                        "space": SPACE, "factory": self.name, "num_machinetypes": 2,
                        "time_sent": 1700000000, "machinetype": name, "running_hs06": hs06,
                        "running_machines": 1, "running_cpus": 1.0, "running_processors": 1.0,
                        "num_before_fizzle": 0, "shutdown_message": "300 No more work",
                        "shutdown_time": 1699999000, "shutdown_machine": "vm-01", "site": "x",
                    }).encode(), addr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_a_real_vac_factory_is_understood_and_understands_us():
    vac = VacResponder("127.0.0.30", "vac.example.ac.uk")
    try:
        result = query_space(["vac.example.ac.uk"], QueryType.MACHINETYPES, SPACE, 2.0,
                             port=vac.sock.getsockname()[1], local_name="us.example.ac.uk",
                             resolver=lambda n: ["127.0.0.30"], space_key=None)
    finally:
        vac.close()
    (replies,) = result.answered.values()
    assert {r.status.machinetype: r.status.running_hs06 for r in replies.replies} == {
        "atlas": 12.5, "lhcb": 0.0}
    assert replies.replies[0].status.running_processors == 1
    assert vac.queries[0]["method"] == "machinetypes"  # old responders read method
    assert len(vac.queries) == 1  # complete after one query: no needless re-send


def test_a_factory_answering_under_another_name_is_not_accepted():
    vac = VacResponder("127.0.0.31", "short-uname")  # Vac: uname must equal the configured name
    try:
        result = query_space(["vac.example.ac.uk"], QueryType.MACHINETYPES, SPACE, 0.5,
                             port=vac.sock.getsockname()[1], local_name="us.example.ac.uk",
                             resolver=lambda n: ["127.0.0.31"])
    finally:
        vac.close()
    assert result.unknown == ("vac.example.ac.uk",) and result.rejected >= 2


def test_ipv6_factories_are_asked_over_an_ipv6_socket():
    responder = Responder(("::1", 0), lambda: snap("::1"), SPACE, lambda: {"::1"})
    responder.start()
    try:
        result = query_space(["::1"], QueryType.MACHINETYPES, SPACE, 2.0,
                             port=responder.address[1], local_name="x.example.ac.uk")
    finally:
        responder.stop()
    assert list(result.answered) == ["::1"] and result.incomplete == ()


def test_every_reply_of_a_big_vac_factory_is_read():
    """A Vac factory answers with one datagram per slot and per machinetype (128 and 40 here),
    all at once; the client reads every one (Vac's responder code: tests/system/vacpeer.py)."""
    name = "bigvac.example.ac.uk"
    machinetypes = [{"machinetype": f"mt{i:02d}", "running_hs06": float(i)} for i in range(40)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.32", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, address = sock.recvfrom(vacpeer.VAC_READ_BYTES)
            except socket.timeout:
                continue
            for reply in vacpeer.answers(json.loads(data), SPACE, name, machinetypes, 128):
                sock.sendto(reply, address)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        results = {kind: query_space([name], kind, SPACE, 3.0, port=sock.getsockname()[1],
                                     local_name="us.example.ac.uk",
                                     resolver=lambda n: ["127.0.0.32"])
                   for kind in (QueryType.MACHINES, QueryType.MACHINETYPES)}
    finally:
        stop.set()
        thread.join()
        sock.close()
    machines = results[QueryType.MACHINES].answered[name]
    assert machines.complete and len(machines.replies) == 128
    assert {r.status.num_processors for r in machines.replies} == {0}  # Vac's empty slots
    types = results[QueryType.MACHINETYPES].answered[name]
    assert types.complete and len(types.replies) == 40
    assert sum(r.status.running_hs06 for r in types.replies) == sum(range(40))
