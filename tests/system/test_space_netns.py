"""The space over real UDP between hosts in network namespaces: responder and client processes.

Five hosts on one bridge (10.199.50.0/24, inside the namespaces only): h1-h3 run a responder
process each (the real :class:`Responder` with a synthetic snapshot, allowing h1-h4), h4 is a
factory that queries them, h5 is a host that is not a factory. Each process is this module
run as a script (``serve`` / ``query``), so the tests exercise separate processes, separate
network stacks and real datagrams.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest

from tests.system.netns import NetnsLab, leftover_namespaces, netns_lab, netns_problem  # noqa: F401
from tests.waiting import scaled

pytestmark = pytest.mark.system

SPACE = "vfsp.example.org"
PORT = 19995
MODULE = "tests.system.test_space_netns"


def factory_name(index: int) -> str:
    return f"f{index}.vfsp.example.org"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    problem = netns_problem()
    if problem is not None:
        pytest.fail(f"network namespaces unavailable: {problem}")
    with NetnsLab(5) as lab:
        lab.wait_reachable()
        yield lab


class Responders:
    """Responder processes on h1-h3 of the lab, stopped (and their stats read) at the end."""

    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self.processes: Dict[int, subprocess.Popen] = {}

    def start(self, index: int, key: Optional[str] = None) -> None:
        host = self.lab.hosts[index - 1]
        allowed = ",".join(h.ip for h in self.lab.hosts[:4])  # h1-h4 are factories
        argv = ["-m", MODULE, "serve", "--bind", host.ip, "--name", factory_name(index),
                "--allowed", allowed]
        if key:
            argv += ["--key", key]
        process = host.spawn_python(argv)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == "ready", f"responder on h{index}: {line!r} {process.stderr.read()}"
        self.processes[index] = process

    def kill(self, index: int) -> None:
        process = self.processes.pop(index)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, index: int) -> dict:
        """Stop one responder gracefully; returns its stats."""
        process = self.processes.pop(index)
        os.kill(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def stop_all(self) -> Dict[int, dict]:
        return {index: self.stop(index) for index in list(self.processes)}


@pytest.fixture
def responders(lab):
    group = Responders(lab)
    yield group
    for index in list(group.processes):
        group.kill(index)


def query_from(host, factories: List[int], *, timeout: Optional[float] = None, key: Optional[str] = None,
               query_type: str = "machinetypes_query") -> dict:
    """Run the client on ``host`` against factories h<N>; returns its JSON summary.
    ``timeout`` is the query's deadline (default 2 s, stretched on a busy machine)."""
    timeout = scaled(2.0) if timeout is None else timeout
    resolve = ",".join(f"{factory_name(i)}={host.lab.hosts[i - 1].ip}" for i in factories)
    argv = [sys.executable, "-m", MODULE, "query", "--factories",
            ",".join(factory_name(i) for i in factories), "--resolve", resolve,
            "--timeout", str(timeout), "--type", query_type]
    if key:
        argv += ["--key", key]
    result = host.run(argv, timeout=timeout + 60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- tests -----------------------------------------------------------------------------------


def test_replies_arrive_from_three_factories(lab, responders):
    for index in (1, 2, 3):
        responders.start(index)
    summary = query_from(lab.hosts[3], [1, 2, 3])
    assert summary["unknown"] == []
    assert summary["answered"] == {factory_name(i): 2 for i in (1, 2, 3)}
    # each factory's own figures came back (the snapshot encodes the factory index)
    assert summary["hs06"] == {factory_name(i): 10.0 * i for i in (1, 2, 3)}
    assert summary["elapsed"] < scaled(1.0)
    summary = query_from(lab.hosts[3], [1, 2, 3], query_type="factory_query")
    assert summary["answered"] == {factory_name(i): 1 for i in (1, 2, 3)}
    stats = responders.stop_all()
    assert all(s["answered"] == 2 and s["dropped_total"] == 0 for s in stats.values())


def test_a_killed_factory_costs_the_others_at_most_the_deadline(lab, responders):
    for index in (1, 2, 3):
        responders.start(index)
    responders.kill(2)
    deadline = scaled(1.5)  # the live factories must answer within it, on a busy machine too
    began = time.monotonic()
    summary = query_from(lab.hosts[3], [1, 2, 3], timeout=deadline)
    wall = time.monotonic() - began
    assert summary["unknown"] == [factory_name(2)]
    assert sorted(summary["answered"]) == [factory_name(1), factory_name(3)]
    assert deadline <= summary["elapsed"] < deadline + scaled(0.5)  # waited for h2 until the deadline, no more
    assert wall < deadline + scaled(15)  # the whole client process, interpreter start-up included
    # a factory that is back is answered again at once
    responders.start(2)
    assert query_from(lab.hosts[3], [1, 2, 3], timeout=scaled(1.5))["unknown"] == []


def test_factories_with_another_space_key_are_ignored_both_ways(lab, responders):
    responders.start(1, key="right")
    responders.start(2)  # no key: answers anyone, but its replies are unsigned
    responders.start(3, key="wrong")
    summary = query_from(lab.hosts[3], [1, 2, 3], timeout=scaled(1.0), key="right")
    assert sorted(summary["answered"]) == [factory_name(1)]
    assert sorted(summary["unknown"]) == [factory_name(2), factory_name(3)]
    assert summary["rejected"] > 0  # h2's unsigned replies arrived and were refused
    stats = responders.stop_all()
    assert stats[1]["answered"] >= 1 and stats[1]["dropped_total"] == 0
    assert stats[2]["answered"] >= 1  # it did answer ...
    assert stats[3]["answered"] == 0 and stats[3]["dropped"]["bad_signature"] >= 1


def test_a_host_that_is_not_a_factory_gets_no_reply(lab, responders):
    for index in (1, 2, 3):
        responders.start(index)
    outsider = lab.hosts[4]
    summary = query_from(outsider, [1, 2, 3], timeout=0.8)
    assert summary["answered"] == {}
    assert sorted(summary["unknown"]) == [factory_name(i) for i in (1, 2, 3)]
    stats = responders.stop_all()
    for s in stats.values():
        assert s["answered"] == 0 and s["datagrams_sent"] == 0
        assert s["dropped"]["unknown_peer"] >= 1


def test_the_lab_removes_its_namespaces_and_kills_its_processes(netns_lab):
    small = netns_lab(2)
    sleeper = small.hosts[1].popen(["sleep", "600"])
    assert len(leftover_namespaces(small.tag)) == 3  # switch + 2 hosts
    small.teardown()
    assert leftover_namespaces(small.tag) == []
    assert sleeper.poll() is not None


# -- the processes ---------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    """A responder process with a synthetic snapshot; prints "ready", then on SIGTERM its
    stats as one JSON line."""
    from vacfactory.space.responder import Responder
    from vacfactory.space.snapshot import FactorySnapshot, FactoryStatus, MachinetypeStatus

    index = int(args.name[1:].split(".", 1)[0])
    snapshot = FactorySnapshot(
        space=SPACE, factory=args.name,
        machinetypes=(MachinetypeStatus("atlas", running_hs06=10.0 * index, running_machines=1,
                                        running_processors=1),
                      MachinetypeStatus("lhcb")),
        factory_status=FactoryStatus(max_processors=8),
    )
    allowed = set(args.allowed.split(","))
    responder = Responder((args.bind, args.port), lambda: snapshot, SPACE, lambda: allowed,
                          space_key=args.key.encode() if args.key else None)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    responder.start()
    print("ready", flush=True)
    while not stopping:
        time.sleep(0.05)
    responder.stop()
    stats = responder.stats
    print(json.dumps({"answered": stats.answered, "datagrams_sent": stats.datagrams_sent,
                      "dropped": dict(stats.dropped), "dropped_total": stats.dropped_total}),
          flush=True)
    return 0


def _query(args: argparse.Namespace) -> int:
    """A client process: one query round; prints a JSON summary."""
    from vacfactory.space.client import query_space
    from vacfactory.space.protocol import QueryType

    table = dict(item.split("=", 1) for item in args.resolve.split(","))
    result = query_space(args.factories.split(","), QueryType(args.type), SPACE, args.timeout,
                         port=args.port, space_key=args.key.encode() if args.key else None,
                         local_name="client.vfsp.example.org",
                         resolver=lambda name: [table[name]] if name in table else [])
    hs06 = {}
    for name, answer in result.answered.items():
        hs06[name] = sum(getattr(r.status, "running_hs06", 0.0) for r in answer.replies)
    print(json.dumps({
        "answered": {name: len(a.replies) for name, a in result.answered.items()},
        "unknown": list(result.unknown),
        "elapsed": result.elapsed,
        "rejected": result.rejected,
        "hs06": hs06,
    }))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE)
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve")
    serve.add_argument("--bind", required=True)
    serve.add_argument("--name", required=True)
    serve.add_argument("--allowed", required=True)
    serve.add_argument("--port", type=int, default=PORT)
    serve.add_argument("--key")
    query = verbs.add_parser("query")
    query.add_argument("--factories", required=True)
    query.add_argument("--resolve", required=True)
    query.add_argument("--timeout", type=float, default=2.0)
    query.add_argument("--type", default="machinetypes_query")
    query.add_argument("--port", type=int, default=PORT)
    query.add_argument("--key")
    args = parser.parse_args(argv)
    return _serve(args) if args.verb == "serve" else _query(args)


if __name__ == "__main__":
    sys.exit(main())
