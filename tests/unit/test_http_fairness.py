"""No VM can deny HTTP to another (issue 13, item 2): connections counted per registered VM,
unregistered addresses closed at accept, requests served round-robin over VMs.

The victim VM lives at 127.0.0.2; eight attacking VMs at 127.0.0.3-10 play the patterns of
tests/unit/http_attack.py from a forked process; 127.0.0.20 is registered to nobody.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import shutil
import socket
import statistics
import tempfile
import time
from typing import Iterator, List, Tuple

import pytest

from tests.unit import http_attack
from tests.unit.test_httpserver import make_vm, statuses
from tests.waiting import poll, scaled
from vacfactory.vmio.http import MetadataServer
from vacfactory.vmio.registry import VMEndpoint, VMRegistry, new_token

VICTIM = "127.0.0.2"
NOBODY = "127.0.0.20"


class Site:
    def __init__(self, vms: int, **server_args) -> None:
        self.base = tempfile.mkdtemp(prefix="vfvmio-fair-")
        self.registry = VMRegistry()
        self.vms = [make_vm(self.base, f"vm-{i}", f"127.0.0.{2 + i}", "4") for i in range(vms)]
        for vm in self.vms:
            self.registry.add(vm.endpoint)
        self.server = MetadataServer(self.registry, [("127.0.0.1", 0)], **server_args)
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.bound_addresses[0][1]

    def connect(self, src: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                        source_address=(src, 0))

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site(2)
    yield s
    s.close()


def closed_without_answer(s: socket.socket) -> bool:
    s.settimeout(3)
    try:
        s.sendall(b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n")
        return s.recv(1000) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


# --------------------------------------------------------------------------------------------
# who may connect, and how many


def test_an_unregistered_address_is_closed_at_accept_even_with_a_valid_token(site: Site) -> None:
    token = site.vms[0].endpoint.token
    s = site.connect(NOBODY)
    s.settimeout(3)
    try:
        s.sendall(f"GET /vm/{token}/machinefeatures/total_cpu HTTP/1.1\r\n\r\n".encode())
        answer = s.recv(1000)
    except (ConnectionResetError, BrokenPipeError):
        answer = b""
    s.close()
    assert answer == b""
    assert site.server.shares.per_owner == {}
    vm = site.connect(VICTIM)
    vm.sendall(b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n")
    assert statuses(vm.recv(1000)) == [200]
    vm.close()


def test_a_vm_gets_its_share_and_no_more_while_another_gets_all_of_its_own() -> None:
    site = Site(2, max_connections_per_vm=5)
    socks: List[socket.socket] = []
    try:
        socks = [site.connect("127.0.0.3") for _ in range(5)]
        assert poll(lambda: site.server.shares.per_owner.get("vm:vm-1") == 5)
        extra = site.connect("127.0.0.3")
        extra.settimeout(3)
        assert statuses(extra.recv(1000)) == [503]
        extra.close()
        victims = [site.connect(VICTIM) for _ in range(5)]  # the whole share is there
        for v in victims:
            v.sendall(b"PUT /joboutputs/heartbeat HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert statuses(v.recv(1000)) == [201]
            v.close()
    finally:
        for s in socks:
            s.close()
        site.close()


def endpoint(i: int) -> VMEndpoint:
    return VMEndpoint(f"vm-x{i}", f"vm-x{i}.example", f"127.0.1.{i}", new_token(),
                      "/m", "/j", "/o", "/u", "demo")


def test_every_registered_vms_share_fits_in_the_overall_cap() -> None:
    registry = VMRegistry()
    server = MetadataServer(registry, [("127.0.0.1", 0)], max_connections=40,
                            max_connections_per_vm=16)
    assert server.vm_share() == 16
    for i in range(1, 5):
        registry.add(endpoint(i))
    assert server.vm_share() == 10  # 4 VMs x 10 fit in 40
    for i in range(5, 100):
        registry.add(endpoint(i))
    assert server.vm_share() == 1  # never 0: a VM can always send its heartbeat
    pooled = MetadataServer(registry, [("127.0.0.1", 0)], max_connections=40,
                            max_unidentified_connections=20)
    assert pooled.vm_share() == 1 and len(registry) == 99
    registry.remove("vm-x99")
    for i in range(5, 99):
        registry.remove(f"vm-x{i}")
    assert pooled.vm_share() == 5  # the token pool's 20 are not the VMs' to share


def test_a_vm_over_a_share_that_shrank_loses_its_idle_connections() -> None:
    site = Site(1, max_connections=40, max_connections_per_vm=16)
    socks: List[socket.socket] = []
    try:
        socks = [site.connect(VICTIM) for _ in range(16)]
        assert poll(lambda: site.server.shares.per_owner.get("vm:vm-0") == 16)
        for i in range(1, 4):
            site.registry.add(endpoint(i))
        assert poll(lambda: site.server.shares.per_owner.get("vm:vm-0") == 10)
    finally:
        for s in socks:
            s.close()
        site.close()


def test_the_token_pool_is_apart_from_the_vms_shares() -> None:
    site = Site(1, max_connections_per_vm=3, max_unidentified_connections=2,
                max_connections_per_address=2)
    socks: List[socket.socket] = []
    try:
        token = site.vms[0].endpoint.token
        socks = [site.connect(NOBODY) for _ in range(2)]
        assert poll(lambda: site.server.shares.unidentified == 2)
        third = site.connect("127.0.0.21")
        third.settimeout(3)
        assert statuses(third.recv(1000)) == [503]  # the pool is full...
        third.close()
        for _ in range(3):  # ...and the VM's own share untouched
            assert closed_without_answer(site.connect(VICTIM)) is False
        # a token-only client is served by token; one that fails is closed after its answer
        socks[0].sendall(f"GET /vm/{token}/machinefeatures/total_cpu HTTP/1.1\r\n\r\n".encode())
        assert statuses(socks[0].recv(1000)) == [200]
        socks[1].sendall(b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n")
        socks[1].settimeout(3)
        data = b""
        while True:
            chunk = socks[1].recv(1000)
            if not chunk:
                break
            data += chunk
        assert statuses(data) == [403]
    finally:
        for s in socks:
            s.close()
        site.close()


# --------------------------------------------------------------------------------------------
# the attack of issue 13: 8 VMs x 64 connections, keep-alive, pipelining and slow loris


def victim_requests(port: int, until: float) -> Tuple[List[Tuple[str, int]], List[float]]:
    """PUT a heartbeat on a fresh connection (as a VM's curl does) and GET a value on a
    keep-alive one, again and again until ``until``: (failures, latencies in seconds)."""
    failures: List[Tuple[str, int]] = []
    latencies: List[float] = []
    keep = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(VICTIM, 0))
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                put = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                                 source_address=(VICTIM, 0))
                put.request("PUT", "/joboutputs/heartbeat", body=b"")
                status = put.getresponse().status
                put.close()
            except OSError:
                status = -1
            latencies.append(time.perf_counter() - started)
            if status != 201:
                failures.append(("PUT", status))
            started = time.perf_counter()
            try:
                keep.request("GET", "/machinefeatures/total_cpu")
                response = keep.getresponse()
                status = response.status if response.read() == b"4" else -2
            except OSError:
                status = -1
                keep.close()
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(("GET", status))
            time.sleep(0.01)
    finally:
        keep.close()
    return failures, latencies


def attack_and_measure(site: Site, seconds: float) -> Tuple[List[Tuple[str, int]], List[float],
                                                             http_attack.Tally]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    attacker = ctx.Process(target=http_attack.run_in_child,
                           args=(site.port, http_attack.attackers(3, 8), seconds, child))
    attacker.start()
    try:
        assert parent.poll(scaled(30)) and parent.recv() == "ready"
        time.sleep(0.3)  # let the first pipelined batches and slow heads arrive
        failures, latencies = victim_requests(site.port, time.monotonic() + seconds - 0.6)
        assert parent.poll(scaled(30))
        tally = parent.recv()
    finally:
        attacker.join(timeout=10)
        if attacker.is_alive():
            attacker.kill()
    return failures, latencies, tally


def test_a_vms_heartbeat_is_never_refused_while_eight_vms_attack() -> None:
    site = Site(9)
    try:
        failures, latencies, tally = attack_and_measure(site, 2.0)
        # the attack was real: every pattern held all the connections it was allowed,
        # the pipelines were answered, the rest of the 64 per VM refused
        share = site.server.vm_share()
        assert all(tally.held[p] >= 2 * share for p in http_attack.PATTERNS), tally.held
        assert tally.answers["pipeline"].get("200", 0) > 1000, tally.answers
        assert tally.answers["keepalive"].get("503", 0) > 0, tally.answers
        assert failures == []
        assert len(latencies) >= 40
        p99 = statistics.quantiles(latencies, n=100)[98]
        print(f"victim p99 under attack: {p99 * 1000:.1f} ms over {len(latencies)} requests")
        assert p99 < 1.0  # issue 13 saw 2-2.7 s; the goal (50 ms) is a bench figure
    finally:
        site.close()


def test_a_pipelined_batch_of_one_vm_does_not_make_another_wait() -> None:
    site = Site(2)
    handled: List[Tuple[float, str]] = []
    route = site.server.router.route

    def recording_route(peer, request):
        handled.append((time.monotonic(), peer))
        return route(peer, request)

    site.server.router.route = recording_route  # type: ignore[method-assign]
    batch = b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n" * 2000
    hogs = [site.connect("127.0.0.3") for _ in range(4)]
    try:
        for hog in hogs:  # 8000 requests of VM 1, answers left unread
            hog.sendall(batch)
        assert poll(lambda: sum(1 for _, p in handled if p == "127.0.0.3") >= 100)
        victim = site.connect(VICTIM)
        sent = time.monotonic()
        victim.sendall(b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n")
        assert statuses(victim.recv(1000)) == [200]
        victim.close()
        served = next(t for t, p in handled if p == VICTIM)
        hog_meanwhile = sum(1 for t, p in handled if p == "127.0.0.3" and sent <= t <= served)
        hog_total = sum(1 for _, p in handled if p == "127.0.0.3")
        assert hog_total < 8000  # the batch was still being served...
        assert hog_meanwhile <= 8, hog_meanwhile  # ...and the victim waited one turn, not for it
    finally:
        for hog in hogs:
            hog.close()
        site.close()
