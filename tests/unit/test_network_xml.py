"""The private network's XML, how an existing definition is compared with the wanted one,
and the slot -> IP/MAC mapping (Vac's scheme)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from vacfactory.hypervisor import MAX_SLOT, NetworkSpec, network_xml, slot_ip, slot_mac
from vacfactory.hypervisor.network import dhcp_host_changes, dhcp_host_xml, network_problems

BASE = "10.254.77.0"


def spec(**changes) -> NetworkSpec:
    hosts = tuple((slot_mac(i, BASE), slot_ip(i, BASE), f"vfhv-{i:02d}") for i in range(3))
    value = NetworkSpec(name="vfhv-net", bridge="vfhvbr0", address="10.254.77.254",
                        dhcp_hosts=hosts, extra_addresses=("10.254.77.253",))
    return replace(value, **changes)


def test_nat_network_xml():
    root = ET.fromstring(network_xml(spec()))
    assert root.findtext("name") == "vfhv-net"
    assert root.find("forward").attrib == {"mode": "nat"}
    assert root.find("bridge").attrib == {"name": "vfhvbr0", "stp": "off", "delay": "0"}
    ip = root.find("ip")
    assert ip.attrib == {"address": "10.254.77.254", "prefix": "24"}
    hosts = [h.attrib for h in ip.findall("dhcp/host")]
    assert hosts == [
        {"mac": "56:4d:0a:fe:4d:01", "name": "vfhv-00", "ip": "10.254.77.1"},
        {"mac": "56:4d:0a:fe:4d:02", "name": "vfhv-01", "ip": "10.254.77.2"},
        {"mac": "56:4d:0a:fe:4d:03", "name": "vfhv-02", "ip": "10.254.77.3"},
    ]
    # static hosts only: an unknown MAC gets no lease
    assert ip.find("dhcp/range") is None


def test_isolated_network_has_no_forward():
    root = ET.fromstring(network_xml(spec(forward=None)))
    assert root.find("forward") is None
    assert root.find("bridge").get("name") == "vfhvbr0"


def test_forward_dev():
    root = ET.fromstring(network_xml(spec(forward_dev="eth0")))
    assert root.find("forward").attrib == {"mode": "nat", "dev": "eth0"}


def test_no_dhcp_section_without_hosts():
    root = ET.fromstring(network_xml(spec(dhcp_hosts=())))
    assert root.find("ip/dhcp") is None


def test_vac_defaults():
    value = NetworkSpec(name="vac_169.254.0.0", bridge="vacbr0")
    assert (value.address, value.prefix, value.extra_addresses, value.forward) == (
        "169.254.169.254", 24, ("169.254.169.253",), "nat")


# -- comparing with what libvirt reports -------------------------------------------------

LIBVIRT_DUMP = """<network>
  <name>vfhv-net</name>
  <uuid>85200343-dc4b-42d1-b975-cec4c04004e2</uuid>
  <forward mode='nat'>
    <nat>
      <port start='1024' end='65535'/>
    </nat>
  </forward>
  <bridge name='vfhvbr0' stp='off' delay='0'/>
  <mac address='52:54:00:28:a4:68'/>
  <ip address='10.254.77.254' prefix='24'>
    <dhcp>
      <host mac='56:4d:0a:fe:4d:03' name='vfhv-02' ip='10.254.77.3'/>
      <host mac='56:4D:0A:FE:4D:01' name='vfhv-00' ip='10.254.77.1'/>
      <host mac='56:4d:0a:fe:4d:02' name='vfhv-01' ip='10.254.77.2'/>
    </dhcp>
  </ip>
