"""One rule per value (core/values.py): the option table and the hypervisor specs agree on it."""

from __future__ import annotations

import pytest

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import load_config_string
from vacfactory.core import values
from vacfactory.errors import ConfigErrors, InvalidValue, VacFactoryError
from vacfactory.hypervisor.base import DiskSpec, FilesystemSpec, InterfaceSpec, VMSpec
from vacfactory.hypervisor.network import NetworkSpec

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)
HEAD = "[settings]\nvac_space = vac01.example.com\nfactory_name = wn01.example.com\nstate_dir = /srv/vf\n"
UUID = "5d0c1a3e-7f7b-4c55-9a0e-1f1b6ad7c2e4"


def machinetype(text: str, settings: str = "") -> object:
    config = load_config_string(HEAD + settings + "[machinetype m]\nroot_image = m.img\n" + text, HOST)
    return config.machinetypes["m"]


def errors(text: str, settings: str = "", head: str = HEAD) -> list:
    with pytest.raises(ConfigErrors) as caught:
        load_config_string(head + settings + "[machinetype m]\nroot_image = m.img\n" + text, HOST)
    return [str(e) for e in caught.value.errors]


@pytest.mark.parametrize("device, bus", [
    ("vda", "virtio"), ("vdz", "virtio"), ("vdaa", "virtio"), ("xvda", "virtio"), ("xvdzz", "virtio"),
    ("hda", "ide"), ("hdd", "ide"), ("sda", "ide"), ("sdd", "ide"),
])
def test_guest_devices_vac_allows_are_accepted_by_the_table_and_by_a_disk_on_vacs_bus(device, bus):
    assert values.disk_bus(device) == bus
    assert machinetype(f"machine_model = vm-raw\nroot_device = {device}\nscratch_device = vdzy\n").root_device == device
    assert DiskSpec(path="/d/root.qcow2", target_dev=device, bus=values.disk_bus(device)).target_dev == device


def test_root_device_xvda_the_bug_of_issue_15_loads_and_makes_a_disk():
    """The table accepted xvda and DiskSpec refused it with a plain ValueError."""
    mt = machinetype("machine_model = vm-raw\nroot_device = xvda\n")
    assert DiskSpec(path="/d/root.qcow2", target_dev=mt.root_device, bus=values.disk_bus(mt.root_device))


@pytest.mark.parametrize("device", ["hde", "sde", "hdaa", "vda1", "xvd", "sdz", "VDA", "vda;", "nvme0n1", "fd0", "a"])
def test_devices_that_do_not_fit_their_bus_are_refused_by_the_table_and_the_spec_alike(device):
    (message,) = errors(f"root_device = {device}\n")
    assert f"[machinetype m] root_device: {device!r} must be a guest disk device" in message
    with pytest.raises(InvalidValue):
        DiskSpec(path="/d/root.qcow2", target_dev=device, bus=values.disk_bus(device))


def test_disk_index_counts_like_libvirt():
    assert [values.disk_index(d) for d in ("vda", "hdb", "sdd", "vdz", "vdaa", "xvdab")] == [0, 1, 3, 25, 26, 27]


@pytest.mark.parametrize("text, clash", [
    ("machine_model = vm-raw\nroot_device = vdb\n", "vdb (root_device) and vdb (scratch_device)"),
    ("machine_model = vm-raw\nroot_device = hda\nscratch_device = sda\n", "hda (root_device) and sda (scratch_device)"),
    ("root_device = hdc\n", "hdc (root_device) and hdc (the CernVM ISO)"),
    ("root_device = sdc\nmachine_model = cernvm4\n", "sdc (root_device) and hdc (the CernVM ISO)"),
    ("machine_model = vm-raw\nconfig_drive = yes\nscratch_device = sdd\n", "sdd (scratch_device) and hdd (the config drive)"),
])
def test_devices_that_would_be_the_same_disk_are_refused_at_root_device(text, clash):
    (message,) = errors(text)
    assert f"[machinetype m] root_device: {clash} would be the same disk" in message


