"""The factory's private VM network: its description, its XML, and the host-side checks.

Like Vac's ``vac_169.254.0.0`` network, it is created and repaired by the factory: a libvirt
network with a bridge holding the metadata address (169.254.169.254 by default), static DHCP
entries that give slot N the fixed MAC ``56:4d:<IP bytes>`` and the fixed IP ``.N+1``, NAT
(or nothing: ``forward=None`` makes it isolated), and extra /32 addresses on the bridge for
services the VMs reach (169.254.169.253: MJF and joboutputs over HTTP).

The DHCP section has only static hosts, no range: dnsmasq then answers only known MACs, so a
VM cannot take another slot's address by DHCP.

This module is pure except for the bridge helpers at the end, which run ``ip`` (argument
lists, validated values). The libvirt side (define, start, update, repair) lives in
:mod:`.libvirt_hv`, which uses :func:`network_problems` and :func:`dhcp_host_changes` to
decide.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

from ..errors import HypervisorError

log = logging.getLogger(__name__)

__all__ = [
    "NetworkSpec",
    "network_xml",
    "network_problems",
    "dhcp_host_changes",
    "dhcp_host_xml",
    "slot_ip",
    "slot_mac",
    "MAX_SLOT",
    "bridge_addresses",
    "add_bridge_address",
    "link_kind",
    "delete_bridge",
]

#: slots 0..MAX_SLOT map to .1 .. .252; .253 and .254 are the factory's, .255 is broadcast
MAX_SLOT = 251

_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_BRIDGE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")  # IFNAMSIZ - 1
_HOSTNAME = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9.-]{0,252})\Z")
_MAC = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_FORWARD_MODES = ("nat", "route", "open")


def _ipv4(what: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError) as exc:
        raise ValueError(f"{what}: not an IPv4 address: {value!r}") from exc


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
        if not _NAME.match(self.name):
            raise ValueError(f"network: bad name {self.name!r}")
        if not _BRIDGE.match(self.bridge):
            raise ValueError(f"network {self.name}: bad bridge name {self.bridge!r}")
        address = _ipv4(f"network {self.name} address", self.address)
        if not isinstance(self.prefix, int) or not 8 <= self.prefix <= 30:
            raise ValueError(f"network {self.name}: prefix must be 8..30, got {self.prefix!r}")
        subnet = ipaddress.IPv4Network(f"{address}/{self.prefix}", strict=False)
        for extra in self.extra_addresses:
            _ipv4(f"network {self.name} extra address", extra)
        macs, ips = set(), set()
        for entry in self.dhcp_hosts:
            if len(entry) != 3:
                raise ValueError(f"network {self.name}: DHCP host is not (mac, ip, name): {entry!r}")
            mac, ip, hostname = entry
            if not _MAC.match(mac):
                raise ValueError(f"network {self.name}: DHCP MAC must be lower-case: {mac!r}")
            if _ipv4(f"network {self.name} DHCP host", ip) not in subnet:
                raise ValueError(f"network {self.name}: DHCP host {ip} is outside {subnet}")
            if not _HOSTNAME.match(hostname):
                raise ValueError(f"network {self.name}: bad DHCP host name {hostname!r}")
            if mac in macs or ip in ips:
                raise ValueError(f"network {self.name}: duplicate DHCP MAC or IP in {entry!r}")
            macs.add(mac)
            ips.add(ip)
        if self.forward is not None and self.forward not in _FORWARD_MODES:
            raise ValueError(f"network {self.name}: forward must be in {_FORWARD_MODES} or None")
        if self.forward_dev is not None:
            if self.forward is None:
                raise ValueError(f"network {self.name}: forward_dev needs a forward mode")
            if not _BRIDGE.match(self.forward_dev):
                raise ValueError(f"network {self.name}: bad forward_dev {self.forward_dev!r}")


def network_xml(spec: NetworkSpec) -> str:
    """The libvirt network definition for ``spec`` (isolated when ``spec.forward`` is None)."""
    net = ET.Element("network")
    ET.SubElement(net, "name").text = spec.name
    if spec.forward is not None:
        forward = ET.SubElement(net, "forward", mode=spec.forward)
        if spec.forward_dev is not None:
            forward.set("dev", spec.forward_dev)
    ET.SubElement(net, "bridge", name=spec.bridge, stp="off", delay="0")
    ip = ET.SubElement(net, "ip", address=spec.address, prefix=str(spec.prefix))
    if spec.dhcp_hosts:
        dhcp = ET.SubElement(ip, "dhcp")
        for mac, host_ip, hostname in spec.dhcp_hosts:
            ET.SubElement(dhcp, "host", mac=mac, name=hostname, ip=host_ip)
    return ET.tostring(net, encoding="unicode")


@dataclass(frozen=True)
class _Facts:
    """The parts of a network definition the factory cares about, normalised for comparing."""

    forward: Optional[str]
    forward_dev: Optional[str]
    bridge: Optional[str]
    address: Optional[str]
    prefix: Optional[int]
    dhcp_hosts: FrozenSet[Tuple[str, str, str]]


def _facts(xml: str) -> _Facts:
    root = ET.fromstring(xml)
    forward = root.find("forward")
    bridge = root.find("bridge")
    ips = [e for e in root.findall("ip") if e.get("family", "ipv4") == "ipv4"]
    address = prefix = None
    hosts: FrozenSet[Tuple[str, str, str]] = frozenset()
    if ips:
        ip = ips[0]
        address = ip.get("address")
        if ip.get("prefix") is not None:
            prefix = int(ip.get("prefix", "0"))
        elif ip.get("netmask") is not None:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{ip.get('netmask')}").prefixlen
        hosts = frozenset(
            ((h.get("mac") or "").lower(), h.get("ip") or "", h.get("name") or "")
            for h in ip.findall("dhcp/host")
        )
    return _Facts(
        forward=None if forward is None else forward.get("mode", "nat"),
        forward_dev=None if forward is None else forward.get("dev"),
        bridge=None if bridge is None else bridge.get("name"),
        address=address,
        prefix=prefix,
        dhcp_hosts=hosts,
    )


def network_problems(spec: NetworkSpec, actual_xml: str, dhcp: bool = True) -> List[str]:
    """How an existing network's definition differs from ``spec``; empty when it matches.

    Only what the factory depends on is compared (forwarding, bridge, address, and the DHCP
    hosts unless ``dhcp`` is False), so what libvirt adds by itself (bridge MAC, NAT port
    range, UUID) never triggers a repair.
    """
    want, have = _facts(network_xml(spec)), _facts(actual_xml)
    problems = []
    for field in ("forward", "forward_dev", "bridge", "address", "prefix"):
        if getattr(want, field) != getattr(have, field):
            problems.append(f"{field} is {getattr(have, field)!r}, want {getattr(want, field)!r}")
    if dhcp and want.dhcp_hosts != have.dhcp_hosts:
        missing = len(want.dhcp_hosts - have.dhcp_hosts)
        extra = len(have.dhcp_hosts - want.dhcp_hosts)
        problems.append(f"DHCP hosts differ ({missing} missing, {extra} unexpected)")
    return problems


def dhcp_host_changes(
    spec: NetworkSpec, actual_xml: str
) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str, str]]]:
    """The DHCP hosts to delete from and to add to an existing network, in a stable order.

    These can be applied to a running network (``virNetworkUpdate``), which keeps the VMs on
    it connected; destroying and restarting the network would cut every one of them off.
    """
    have = _facts(actual_xml).dhcp_hosts
    want = frozenset(spec.dhcp_hosts)
    return sorted(have - want), sorted(want - have)


def dhcp_host_xml(host: Tuple[str, str, str]) -> str:
    """One ``<host mac= name= ip=/>`` element, as virNetworkUpdate wants it."""
    mac, ip, name = host
    return ET.tostring(ET.Element("host", mac=mac, name=name, ip=ip), encoding="unicode")


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


def _check_bridge(bridge: str) -> None:
    if not _BRIDGE.match(bridge):
        raise ValueError(f"bad bridge name {bridge!r}")


def _ip_command() -> str:
    # A daemon may run with a PATH that lacks the sbin directories.
    found = shutil.which("ip", path=os.pathsep.join([os.defpath, "/usr/sbin", "/sbin"]))
    if found is None:
        raise HypervisorError("the ip command (iproute2) is not installed")
    return found


def _run_ip(args: List[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [_ip_command()] + args, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HypervisorError(f"ip {' '.join(args)}: {exc}") from exc


def link_kind(device: str) -> Optional[str]:
    """The kind of network device ``device`` ("bridge", "veth", ...; "" for a plain NIC), None
    if there is no such device."""
    _check_bridge(device)
    result = _run_ip(["-j", "-d", "link", "show", "dev", device])
    if result.returncode != 0:
        return None
    try:
        links = json.loads(result.stdout or "[]")
        return str(links[0].get("linkinfo", {}).get("info_kind", "")) if links else None
    except (ValueError, IndexError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"ip link show dev {device}: unreadable output: {exc}") from exc


def bridge_addresses(bridge: str) -> FrozenSet[str]:
    """The IPv4 addresses on ``bridge`` (``ip -j addr show dev BRIDGE``)."""
    _check_bridge(bridge)
    result = _run_ip(["-j", "-4", "addr", "show", "dev", bridge])
    if result.returncode != 0:
        raise HypervisorError(f"ip addr show dev {bridge}: {result.stderr.strip()}")
    try:
        links = json.loads(result.stdout or "[]")
        return frozenset(
            info["local"]
            for link in links
            for info in link.get("addr_info", [])
            if info.get("family") == "inet" and "local" in info
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"ip addr show dev {bridge}: unreadable output: {exc}") from exc


def add_bridge_address(bridge: str, address: str) -> None:
    """Put ``address``/32 on ``bridge`` (a /32 so it adds no second route to the subnet)."""
    _check_bridge(bridge)
    addr = _ipv4("bridge address", address)
    result = _run_ip(["addr", "add", f"{addr}/32", "dev", bridge])
    if result.returncode != 0:
        raise HypervisorError(f"ip addr add {addr}/32 dev {bridge}: {result.stderr.strip()}")
    log.info("%s: added address %s/32", bridge, addr)


def delete_bridge(bridge: str) -> None:
    """Delete a stale bridge device that blocks (re)starting the network.

    Only called for the bridge named in the factory's own NetworkSpec when no libvirt network
    claims it: the leftover of a crash, the case Vac's ``fixNetworkingCommands`` handled.
    """
    kind = link_kind(bridge)
    if kind is None:
        return
    if kind != "bridge":
        # the kernel ignores "type" on delete: never remove a NIC that happens to match
        what = kind or "physical"
        raise HypervisorError(f"{bridge} is a {what} device, not a bridge: not deleting it")
    result = _run_ip(["link", "delete", "dev", bridge])
    if result.returncode != 0:
        raise HypervisorError(f"ip link delete {bridge}: {result.stderr.strip()}")
    log.warning("%s: deleted a stale bridge device", bridge)
