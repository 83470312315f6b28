"""Which hypervisor the daemon gives the engine: libvirt, and the container runtime beside it
when the factory has containers to run or to watch.

The container runtime (``container_socket``) is connected only when the configuration at
start-up has a ``machine_model = docker`` machinetype, or a docker machine of an earlier run
is still live (it must be watched, accounted and, if it is a zombie, destroyed even after its
machinetype left the configuration). A VM-only site never touches a Docker socket. A docker
machinetype added by a later reload waits ("not startable yet") until the daemon restarts.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

from vacfactory.hypervisor.base import Hypervisor

#: the machine model a container runtime runs
CONTAINER_MODEL = "docker"


def wants_containers(config, live_models: Iterable[str] = ()) -> bool:
    """A docker machinetype is configured, or a live machine is a container."""
    configured = any(mt.machine_model == CONTAINER_MODEL for mt in config.machinetypes.values())
    return configured or CONTAINER_MODEL in set(live_models)


def machine_hypervisor(settings, containers_wanted: bool) -> Tuple[Hypervisor, Optional[object]]:
    """(the engine's hypervisor, the container runtime or None): libvirt alone, or libvirt and
    the container runtime behind one RoutingHypervisor. Nothing connects here: each backend
    connects at its first call, so an absent runtime shows as a blind round with its error."""
    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor

    vms = LibvirtHypervisor(settings.libvirt_uri)
    if not containers_wanted:
        return vms, None
    from vacfactory.hypervisor.containers import ContainerHypervisor
    from vacfactory.hypervisor.routing import RoutingHypervisor

    containers = ContainerHypervisor(settings.container_socket, owner=settings.factory_name)
    return RoutingHypervisor(vms, containers), containers
