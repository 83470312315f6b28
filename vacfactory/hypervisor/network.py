"""The factory's private VM network: its description, its XML, and the host-side checks.

Like Vac's ``vac_169.254.0.0`` network, it is created and repaired by the factory: a libvirt
network with a bridge holding the metadata address (169.254.169.254 by default), static DHCP
entries that give slot N the fixed MAC ``56:4d:<IP bytes>`` and the fixed IP ``.N+1``, NAT
(or nothing: ``forward=None`` makes it isolated), and extra /32 addresses on the bridge for
services the VMs reach (169.254.169.253: MJF and joboutputs over HTTP).

The DHCP section has only static hosts, no range: dnsmasq then answers only known MACs, so a
VM cannot take another slot's address by DHCP.

This module is pure except for the bridge and slot-port helpers at the end, which run ``ip``
(argument lists, validated values) and read ``/sys/class/net``. The libvirt side (define, start, update, repair) lives in
:mod:`.libvirt_hv`, which uses :func:`network_problems` and :func:`dhcp_host_changes` to
decide.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

from ..core import values
from ..errors import HypervisorError
from .addressing import (  # noqa: F401 - the pure values, re-exported
    MAX_SLOT,
    SLOT_PORT_PREFIX,
    NetworkSpec,
    _MAC,
    _SLOT_PORT,
    _ipv4,
    check_port,
    slot_ip,
    slot_mac,
    slot_port,
)

log = logging.getLogger(__name__)

_SYS_NET = "/sys/class/net"

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
    "slot_port",
    "ensure_tap",
    "port_master",
    "slot_ports",
    "held_ports",
    "binding_xml",
    "binding_facts",
]


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


def _check_bridge(bridge: str) -> None:
    values.check_interface_name(bridge, "bridge")


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


# -- slot ports ---------------------------------------------------------------------------
#
# Each slot's NIC is a persistent tap the factory creates once and keeps on the bridge, with
# its nwfilter binding (clean-traffic, the slot's MAC and IP) made once by the hypervisor
# adapter. libvirt then opens it (``<interface type='ethernet'>``, ``managed='no'``) instead of
# making a tap and instantiating the filter at every start: about 1.1 s less per creation here
# (a filter's rules are dozens of ebtables/iptables runs), which is most of a refill.


def port_master(port: str) -> Optional[str]:
    """The bridge ``port`` is attached to ("" if none), None if there is no such device."""
    check_port(port)
    base = os.path.join(_SYS_NET, port)
    if not os.path.exists(base):
        return None
    try:
        return os.path.basename(os.readlink(os.path.join(base, "master")))
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise HypervisorError(f"{port}: cannot read its bridge: {exc}") from exc


def slot_ports() -> List[str]:
    """The slot ports that exist on this host."""
    try:
        names = os.listdir(_SYS_NET)
    except OSError:
        return []
    return sorted(name for name in names if _SLOT_PORT.match(name))


def ensure_tap(port: str, bridge: str) -> bool:
    """Make ``port`` a persistent tap on ``bridge``, up; True if the tap had to be created.

    A device of that name that is not a tap is refused (never touched). Idempotent: when all
    is in place it costs two reads in /sys.
    """
    check_port(port)
    _check_bridge(bridge)
    created = False
    master = port_master(port)
    if master is None:
        result = _run_ip(["tuntap", "add", "dev", port, "mode", "tap", "vnet_hdr"])
        if result.returncode != 0 and port_master(port) is None:
            raise HypervisorError(f"ip tuntap add dev {port}: {result.stderr.strip()}")
        created, master = True, ""
        log.info("%s: created the slot's tap", port)
    elif not os.path.exists(os.path.join(_SYS_NET, port, "tun_flags")):
        raise HypervisorError(f"{port} exists and is not a tap device: not using it")
    if master != bridge or not _is_up(port):
        result = _run_ip(["link", "set", "dev", port, "master", bridge, "up"])
        if result.returncode != 0:
            raise HypervisorError(f"ip link set dev {port} master {bridge}: {result.stderr.strip()}")
        if not created:
            log.warning("%s: was on %r%s, put back on %s, up", port, master or "no bridge",
                        "" if master != bridge else " but down", bridge)
    return created


def _is_up(port: str) -> bool:
    """Is the device administratively up (IFF_UP in /sys/class/net/PORT/flags)?"""
    try:
        with open(os.path.join(_SYS_NET, port, "flags")) as f:
            return bool(int(f.read().strip(), 16) & 0x1)
    except (OSError, ValueError):
        return False


def held_ports(bridge: str) -> List[str]:
    """The slot ports on ``bridge`` ("": on no bridge) that a running VM holds (carrier up:
    QEMU has the tap open)."""
    if bridge:
        _check_bridge(bridge)
    held = []
    for port in slot_ports():
        if port_master(port) != bridge:
            continue
        try:
            with open(os.path.join(_SYS_NET, port, "carrier")) as f:
                if f.read().strip() == "1":
                    held.append(port)
        except OSError:  # EINVAL while the link is down: nobody holds it
            continue
    return held


#: the nwfilter every slot port is bound to (MAC, IP, ARP and L2 spoofing all dropped)
SLOT_FILTER = "clean-traffic"
_BINDING_OWNER = uuidlib.UUID("5f1c3e0a-7d2b-4c59-9a51-0c2f6e9b8d41")


def binding_xml(port: str, mac: str, ip: str) -> str:
    """The nwfilter binding of slot port ``port``: clean-traffic for exactly ``mac`` and ``ip``."""
    check_port(port)
    if not _MAC.match(mac):
        raise ValueError(f"{port}: binding MAC must be lower-case: {mac!r}")
    address = _ipv4(f"{port} binding IP", ip)
    root = ET.Element("filterbinding")
    owner = ET.SubElement(root, "owner")
    ET.SubElement(owner, "name").text = port
    ET.SubElement(owner, "uuid").text = str(uuidlib.uuid5(_BINDING_OWNER, port))
    ET.SubElement(root, "portdev", name=port)
    ET.SubElement(root, "mac", address=mac)
    filterref = ET.SubElement(root, "filterref", filter=SLOT_FILTER)
    ET.SubElement(filterref, "parameter", name="IP", value=str(address))
    return ET.tostring(root, encoding="unicode")


def binding_facts(xml: str) -> Tuple[Optional[str], Optional[str], Optional[str], FrozenSet[str]]:
    """(port, MAC, filter, IP parameters) of a binding, to compare with what a slot needs."""
    root = ET.fromstring(xml)
    portdev, mac, filterref = root.find("portdev"), root.find("mac"), root.find("filterref")
    ips = frozenset(
        p.get("value") or "" for p in (filterref.findall("parameter") if filterref is not None else [])
        if p.get("name") == "IP"
    )
    return (
        None if portdev is None else portdev.get("name"),
        None if mac is None else (mac.get("address") or "").lower(),
        None if filterref is None else filterref.get("filter"),
        ips,
    )
