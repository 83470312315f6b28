"""The rules for single values: guest disk devices, names, interfaces, MACs, paths, UUIDs.

One place for each rule, used both by the option table (``config/options.py``, which tells an
admin at file:line) and by the hypervisor specs (``hypervisor/base.py``, ``network.py``, which
refuse a bad value before it reaches domain XML or a command line). So a value the table
accepts is one the specs take: ``tests/unit/test_table_to_specs.py`` checks it with every kind
of value the table's types generate.

Each ``check_*`` returns the value or raises :class:`~vacfactory.errors.InvalidValue` (also a
ValueError). Its message is ``'<value>' <rule in words>``, prefixed with ``what`` and ": " when
``what`` is given (a spec names the disk or network), so the loader can add file:line in front.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from typing import Dict, Optional, Sequence, Tuple

from vacfactory.errors import InvalidValue

# --------------------------------------------------------------------------- host names
#: a host name: dot-separated labels of letters, digits and inner '-', at most 253 characters
HOSTNAME_PATTERN = (r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
#: a fully qualified host name: a host name with at least one dot
FQDN_PATTERN = (r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")

#: libvirt domain names the factory uses: also the VMs' host names (engine/naming.py)
DOMAIN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}"
_DOMAIN_NAME_MAX = 128
#: a VM's name is the factory's with "-NNN" after the first label (slots go up to 251)
_SLOT_SUFFIX = len("-251")
_FACTORY_NAME_MAX = _DOMAIN_NAME_MAX - _SLOT_SUFFIX
_FACTORY_LABEL_MAX = 63 - _SLOT_SUFFIX
FQDN_DOC = "must be a fully qualified domain name (contain a dot)"
FACTORY_NAME_DOC = (f"{FQDN_DOC}, at most {_FACTORY_NAME_MAX} characters, its first label at most "
                    f"{_FACTORY_LABEL_MAX} (VMs are named <first label>-NN.<rest>)")


def _refuse(what: str, value: object, rule: str) -> InvalidValue:
    shown = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:57] + "...")
    return InvalidValue(f"{what}: {shown} {rule}" if what else f"{shown} {rule}")


def _matches(pattern: str, value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def check_factory_name(name: str, what: str = "") -> str:
    """A factory's FQDN from which every VM name (``<short>-NNN.<domain>``) is a valid one."""
    if not _matches(FQDN_PATTERN, name):
        raise _refuse(what, name, FQDN_DOC)
    if len(name) > _FACTORY_NAME_MAX:
        raise _refuse(what, name, f"is longer than {_FACTORY_NAME_MAX} characters (VMs are named "
                                  f"<first label>-NN.<rest>, at most {_DOMAIN_NAME_MAX})")
    if len(name.split(".", 1)[0]) > _FACTORY_LABEL_MAX:
        raise _refuse(what, name, f"has a first label longer than {_FACTORY_LABEL_MAX} characters (VMs' "
                                  f"host names add -NN to it, and a label has at most 63)")
    return name


def check_domain_name(name: str, what: str = "") -> str:
    if not _matches(DOMAIN_NAME_PATTERN, name):
        raise _refuse(what, name, "is not a valid domain name (A-Z a-z 0-9 _ . + -, at most 128)")
    return name


def check_hostname(name: str, what: str = "") -> str:
    if not _matches(HOSTNAME_PATTERN, name):
        raise _refuse(what, name, "must be a host name")
    return name


# --------------------------------------------------------------------------- guest disks
#: libvirt's disk target names we use: a bus prefix and one or two letters (no partitions)
_TARGET_PATTERN = r"(vd|xvd|sd|hd)([a-z]{1,2})"
#: the IDE bus of the `pc` machine has four places: index 0-3 (hda/sda .. hdd/sdd)
IDE_PLACES = 4
DISK_BUSES = ("virtio", "sata", "ide")
#: where the engine puts the CernVM ISO and the config drive (IDE, as Vac puts the ISO)
CERNVM_ISO_DEVICE = "hdc"
CONFIG_DRIVE_DEVICE = "hdd"
GUEST_DISK_DEVICE_DOC = ("must be a guest disk device: vdX, vdXX, xvdX, xvdXX (virtio bus), or hda to hdd, "
                         "sda to sdd (IDE bus, which has four places)")


def disk_bus(device: str) -> str:
    """Vac's rule: the virtio bus for a device name containing ``vd``, IDE otherwise."""
    return "virtio" if "vd" in device else "ide"


def disk_index(device: str) -> int:
    """libvirt's index of a target name: vda/hda/sda -> 0, vdb -> 1, ..., vdz -> 25, vdaa -> 26."""
    match = re.fullmatch(_TARGET_PATTERN, device)
    if match is None:
        raise _refuse("", device, "is not a disk target name")
    index = -1
    for letter in match.group(2):
        index = (index + 1) * 26 + ord(letter) - ord("a")
    return index


def check_disk_target(device: str, bus: str, what: str = "") -> str:
    """A target name libvirt places on ``bus``: IDE has only four places."""
    if bus not in DISK_BUSES:
        raise _refuse(what, bus, f"is not a disk bus ({', '.join(DISK_BUSES)})")
    if not _matches(_TARGET_PATTERN, device):
        raise _refuse(what, device, "is not a disk target name (vd, xvd, sd or hd and one or two letters)")
    if bus == "ide" and disk_index(device) >= IDE_PLACES:
        raise _refuse(what, device, "does not fit the IDE bus (hda to hdd, sda to sdd)")
    return device