def test_scratch_device_does_not_matter_to_a_cernvm_which_has_no_scratch_disk():
    assert machinetype("root_device = vdb\n").root_device == "vdb"  # cernvm3, scratch_device = vdb


def test_a_vm_spec_refuses_two_disks_in_one_place():
    disks = (DiskSpec(path="/d/a", target_dev="hda", bus="ide"), DiskSpec(path="/d/b", target_dev="sda", bus="ide"))
    with pytest.raises(InvalidValue, match="disks hda and sda would be the same disk"):
        VMSpec(name="f-01.example.org", uuid=UUID, vcpus=1, memory_mib=64, domain_type="test", disks=disks)


@pytest.mark.parametrize("make", [
    lambda: DiskSpec(path="relative", target_dev="vda"),
    lambda: DiskSpec(path="/d/a", target_dev="vda", fmt="vmdk"),
    lambda: DiskSpec(path="/d/a", target_dev="hdc", device="cdrom", bus="virtio"),
    lambda: InterfaceSpec(network="-net", mac="56:4d:a9:fe:a9:04"),
    lambda: InterfaceSpec(network="vacfactory", mac="57:4d:a9:fe:a9:04"),
    lambda: FilesystemSpec(source_dir="/d", tag="a b"),
    lambda: VMSpec(name="f-01.example.org", uuid="nope", vcpus=1, memory_mib=64, domain_type="test"),
    lambda: VMSpec(name="f-01.example.org", uuid=UUID, vcpus=True, memory_mib=64, domain_type="test"),
    lambda: NetworkSpec(name="vacfactory", bridge="a-bridge-name-too-long"),
])
def test_spec_errors_are_project_errors(make):
    with pytest.raises(InvalidValue) as caught:
        make()
    assert isinstance(caught.value, VacFactoryError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("option, value, message", [
    ("network_name", "-x", "must be a libvirt network name"),
    ("network_name", "n" * 65, "must be a libvirt network name"),
    ("network_bridge", ".br", "must be a Linux interface name"),
    ("forward_dev", "-eth0", "must be a Linux interface name"),
    ("factory_name", "f" * 60 + ".example.org", "has a first label longer than 59 characters"),
    ("factory_name", "f." + "d" * 50 + "." + "e" * 50 + "." + "g" * 21, "is longer than 124 characters"),
    ("total_processors", "253", "must be <= 252"),
])
def test_settings_the_specs_would_refuse_are_refused_by_the_table(option, value, message):
    head = HEAD.replace("factory_name = wn01.example.com\n", "")
    (error,) = errors("", settings=f"{option} = {value}\n", head=head)
    assert f"[settings] {option}: " in error and message in error


def test_the_longest_factory_name_gives_valid_vm_names():
    name = "f" * 59 + "." + "d" * 60 + ".org"
    assert values.check_factory_name(name) == name and len(name) == 124
    values.check_domain_name(name.replace(".", "-251.", 1))
    values.check_hostname(name.replace(".", "-251.", 1))


@pytest.mark.parametrize("root_device, scratch_device", [("xvda", "xvdb"), ("vdaa", "sdb"), ("hda", "hdd")])
def test_libvirt_takes_the_domain_the_engine_builds_with_these_devices(tmp_path, root_device, scratch_device):
    """End to end: the loader, the engine's builder (real qcow2 disks) and libvirt's test driver."""
    import subprocess

    from tests.unit.test_vmbuild import Site, accepted_by_libvirt, build

    site = Site(str(tmp_path))
    base = site.write("base.img", b"")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "1M"], check=True)
    config = site.configure("disk_gb_per_processor = 1\n", f"root_image = base.img\nroot_device = {root_device}\n"
                            f"scratch_device = {scratch_device}\n", kernel=False)
    _, spec = build(site, config, processors=1)
    assert [(d.target_dev, d.bus) for d in spec.disks] == [
        (root_device, values.disk_bus(root_device)), (scratch_device, values.disk_bus(scratch_device))]
    assert accepted_by_libvirt(spec)
