"""engine.spacewatch: the background view of the space, against real responders on loopback.

Two peer factories answer on 127.0.0.2 and 127.0.0.3 (real :class:`Responder` s, real UDP);
the watcher's clock is moved by hand, so "missed one round" and "silent beyond the window"
are exact. A peer that misses a round must keep counting with its last answer; only beyond
``STALE_INTERVALS`` query intervals is it unknown - and both are logged.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Dict, Iterator

import pytest

from tests.unit.engine_harness import HOST, kernel_file, machinetype_text
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.core.views import MachinetypeState
from vacfactory.engine.spacewatch import QUERY_SECONDS, STALE_INTERVALS, SpaceWatcher, stale_after
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, MachinetypeStatus

SPACE = "watch.example.org"
PEERS = ("127.0.0.2", "127.0.0.3")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class Peers:
    """A responder per peer address, each reporting ``hs06`` of atlas."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.running: Dict[str, Responder] = {}

    def start(self, address: str, hs06: float) -> None:
        snapshot = FactorySnapshot(space=SPACE, factory=address, machinetypes=(
            MachinetypeStatus("atlas", running_hs06=hs06, running_machines=int(hs06 // 10),
                              running_processors=int(hs06 // 10)),))
        responder = Responder((address, self.port), lambda: snapshot, SPACE,
                              lambda: {"127.0.0.1", *PEERS})
        responder.start()
        self.running[address] = responder

    def stop(self, address: str) -> None:
        self.running.pop(address).stop()


@pytest.fixture
def setup(tmp_path) -> Iterator:
    port = free_port()
    path = os.path.join(tmp_path, "vacfactory.conf")
    with open(path, "w") as f:
        f.write(
            "[settings]\n"
            f"vac_space = {SPACE}\n"
            "factory_name = watcher.example.org\n"
            f"factories = . {' '.join(PEERS)}\n"
            f"state_dir = {tmp_path / 'state'}\n"
            "libvirt_uri = test:///default\n"
            "domain_type = test\n"
            "total_processors = 4\n"
            f"udp_port = {port}\n"
            "udp_timeout_seconds = 0.5\n"
            + machinetype_text("atlas", kernel_file(str(tmp_path))))
    config = ConfigWatcher(ConfigSources.for_main_file(path), host_facts=HOST).current
    clock = Clock()
    peers = Peers(port)
    yield SpaceWatcher(lambda: config, clock=clock), peers, clock, config
    for address in list(peers.running):
        peers.stop(address)


def atlas_hs06(watcher: SpaceWatcher, config, clock: Clock) -> float:
    own = {"atlas": MachinetypeState(running_hs06=1.0)}
    return watcher.view(config, own, clock.now)["atlas"].running_hs06


def test_a_peer_missing_rounds_counts_with_its_last_answer_until_the_window_ends(setup, caplog):
    watcher, peers, clock, config = setup
    window = stale_after(config.settings.udp_timeout_seconds)
    assert window == STALE_INTERVALS * QUERY_SECONDS
    caplog.set_level(logging.INFO, logger="vacfactory.engine.spacewatch")
    peers.start(PEERS[0], 20.0)
    peers.start(PEERS[1], 50.0)
    watcher.query_once()
    assert atlas_hs06(watcher, config, clock) == 71.0  # own 1 + 20 + 50
    assert watcher.unknown == frozenset()

    peers.stop(PEERS[1])
    clock.now += QUERY_SECONDS
    watcher.query_once()  # .3 missed a round: still counted with its 50
    assert atlas_hs06(watcher, config, clock) == 71.0
    assert watcher.unknown == frozenset()
    held = [r.getMessage() for r in caplog.records if "counting their last answers" in r.getMessage()]
    assert held and "127.0.0.3" in held[-1] and "127.0.0.2" not in held[-1], held

    clock.now += window - QUERY_SECONDS + 1  # its answer is now older than the window
    watcher.query_once()
    assert atlas_hs06(watcher, config, clock) == 21.0  # unknown: adds nothing
    assert watcher.unknown == {"127.0.0.3"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[-1] == "space: no answer from 127.0.0.3 (counted as unknown)"

    peers.start(PEERS[1], 30.0)  # back, with other figures
    clock.now += QUERY_SECONDS
    watcher.query_once()
    assert atlas_hs06(watcher, config, clock) == 51.0
    assert watcher.unknown == frozenset()
    assert caplog.records[-1].getMessage() == "space: every factory answered"


def test_a_round_that_is_no_longer_fresh_is_not_used_at_all(setup):
    """A stuck query thread: the merged answers of its last round lapse after the window."""
    watcher, peers, clock, config = setup
    peers.start(PEERS[0], 20.0)
    peers.start(PEERS[1], 50.0)
    watcher.query_once()
    window = stale_after(config.settings.udp_timeout_seconds)
    clock.now += window
    assert atlas_hs06(watcher, config, clock) == 71.0
    clock.now += 1
    assert atlas_hs06(watcher, config, clock) == 1.0
