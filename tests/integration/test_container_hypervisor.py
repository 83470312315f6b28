"""ContainerHypervisor against real containers: a private Podman API service (tests/podman_lab.py).

Each test has its own owner label, so it sees only its own containers although the service is
shared by the session. Every wait follows an event or polls with a deadline (tests/waiting.py).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid as uuidlib
from typing import List, Optional

import docker
import pytest

from tests.podman_lab import BUSYBOX
from tests.waiting import poll, scaled, wait_for
from vacfactory.errors import HypervisorError
from vacfactory.hypervisor.base import BindSpec, ContainerSpec, DomainEvent, DomainState
from vacfactory.hypervisor.containers import STOPPING_SUFFIX, LABEL_FACTORY, LABEL_GRACE, LABEL_UUID, ContainerHypervisor


@pytest.fixture
def owner() -> str:
    return "t" + uuidlib.uuid4().hex[:10]


@pytest.fixture
def hv(podman, owner):
    hypervisor = ContainerHypervisor(podman.url, owner, nofile=10000, nproc=1000)
    yield hypervisor
    hypervisor.close()
    for name in podman.containers():
        if name.startswith(owner):
            podman.podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def api(podman):
    client = docker.APIClient(base_url=podman.url, version="1.41")
    yield client
    client.close()


def spec(owner: str, number: int, command: str, binds=(), grace: int = 10, processors: int = 1,
         memory_mib: int = 64, image: str = BUSYBOX) -> ContainerSpec:
    return ContainerSpec(name=f"{owner}-{number:02d}", uuid=str(uuidlib.uuid4()), image=image,
                         command=("sh", "-c", command), processors=processors, memory_mib=memory_mib,
                         binds=tuple(binds), stop_grace_seconds=grace)


def listed(hv: ContainerHypervisor) -> dict:
    return {d.uuid: d for d in hv.list_domains()}


def gone(podman, name: str) -> bool:
    """No container of that slot name, also none renamed while it is being stopped."""
    return not [n for n in podman.containers() if n == name or n.startswith(name + STOPPING_SUFFIX)]


class Events:
    def __init__(self) -> None:
        self.items: List[DomainEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.items.append(event)

    def of(self, uuid: str, kind: str) -> List[DomainEvent]:
        with self.lock:
            return [e for e in self.items if e.uuid == uuid and e.kind == kind]


_PROBES = itertools.count(50)


def following(hv: ContainerHypervisor, events: Optional[Events] = None) -> Events:
    """Events from ``hv``, once they flow: Podman answers the events request before it reads
    its events file, so events of the first moments can be lost; a probe container shows
    the stream is live."""
    if events is None:
        events = Events()
        hv.set_event_callback(events)
    wait_for(lambda: hv._events.connected.is_set(), "the event stream", timeout=10)
    for attempt in range(5):
        probe = spec(hv.owner, next(_PROBES), "true", grace=0)
        hv.create(probe)
        if poll(lambda: events.of(probe.uuid, "started"), timeout=2):
            return events
    raise AssertionError("no started event for 5 probe containers")


def test_binds_isolation_and_limits_seen_from_inside(hv, owner, podman, tmp_path):
    """The container reads a read-only bind, writes a read-write one, cannot write the
    read-only one, and sees no host path but its binds; its limits hold inside."""
    mjf, out = tmp_path / "machinefeatures", tmp_path / "joboutputs"
    mjf.mkdir()
    out.mkdir()
    (mjf / "hs06").write_text("42\n")
    script = " ; ".join([
        "cat /etc/machinefeatures/hs06 > /out/hs06",
        "(echo x > /etc/machinefeatures/hs06) 2> /out/ro-error && echo written > /out/ro-written",
        "cat /etc/hostname > /out/hostname",
        "ls / > /out/root",
        # mountinfo: ... mount point (5th) ... optional fields, "-", the filesystem type
        "awk '{i = 7; while ($i != \"-\") i++; if ($(i + 1) !~ /^(proc|tmpfs|sysfs|devpts|mqueue|cgroup2?|overlay)$/)"
        " print $5}' /proc/self/mountinfo > /out/host-mounts",
        "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status > /out/status",
        "ulimit -n > /out/nofile; ulimit -u > /out/nproc",
        "touch /out/done",
    ])
    s = spec(owner, 1, script, binds=[BindSpec(str(mjf), "/etc/machinefeatures"),
                                      BindSpec(str(out), "/out", readonly=False)])
    hv.create(s)
    wait_for(lambda: (out / "done").exists(), "the container's script", timeout=20)
    assert (out / "hs06").read_text() == "42\n"
    assert (mjf / "hs06").read_text() == "42\n" and not (out / "ro-written").exists()
    assert "Read-only file system" in (out / "ro-error").read_text()
    with open("/etc/hostname") as f:
        host_name = f.read()
    assert (out / "hostname").read_text().strip() == s.name != host_name.strip()
    root = set((out / "root").read_text().split())
    assert {"bin", "etc", "out"} <= root and not root & {"usr", "home", "work", "var", "lib"}
    # host filesystem mounts: the binds and the runtime's per-container files, nothing else
    assert set((out / "host-mounts").read_text().split()) == {
        "/etc/machinefeatures", "/out", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/run/.containerenv"}
    assert (out / "status").read_text().split() == ["NoNewPrivs:", "1", "Seccomp:", "2"]
    assert (out / "nofile").read_text() == "10000\n" and (out / "nproc").read_text() == "1000\n"
    # it exited: not listed, removed; its binds stay
    wait_for(lambda: s.uuid not in listed(hv) and gone(podman, s.name), "the exited container removed")
    assert hv.domain_info(s.uuid) is None and not hv.destroy(s.uuid)
    assert (mjf / "hs06").exists() and (out / "done").exists()


def test_settings_from_inspect(hv, owner, api):
    s = spec(owner, 2, "sleep 1000", processors=3, memory_mib=96, grace=7)
    hv.create(s)
    info = api.inspect_container(s.name)
    config, host = info["Config"], info["HostConfig"]
    assert config["Labels"][LABEL_FACTORY] == owner and config["Labels"][LABEL_UUID] == s.uuid
    assert config["Labels"][LABEL_GRACE] == "7"
    assert info["Name"].lstrip("/") == s.name and config["Hostname"] == s.name
    assert config["Cmd"] == ["sh", "-c", "sleep 1000"]
    assert host["CpuShares"] == 3 * 1024 and host["Memory"] == 96 * 1024 * 1024
    assert sorted((u["Name"], u["Soft"], u["Hard"]) for u in host["Ulimits"]) == [
        ("RLIMIT_NOFILE", 10000, 10000), ("RLIMIT_NPROC", 1000, 1000)]
    assert "no-new-privileges" in host["SecurityOpt"] and host["Privileged"] is False
    assert not host["CapAdd"] and not host["Devices"] and host["AutoRemove"] is False
    assert not host["Binds"]
    domain = listed(hv)[s.uuid]
    assert (domain.name, domain.state, domain.vcpus, domain.memory_kib) == (s.name, DomainState.RUNNING, 3, 96 * 1024)
    assert hv.domain_info(s.uuid).name == s.name
    assert hv.describe().startswith("Podman 4.") and "Docker Engine API" in hv.describe() and hv.ping()


@pytest.mark.parametrize("multi_stats", [True, False], ids=["podman-stats", "per-container-stats"])
def test_events_cpu_and_pause(hv, owner, api, podman, multi_stats):
    hv.multi_stats = multi_stats
    events = following(hv)
    s = spec(owner, 3, "while :; do :; done", grace=1)  # pid 1 without a TERM handler: killed
    hv.create(s)
    wait_for(lambda: events.of(s.uuid, "started"), "the started event")
    busy = wait_for(lambda: [d for d in hv.list_domains() if d.uuid == s.uuid and d.cpu_seconds > 0.2],
                    "CPU time of a busy container")[0]
    api.pause(s.name)
    wait_for(lambda: events.of(s.uuid, "suspended"), "the suspended event")
    assert listed(hv)[s.uuid].state == DomainState.PAUSED
    api.unpause(s.name)
    wait_for(lambda: events.of(s.uuid, "resumed"), "the resumed event")
    last = hv.domain_info(s.uuid).cpu_seconds
    assert last >= busy.cpu_seconds
    assert hv.destroy(s.uuid)
    stopped = wait_for(lambda: events.of(s.uuid, "stopped"), "the stopped event")[0]
    assert stopped.name == s.name and stopped.cpu_seconds == last
    wait_for(lambda: gone(podman, s.name), "the destroyed container removed")


def test_destroy_is_prompt_graceful_then_forced(hv, owner, podman, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    binds = [BindSpec(str(out), "/out", readonly=False)]
    polite = spec(owner, 4, "trap 'echo bye > /out/polite; exit 0' TERM; touch /out/up4; "
                            "while :; do sleep 0.1; done", binds=binds, grace=60)
    stubborn = spec(owner, 5, "trap '' TERM; touch /out/up5; while :; do sleep 0.1; done", binds=binds, grace=2)
    hv.create(polite)
    hv.create(stubborn)
    wait_for(lambda: (out / "up4").exists() and (out / "up5").exists(), "both containers running")
    for s in (polite, stubborn):
        began = time.monotonic()
        assert hv.destroy(s.uuid)
        assert time.monotonic() - began < scaled(1.0)  # the grace period is not waited for here
    assert not {polite.uuid, stubborn.uuid} & set(listed(hv))  # being stopped: not listed
    assert hv.destroy(polite.uuid) or gone(podman, polite.name)  # idempotent
    wait_for(lambda: gone(podman, polite.name), "the polite container stopped and removed", timeout=20)
    assert (out / "polite").read_text() == "bye\n"  # well before its 60 s grace ended
    began = time.monotonic()
    wait_for(lambda: gone(podman, stubborn.name), "the stubborn container killed and removed", timeout=20)
    assert not hv.destroy(stubborn.uuid) and not hv.destroy(polite.uuid)
    assert time.monotonic() - began < scaled(10)


def test_zombie_listed_foreign_never_touched(hv, owner, podman, api):
    """A container of ours made by another process (a daemon before a restart) is listed, so
    the engine can destroy it; containers without our owner label never are."""
    previous = ContainerHypervisor(podman.url, owner)  # the default rlimits: runc accepts them
    zombie = spec(owner, 6, "sleep 1000", grace=0)
    previous.create(zombie)
    previous.close()
    ulimits = api.inspect_container(zombie.name)["HostConfig"]["Ulimits"]
    assert {u["Name"]: u["Hard"] for u in ulimits} == {"RLIMIT_NOFILE": previous.nofile, "RLIMIT_NPROC": previous.nproc}
    assert listed(hv)[zombie.uuid].name == zombie.name
    foreign_uuid = str(uuidlib.uuid4())
    common = ["--ulimit", "nofile=1000:1000", "--ulimit", "nproc=100:100"]
    podman.podman("run", "-d", "--name", f"{owner}-other", "--label", f"{LABEL_FACTORY}=x{owner}",
                  "--label", f"{LABEL_UUID}={foreign_uuid}", *common, BUSYBOX, "sleep", "1000")
    podman.podman("run", "-d", "--name", f"{owner}-plain", *common, BUSYBOX, "sleep", "1000")
    podman.podman("run", "--name", f"{owner}-exited", "--label", f"{LABEL_FACTORY}=x{owner}", *common, BUSYBOX, "true")
    assert set(listed(hv)) == {zombie.uuid}
    assert not hv.destroy(foreign_uuid) and hv.domain_info(foreign_uuid) is None
    assert hv.destroy(zombie.uuid)
    wait_for(lambda: gone(podman, zombie.name), "the zombie removed")
    hv.list_domains()
    assert {f"{owner}-other", f"{owner}-plain", f"{owner}-exited"} <= set(podman.containers())
    running = podman.podman("ps", "--format", "{{.Names}}").stdout.split()
    assert {f"{owner}-other", f"{owner}-plain"} <= set(running)


def test_image_status_never_blocks(hv, owner):
    assert hv.image_status(BUSYBOX) is None
    missing = f"localhost/{owner}-missing:1"
    began = time.monotonic()
    assert hv.image_status(missing) in ("being pulled",) or hv.image_status(missing).startswith("pull failed")
    assert time.monotonic() - began < scaled(1.0)
    reason = wait_for(lambda: (hv.image_status(missing) or "").startswith("pull failed") and hv.image_status(missing),
                      "the failed pull reported")
    assert "next try in" in reason
    with pytest.raises(HypervisorError, match="not present"):
        hv.create(spec(owner, 7, "true", image=missing))


def test_parallel_creates_and_round_cost(hv, owner, podman):
    specs = [spec(owner, 10 + i, "while :; do :; done", grace=0) for i in range(8)]
    times: List[float] = []
    errors: List[BaseException] = []

    def create(s: ContainerSpec) -> None:
        began = time.monotonic()
        try:
            hv.create(s)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        times.append(time.monotonic() - began)

    threads = [threading.Thread(target=create, args=(s,)) for s in specs]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    assert not errors
    assert {s.uuid for s in specs} == set(listed(hv))
    rounds = {}
    for multi in (True, False):
        hv.multi_stats = multi
        samples = []
        for _ in range(5):
            began = time.monotonic()
            domains = hv.list_domains()
            samples.append(time.monotonic() - began)
        assert len(domains) == 8
        rounds[multi] = sorted(samples)[2]
    print(f"\n8 parallel creates: {elapsed:.2f} s (each {min(times):.2f}-{max(times):.2f} s); list_domains with 8: "
          f"{rounds[True] * 1000:.0f} ms (podman stats), {rounds[False] * 1000:.0f} ms (per-container stats)")
    for s in specs:
        assert hv.destroy(s.uuid)
    wait_for(lambda: not set(s.name for s in specs) & set(podman.containers()), "every container removed")


def test_events_follow_a_restarted_runtime(hv, owner, podman):
    events = following(hv)
    first = spec(owner, 20, "sleep 1000", grace=0)
    hv.create(first)
    wait_for(lambda: events.of(first.uuid, "started"), "the started event")
    podman.kill_service()
    with pytest.raises(HypervisorError, match=podman.socket_path):
        hv.list_domains()
    assert not hv.ping()
    wait_for(lambda: not hv._events.connected.is_set(), "the event stream's end noticed")
    podman.start()
    assert first.uuid in listed(hv)  # the container outlived the API service
    following(hv, events)  # the event stream reopened
    second = spec(owner, 21, "sleep 1000", grace=0)
    hv.create(second)
    wait_for(lambda: events.of(second.uuid, "started"), "a started event after the restart")
    for s in (first, second):
        assert hv.destroy(s.uuid)
    wait_for(lambda: events.of(second.uuid, "stopped"), "a stopped event after the restart")
    hv.close()  # stops the event thread; the next call starts it again
    assert not hv._events.running()
    third = spec(owner, 22, "sleep 1000", grace=0)
    hv.create(third)
    assert hv._events.running()
    hv.destroy(third.uuid)
    wait_for(lambda: events.of(third.uuid, "stopped"), "events again after close()")


def test_destroy_a_paused_container(hv, owner, api, podman):
    s = spec(owner, 23, "sleep 1000", grace=30)
    hv.create(s)
    api.pause(s.name)
    assert listed(hv)[s.uuid].state == DomainState.PAUSED
    assert hv.destroy(s.uuid)
    wait_for(lambda: gone(podman, s.name), "the paused container killed and removed", timeout=10)


def test_unreachable_runtime_is_a_hypervisor_error(tmp_path, owner):
    socket_path = str(tmp_path / "none.sock")
    hv = ContainerHypervisor(socket_path, owner)
    for call in (hv.list_domains, hv.describe, lambda: hv.image_status(BUSYBOX),
                 lambda: hv.destroy(str(uuidlib.uuid4())), lambda: hv.domain_info(str(uuidlib.uuid4())),
                 lambda: hv.create(spec(owner, 30, "true"))):
        with pytest.raises(HypervisorError) as raised:
            call()
        assert socket_path in str(raised.value)
    assert not hv.ping()
    events = Events()
    hv.set_event_callback(events)  # follows nothing yet, and does not raise
    hv.close()


def test_exited_container_left_by_a_crash_frees_its_name(hv, owner, podman, api):
    """A container of ours that never started (a crash between create and start) or exited
    unnoticed is removed when a new one needs its slot name."""
    s = spec(owner, 40, "sleep 1000", grace=0)
    api.create_container(BUSYBOX, ["true"], name=s.name, labels={LABEL_FACTORY: owner, LABEL_UUID: str(uuidlib.uuid4())},
                         host_config=api.create_host_config(ulimits=[
                             docker.types.Ulimit(name="nofile", soft=100, hard=100),
                             docker.types.Ulimit(name="nproc", soft=100, hard=100)]))
    hv.create(s)
    assert listed(hv)[s.uuid].name == s.name
    assert hv.destroy(s.uuid)
    wait_for(lambda: gone(podman, s.name), "the container removed")
