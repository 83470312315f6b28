"""The hypervisor boundary: a narrow interface, its libvirt and container implementations.

The engine imports from here only. This package is the only place in vacfactory that imports
``libvirt`` or runs ``qemu-img``; :class:`LibvirtHypervisor`, the qemu-img helpers and the
network module (which runs ``ip``) are imported lazily, so that code which only needs the
interface and its value types (and tests of it) imports nothing that runs subprocesses, and
runs where libvirt-python is missing. Likewise :class:`ContainerHypervisor` (the only importer
of ``docker``) and :class:`RoutingHypervisor`.
"""

from __future__ import annotations

from typing import Any

from .base import (
    EVENT_KINDS,
    BindSpec,
    ContainerSpec,
    DiskSpec,
    DomainEvent,
    DomainInfo,
    DomainState,
    FilesystemSpec,
    Hypervisor,
    InterfaceSpec,
    MachineSpec,
    VMSpec,
)
from .addressing import MAX_SLOT, NetworkSpec, slot_ip, slot_mac
from .domainxml import domain_xml

_LAZY = {
    "ContainerHypervisor": "containers",
    "RoutingHypervisor": "routing",
    "LibvirtHypervisor": "libvirt_hv",
    "create_overlay": "disks",
    "create_scratch": "disks",
    "image_format": "disks",
    "remove_disk": "disks",
    "network_xml": "network",
}

__all__ = [
    "EVENT_KINDS",
    "BindSpec",
    "ContainerHypervisor",
    "ContainerSpec",
    "DiskSpec",
    "DomainEvent",
    "DomainInfo",
    "DomainState",
    "FilesystemSpec",
    "Hypervisor",
    "InterfaceSpec",
    "LibvirtHypervisor",
    "MAX_SLOT",
    "MachineSpec",
    "NetworkSpec",
    "VMSpec",
    "create_overlay",
    "create_scratch",
    "domain_xml",
    "image_format",
    "network_xml",
    "remove_disk",
    "RoutingHypervisor",
    "slot_ip",
    "slot_mac",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
