"""One :class:`Hypervisor` over two: VMs on one backend, containers on another.

The engine keeps one hypervisor whatever its machinetypes run on. ``create`` goes by the
spec's type; calls by UUID go to the backend known to hold it (learnt from creates and
listings), else to both. A listing needs both backends: with one unreachable the round is
blind, since judging half a view would finish every machine of the other half.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional

from vacfactory.errors import HypervisorError

from .base import ContainerSpec, DomainEvent, DomainInfo, Hypervisor, MachineSpec, NetworkSpec, VMSpec, check_uuid

__all__ = ["RoutingHypervisor"]


class RoutingHypervisor:
    """``vms`` takes VMSpecs (and the network, the disks), ``containers`` ContainerSpecs."""

    def __init__(self, vms: Hypervisor, containers: Hypervisor) -> None:
        self.vms = vms
        self.containers = containers
        self._lock = threading.Lock()
        self._where: Dict[str, Hypervisor] = {}  # uuid -> backend, a hint (pruned by listings)

    def _backend(self, spec: MachineSpec) -> Hypervisor:
        if isinstance(spec, ContainerSpec):
            return self.containers
        if isinstance(spec, VMSpec):
            return self.vms
        raise HypervisorError(f"neither a VM nor a container: {type(spec).__name__}",
                              domain=getattr(spec, "name", None))

    def _order(self, uuid: str) -> List[Hypervisor]:
        with self._lock:
            first = self._where.get(uuid)
        both = [self.vms, self.containers]
        return both if first is None else [first] + [b for b in both if b is not first]

    def create(self, spec: MachineSpec) -> None:
        backend = self._backend(spec)
        backend.create(spec)
        with self._lock:
            self._where[spec.uuid] = backend

    def destroy(self, uuid: str) -> bool:
        """True if either backend had it; an error only when no backend could say it had."""
        uuid = check_uuid(uuid)
        error: Optional[HypervisorError] = None
        for backend in self._order(uuid):
            try:
                if backend.destroy(uuid):
                    return True
            except HypervisorError as exc:
                error = error or exc
        if error is not None:
            raise error
        return False

    def domain_info(self, uuid: str) -> Optional[DomainInfo]:
        uuid = check_uuid(uuid)
        error: Optional[HypervisorError] = None
        for backend in self._order(uuid):
            try:
                info = backend.domain_info(uuid)
            except HypervisorError as exc:
                error = error or exc
                continue
            if info is not None:
                return info
        if error is not None:
            raise error
        return None

    def list_domains(self) -> List[DomainInfo]:
        vms = self.vms.list_domains()
        containers = self.containers.list_domains()
        with self._lock:
            self._where = {d.uuid: self.vms for d in vms}
            self._where.update((d.uuid, self.containers) for d in containers)
        return vms + containers

    def image_status(self, reference: str) -> Optional[str]:
        """Container images only (VM images are the factory's image cache)."""
        return self.containers.image_status(reference)  # type: ignore[attr-defined]

    def set_event_callback(self, callback: Callable[[DomainEvent], None]) -> None:
        self.vms.set_event_callback(callback)
        self.containers.set_event_callback(callback)

    def describe(self) -> str:
        return f"{self.vms.describe()}; {self.containers.describe()}"

    def ping(self) -> bool:
        return self.vms.ping() and self.containers.ping()

    def ensure_network(self, spec: NetworkSpec) -> None:
        self.vms.ensure_network(spec)

    def remove_disks(self, directory: str) -> None:
        self.vms.remove_disks(directory)

    def close(self) -> None:
        try:
            self.vms.close()
        finally:
            self.containers.close()
