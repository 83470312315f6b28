"""RoutingHypervisor over two FakeHypervisors: VMs to one, containers to the other."""

from __future__ import annotations

import uuid as uuidlib

import pytest

from tests.unit.test_engine_fake import protocol_methods
from vacfactory.errors import HypervisorError
from vacfactory.hypervisor.base import ContainerSpec, NetworkSpec, VMSpec
from vacfactory.hypervisor.fake import FakeHypervisor
from vacfactory.hypervisor.routing import RoutingHypervisor


def vm(number: int) -> VMSpec:
    return VMSpec(name=f"vm-{number:02d}.example.org", uuid=str(uuidlib.uuid4()), vcpus=2, memory_mib=512,
                  domain_type="test")


def container(number: int) -> ContainerSpec:
    return ContainerSpec(name=f"ct-{number:02d}.example.org", uuid=str(uuidlib.uuid4()), image="busybox:1",
                         command=("sleep", "100"), processors=3, memory_mib=256)


@pytest.fixture
def route():
    vms, containers = FakeHypervisor(), FakeHypervisor()
    return RoutingHypervisor(vms, containers), vms, containers


def test_it_implements_the_whole_protocol():
    assert {n for n in protocol_methods() if not callable(getattr(RoutingHypervisor, n, None))} == set()


def test_create_goes_by_the_spec_type_and_listing_joins_both(route):
    hv, vms, containers = route
    a, b = vm(1), container(2)
    hv.create(a)
    hv.create(b)
    assert set(vms.domains) == {a.uuid} and set(containers.domains) == {b.uuid}
    assert {d.uuid: d.vcpus for d in hv.list_domains()} == {a.uuid: 2, b.uuid: 3}
    with pytest.raises(HypervisorError, match="neither a VM nor a container"):
        hv.create(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("down", ["vms", "containers"])
def test_listing_is_blind_when_either_backend_is_unreachable(route, down):
    hv, vms, containers = route
    hv.create(vm(1))
    hv.create(container(2))
    {"vms": vms, "containers": containers}[down].reachable = False
    with pytest.raises(HypervisorError):
        hv.list_domains()
    assert not hv.ping()


def test_calls_by_uuid_reach_the_backend_that_has_it(route):
    hv, vms, containers = route
    a, b = vm(1), container(2)
    hv.create(a)
    hv.create(b)
    fresh = RoutingHypervisor(vms, containers)  # knows nothing yet: asks both
    assert fresh.domain_info(b.uuid).name == b.name and fresh.domain_info(a.uuid).name == a.name
    assert fresh.destroy(b.uuid) and b.uuid not in containers.domains and a.uuid in vms.domains
    assert not fresh.destroy(b.uuid) and fresh.domain_info(b.uuid) is None
    assert hv.destroy(a.uuid) and not vms.domains
    assert f"destroy {a.uuid}" not in containers.calls  # known to be a VM: asked only there


def test_an_unreachable_backend_does_not_hide_the_other_ones_machine(route):
    hv, vms, containers = route
    b = container(2)
    hv.create(b)
    vms.reachable = False
    fresh = RoutingHypervisor(vms, containers)
    assert fresh.domain_info(b.uuid).uuid == b.uuid
    assert fresh.destroy(b.uuid)
    with pytest.raises(HypervisorError):  # nobody had it, and one could not say
        fresh.destroy(str(uuidlib.uuid4()))
    with pytest.raises(HypervisorError):
        fresh.domain_info(str(uuidlib.uuid4()))


def test_events_of_both_reach_the_callback_and_the_rest_is_routed(route, tmp_path):
    hv, vms, containers = route
    seen = []
    hv.set_event_callback(seen.append)
    a, b = vm(1), container(2)
    hv.create(a)
    hv.create(b)
    assert [(e.uuid, e.kind) for e in seen] == [(a.uuid, "started"), (b.uuid, "started")]
    assert hv.describe() == "Fake 1.0.0; Fake 1.0.0"
    network = NetworkSpec(name="vacfactory", bridge="vfbr0")
    hv.ensure_network(network)
    assert vms.networks == [network] and containers.networks == []
    disks = tmp_path / "disks"
    disks.mkdir()
    (disks / "root.qcow2").write_bytes(b"x")
    hv.remove_disks(str(disks))
    assert not list(disks.iterdir())
    containers.image_reasons["busybox:2"] = "being pulled"
    assert hv.image_status("busybox:2") == "being pulled" and hv.image_status("busybox:1") is None
    hv.close()


def test_the_fake_takes_container_specs_and_reports_images():
    fake = FakeHypervisor()
    spec = container(3)
    fake.image_reasons["busybox:1"] = "pull failed: no registry"
    assert fake.image_status("busybox:1") == "pull failed: no registry"
    with pytest.raises(HypervisorError, match="not present"):
        fake.create(spec)
    del fake.image_reasons["busybox:1"]
    fake.create(spec)
    (domain,) = fake.list_domains()
    assert (domain.name, domain.vcpus, domain.memory_kib) == (spec.name, 3, 256 * 1024)
    with pytest.raises(HypervisorError, match="exists"):
        fake.create(spec)
