"""Making a VM's disks before its domain starts, from the sources its spec describes.

The engine describes disks (hypervisor.base.Overlay, Scratch, ConfigDrive); the hypervisor
makes them here, with qemu-img (hypervisor.disks) and the config-drive builder. A disk file
that exists already is an error: a machine directory is prepared fresh for each VM, so an
existing file means the same VM is being created twice.
"""

from __future__ import annotations

import json
import os

from vacfactory.errors import HypervisorError
from vacfactory.hypervisor import disks
from vacfactory.hypervisor.base import ConfigDrive, DiskSpec, Overlay, Scratch, VMSpec


def make_disks(spec: VMSpec) -> None:
    """Create every disk of ``spec`` that has a source, in order."""
    for disk in spec.disks:
        if disk.source is not None:
            make_disk(disk)


def make_disk(disk: DiskSpec) -> None:
    source = disk.source
    if os.path.lexists(disk.path):
        raise HypervisorError(f"{disk.path}: disk exists already")
    if isinstance(source, Overlay):
        fmt = disks.image_format(source.backing, source.max_virtual_bytes)
        disks.create_overlay(source.backing, disk.path, fmt)
    elif isinstance(source, Scratch):
        disks.create_scratch(disk.path, source.size_bytes)
    elif isinstance(source, ConfigDrive):
        from vacfactory.vmio import configdrive

        configdrive.build_config_drive(disk.path, source.user_data, json.loads(source.meta_data))
    else:  # pragma: no cover - DiskSource is a closed union
        raise HypervisorError(f"{disk.path}: unknown disk source {source!r}")


def remove_disks(directory: str) -> None:
    """Delete every file in a VM's disks directory (nothing if it is gone)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        disks.remove_disk(os.path.join(directory, name))
