"""Domain XML from a :class:`VMSpec`: one pure function, the only place that knows the shape.

Built with ElementTree so every value is escaped by construction. The shape follows Vac's
``createVM`` (see reference/vac-anchor.md 7.3) with what this project measured:

- ``<features><acpi/>`` is required: without it libvirt passes ``-no-acpi`` and a guest's
  ``poweroff`` only halts, so the domain never ends.
- ``on_poweroff``/``on_reboot``/``on_crash`` are all ``destroy``: a VM lives once, and a
  reboot or panic ends it like Vac does (the factory then finds out why from joboutputs).
- Disks use ``cache='unsafe'`` (the disks are throw-away: the VM cannot survive a host crash
  anyway, so flushes buy nothing) and ``error_policy='report'``, so a host I/O error reaches
  the guest, which can fail its job and power off, instead of pausing the domain forever.
- ``<pm>`` disables guest suspend: a suspended VM would hold its slot doing nothing.
- CPU mode only for ``kvm``: under TCG (``qemu``) libvirt picks qemu64 and host-passthrough
  is refused; the test driver has no CPU model at all.
- No graphics, no USB controller and no memory balloon: nobody looks at the screen or plugs
  anything in, and the factory never resizes VMs. The serial console goes to a file (read
  by operators and by tests).
- The test driver (``domain_type='test'``) accepts the very same XML, so the unit tests check
  what production sends.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .base import DiskSpec, FilesystemSpec, InterfaceSpec, VMSpec

__all__ = ["domain_xml"]


def domain_xml(spec: VMSpec) -> str:
    """The libvirt XML of a transient domain that runs ``spec``."""
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    dom.append(_os(spec))
    features = ET.SubElement(dom, "features")
    for feature in ("acpi", "apic", "pae"):
        ET.SubElement(features, feature)
    if spec.domain_type == "kvm" and spec.cpu_mode != "none":
        ET.SubElement(dom, "cpu", mode=spec.cpu_mode)
    ET.SubElement(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    pm = ET.SubElement(dom, "pm")
    ET.SubElement(pm, "suspend-to-mem", enabled="no")
    ET.SubElement(pm, "suspend-to-disk", enabled="no")
    devices = ET.SubElement(dom, "devices")
    for disk in spec.disks:
        devices.append(_disk(disk))
    for filesystem in spec.filesystems:
        devices.append(_filesystem(filesystem))
    if spec.interface is not None:
        devices.append(_interface(spec.interface))
    if spec.console_log is not None:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=spec.console_log)
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="file")
        ET.SubElement(console, "source", path=spec.console_log)
        ET.SubElement(console, "target", type="serial", port="0")
    # no USB: nothing uses it, and the PIIX USB controller costs ~0.3 s of boot under TCG
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def _os(spec: VMSpec) -> ET.Element:
    os_el = ET.Element("os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel is not None:
        ET.SubElement(os_el, "kernel").text = spec.kernel
        if spec.initrd is not None:
            ET.SubElement(os_el, "initrd").text = spec.initrd
        if spec.cmdline is not None:
            ET.SubElement(os_el, "cmdline").text = spec.cmdline
    else:
        ET.SubElement(os_el, "boot", dev=spec.boot)
        if spec.console_log is not None:
            # the firmware's messages go to the console log too: a VM that never boots says why
            ET.SubElement(os_el, "bios", useserial="yes")
    return os_el


def _disk(disk: DiskSpec) -> ET.Element:
    el = ET.Element("disk", type="file", device=disk.device)
    ET.SubElement(el, "driver", name="qemu", type=disk.fmt, cache="unsafe", error_policy="report")
    ET.SubElement(el, "source", file=disk.path)
    ET.SubElement(el, "target", dev=disk.target_dev, bus=disk.bus)
    if disk.readonly or disk.device == "cdrom":
        ET.SubElement(el, "readonly")
    return el


def _filesystem(fs: FilesystemSpec) -> ET.Element:
    el = ET.Element("filesystem", type="mount", accessmode="mapped")
    ET.SubElement(el, "source", dir=fs.source_dir)
    ET.SubElement(el, "target", dir=fs.tag)
    if fs.readonly:
        ET.SubElement(el, "readonly")
    return el


def _interface(iface: InterfaceSpec) -> ET.Element:
    if iface.port is not None:
        # the slot's own tap, already on the bridge with its filter bound (libvirt_hv
        # ensures both before the domain starts): libvirt only opens it
        el = ET.Element("interface", type="ethernet")
        ET.SubElement(el, "target", dev=iface.port, managed="no")
        ET.SubElement(el, "mac", address=iface.mac.lower())
        ET.SubElement(el, "model", type="virtio")
        return el
    el = ET.Element("interface", type="network")
    ET.SubElement(el, "source", network=iface.network)
    ET.SubElement(el, "mac", address=iface.mac.lower())
    ET.SubElement(el, "model", type="virtio")
    if iface.anti_spoofing:
        filterref = ET.SubElement(el, "filterref", filter="clean-traffic")
        if iface.ip is not None:
            ET.SubElement(filterref, "parameter", name="IP", value=iface.ip)
    return el
