"""LibvirtHypervisor against libvirt's in-process ``test:///default`` driver.

The test driver's state is shared by every open connection in this process (see the
libvirt_hv module docstring), so each test uses unique names and UUIDs and destroys what it
creates.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable, Iterator, List

import pytest

from tests.waiting import poll, scaled
from vacfactory.errors import HypervisorError
from vacfactory.hypervisor import (
    DomainEvent,
    DomainState,
    LibvirtHypervisor,
    VMSpec,
)

URI = "test:///default"
#: a URI whose daemon does not exist: connecting fails at once
DEAD_URI = "test+unix:///default?socket=/nonexistent/vfhv/libvirt-sock"


def make_spec(vcpus: int = 1, memory_mib: int = 128) -> VMSpec:
    return VMSpec(name=f"vfhv-td-{uuid.uuid4().hex[:10]}", uuid=str(uuid.uuid4()),
                  vcpus=vcpus, memory_mib=memory_mib, domain_type="test")


class Events:
    """Collects the events of chosen UUIDs and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: List[DomainEvent] = []
        self.watch: set = set()
        self._cond = threading.Condition()

    def __call__(self, event: DomainEvent) -> None:
        with self._cond:
            if event.uuid in self.watch:
                self.items.append(event)
                self._cond.notify_all()

    def wait_for(self, uuid_: str, kind: str, timeout: float = 5.0) -> DomainEvent:
        deadline = time.monotonic() + scaled(timeout)
        with self._cond:
            while True:
                for event in self.items:
                    if event.uuid == uuid_ and event.kind == kind:
                        return event
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} event for {uuid_}; got {self.items}"
                self._cond.wait(left)


@pytest.fixture
def hv() -> Iterator[LibvirtHypervisor]:
    hypervisor = LibvirtHypervisor(URI)
    created: List[str] = []
    hypervisor.created = created  # type: ignore[attr-defined]
    yield hypervisor
    for domain_uuid in created:
        hypervisor.destroy(domain_uuid)
    hypervisor.close()


@pytest.fixture
def create(hv: LibvirtHypervisor) -> Callable[..., VMSpec]:
    def _create(**kwargs) -> VMSpec:
        spec = make_spec(**kwargs)
        hv.create(spec)
        hv.created.append(spec.uuid)  # type: ignore[attr-defined]
        return spec
    return _create


def test_created_domain_is_listed_running_with_its_size(hv, create):
    spec = create(vcpus=3, memory_mib=384)
    listed = [d for d in hv.list_domains() if d.uuid == spec.uuid]
    assert len(listed) == 1
    info = listed[0]
    assert info.name == spec.name
    assert info.state is DomainState.RUNNING
    assert (info.vcpus, info.memory_kib) == (3, 384 * 1024)
    # the test driver has no CPU accounting (its info() reports the time of day)
    assert info.cpu_seconds == 0.0
    assert hv.domain_info(spec.uuid) == info


def test_domain_info_of_unknown_uuid_is_none(hv):
    assert hv.domain_info(str(uuid.uuid4())) is None


def test_uuid_case_does_not_matter(hv, create):
    spec = create()
    info = hv.domain_info(spec.uuid.upper())
    assert info is not None and info.uuid == spec.uuid


def test_destroy_is_idempotent(hv, create):
    spec = create()
    assert hv.destroy(spec.uuid) is True
    assert hv.destroy(spec.uuid) is False
    assert hv.domain_info(spec.uuid) is None
    assert spec.uuid not in {d.uuid for d in hv.list_domains()}


def test_malformed_uuid_is_a_programming_error(hv):
    with pytest.raises(ValueError):
        hv.destroy("vfhv-not-a-uuid")
    with pytest.raises(ValueError):
        hv.domain_info("")


def test_create_failure_raises_hypervisor_error_naming_domain_and_uri(hv, create):
    spec = create()
    clash = VMSpec(name=spec.name, uuid=str(uuid.uuid4()), vcpus=1, memory_mib=64,
                   domain_type="test")
    with pytest.raises(HypervisorError) as excinfo:
        hv.create(clash)
    assert excinfo.value.domain == spec.name
    assert excinfo.value.uri == URI
    assert URI in str(excinfo.value) and "already" in str(excinfo.value)
    assert hv.domain_info(clash.uuid) is None


