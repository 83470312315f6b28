"""The parts of the container hypervisor that need no runtime: socket and limit rules, event
mapping (malformed events are skipped), the event follower's reconnects, background pulls.
The real containers are in tests/integration/test_container_hypervisor.py."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import uuid as uuidlib

import pytest

from tests.unit.test_engine_fake import protocol_methods
from tests.waiting import wait_for
from vacfactory.errors import HypervisorError, InvalidValue
from vacfactory.hypervisor.containers import (
    LABEL_FACTORY,
    LABEL_UUID,
    ContainerHypervisor,
    socket_url,
)
from vacfactory.hypervisor.eventstream import EventFollower
from vacfactory.hypervisor.pulls import ImagePulls

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_it_implements_the_whole_protocol_and_only_it_imports_docker():
    assert {n for n in protocol_methods() if not callable(getattr(ContainerHypervisor, n, None))} == set()
    code = ("import sys, vacfactory.hypervisor as h, vacfactory.hypervisor.fake, vacfactory.hypervisor.routing; "
            "h.RoutingHypervisor; print('docker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
    importers = subprocess.run(["grep", "-rlE", r"^\s*(import|from) docker", "vacfactory"], cwd=REPO,
                               capture_output=True, text=True).stdout.split()
    assert importers == ["vacfactory/hypervisor/containers.py"]


def test_socket_forms():
    assert socket_url("/run/podman/podman.sock") == "unix:///run/podman/podman.sock"
    assert socket_url("unix:///var/run/docker.sock") == "unix:///var/run/docker.sock"
    for bad in ("relative.sock", "unix://relative", "tcp://host:2375"):
        with pytest.raises(InvalidValue):
            socket_url(bad)


def test_rlimits_never_above_the_hosts_hard_limits():
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hv = ContainerHypervisor("/nonexistent/docker.sock", "f.example.org")
    if hard_nofile != resource.RLIM_INFINITY:
        assert hv.nofile == min(20000, hard_nofile)
        with pytest.raises(InvalidValue, match="above the host's hard limit"):
            ContainerHypervisor("/x.sock", "f", nofile=hard_nofile + 1)
    assert ContainerHypervisor("/x.sock", "f", nofile=100, nproc=50).nproc == 50
    for bad in (0, -1, True, "100"):
        with pytest.raises(InvalidValue):
            ContainerHypervisor("/x.sock", "f", nproc=bad)
    with pytest.raises(InvalidValue):
        ContainerHypervisor("/x.sock", "two words")


def event(action, owner="f.example.org", uuid=None, name="f-01.example.org"):
    attributes = {LABEL_FACTORY: owner, "name": name}
    if uuid is not None:
        attributes[LABEL_UUID] = uuid
    return {"Type": "container", "Action": action, "Actor": {"ID": "abc", "Attributes": attributes}}


def test_events_are_mapped_and_malformed_ones_skipped():
    hv = ContainerHypervisor("/nonexistent/docker.sock", "f.example.org")
    seen = []
    hv._callback = seen.append
    u = str(uuidlib.uuid4())
    hv._last_cpu[u] = (12.5, 0.0)
    for junk in (None, "start", [], {}, {"Action": "start"}, {"Action": "start", "Actor": "x"},
                 {"Action": "start", "Actor": {"Attributes": None}}, event("start", uuid="not-a-uuid"),
                 event("start", uuid=None), event("start", owner="other.example.org", uuid=u),
                 event("create", uuid=u), event("exec_start: sh", uuid=u), event(7, uuid=u)):
        hv._on_event(junk)
    assert seen == []
    for action in ("start", "pause", "unpause", "die", "die"):
        hv._on_event(event(action, uuid=u.upper()))
    assert [(e.uuid, e.kind, e.cpu_seconds) for e in seen] == [
        (u, "started", None), (u, "suspended", None), (u, "resumed", None), (u, "stopped", 12.5), (u, "stopped", None)]
    assert seen[0].name == "f-01.example.org"


def test_an_unreachable_runtime_is_an_error_naming_the_socket():
    hv = ContainerHypervisor("/nonexistent/docker.sock", "f.example.org")
    with pytest.raises(HypervisorError, match="/nonexistent/docker.sock"):
        hv.list_domains()
    assert not hv.ping()
    with pytest.raises(HypervisorError, match="not a container"):
        hv.create(object())  # type: ignore[arg-type]
    hv.ensure_network(None)  # type: ignore[arg-type]
    hv.remove_disks("/nonexistent")
    hv.close()


class Stream:
    """An event stream: yields its items (an Exception item is raised), then ends."""

    def __init__(self, items):
        self.items = list(items)
        self.closed = False

    def __iter__(self):
        for item in self.items:
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self):
        self.closed = True


def test_the_follower_survives_outages_bad_events_and_broken_streams():
    opened = []
    handled = []
    block = threading.Event()
    plan = [OSError("connection refused"), Stream([1, "bad", 2, ValueError("not JSON")]),
            OSError("refused again"), Stream([3])]

    def open_stream():
        if not plan:
            block.wait(10)
            return Stream([])
        item = plan.pop(0)
        opened.append(item)
        if isinstance(item, Exception):
            raise item
        return item

    def handle(item):
        if item == "bad":
            raise KeyError("malformed")
        handled.append(item)

    follower = EventFollower("test", open_stream, handle, retry_seconds=0.01)
    follower.start()
    wait_for(lambda: handled == [1, 2, 3], "every good event handled", timeout=5)
    assert follower.running() and all(s.closed for s in opened if isinstance(s, Stream))
    block.set()
    follower.stop()
    assert not follower.running()


def test_pulls_one_at_a_time_in_the_background_with_a_back_off():
    now = [100.0]
    release = threading.Event()
    calls = []

    def pull(reference):
        calls.append(reference)
        release.wait(10)
        if reference.endswith(":bad"):
            raise HypervisorError("no such registry")

    pulls = ImagePulls(pull, retry_seconds=60, clock=lambda: now[0])
    assert pulls.status("a:bad") == "being pulled" and pulls.status("a:bad") == "being pulled"
    assert pulls.status("b:1") == "being pulled"
    wait_for(lambda: sorted(calls) == ["a:bad", "b:1"], "both pulls started")
    release.set()
    wait_for(lambda: pulls.failure("a:bad"), "the failure recorded")
    assert pulls.status("a:bad") == "pull failed: no such registry (next try in 60 s)"
    now[0] += 61
    assert pulls.status("a:bad") == "being pulled"
    wait_for(lambda: calls.count("a:bad") == 2, "a second pull after the back-off")
    wait_for(lambda: pulls.failure("b:1") is None and pulls.status("b:1") == "being pulled" and len(calls) >= 3,
             "a succeeded pull forgotten (a new one starts if the image is still missing)")


@pytest.mark.parametrize("text,expected", [
    ("2026-12-07T15:01:59.123456789Z", 1796655719.123456789),
    ("2026-12-07T16:01:59+01:00", 1796655719.0),
    ("2026-12-07T15:01:59.5Z", 1796655719.5),
    ("0001-01-01T00:00:00Z", None),  # the zero time: never exited
    ("yesterday", None),
    (None, None),
    ("2026-13-40T99:99:99Z", None),
])
def test_api_times_parse_to_epoch_seconds_or_none(text, expected):
    from vacfactory.hypervisor.containers import parse_api_time

    value = parse_api_time(text)
    assert value == pytest.approx(expected, abs=1e-6) if expected is not None else value is None
