"""The HTTP server's connection states and its fairness bookkeeping, as plain values (the
socket behaviour is tested in test_httpserver.py and test_http_fairness.py)."""

from __future__ import annotations

import socket

import pytest

from vacfactory.vmio.http.connection import TRANSITIONS, Connection, ConnState, IllegalTransition
from vacfactory.vmio.http.fairness import RoundRobin, Shares
from vacfactory.vmio.registry import VMRegistry


@pytest.fixture
def conn():
    a, b = socket.socketpair()
    yield Connection(a, "10.0.0.2", "vm:one")
    a.close()
    b.close()


def test_every_state_but_closed_can_close_and_closed_is_final():
    for state in ConnState:
        if state is ConnState.CLOSED:
            assert TRANSITIONS[state] == frozenset()
        else:
            assert ConnState.CLOSED in TRANSITIONS[state]


def test_a_closing_connection_never_reads_another_request(conn):
    conn.move(ConnState.CLOSING)
    for later in (ConnState.READING, ConnState.UPLOADING, ConnState.DISCARDING):
        with pytest.raises(IllegalTransition, match="closing to"):
            conn.move(later)
    assert not conn.state.reads_requests and conn.state.live


def test_the_life_of_a_keep_alive_upload_then_a_close(conn):
    for state in (ConnState.UPLOADING, ConnState.READING, ConnState.DISCARDING, ConnState.READING,
                  ConnState.CLOSING, ConnState.LINGERING, ConnState.CLOSED):
        conn.move(state)
        assert conn.state is state
    assert not conn.state.live and not conn.state.reads_requests


def test_moving_into_the_current_state_changes_nothing(conn):
    conn.move(ConnState.CLOSING)
    conn.move(ConnState.CLOSING)
    assert conn.state is ConnState.CLOSING


def test_a_discarding_connection_cannot_start_an_upload(conn):
    conn.move(ConnState.DISCARDING)
    with pytest.raises(IllegalTransition):
        conn.move(ConnState.UPLOADING)


def test_only_a_reading_connection_with_nothing_buffered_is_idle(conn):
    assert conn.idle
    conn.inbuf += b"GET"
    assert not conn.idle
    conn.inbuf.clear()
    conn.move(ConnState.DISCARDING)  # in the middle of a body: not idle
    assert not conn.idle


def test_a_vms_share_shrinks_so_that_every_registered_vm_fits():
    registry = VMRegistry()
    shares = Shares(registry, max_connections=40, max_per_vm=16, max_unidentified=8, max_per_address=4)
    assert shares.vm_share() == 16  # no VM registered yet: the full share
    shares.per_owner["vm:a"] = 16
    assert shares.over_share() == set()
    shares.max_connections = 20  # 12 left for VMs once the pool is set aside
    assert shares.vm_share() == 12 and shares.over_share() == {"vm:a"}


def test_the_unidentified_pool_is_apart_from_the_vms_shares():
    shares = Shares(VMRegistry(), max_connections=100, max_per_vm=16, max_unidentified=2, max_per_address=4)
    owner, vm = shares.owner_of("192.0.2.9")
    assert owner == "addr:192.0.2.9" and vm is None
    shares.add(owner)
    shares.add("addr:192.0.2.10")
    assert shares.full("addr:192.0.2.11", open_connections=2)  # the pool is full
    assert not shares.full("vm:x", open_connections=2)
    shares.remove(owner)
    assert shares.unidentified == 1 and owner not in shares.per_owner
    assert Shares(VMRegistry(), 100, 16, 0, 4).owner_of("192.0.2.9") == (None, None)  # no pool: refused


def test_round_robin_serves_one_request_per_owner_per_turn(conn):
    socks = []
    turns = RoundRobin()
    made = []
    for owner, count in (("vm:greedy", 3), ("vm:b", 1), ("vm:c", 1)):
        for _ in range(count):
            a, b = socket.socketpair()
            socks += [a, b]
            made.append(Connection(a, owner, owner))
            turns.enqueue(made[-1])
    turns.enqueue(made[0])  # already queued: not twice
    try:
        assert [c.owner for c in turns.turn()] == ["vm:greedy", "vm:b", "vm:c"]
        assert [c.owner for c in turns.turn()] == ["vm:greedy"]
        assert [c.owner for c in turns.turn()] == ["vm:greedy"]
        assert not turns
    finally:
        for s in socks:
            s.close()
