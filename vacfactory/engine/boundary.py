"""The VM boundary as the engine sees it: publish a VM's files, withdraw them, read its outputs.

Publishing registers the VM with the HTTP MJF/metadata server (by address and token) and,
for ``mjf_transport = nfs``, exports its machinefeatures/jobfeatures (read-only) and
joboutputs (read-write) to the VM's address only. Everything read back from joboutputs goes
through vmio.joboutputs, which treats every byte as hostile.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional

from vacfactory.core.outcomes import ShutdownMessage
from vacfactory.errors import ExportError
from vacfactory.state.machines import Machine
from vacfactory.vmio import joboutputs
from vacfactory.vmio.exports import ExportSpec, Exporter, NullExporter
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.registry import VMEndpoint, VMRegistry

log = logging.getLogger(__name__)


class VMBoundary:
    def __init__(
        self,
        registry: Optional[VMRegistry] = None,
        exporter: Optional[Exporter] = None,
        limits: JobOutputsLimits = JobOutputsLimits(),
    ) -> None:
        self.registry = registry if registry is not None else VMRegistry()
        self.exporter = exporter if exporter is not None else NullExporter()
        self.limits = limits

    def start(self, config, live: Iterable[Machine]) -> None:
        """After a restart: re-register live VMs and make the exports match them exactly."""
        expected = {}
        for machine in live:
            if machine.record.address:
                self.registry.add(endpoint(machine))
            expected[machine.uuid] = export_specs(machine)
        try:
            self.exporter.reconcile(expected)
        except ExportError as error:
            # HTTP VMs do not need NFS; NFS VMs will fail to publish, with this error again
            log.error("NFS exports could not be restored: %s", error)

    def publish(self, machine: Machine) -> None:
        # a VM without an address (libvirt's test driver: no network) cannot reach the server
        if machine.record.address:
            self.registry.add(endpoint(machine))
        specs = export_specs(machine)
        if specs:
            self.exporter.set_exports(machine.uuid, specs)

    def withdraw(self, machine: Machine) -> None:
        self.registry.remove(machine.uuid)
        if machine.record.mjf_transport == "nfs":
            self.exporter.remove_exports(machine.uuid)

    def shutdown_message(self, machine: Machine) -> Optional[ShutdownMessage]:
        return joboutputs.read_shutdown_message(machine.joboutputs_dir, self.limits)

    def heartbeat_mtime(self, machine: Machine, name: str, now: float) -> Optional[float]:
        """The VM's heartbeat file mtime; one set far in the future counts as no heartbeat."""
        return joboutputs.heartbeat_mtime(machine.joboutputs_dir, name, now=now)

    def enforce_limits(self, machine: Machine, heartbeat_file: Optional[str] = None) -> None:
        """Trim what a VM wrote beyond the caps, keeping its heartbeat and shutdown_message."""
        protect = [heartbeat_file] if heartbeat_file else []
        joboutputs.enforce_limits(machine.joboutputs_dir, self.limits, protect=protect)


def endpoint(machine: Machine) -> VMEndpoint:
    record = machine.record
    return VMEndpoint(
        uuid=record.uuid,
        name=record.name,
        address=record.address,
        token=record.token,
        machinefeatures_dir=machine.machinefeatures_dir,
        jobfeatures_dir=machine.jobfeatures_dir,
        joboutputs_dir=machine.joboutputs_dir,
        user_data_path=machine.user_data_path,
        machinetype=record.machinetype,
        meta={},
    )


def export_specs(machine: Machine) -> List[ExportSpec]:
    record = machine.record
    if record.mjf_transport != "nfs" or not record.address:
        return []
    return [
        ExportSpec(uuid=record.uuid, client=record.address, path=machine.machinefeatures_dir,
                   pseudo=f"/{record.uuid}/machinefeatures", readonly=True),
        ExportSpec(uuid=record.uuid, client=record.address, path=machine.jobfeatures_dir,
                   pseudo=f"/{record.uuid}/jobfeatures", readonly=True),
        ExportSpec(uuid=record.uuid, client=record.address, path=machine.joboutputs_dir,
                   pseudo=f"/{record.uuid}/joboutputs", readonly=False),
    ]
