"""A hypervisor in memory, for running the whole engine in unit tests without libvirt.

It keeps the :class:`~vacfactory.hypervisor.base.Hypervisor` contract the engine relies on:
``create`` makes the disks the spec describes (as small placeholder files, so cleaning and
keeping disks are real file operations) and refuses a UUID or name already running; events
go to the callback (from the caller's thread, as libvirt's thread would); ``destroy`` is
idempotent. It takes a ``ContainerSpec`` too (a container has no disks; its vcpus are its
processors), and ``image_status`` answers from ``image_reasons`` (no entry: present). A test drives what the VMs do (:meth:`power_off`, :meth:`crash`, :meth:`pause`)
and the hypervisor's health (``reachable``, ``fail_creates``); ``calls`` records what the
engine asked. Thread-safe: the engine starts domains from several threads at once.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Union

from vacfactory.errors import HypervisorError
from vacfactory.hypervisor.base import (
    ContainerSpec,
    DomainEvent,
    DomainInfo,
    DomainState,
    NetworkSpec,
    VMSpec,
    check_uuid,
)


class FakeHypervisor:
    """Domains in a dict; everything else a test can set."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.domains: Dict[str, DomainInfo] = {}
        self.specs: Dict[str, Union[VMSpec, ContainerSpec]] = {}
        #: image reference -> why it is not ready (image_status); no entry: present
        self.image_reasons: Dict[str, str] = {}
        #: False: every call fails as if libvirtd were down
        self.reachable = True
        #: a creation whose VM name contains a key fails with that message
        self.fail_creates: Dict[str, str] = {}
        self.calls: List[str] = []
        self.networks: List[NetworkSpec] = []
        self._callback: Optional[Callable[[DomainEvent], None]] = None
        self._lock = threading.Lock()

    def _check(self, what: str) -> None:
        if not self.reachable:
            raise HypervisorError(f"{what}: cannot connect (the fake is unreachable)", uri="fake:///")

    # -- the Hypervisor protocol ---------------------------------------------------------

    def create(self, spec: Union[VMSpec, ContainerSpec]) -> None:
        self._check("create")
        for key, message in self.fail_creates.items():
            if key in spec.name:
                raise HypervisorError(f"create failed: {message}", domain=spec.name, uri="fake:///")
        with self._lock:
            if spec.uuid in self.domains or any(d.name == spec.name for d in self.domains.values()):
                raise HypervisorError("create failed: domain exists", domain=spec.name, uri="fake:///")
            self.calls.append(f"create {spec.name}")
        if isinstance(spec, ContainerSpec):
            if spec.image in self.image_reasons:
                raise HypervisorError(f"image {spec.image} is not present", domain=spec.name, uri="fake:///")
            vcpus = spec.processors
        else:
            vcpus = spec.vcpus
        for disk in getattr(spec, "disks", ()):
            if disk.source is not None:
                with open(disk.path, "xb") as f:  # never over an existing disk
                    f.write(type(disk.source).__name__.encode())
        with self._lock:
            self.specs[spec.uuid] = spec
            self.domains[spec.uuid] = DomainInfo(name=spec.name, uuid=spec.uuid, state=DomainState.RUNNING,
                                                 cpu_seconds=0.0, vcpus=vcpus, memory_kib=spec.memory_mib * 1024)
        self._event(spec.uuid, spec.name, "started")

    def destroy(self, uuid: str) -> bool:
        self._check("destroy")
        uuid = check_uuid(uuid)
        with self._lock:
            domain = self.domains.pop(uuid, None)
            self.calls.append(f"destroy {uuid}")
        if domain is None:
            return False
        self._event(uuid, domain.name, "stopped")
        return True

    def list_domains(self) -> List[DomainInfo]:
        self._check("list")
        with self._lock:
            return list(self.domains.values())

    def domain_info(self, uuid: str) -> Optional[DomainInfo]:
        self._check("lookup")
        with self._lock:
            return self.domains.get(check_uuid(uuid))

    def remove_disks(self, directory: str) -> None:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            os.unlink(os.path.join(directory, name))

    def image_status(self, reference: str) -> Optional[str]:
        self._check("image")
        return self.image_reasons.get(reference)

    def describe(self) -> str:
        self._check("describe")
        return "Fake 1.0.0"

    def set_event_callback(self, callback: Callable[[DomainEvent], None]) -> None:
        self._callback = callback

    def ping(self) -> bool:
        return self.reachable

    def ensure_network(self, spec: NetworkSpec) -> None:
        self._check("network")
        self.networks.append(spec)

    def close(self) -> None:
        pass

    # -- what the VMs do -----------------------------------------------------------------

    def power_off(self, uuid: str, cpu_seconds: Optional[float] = None) -> None:
        """The guest powers off: shutdown (with its final CPU time), then stopped."""
        with self._lock:
            domain = self.domains.pop(uuid)
        self._event(uuid, domain.name, "shutdown", cpu_seconds)
        self._event(uuid, domain.name, "stopped")

    def crash(self, uuid: str) -> None:
        with self._lock:
            domain = self.domains.pop(uuid)
        self._event(uuid, domain.name, "crashed")

    def set_cpu(self, uuid: str, cpu_seconds: float) -> None:
        with self._lock:
            self.domains[uuid] = replace(self.domains[uuid], cpu_seconds=cpu_seconds)

    def pause(self, uuid: str) -> None:
        with self._lock:
            self.domains[uuid] = replace(self.domains[uuid], state=DomainState.PAUSED)
        self._event(uuid, self.domains[uuid].name, "suspended")

    def _event(self, uuid: str, name: str, kind: str, cpu_seconds: Optional[float] = None) -> None:
        callback = self._callback
        if callback is not None:
            callback(DomainEvent(uuid=uuid, name=name, kind=kind, time=self.clock(), cpu_seconds=cpu_seconds))