def test_events_started_on_create_and_stopped_on_destroy(hv):
    events = Events()
    hv.set_event_callback(events)
    spec = make_spec()
    events.watch.add(spec.uuid)
    hv.create(spec)
    started = events.wait_for(spec.uuid, "started")
    assert started.name == spec.name and started.cpu_seconds is None
    assert abs(started.time - time.time()) < 5
    assert hv.destroy(spec.uuid)
    stopped = events.wait_for(spec.uuid, "stopped")
    assert stopped.time >= started.time
    assert [e.kind for e in events.items] == ["started", "stopped"]


def test_a_failing_callback_does_not_stop_event_delivery(hv):
    seen: List[DomainEvent] = []

    def callback(event: DomainEvent) -> None:
        seen.append(event)
        raise RuntimeError("engine bug")

    hv.set_event_callback(callback)
    first, second = make_spec(), make_spec()
    for spec in (first, second):
        hv.create(spec)
        hv.destroy(spec.uuid)
    poll(lambda: sum(e.uuid == second.uuid for e in seen) >= 2, 5)
    assert [e.kind for e in seen if e.uuid == second.uuid] == ["started", "stopped"]


def test_test_driver_state_is_shared_between_open_connections_and_reset_after_the_last():
    """The measured behaviour the libvirt_hv docstring promises and other tests rely on."""
    one, two = LibvirtHypervisor(URI), LibvirtHypervisor(URI)
    spec = make_spec()
    one.create(spec)
    assert two.domain_info(spec.uuid) is not None
    one.close()
    assert two.domain_info(spec.uuid) is not None  # still open: still shared
    two.close()
    three = LibvirtHypervisor(URI)
    try:
        assert three.domain_info(spec.uuid) is None  # the last close reset the driver
        assert "test" in {d.name for d in three.list_domains()}
    finally:
        three.destroy(spec.uuid)
        three.close()


def test_events_reach_every_connection():
    one, two = LibvirtHypervisor(URI), LibvirtHypervisor(URI)
    events_one, events_two = Events(), Events()
    one.set_event_callback(events_one)
    two.set_event_callback(events_two)
    spec = make_spec()
    events_one.watch.add(spec.uuid)
    events_two.watch.add(spec.uuid)
    try:
        one.create(spec)
        events_two.wait_for(spec.uuid, "started")
        events_one.wait_for(spec.uuid, "started")
    finally:
        one.destroy(spec.uuid)
        one.close()
        two.close()


def test_close_then_use_again_reconnects(hv, create):
    keeper = LibvirtHypervisor(URI)  # an open connection keeps the test driver's state
    assert keeper.ping()
    try:
        spec = create()
        hv.close()
        hv.close()  # idempotent
        assert hv.domain_info(spec.uuid) is not None
    finally:
        keeper.close()


def test_ping(hv):
    assert hv.ping() is True
    dead = LibvirtHypervisor(DEAD_URI)
    assert dead.ping() is False


def test_unreachable_libvirt_raises_hypervisor_error_with_uri():
    dead = LibvirtHypervisor(DEAD_URI)
    for call in (dead.list_domains, lambda: dead.destroy(str(uuid.uuid4())),
                 lambda: dead.create(make_spec())):
        with pytest.raises(HypervisorError) as excinfo:
            call()
        assert excinfo.value.uri == DEAD_URI
        assert DEAD_URI in str(excinfo.value)


def test_set_event_callback_while_unreachable_does_not_raise():
    dead = LibvirtHypervisor(DEAD_URI)
    dead.set_event_callback(lambda event: None)
    assert dead.ping() is False


def test_list_domains_is_cheap_for_many_domains(hv):
    specs = [make_spec() for _ in range(130)]
    for spec in specs:
        hv.create(spec)
        hv.created.append(spec.uuid)  # type: ignore[attr-defined]
    hv.list_domains()
    started = time.perf_counter()
    listed = hv.list_domains()
    elapsed = time.perf_counter() - started
    mine = {spec.uuid for spec in specs}
    assert mine <= {d.uuid for d in listed}
    assert all(d.state is DomainState.RUNNING for d in listed if d.uuid in mine)
    assert elapsed < 1.0, f"list_domains of {len(listed)} domains took {elapsed:.3f} s"


def test_describe_names_the_hypervisor_and_libvirt_versions():
    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor

    hypervisor = LibvirtHypervisor("test:///default")
    try:
        text = hypervisor.describe()
    finally:
        hypervisor.close()
    kind, version, word, lib = text.split()
    assert word == "libvirt" and kind == "TEST"
    assert all(part.isdigit() for part in version.split(".") + lib.split("."))
