"""The responder inside a real daemon follows configuration reloads, and the space sees a long
round's VMs while the round still runs.

Everything is real: a :class:`~vacfactory.daemon.Daemon` on libvirt's in-process test driver,
its configuration files (reloaded by the engine's own poll), its responder on a loopback UDP
port, and the VacQuery client asking it. The only seam is a wrapper around the hypervisor's
``create`` that asks the responder before each VM starts (and takes 100 ms, as a real domain
takes about that long).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Iterator, List, Optional

import pytest

from tests.unit.engine_harness import HOST, kernel_file, machinetype_text
from tests.waiting import poll, scaled
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon
from vacfactory.engine import creation
from vacfactory.engine.snapshot import SnapshotPacer
from vacfactory.space import auth
from vacfactory.space.client import SpaceReplies, query_space
from vacfactory.space.protocol import QueryType, decode, encode_query
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, FactoryStatus

_count = iter(range(1, 1_000_000))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaemonSite:
    """A daemon's configuration and key files in a temporary directory."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.name = f"vfreload{os.getpid()}x{next(_count)}.example.org"
        self.kernel = kernel_file(tmp)
        self.config_path = os.path.join(tmp, "vacfactory.conf")
        self.daemon: Optional[Daemon] = None

    def key_file(self, label: str, key: str) -> str:
        path = os.path.join(self.tmp, f"{label}.key")
        with open(path, "w") as f:
            f.write(key + "\n")
        os.chmod(path, 0o600)
        return path

    def write(self, *, space: str, port: int, key_file: str, total: int = 4) -> None:
        text = (
            "[settings]\n"
            f"vac_space = {space}\n"
            f"factory_name = {self.name}\n"
            "factories = .\n"
            f"state_dir = {os.path.join(self.tmp, 'state')}\n"
            "libvirt_uri = test:///default\n"
            "domain_type = test\n"
            f"total_processors = {total}\n"
            "hs06_per_processor = 10\n"
            "mb_per_processor = 64\n"
            "overload_per_processor = 1000\n"
            f"udp_port = {port}\n"
            "udp_timeout_seconds = 1\n"
            f"space_key_file = {key_file}\n"
        ) + machinetype_text("atlas", self.kernel)
        with open(self.config_path, "w") as f:
            f.write(text)
        # a new mtime even within the same clock tick: the engine's poll must see the change
        st = os.stat(self.config_path)
        os.utime(self.config_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def start(self) -> Daemon:
        self.daemon = Daemon(ConfigSources.for_main_file(self.config_path), host_facts=HOST)
        self.daemon.start()
        return self.daemon

    def round(self) -> None:
        """One engine round and the daemon's after-round work (what ``run`` loops over)."""
        assert self.daemon is not None
        self.daemon.factory.run_round()
        self.daemon._after_round()

    def close(self) -> None:
        if self.daemon is None:
            return
        hypervisor = self.daemon.hypervisor
        uuids = [m.uuid for m in self.daemon.factory.machines.values() if m.live]
        self.daemon.stop()
        for uuid in uuids:
            try:
                hypervisor.destroy(uuid)
            except Exception:  # noqa: BLE001 - teardown: the domain may be gone already
                pass
        self.daemon.close()


@pytest.fixture
def site(tmp_path) -> Iterator[DaemonSite]:
    s = DaemonSite(str(tmp_path))
    yield s
    s.close()


def ask(site: DaemonSite, port: int, space: str, key: str, query_type=QueryType.FACTORY,
        timeout: float = 1.0) -> SpaceReplies:
    return query_space([site.name], query_type, space, timeout, port=port,
                       space_key=key.encode(), local_name=site.name,
                       resolver=lambda name: ["127.0.0.1"])


# -- task: a reload reaches the running responder ---------------------------------------------


def test_a_reload_moves_the_responder_to_the_new_space_key_and_port_without_a_restart(site):
    old_port, new_port = free_udp_port(), free_udp_port()
    old_key, new_key = "the old space key", "the new space key"
    site.write(space="old.example.org", port=old_port, key_file=site.key_file("old", old_key))
    daemon = site.start()
    site.round()
    assert ask(site, old_port, "old.example.org", old_key).answered
    responder = daemon.responder
    assert responder is not None

    site.write(space="new.example.org", port=new_port, key_file=site.key_file("new", new_key))
    site.round()  # the engine's poll reloads; the after-round work applies it

    assert daemon.factory.config.settings.udp_port == new_port  # (the reload happened)
    answer = ask(site, new_port, "new.example.org", new_key)
    assert list(answer.answered) == [site.name] and answer.unknown == ()
    assert answer.answered[site.name].replies[0].space == "new.example.org"
    # the old key, the old space and the old port get nothing any more
    assert ask(site, new_port, "new.example.org", old_key, timeout=0.5).unknown == (site.name,)
    assert ask(site, new_port, "old.example.org", new_key, timeout=0.5).unknown == (site.name,)
    assert ask(site, old_port, "old.example.org", old_key, timeout=0.5).unknown == (site.name,)
    # the same responder moved (its counters, replay memory and thread carried over)
    assert daemon.responder is responder and responder.address[1] == new_port
    dropped = responder.stats.dropped
    assert dropped["bad_signature"] >= 1 and dropped["wrong_space"] >= 1


def test_a_rewritten_key_file_is_picked_up_by_the_responders_periodic_check(site):
    port = free_udp_port()
    key_file = site.key_file("space", "first key")
    site.write(space="s.example.org", port=port, key_file=key_file)
    daemon = site.start()
    site.round()
    assert ask(site, port, "s.example.org", "first key").answered
    with open(key_file, "w") as f:
        f.write("second key\n")
    daemon.ensure_responder()  # the daemon runs it every minute
    assert ask(site, port, "s.example.org", "second key").answered
    assert ask(site, port, "s.example.org", "first key", timeout=0.5).unknown == (site.name,)


def test_an_unreadable_new_key_file_leaves_the_responder_serving_with_the_old_key(site, caplog):
    port = free_udp_port()
    site.write(space="s.example.org", port=port, key_file=site.key_file("space", "good key"))
    daemon = site.start()
    site.round()
    site.write(space="s.example.org", port=port,
               key_file=os.path.join(site.tmp, "missing.key"))
    site.round()
    assert daemon.factory.config.settings.space_key_file.endswith("missing.key")
    assert any("missing.key" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert ask(site, port, "s.example.org", "good key").answered


def test_a_port_that_cannot_be_bound_keeps_the_responder_on_the_old_port(site, caplog):
    port = free_udp_port()
    key_file = site.key_file("space", "k")
    site.write(space="s.example.org", port=port, key_file=key_file)
    daemon = site.start()
    site.round()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        busy = taken.getsockname()[1]
        site.write(space="s.example.org", port=busy, key_file=key_file)
        site.round()
        assert any(f"cannot move to UDP port {busy}" in r.getMessage() for r in caplog.records)
        assert ask(site, port, "s.example.org", "k").answered
    assert daemon.responder is not None and daemon.responder.address[1] == port


# -- the responder's side: reconfigure and rebind -------------------------------------------------

SNAPSHOT = FactorySnapshot(space="s.example.org", factory="f.example.org",
                           factory_status=FactoryStatus(max_processors=8))


def test_rebinding_never_leaves_a_gap_in_the_service():
    """A client asks both ports every 5 ms while the responder moves: the answers (from
    either port) never pause for more than a moment."""
    responder = Responder(("127.0.0.1", 0), lambda: SNAPSHOT, "s.example.org",
                          lambda: {"127.0.0.1"})
    responder.start()
    old_port, new_port = responder.address[1], free_udp_port()
    answers: List[float] = []
    stop = threading.Event()

    def client() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.005)
            while not stop.is_set():
                for port in (old_port, new_port):
                    sock.sendto(encode_query(QueryType.FACTORY, "s.example.org", "c"),
                                ("127.0.0.1", port))
                try:
                    while True:
                        sock.recvfrom(65535)
                        answers.append(time.monotonic())
                except (socket.timeout, ConnectionRefusedError):
                    pass

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert poll(lambda: len(answers) >= 20, 5), "the old port does not answer"
        moved_at = time.monotonic()
        responder.rebind(("127.0.0.1", new_port))
        # a busy machine spaces the client's questions out: the window and the pause allowed grow
        window = scaled(0.2)
        poll(lambda: answers[-1] > moved_at + window, 5)
    finally:
        stop.set()
        thread.join()
        responder.stop()
    around = [t for t in answers if moved_at - window <= t <= moved_at + window]
    gaps = [b - a for a, b in zip(around, around[1:])]
    assert around and around[0] < moved_at and around[-1] > moved_at + window / 2, answers[-5:]
    assert max(gaps) < scaled(0.1), f"the service paused {max(gaps) * 1000:.0f} ms"
    assert responder.bind == ("127.0.0.1", new_port)


def test_reconfigure_applies_the_new_key_and_space_from_the_next_datagram():
    responder = Responder(("127.0.0.1", 0), lambda: SNAPSHOT, "s.example.org",
                          lambda: {"127.0.0.1"}, space_key=b"old")
    now = time.time()
    query = encode_query(QueryType.FACTORY, "s.example.org", "c", now=now)
    assert responder.handle(auth.sign(query, b"old"), "127.0.0.1", now)
    assert responder.reconfigure("s.example.org", b"new") is True
    assert responder.reconfigure("s.example.org", b"new") is False  # nothing changed
    assert responder.handle(auth.sign(query, b"old"), "127.0.0.1", now) == []
    signed = responder.handle(auth.sign(encode_query(QueryType.FACTORY, "s.example.org", "d", now=now),
                                        b"new"), "127.0.0.1", now)
    assert len(signed) == 1 and auth.verify(signed[0], b"new", peer="r")
    responder.reconfigure("t.example.org", None)  # unsigned from now on, another space
    other = SNAPSHOT.__class__(space="t.example.org", factory="f.example.org")
    responder.snapshot_provider = lambda: other
    replies = responder.handle(encode_query(QueryType.FACTORY, "t.example.org", "e"),
                               "127.0.0.1", now)
    assert decode(replies[0], peer="r").space == "t.example.org"
    assert responder.stats.dropped["bad_signature"] == 1


# -- task: VMs created during a long round are visible before it ends -----------------------------


def test_a_long_rounds_vms_are_answered_for_while_the_round_still_runs(site, monkeypatch):
    """8 VMs in one round, each taking 100 ms to start, one at a time (as on a host where the
    engine starts one creation at once): once the first has started, the responder reports
    every VM of the round (each is prepared before any starts), while the round still runs."""
    monkeypatch.setattr(creation, "MAX_PARALLEL_CREATIONS", 1)
    port = free_udp_port()
    site.write(space="s.example.org", port=port, key_file=site.key_file("space", "k"), total=8)
    daemon = site.start()
    seen: List[int] = []
    create = daemon.hypervisor.create

    def slow_create(spec):
        answer = ask(site, port, "s.example.org", "k")
        status = answer.answered[site.name].replies[0].status
        assert isinstance(status, FactoryStatus)
        seen.append(status.running_machines)
        time.sleep(0.1)
        # a slow creation is one that outlasts ~20 snapshot builds; on a loaded machine a build
        # can take over 5 ms, so this one lasts until the pacer calls it slow
        assert poll(daemon.snapshot_pacer.due, 5), "the snapshot pacer never called a creation slow"
        return create(spec)

    daemon.hypervisor.create = slow_create  # the engine calls it through the same object
    before = daemon.snapshot_pacer.builds
    report = daemon.factory.run_round()
    assert len(report.created) == 8
    # all 8 are prepared (live) before the first starts; each start republishes the snapshot
    assert seen == [0] + [8] * 7, seen
    assert daemon.snapshot_pacer.builds - before == 8  # one per creation, none wasted
    daemon._after_round()
    final = ask(site, port, "s.example.org", "k").answered[site.name].replies[0].status
    assert final.running_machines == 8


class StepClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_spends_at_most_a_twentieth_of_the_time_on_snapshots():
    clock = StepClock()
    pacer = SnapshotPacer(clock=clock)

    def build_taking(seconds: float):
        def make():
            clock.now += seconds
            return SNAPSHOT
        return make

    pacer.build(build_taking(0.001))  # 1 ms: the next one is due 20 ms later
    clock.now += 0.019
    assert not pacer.due()
    clock.now += 0.002
    assert pacer.due()
    pacer.build(build_taking(0.1))  # a slow build: still due within REFRESH_SECONDS (0.5 s)
    clock.now += 0.49
    assert not pacer.due()
    clock.now += 0.02
    assert pacer.due()
    assert pacer.builds == 2
