"""domain_xml: every element the factory relies on, parsed back; the specs' own validation;
and libvirt accepting the result (schema validation, and the test driver starting it)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from vacfactory.hypervisor import (
    DiskSpec,
    FilesystemSpec,
    InterfaceSpec,
    LibvirtHypervisor,
    VMSpec,
    domain_xml,
)

UUID = "6f1c1a38-2b3c-4d5e-8f90-0123456789ab"


def full_spec(**changes) -> VMSpec:
    spec = VMSpec(
        name="vfhv-01.example.org",
        uuid=UUID,
        vcpus=2,
        memory_mib=1536,
        domain_type="kvm",
        console_log="/var/lib/vacfactory/machines/x/console.log",
        kernel="/var/lib/vacfactory/imagecache/vmlinux",
        initrd="/var/lib/vacfactory/imagecache/initrd.img",
        cmdline="console=ttyS0 quiet panic=-1",
        disks=(
            DiskSpec("/var/lib/vacfactory/machines/x/disks/root.qcow2"),
            DiskSpec("/var/lib/vacfactory/machines/x/disks/scratch.raw", "vdb", fmt="raw"),
            DiskSpec("/var/lib/vacfactory/imagecache/cernvm.iso", "sda", "raw", "cdrom", bus="sata"),
        ),
        interface=InterfaceSpec("vac_169.254.0.0", "56:4D:A9:FE:A9:05", anti_spoofing=True),
        filesystems=(
            FilesystemSpec("/var/lib/vacfactory/machines/x/machinefeatures", "machinefeatures", True),
            FilesystemSpec("/var/lib/vacfactory/machines/x/joboutputs", "joboutputs"),
        ),
    )
    return replace(spec, **changes)


def parse(spec: VMSpec) -> ET.Element:
    return ET.fromstring(domain_xml(spec))


def test_identity_and_resources():
    root = parse(full_spec())
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert root.findtext("name") == "vfhv-01.example.org"
    assert root.findtext("uuid") == UUID
    for tag in ("memory", "currentMemory"):
        assert root.find(tag).get("unit") == "MiB"
        assert root.findtext(tag) == "1536"
    assert root.findtext("vcpu") == "2"


def test_direct_kernel_boot_has_kernel_initrd_cmdline_and_no_boot_device():
    os_el = parse(full_spec()).find("os")
    type_el = os_el.find("type")
    assert (type_el.text, type_el.get("arch"), type_el.get("machine")) == ("hvm", "x86_64", "pc")
    assert os_el.findtext("kernel") == "/var/lib/vacfactory/imagecache/vmlinux"
    assert os_el.findtext("initrd") == "/var/lib/vacfactory/imagecache/initrd.img"
    assert os_el.findtext("cmdline") == "console=ttyS0 quiet panic=-1"
    assert os_el.find("boot") is None


@pytest.mark.parametrize("boot", ["hd", "cdrom"])
def test_image_boot_uses_boot_device_and_firmware_on_serial(boot):
    os_el = parse(full_spec(kernel=None, initrd=None, cmdline=None, boot=boot)).find("os")
    assert os_el.find("boot").get("dev") == boot
    assert os_el.find("kernel") is None
    assert os_el.find("bios").get("useserial") == "yes"


def test_no_bios_useserial_without_a_serial_console():
    os_el = parse(full_spec(kernel=None, initrd=None, cmdline=None, console_log=None)).find("os")
    assert os_el.find("bios") is None


def test_features_include_acpi_so_guest_poweroff_ends_the_domain():
    features = parse(full_spec()).find("features")
    assert {child.tag for child in features} == {"acpi", "apic", "pae"}


def test_lifecycle_actions_all_destroy_and_clock_utc_and_no_suspend():
    root = parse(full_spec())
    for action in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(action) == "destroy"
    assert root.find("clock").get("offset") == "utc"
    assert root.find("pm/suspend-to-mem").get("enabled") == "no"
    assert root.find("pm/suspend-to-disk").get("enabled") == "no"


@pytest.mark.parametrize(
    "domain_type,cpu_mode,expected",
    [
        ("kvm", "host-passthrough", "host-passthrough"),
        ("kvm", "host-model", "host-model"),
        ("kvm", "none", None),
        ("qemu", "host-passthrough", None),
        ("test", "host-model", None),
    ],
)
def test_cpu_mode_only_for_kvm(domain_type, cpu_mode, expected):
    cpu = parse(full_spec(domain_type=domain_type, cpu_mode=cpu_mode)).find("cpu")
    assert (None if cpu is None else cpu.get("mode")) == expected


def test_disks():
    disks = parse(full_spec()).findall("devices/disk")
    assert len(disks) == 3
    root, scratch, cdrom = disks
    assert root.get("type") == "file" and root.get("device") == "disk"
    driver = root.find("driver")
    assert driver.attrib == {"name": "qemu", "type": "qcow2", "cache": "unsafe", "error_policy": "report"}
    assert root.find("source").get("file") == "/var/lib/vacfactory/machines/x/disks/root.qcow2"
    assert root.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert root.find("readonly") is None
    assert scratch.find("driver").get("type") == "raw"
    assert scratch.find("target").get("dev") == "vdb"
    assert cdrom.get("device") == "cdrom"
    assert cdrom.find("target").attrib == {"dev": "sda", "bus": "sata"}
    assert cdrom.find("readonly") is not None


def test_readonly_disk():
    spec = full_spec(disks=(DiskSpec("/images/base.raw", fmt="raw", readonly=True),))
    assert parse(spec).find("devices/disk/readonly") is not None


def test_interface_on_network_with_fixed_mac_virtio_and_clean_traffic():
    iface = parse(full_spec()).find("devices/interface")
    assert iface.get("type") == "network"
    assert iface.find("source").get("network") == "vac_169.254.0.0"
    assert iface.find("mac").get("address") == "56:4d:a9:fe:a9:05"
    assert iface.find("model").get("type") == "virtio"
    assert iface.find("filterref").get("filter") == "clean-traffic"


def test_interface_without_anti_spoofing_has_no_filter():
    spec = full_spec(interface=InterfaceSpec("net", "56:4d:0a:fe:4d:01"))
    assert parse(spec).find("devices/interface/filterref") is None


def test_no_interface_when_none():
    assert parse(full_spec(interface=None)).find("devices/interface") is None


def test_filesystems_are_virtio_9p_mapped():
    shares = parse(full_spec()).findall("devices/filesystem")
    assert [fs.find("target").get("dir") for fs in shares] == ["machinefeatures", "joboutputs"]
    for fs in shares:
        assert fs.get("type") == "mount" and fs.get("accessmode") == "mapped"
    assert shares[0].find("source").get("dir") == "/var/lib/vacfactory/machines/x/machinefeatures"
    assert shares[0].find("readonly") is not None
    assert shares[1].find("readonly") is None


def test_serial_and_console_go_to_the_console_log():
    devices = parse(full_spec()).find("devices")
    serial, console = devices.find("serial"), devices.find("console")
    assert serial.get("type") == "file" and console.get("type") == "file"
    assert serial.find("source").get("path") == "/var/lib/vacfactory/machines/x/console.log"
    assert console.find("source").get("path") == "/var/lib/vacfactory/machines/x/console.log"
    assert serial.find("target").get("port") == "0"
    assert console.find("target").attrib == {"type": "serial", "port": "0"}


def test_no_serial_without_console_log():
    devices = parse(full_spec(console_log=None)).find("devices")
    assert devices.find("serial") is None and devices.find("console") is None


def test_no_balloon_no_usb_and_no_graphics():
    devices = parse(full_spec()).find("devices")
    assert devices.find("memballoon").get("model") == "none"
    assert devices.find("controller").attrib == {"type": "usb", "model": "none"}
    for tag in ("graphics", "video", "input", "sound"):
        assert devices.find(tag) is None


def test_special_characters_are_escaped_and_survive_a_round_trip():
    nasty_dir = "/srv/a&b/<c>/\"d'/e"
    spec = full_spec(
        cmdline="x=\"<&>\" y='1'",
        console_log=nasty_dir + "/console.log",
        disks=(DiskSpec(nasty_dir + "/root.qcow2"),),
        filesystems=(FilesystemSpec(nasty_dir, "share"),),
    )
    text = domain_xml(spec)
    assert "<&>" not in text
    root = ET.fromstring(text)
    assert root.findtext("os/cmdline") == "x=\"<&>\" y='1'"
    assert root.find("devices/disk/source").get("file") == nasty_dir + "/root.qcow2"
    assert root.find("devices/filesystem/source").get("dir") == nasty_dir
    assert root.find("devices/serial/source").get("path") == nasty_dir + "/console.log"


def test_minimal_spec_has_no_optional_devices():
    spec = VMSpec(name="vfhv-min", uuid=UUID, vcpus=1, memory_mib=64, domain_type="qemu")
    root = parse(spec)
    assert [child.tag for child in root.find("devices")] == ["controller", "memballoon"]
    assert root.find("os/boot").get("dev") == "hd"


# -- the specs refuse values that would produce bad XML or unsafe paths ---------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "-rf"},
        {"name": "a b"},
        {"name": ""},
        {"uuid": "not-a-uuid"},
        {"vcpus": 0},
        {"memory_mib": 0},
        {"domain_type": "xen"},
        {"cpu_mode": "custom"},
        {"boot": "network"},
        {"kernel": "relative/vmlinux"},
        {"console_log": "/tmp/a\nb"},
        {"cmdline": "quiet\x00panic=-1"},
        {"kernel": None},  # initrd and cmdline without a kernel
        {"disks": (DiskSpec("/a.qcow2"), DiskSpec("/b.qcow2"))},  # both vda
        {"filesystems": (FilesystemSpec("/a", "t"), FilesystemSpec("/b", "t"))},
    ],
)
def test_vmspec_rejects(changes):
    with pytest.raises(ValueError):
        full_spec(**changes)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DiskSpec("relative.qcow2"),
        lambda: DiskSpec("-o.qcow2"),
        lambda: DiskSpec("/a.qcow2", fmt="vmdk"),
        lambda: DiskSpec("/a.qcow2", target_dev="vd1"),
        lambda: DiskSpec("/a.iso", "vdb", "raw", "cdrom", bus="virtio"),
        lambda: DiskSpec("/a.iso", "sda", "raw", "floppy", bus="sata"),
        lambda: InterfaceSpec("net", "56:4d:0a:fe:4d"),
        lambda: InterfaceSpec("net", "57:4d:0a:fe:4d:01"),  # multicast bit
        lambda: InterfaceSpec("bad name", "56:4d:0a:fe:4d:01"),
        lambda: FilesystemSpec("/a", "tag with space"),
        lambda: FilesystemSpec("a", "tag"),
    ],
)
def test_device_specs_reject(make):
    with pytest.raises(ValueError):
        make()


# -- libvirt accepts what we generate --------------------------------------------------------


@pytest.mark.parametrize("domain_type", ["kvm", "qemu", "test"])
@pytest.mark.parametrize("kernel_boot", [True, False])
def test_libvirt_validates_and_starts_the_xml(domain_type, kernel_boot):
    """createXML with VALIDATE checks libvirt's RNG schema before anything else; the test
    driver (measured) accepts ``type='kvm'`` and ``type='qemu'`` domains too, so the exact
    production XML is checked here without a daemon."""
    changes = {} if kernel_boot else {"kernel": None, "initrd": None, "cmdline": None}
    spec = full_spec(domain_type=domain_type, name=f"vfhv-xml-{uuid.uuid4().hex[:8]}",
                     uuid=str(uuid.uuid4()), **changes)
    hv = LibvirtHypervisor("test:///default")
    try:
        hv.create(spec)
        info = hv.domain_info(spec.uuid)
        assert info is not None and info.name == spec.name
        assert info.vcpus == 2 and info.memory_kib == 1536 * 1024
    finally:
        hv.destroy(spec.uuid)
        hv.close()


def test_anti_spoofing_pins_the_slot_address_in_the_filter():
    import xml.etree.ElementTree as ET

    from vacfactory.hypervisor.base import InterfaceSpec, VMSpec
    from vacfactory.hypervisor.domainxml import domain_xml

    spec = VMSpec(name="f1-03.example.org", uuid="5d0c1a3e-7f7b-4c55-9a0e-1f1b6ad7c2e4", vcpus=1,
                  memory_mib=256, domain_type="qemu",
                  interface=InterfaceSpec(network="vacfactory", mac="56:4d:a9:fe:a9:04", anti_spoofing=True,
                                          ip="169.254.169.4"),
                  kernel="/boot/vmlinux")
    filterref = ET.fromstring(domain_xml(spec)).find("devices/interface/filterref")
    assert filterref.get("filter") == "clean-traffic"
    assert [(p.get("name"), p.get("value")) for p in filterref.findall("parameter")] == [("IP", "169.254.169.4")]


def test_an_interface_address_must_be_ipv4():
    import pytest

    from vacfactory.hypervisor.base import InterfaceSpec

    with pytest.raises(ValueError, match="not an IPv4 address"):
        InterfaceSpec(network="vacfactory", mac="56:4d:a9:fe:a9:04", ip="169.254.169.4; reboot")


def test_a_slot_port_nic_is_the_slots_own_tap_with_no_per_domain_filter():
    """The filter is bound to the slot's tap once (libvirt_hv._ensure_port); the domain only
    names the tap, which libvirt must open as it is (managed='no')."""
    from vacfactory.hypervisor.base import InterfaceSpec, VMSpec
    from vacfactory.hypervisor.domainxml import domain_xml

    spec = VMSpec(name="f1-03.example.org", uuid="5d0c1a3e-7f7b-4c55-9a0e-1f1b6ad7c2e4", vcpus=1,
                  memory_mib=256, domain_type="qemu",
                  interface=InterfaceSpec(network="vacfactory", mac="56:4d:a9:fe:a9:04", anti_spoofing=True,
                                          ip="169.254.169.4", port="vfslot003"),
                  kernel="/boot/vmlinux")
    iface = ET.fromstring(domain_xml(spec)).find("devices/interface")
    assert iface.get("type") == "ethernet"
    assert iface.find("target").attrib == {"dev": "vfslot003", "managed": "no"}
    assert iface.find("mac").get("address") == "56:4d:a9:fe:a9:04"
    assert iface.find("model").get("type") == "virtio"
    assert iface.find("filterref") is None and iface.find("source") is None


@pytest.mark.parametrize("changes, message", [
    ({"port": "vnet0"}, "bad slot port name"),
    ({"port": "vfslot1"}, "bad slot port name"),
    ({"port": "vfslot001", "anti_spoofing": False}, "needs anti_spoofing and ip"),
    ({"port": "vfslot001", "ip": None}, "needs anti_spoofing and ip"),
])
def test_a_slot_port_is_never_an_unfiltered_or_foreign_device(changes, message):
    from vacfactory.hypervisor.base import InterfaceSpec

    values = dict(network="vacfactory", mac="56:4d:a9:fe:a9:02", anti_spoofing=True, ip="169.254.169.2")
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        InterfaceSpec(**values)