def check_guest_disk_device(device: str, what: str = "") -> str:
    """A root_device / scratch_device: a target name that fits the bus Vac's rule gives it."""
    try:
        return check_disk_target(device, disk_bus(device) if isinstance(device, str) else "ide")
    except InvalidValue:
        raise _refuse(what, device, GUEST_DISK_DEVICE_DOC) from None


def disk_place(device: str, bus: str) -> Tuple[str, object]:
    """Where a disk sits: IDE disks by index (hda and sda are the same place), others by name."""
    return ("ide", disk_index(device)) if bus == "ide" else (bus, device)


def disk_clash(disks: Sequence[Tuple[str, str]]) -> Optional[Tuple[int, int]]:
    """Indexes of the first two ``(device, bus)`` pairs that share a name or a place, or None."""
    seen: Dict[object, int] = {}
    for position, (device, bus) in enumerate(disks):
        for key in (("name", device), disk_place(device, bus)):
            if key in seen:
                return seen[key], position
            seen[key] = position
    return None


# --------------------------------------------------------------------------- networks
#: VM slots on the private /24 network: .1 to .252 (.253 and .254 are the factory's)
VM_SLOTS = 252
NETWORK_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NETWORK_NAME_DOC = "must be a libvirt network name: 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
#: Linux interface names: IFNAMSIZ - 1 characters; no '/', ':', blanks, never '.' or '..'
INTERFACE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}"
INTERFACE_NAME_DOC = ("must be a Linux interface name: 1 to 15 of A-Z a-z 0-9 _ . -, "
                      "starting with a letter or digit")
_MAC_PATTERN = r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}"


def check_network_name(name: str, what: str = "") -> str:
    if not _matches(NETWORK_NAME_PATTERN, name):
        raise _refuse(what, name, NETWORK_NAME_DOC)
    return name


def check_interface_name(name: str, what: str = "") -> str:
    if not _matches(INTERFACE_NAME_PATTERN, name):
        raise _refuse(what, name, INTERFACE_NAME_DOC)
    return name


def check_mac(mac: str, what: str = "") -> str:
    """A unicast MAC address written as six colon-separated hex pairs."""
    if not _matches(_MAC_PATTERN, mac):
        raise _refuse(what, mac, "is not a MAC address (six hex pairs separated by ':')")
    if int(mac[:2], 16) & 1:
        raise _refuse(what, mac, "is a multicast MAC address")
    return mac


def check_ipv4(address: str, what: str = "") -> str:
    try:
        ipaddress.IPv4Address(address)
    except (ValueError, TypeError):
        raise _refuse(what, address, "is not an IPv4 address") from None
    return address


# --------------------------------------------------------------------------- paths, ids
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MOUNT_TAG_PATTERN = r"[A-Za-z0-9_.-]{1,31}"


def check_single_line(text: str, what: str = "") -> str:
    """Text for XML and command lines: no control characters (XML 1.0 cannot carry them)."""
    if not isinstance(text, str) or _CONTROL.search(text):
        raise _refuse(what, text, "must not contain control characters")
    return text


def check_absolute_path(path: str, what: str = "") -> str:
    """A path safe to hand to libvirt or a subprocess: absolute (never read as an option,
    never relative to our cwd) and free of control characters."""
    if not isinstance(path, str) or not path:
        raise _refuse(what, path, "must be a non-empty path")
    if not path.startswith("/"):
        raise _refuse(what, path, "must be an absolute path")
    check_single_line(path, what)
    return path


def check_uuid(value: str, what: str = "") -> str:
    """The canonical lower-case form of a UUID string."""
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise _refuse(what, value, "is not a UUID") from None


def check_mount_tag(tag: str, what: str = "") -> str:
    if not _matches(MOUNT_TAG_PATTERN, tag):
        raise _refuse(what, tag, "is not a mount tag (1 to 31 of A-Z a-z 0-9 _ . -)")
    return tag


# --------------------------------------------------------------------------- container images
#: a container image reference as the Docker Engine API takes it (distribution's grammar):
#: [registry[:port]/]path[:tag][@sha256:digest], path components lower case. Nothing else
#: (no spaces, no options, no "..") reaches the runtime from a config file or a pipe.
_IMAGE_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?/)"
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE_PATTERN = (rf"(?=.{{1,255}}(?:@|\Z)){_IMAGE_DOMAIN}?{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
                           r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
DOCKER_SCHEME = "docker://"


def check_image_reference(reference: str, what: str = "") -> str:
    """A container image reference (``docker://`` already removed), e.g. ``busybox``,
    ``registry.example.org:5000/lhcb/pilot:1.2`` or ``name@sha256:<64 hex>``."""
    if not _matches(IMAGE_REFERENCE_PATTERN, reference):
        raise _refuse(what, reference, "is not a container image reference ([registry/]name[:tag][@sha256:digest], "
                                       "names in lower case)")
    return reference


def docker_image(location: str, what: str = "") -> str:
    """The image reference in a ``root_image = docker://IMAGE[:TAG]`` value."""
    if not isinstance(location, str) or not location.lower().startswith(DOCKER_SCHEME):
        raise _refuse(what, location, f"must start with {DOCKER_SCHEME}")
    return check_image_reference(location[len(DOCKER_SCHEME):], what)


def command_words(text: str, what: str = "") -> Tuple[str, ...]:
    """A command line split into words as a shell would (quotes kept together); no shell
    ever runs it. Refused: unbalanced quotes, no words, control characters."""
    import shlex

    check_single_line(text, what)
    try:
        words = tuple(shlex.split(text))
    except ValueError as error:
        raise _refuse(what, text, f"does not split into words ({error})") from None
    if not words or not words[0]:
        raise _refuse(what, text, "has no command")
    return words