</network>"""


def test_what_libvirt_adds_is_not_a_difference():
    """UUID, bridge MAC, NAT port range, host order and MAC case must not cause a repair."""
    assert network_problems(spec(), LIBVIRT_DUMP) == []


def test_our_own_xml_matches_itself():
    for value in (spec(), spec(forward=None), spec(forward_dev="eth0"), spec(dhcp_hosts=())):
        assert network_problems(value, network_xml(value)) == []


def test_netmask_form_is_understood():
    dump = LIBVIRT_DUMP.replace("prefix='24'", "netmask='255.255.255.0'")
    assert network_problems(spec(), dump) == []


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda x: x.replace("10.254.77.254", "10.254.78.254"), "address"),
        (lambda x: x.replace("prefix='24'", "prefix='16'"), "prefix"),
        (lambda x: x.replace("name='vfhvbr0'", "name='virbr9'"), "bridge"),
        (lambda x: x.replace("mode='nat'", "mode='route'"), "forward"),
        (lambda x: x.replace("ip='10.254.77.3'", "ip='10.254.77.9'"), "DHCP"),
        (lambda x: x.replace("<host mac='56:4d:0a:fe:4d:03' name='vfhv-02' ip='10.254.77.3'/>", ""),
         "DHCP"),
        (lambda x: x.replace("name='vfhv-01'", "name='other'"), "DHCP"),
    ],
)
def test_differences_are_reported(edit, fragment):
    problems = network_problems(spec(), edit(LIBVIRT_DUMP))
    assert len(problems) == 1 and fragment in problems[0]


def test_dhcp_can_be_left_out_of_the_comparison():
    edited = LIBVIRT_DUMP.replace("ip='10.254.77.3'", "ip='10.254.77.9'")
    assert network_problems(spec(), edited, dhcp=False) == []


def test_dhcp_host_changes():
    edited = LIBVIRT_DUMP.replace("ip='10.254.77.3'", "ip='10.254.77.9'")
    remove, add = dhcp_host_changes(spec(), edited)
    assert remove == [("56:4d:0a:fe:4d:03", "10.254.77.9", "vfhv-02")]
    assert add == [("56:4d:0a:fe:4d:03", "10.254.77.3", "vfhv-02")]
    assert dhcp_host_changes(spec(), LIBVIRT_DUMP) == ([], [])
    remove, add = dhcp_host_changes(spec(dhcp_hosts=()), LIBVIRT_DUMP)
    assert len(remove) == 3 and add == []


def test_dhcp_host_xml():
    host = ET.fromstring(dhcp_host_xml(("56:4d:0a:fe:4d:01", "10.254.77.1", "vfhv-00")))
    assert host.tag == "host"
    assert host.attrib == {"mac": "56:4d:0a:fe:4d:01", "ip": "10.254.77.1", "name": "vfhv-00"}


def test_isolated_network_differs_from_nat():
    problems = network_problems(spec(forward=None), LIBVIRT_DUMP)
    assert problems and "forward" in problems[0]


# -- slots -----------------------------------------------------------------------------------


def test_slot_ip_is_slot_plus_one():
    assert slot_ip(0) == "169.254.169.1"
    assert slot_ip(4) == "169.254.169.5"
    assert slot_ip(MAX_SLOT) == "169.254.169.252"
    assert slot_ip(0, BASE) == "10.254.77.1"


@pytest.mark.parametrize("slot", [-1, MAX_SLOT + 1, 300, True, "1", 1.0])
def test_slot_out_of_range(slot):
    with pytest.raises(ValueError):
        slot_ip(slot)


@pytest.mark.parametrize("base", ["169.254.169.1", "not-an-ip", "169.254.169.0/24", "::1"])
def test_slot_base_must_be_a_dot_zero_address(base):
    with pytest.raises(ValueError):
        slot_ip(0, base)


def test_slot_mac_is_564d_plus_ip_bytes_like_vac():
    # Vac: 169.254.169.5 -> 56:4D:A9:FE:A9:05 (we write lower case, as libvirt stores it)
    assert slot_mac(4) == "56:4d:a9:fe:a9:05"
    assert slot_mac(0, BASE) == "56:4d:0a:fe:4d:01"


def test_every_slot_has_a_distinct_unicast_mac_and_ip():
    macs = {slot_mac(i) for i in range(MAX_SLOT + 1)}
    ips = {slot_ip(i) for i in range(MAX_SLOT + 1)}
    assert len(macs) == len(ips) == MAX_SLOT + 1
    assert "169.254.169.253" not in ips and "169.254.169.254" not in ips
    assert all(int(mac[:2], 16) & 1 == 0 for mac in macs)


# -- the spec's own validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "bad name"},
        {"bridge": "-evil"},
        {"bridge": "a-very-long-bridge-name"},  # > 15 characters
        {"address": "10.254.77"},
        {"prefix": 33},
        {"extra_addresses": ("nope",)},
        {"forward": "bridge"},
        {"forward": None, "forward_dev": "eth0"},
        {"forward_dev": "-x"},
        {"dhcp_hosts": (("56:4D:0A:FE:4D:01", "10.254.77.1", "a"),)},  # upper-case MAC
        {"dhcp_hosts": (("56:4d:0a:fe:4d:01", "10.254.78.1", "a"),)},  # outside the subnet
        {"dhcp_hosts": (("56:4d:0a:fe:4d:01", "10.254.77.1", "-a"),)},
        {"dhcp_hosts": (("56:4d:0a:fe:4d:01", "10.254.77.1", "a"),
                        ("56:4d:0a:fe:4d:01", "10.254.77.2", "b"))},  # duplicate MAC
        {"dhcp_hosts": (("56:4d:0a:fe:4d:01", "10.254.77.1"),)},
    ],
)
def test_network_spec_rejects(changes):
    with pytest.raises(ValueError):
        spec(**changes)


def test_slot_ports_are_named_by_slot_and_fit_an_interface_name():
    from vacfactory.hypervisor.network import slot_port

    assert slot_port(0) == "vfslot000" and slot_port(MAX_SLOT) == f"vfslot{MAX_SLOT:03d}"
    assert len(slot_port(MAX_SLOT)) <= 15
    for bad in (-1, MAX_SLOT + 1, True, "3"):
        with pytest.raises(ValueError):
            slot_port(bad)


def test_a_slot_binding_pins_clean_traffic_to_the_slots_mac_and_ip():
    from vacfactory.hypervisor.network import SLOT_FILTER, binding_facts, binding_xml

    xml = binding_xml("vfslot004", slot_mac(4), slot_ip(4))
    root = ET.fromstring(xml)
    assert root.find("portdev").get("name") == "vfslot004"
    assert root.find("owner/name").text == "vfslot004"
    assert binding_facts(xml) == ("vfslot004", slot_mac(4), SLOT_FILTER, frozenset([slot_ip(4)]))
    # the owner UUID is stable, so a re-made binding of the slot is the same owner
    assert ET.fromstring(binding_xml("vfslot004", slot_mac(4), slot_ip(4))).find("owner/uuid").text == \
        root.find("owner/uuid").text
    # what a foreign or stale binding looks like differs from what the slot needs
    other = xml.replace(slot_ip(4), "169.254.169.99")
    assert binding_facts(other) != binding_facts(xml)
    for bad in (("vnet3", slot_mac(4), slot_ip(4)), ("vfslot004", "56:4D:A9:FE:A9:05", slot_ip(4)),
                ("vfslot004", slot_mac(4), "not-an-ip")):
        with pytest.raises(ValueError):
            binding_xml(*bad)
