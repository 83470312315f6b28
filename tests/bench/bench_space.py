"""Space benchmarks (``python tests/bench/bench_space.py``; ``make bench`` runs it).

Prints four lines and exits non-zero if a goal is missed:

- ``space query``: one ``machinetypes_query`` round to 200 factories on loopback (the real
  :class:`Responder` class, 50 threads in each of 4 processes on 127.0.0.2-201) with 2% of
  datagrams dropped in each direction (netem is not available here, so the responders drop
  them in-process), timed with the real client; goal p95 < 1 s. Vac's client waits in rounds
  of 2 s timeouts with no overall bound, so one lost datagram costs it at least 2 s.
- ``responder``: ``factory_query`` answers per second of one responder process pinned to one
  core, fed by a client pinned to the other; goal >= 5000.
- ``responder latency``: 300 ``factory_query`` answers timed from another process while two
  threads play a busy engine (pure-Python work holding the GIL, a new snapshot every
  millisecond); goal p99 < 50 ms.
- ``share accuracy``: the simulator, 100 factories x 32 processors, shares 5:3:2, random
  lifetimes; achieved vs target processor share after the warm-up; goals <= 2 points, and
  <= 5 points with 10% of the factories unreachable.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import socket
import statistics
import sys
import time
from typing import List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.unit.test_space_responder import latencies_while_the_engine_keeps_the_interpreter_busy  # noqa: E402
from vacfactory.space.client import query_space
from vacfactory.space.protocol import QueryType, encode_query
from vacfactory.space.responder import Responder
from vacfactory.space.simulator import SimConfig, simulate
from vacfactory.space.snapshot import FactorySnapshot, FactoryStatus, MachinetypeStatus

SPACE = "bench.example.org"
PEERS = 200
LOSS = 0.02
ROUNDS = 60


def snapshot(name: str) -> FactorySnapshot:
    return FactorySnapshot(
        space=SPACE, factory=name,
        machinetypes=tuple(MachinetypeStatus(f"mt{i}", running_hs06=10.0 * i, running_machines=i,
                                             running_processors=i) for i in range(3)),
        factory_status=FactoryStatus(max_processors=32, running_processors=30),
    )


class LossyResponder(Responder):
    """The real responder, losing a fraction of datagrams both ways (like netem would)."""

    loss = LOSS

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rng = random.Random(seed)

    def handle(self, datagram, peer, now):
        if self._rng.random() < self.loss:
            return []  # the query was lost on its way here
        return super().handle(datagram, peer, now)

    def _sendto(self, sock, datagram, address):
        if self._rng.random() < self.loss:
            return  # the reply was lost on its way back
        super()._sendto(sock, datagram, address)


def _serve_peers(addresses: List[str], port: int, ready, stop) -> None:
    responders = []
    for address in addresses:
        snap = snapshot(f"peer-{address}")
        responder = LossyResponder((address, port), lambda s=snap: s, SPACE,
                                   lambda: {"127.0.0.1"}, seed=hash(address) & 0xFFFF)
        responder.start()
        responders.append(responder)
    ready.set()
    stop.wait()
    for responder in responders:
        responder.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.2", 0))
        return probe.getsockname()[1]


def bench_space_query() -> Tuple[float, float, int]:
    """(p50, p95, rounds with an unknown factory) over ROUNDS query rounds."""
    port = free_port()
    addresses = [f"127.0.{(i + 2) // 256}.{(i + 2) % 256}" for i in range(PEERS)]
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    workers = []
    for chunk in range(4):
        ready = context.Event()
        worker = context.Process(target=_serve_peers,
                                 args=(addresses[chunk::4], port, ready, stop), daemon=True)
        worker.start()
        workers.append((worker, ready))
    for worker, ready in workers:
        if not ready.wait(60):
            raise RuntimeError("responder processes did not start")
    table = {f"peer-{a}": a for a in addresses}
    times = []
    incomplete = 0
    try:
        query_space(list(table), QueryType.MACHINETYPES, SPACE, 10.0, port=port,
                    local_name="client.example.org", resolver=lambda n: [table[n]])  # warm-up
        for _ in range(ROUNDS):
            result = query_space(list(table), QueryType.MACHINETYPES, SPACE, 10.0, port=port,
                                 local_name="client.example.org", resolver=lambda n: [table[n]])
            times.append(result.elapsed)
            incomplete += bool(result.unknown or result.incomplete)
    finally:
        stop.set()
        for worker, _ in workers:
            worker.join(10)
    times.sort()
    return statistics.median(times), times[int(0.95 * len(times)) - 1], incomplete


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
    except (AttributeError, OSError):
        pass


def _throughput_responder(port_out, stop, answered_out) -> None:
    _pin(0)
    snap = snapshot("throughput.example.org")
    responder = Responder(("127.0.0.1", 0), lambda: snap, SPACE, lambda: {"127.0.0.1"})
    responder.start()
    port_out.put(responder.address[1])
    stop.wait()
    answered_out.put(responder.stats.answered)
    responder.stop()


def bench_responder(seconds: float = 4.0) -> float:
    """factory_query answers per second of one responder process on one core."""
    context = multiprocessing.get_context("fork")
    port_q, answered_q, stop = context.Queue(), context.Queue(), context.Event()
    server = context.Process(target=_throughput_responder, args=(port_q, stop, answered_q),
                             daemon=True)
    server.start()
    port = port_q.get(timeout=30)
    _pin(1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.settimeout(0.2)
    query = encode_query(QueryType.FACTORY, SPACE, "c" * 64)
    target = ("127.0.0.1", port)
    window = 32  # queries in flight: keeps the responder busy without overrunning buffers
    received = 0
    outstanding = 0
    began = time.perf_counter()
    measured_from: Optional[float] = None
    counted = 0
    while True:
        now = time.perf_counter()
        if now - began > seconds + 1.0:
            break
        if measured_from is None and now - began > 1.0:  # one second of warm-up
            measured_from, counted = now, received
        while outstanding < window:
            sock.sendto(query, target)
            outstanding += 1
        try:
            sock.recvfrom(65535)
            received += 1
            outstanding -= 1
        except socket.timeout:
            outstanding = 0  # lost in a full buffer: refill the window
    elapsed = time.perf_counter() - (measured_from or began)
    stop.set()
    server.join(10)
    sock.close()
    return (received - counted) / elapsed


def _simulate(unreachable: float) -> float:
    return simulate(SimConfig(factories=100, processors=32, hours=3.0, warmup_hours=1.0,
                              unreachable=unreachable, seed=11)).max_deviation_points


def bench_share_accuracy() -> Tuple[float, float]:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        full, partial = pool.map(_simulate, [0.0, 0.1])
    return full, partial


def main() -> int:
    failures = 0
    p50, p95, incomplete = bench_space_query()
    print(f"space query, {PEERS} peers, {LOSS:.0%} loss: p50 {p50:.3f} s, p95 {p95:.3f} s "
          f"({incomplete}/{ROUNDS} rounds incomplete) (goal p95 < 1 s)", flush=True)
    failures += p95 >= 1.0
    rate = bench_responder()
    print(f"responder: {rate:,.0f} factory_query answers/s on one core (goal >= 5000)",
          flush=True)
    failures += rate < 5000
    latencies = latencies_while_the_engine_keeps_the_interpreter_busy(300)
    p99 = latencies[int(0.99 * len(latencies)) - 1]
    print(f"responder latency while the engine is busy: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms over {len(latencies)} queries (goal p99 < 50 ms)", flush=True)
    failures += p99 >= 0.050
    full, partial = bench_share_accuracy()
    print(f"share accuracy: max deviation {full:.2f} points (goal <= 2); "
          f"with 10% unreachable: {partial:.2f} points (goal <= 5)", flush=True)
    failures += full > 2.0 or partial > 5.0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
