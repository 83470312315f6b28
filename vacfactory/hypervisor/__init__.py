"""The hypervisor boundary: a narrow interface and its libvirt implementation.

The engine imports from here only. This package is the only place in vacfactory that imports
``libvirt`` or runs ``qemu-img``; :class:`LibvirtHypervisor` is imported lazily so that code
which only needs the value types (and tests of it) runs where libvirt-python is missing.
"""

from __future__ import annotations

from typing import Any

from .base import (
    EVENT_KINDS,
    DiskSpec,
    DomainEvent,
    DomainInfo,
    DomainState,
    FilesystemSpec,
    Hypervisor,
    InterfaceSpec,
    VMSpec,
)
from .disks import create_overlay, create_scratch, image_format, remove_disk
from .domainxml import domain_xml
from .network import MAX_SLOT, NetworkSpec, network_xml, slot_ip, slot_mac

__all__ = [
    "EVENT_KINDS",
    "DiskSpec",
    "DomainEvent",
    "DomainInfo",
    "DomainState",
    "FilesystemSpec",
    "Hypervisor",
    "InterfaceSpec",
    "LibvirtHypervisor",
    "MAX_SLOT",
    "NetworkSpec",
    "VMSpec",
    "create_overlay",
    "create_scratch",
    "domain_xml",
    "image_format",
    "network_xml",
    "remove_disk",
    "slot_ip",
    "slot_mac",
]


def __getattr__(name: str) -> Any:
    if name == "LibvirtHypervisor":
        from .libvirt_hv import LibvirtHypervisor

        return LibvirtHypervisor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
