"""Predict what a valid configuration will break at run time (``vacfactory config check``).

The loader answers "does this configuration parse and obey the option rules?". This package
answers "will the daemon work with it on this host?", one module per kind of check:

- ``files``: state_dir, each machinetype's images, kernel, user_data and proxy files, keys,
  the NFS server's program, the APEL sender's certificate and key;
- ``qemu``: directories QEMU's user cannot pass through (qemu:///system);
- ``capacity``: every share 0, processors and memory no VM can use;
- ``pipes``: the last failed fetch of a vacuum pipe;
- ``comments``: `` #`` inside a value (also run on configurations that do not load);
- ``containers``: the container runtime's socket for docker machinetypes (online: it answers
  and has their images);
- ``online``: libvirt at libvirt_uri, the daemon's ports, host names (``--online``).

Every check returns :class:`Finding` values naming the file and line of the option concerned.
An *error* is something the daemon will fail at (a VM creation, a server, the start itself);
a *warning* works, but probably not as meant (all shares 0, processors no VM can use, memory
overcommitted); a *note* is information. Nothing is changed: the only file written is a
probe in state_dir, removed at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from vacfactory.config.model import Config

from .capacity import memory, processors, shares
from .comments import inline_comments
from .containers import container_runtime, container_socket
from .files import MAX_TEMPLATE_BYTES, ImageProbe, apel_sender, keys, machinetype_files, nfs_server, state_dir
from .findings import ERROR, NOTE, SEVERITIES, WARNING, Finding, Locator, as_mapping, count, ordered
from .pipes import pipes, utc
from .qemu import QemuUser, find_qemu_user, qemu_access

__all__ = [
    "ERROR", "NOTE", "SEVERITIES", "WARNING", "MAX_TEMPLATE_BYTES",
    "Finding", "HostProbes", "Locator", "QemuUser",
    "apel_sender", "as_mapping", "container_runtime", "container_socket", "count", "default_probes", "find_qemu_user", "inline_comments", "keys",
    "machinetype_files", "memory", "nfs_server", "ordered", "pipes", "predict", "processors", "qemu_access",
    "shares", "state_dir", "utc",
]


@dataclass(frozen=True)
class HostProbes:
    """What the checks ask the host; tests pass other values (never mocks of the checks)."""

    #: this host's memory in MiB (0: unknown)
    memory_mb: int
    image_format: ImageProbe
    #: the user qemu runs as (None: not installed, nothing to check)
    qemu_user: Optional[QemuUser] = None


def default_probes() -> HostProbes:
    from vacfactory.config.hostfacts import memory_total_mb
    from vacfactory.hypervisor.disks import image_format

    return HostProbes(memory_mb=memory_total_mb(), image_format=image_format, qemu_user=find_qemu_user())


def predict(config: Config, files: Sequence[str], probes: Optional[HostProbes] = None) -> List[Finding]:
    """Every offline finding about a valid configuration (not the `` #`` scan: see
    :func:`inline_comments`, which also runs on configurations that do not load)."""
    probes = probes or default_probes()
    locator = Locator(config, files)
    findings: List[Finding] = []
    findings += state_dir(config.settings.state_dir, locator)
    findings += machinetype_files(config, locator, probes.image_format)
    findings += qemu_access(config, locator, probes.qemu_user)
    findings += keys(config, locator)
    findings += nfs_server(config, locator)
    findings += container_socket(config, locator)
    findings += apel_sender(config, locator)
    findings += shares(config, locator)
    findings += processors(config, locator)
    findings += memory(config, locator, probes.memory_mb)
    findings += pipes(config, locator)
    return findings
