"""The VM network's pure values: slot addresses, MACs and ports, and the network's description.

Pure (no subprocess, no libvirt), so the engine and the hypervisor interface can name a slot's
address and port without importing :mod:`.network`, which runs ``ip``. Slot N has the fixed
IP ``169.254.169.N+1``, the fixed MAC ``56:4d:<IP bytes>`` (Vac's) and the host tap
``vfslotNNN``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from vacfactory.core import values
from vacfactory.errors import InvalidValue

__all__ = ["MAX_SLOT", "SLOT_PORT_PREFIX", "NetworkSpec", "slot_ip", "slot_mac", "slot_port", "check_port"]

#: slots 0..MAX_SLOT map to .1 .. .252; .253 and .254 are the factory's, .255 is broadcast
MAX_SLOT = 251

_MAC = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
#: the host side of slot N's NIC: a persistent tap the factory owns (see ensure_tap)
SLOT_PORT_PREFIX = "vfslot"
_SLOT_PORT = re.compile(r"\Avfslot[0-9]{3}\Z")
_FORWARD_MODES = ("nat", "route", "open")


def _ipv4(what: str, value: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(values.check_ipv4(value, what))


@dataclass(frozen=True)
class NetworkSpec:
    """The private network as the factory wants it; ``ensure_network`` makes reality match."""

    name: str
    bridge: str
    address: str = "169.254.169.254"
    prefix: int = 24
    dhcp_hosts: Tuple[Tuple[str, str, str], ...] = ()  # (mac, ip, hostname)
    extra_addresses: Tuple[str, ...] = ("169.254.169.253",)
    forward: Optional[str] = "nat"
    forward_dev: Optional[str] = None

    def __post_init__(self) -> None:
        values.check_network_name(self.name, "network")
        values.check_interface_name(self.bridge, f"network {self.name} bridge")
        address = _ipv4(f"network {self.name} address", self.address)
        if not isinstance(self.prefix, int) or not 8 <= self.prefix <= 30:
            raise InvalidValue(f"network {self.name}: prefix must be 8..30, got {self.prefix!r}")
        subnet = ipaddress.IPv4Network(f"{address}/{self.prefix}", strict=False)
        for extra in self.extra_addresses:
            _ipv4(f"network {self.name} extra address", extra)
        macs, ips = set(), set()
        for entry in self.dhcp_hosts:
            if len(entry) != 3:
                raise InvalidValue(f"network {self.name}: DHCP host is not (mac, ip, name): {entry!r}")
            mac, ip, hostname = entry
            if not _MAC.match(mac):
                raise InvalidValue(f"network {self.name}: DHCP MAC must be lower-case: {mac!r}")
            values.check_mac(mac, f"network {self.name} DHCP host")
            if _ipv4(f"network {self.name} DHCP host", ip) not in subnet:
                raise InvalidValue(f"network {self.name}: DHCP host {ip} is outside {subnet}")
            values.check_hostname(hostname, f"network {self.name} DHCP host name")
            if mac in macs or ip in ips:
                raise InvalidValue(f"network {self.name}: duplicate DHCP MAC or IP in {entry!r}")
            macs.add(mac)
            ips.add(ip)
        if self.forward is not None and self.forward not in _FORWARD_MODES:
            raise InvalidValue(f"network {self.name}: forward must be in {_FORWARD_MODES} or None")
        if self.forward_dev is not None:
            if self.forward is None:
                raise InvalidValue(f"network {self.name}: forward_dev needs a forward mode")
            values.check_interface_name(self.forward_dev, f"network {self.name} forward_dev")


def slot_ip(slot: int, base: str = "169.254.169.0") -> str:
    """The fixed IP of VM slot ``slot``: slot N gets ``base`` + N + 1 (slots 0..251)."""
    network = _ipv4("slot base", base)
    if int(network) & 0xFF:
        raise ValueError(f"slot base must end in .0: {base!r}")
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot must be an integer 0..{MAX_SLOT}, got {slot!r}")
    return str(network + slot + 1)


def slot_mac(slot: int, base: str = "169.254.169.0") -> str:
    """The fixed MAC of slot ``slot``: ``56:4d:`` + the 4 bytes of its IP, as Vac does."""
    packed = ipaddress.IPv4Address(slot_ip(slot, base)).packed
    return "56:4d:" + ":".join(f"{b:02x}" for b in packed)


def slot_port(slot: int) -> str:
    """The host tap device of slot ``slot`` ("vfslot007"): one per slot, shared by every
    factory on the host like the slot's MAC and IP."""
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot must be an integer 0..{MAX_SLOT}, got {slot!r}")
    return f"{SLOT_PORT_PREFIX}{slot:03d}"


def check_port(port: str) -> str:
    if not isinstance(port, str) or not _SLOT_PORT.match(port):
        raise InvalidValue(f"bad slot port name {port!r}")
    return port
