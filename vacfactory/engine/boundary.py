"""The VM boundary as the engine sees it: publish a VM's files, withdraw them, read its outputs.

Publishing registers the VM with the HTTP MJF/metadata server (by address and token) and,
for ``mjf_transport = nfs``, exports its machinefeatures/jobfeatures (read-only) and
joboutputs (read-write) to the VM's address only; its joboutputs is then a size-limited
filesystem of its own (vmio.jobfs), released when the VM is cleaned. Everything read back from
joboutputs goes through vmio.joboutputs, which treats every byte as hostile.

``vm_meta`` is what every VM is offered besides its own identity (the keys of the
``root_public_key`` file, see engine.rootkeys; the availability zone); the HTTP server and
the config drive (engine.vmbuild) both take it.
``nfs_meta`` adds, for an NFS VM, where to mount its exports: nfs-ganesha serves them under
pseudo paths (``/<uuid>/machinefeatures``), the kernel server (``exportfs``) under their real
paths in the state directory, so a VM cannot guess them.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from vacfactory.core.outcomes import ShutdownMessage
from vacfactory.engine.rootkeys import KeyFileNotices, read_public_keys
from vacfactory.errors import ExportError, VacFactoryError
from vacfactory.state.machines import Machine
from vacfactory.vmio import joboutputs
from vacfactory.vmio.exports import ExportfsExporter, ExportSpec, Exporter, GaneshaExporter, NullExporter
from vacfactory.vmio.http import METADATA_ADDRESS
from vacfactory.vmio.jobfs import JobOutputsFS
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.registry import VMEndpoint, VMRegistry

log = logging.getLogger(__name__)


class VMBoundary:
    """``meta_source`` gives the :func:`vm_meta` of the current configuration (the daemon
    passes one reading the engine's config; without it VMs are offered no extra metadata)."""

    def __init__(
        self,
        registry: Optional[VMRegistry] = None,
        exporter: Optional[Exporter] = None,
        limits: JobOutputsLimits = JobOutputsLimits(),
        meta_source: Callable[[], Mapping[str, str]] = dict,
        jobfs: Optional[JobOutputsFS] = None,
    ) -> None:
        self.registry = registry if registry is not None else VMRegistry()
        self.exporter = exporter if exporter is not None else NullExporter()
        self.limits = limits
        self.meta_source = meta_source
        #: each NFS VM's joboutputs on a filesystem of its own (vmio.jobfs); none: plain dirs
        self.jobfs = jobfs if jobfs is not None else JobOutputsFS("none", limits)

    def start(self, config, live: Iterable[Machine]) -> None:
        """After a restart: re-register live VMs and make the exports match them exactly."""
        try:
            meta = self.meta_source()
        except VacFactoryError as error:
            # running VMs keep their MJF; only the key is not offered to them
            log.error("%s; live VMs are re-registered without it", error)
            meta = {}
        expected = {}
        for machine in live:
            if machine.record.address:
                self.registry.add(endpoint(machine, self._meta(machine, meta)))
            expected[machine.uuid] = export_specs(machine)
            if machine.record.mjf_transport == "nfs":
                self._remount(machine)
        try:
            self.exporter.reconcile(expected)
        except ExportError as error:
            # HTTP VMs do not need NFS; NFS VMs will fail to publish, with this error again
            log.error("NFS exports could not be restored: %s", error)

    def publish(self, machine: Machine) -> None:
        # a VM without an address (libvirt's test driver: no network) cannot reach the server
        if machine.record.address:
            self.registry.add(endpoint(machine, self._meta(machine, self.meta_source())))
        specs = export_specs(machine)
        if specs:
            self.jobfs.create(machine.joboutputs_dir)
            self.exporter.set_exports(machine.uuid, specs)

    @property
    def nfs_exporter(self) -> str:
        """The ``nfs_exporter`` value of the exporter in use (what decides the mount paths)."""
        return exporter_kind(self.exporter)

    def _meta(self, machine: Machine, meta: Mapping[str, str]) -> Dict[str, str]:
        """What ``machine`` is offered: ``meta`` plus, for an NFS VM, where its exports are."""
        return {**meta, **nfs_meta(machine, self.nfs_exporter)}

    def withdraw(self, machine: Machine) -> None:
        self.registry.remove(machine.uuid)
        if machine.record.mjf_transport == "nfs":
            self.exporter.remove_exports(machine.uuid)
            self.jobfs.release(machine.joboutputs_dir)  # after the export: nothing writes now

    def _remount(self, machine: Machine) -> None:
        """At start-up: an NFS VM's joboutputs filesystem mounted again if a reboot lost it."""
        try:
            self.jobfs.remount(machine.joboutputs_dir)
        except (ExportError, OSError) as error:
            log.error("%s: joboutputs filesystem cannot be mounted again: %s", machine.name, error)

    def shutdown_message(self, machine: Machine) -> Optional[ShutdownMessage]:
        return joboutputs.read_shutdown_message(machine.joboutputs_dir, self.limits)

    def heartbeat_mtime(self, machine: Machine, name: str, now: float) -> Optional[float]:
        """The VM's heartbeat file mtime; one set far in the future counts as no heartbeat."""
        return joboutputs.heartbeat_mtime(machine.joboutputs_dir, name, now=now)

    def enforce_limits(self, machine: Machine, heartbeat_file: Optional[str] = None) -> None:
        """Trim what a VM wrote beyond the caps, keeping its heartbeat and shutdown_message."""
        protect = [heartbeat_file] if heartbeat_file else []
        joboutputs.enforce_limits(machine.joboutputs_dir, self.limits, protect=protect)


def endpoint(machine: Machine, meta: Optional[Mapping[str, str]] = None) -> VMEndpoint:
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
        meta=meta or {},
    )


def export_specs(machine: Machine) -> List[ExportSpec]:
    return [spec for _, spec in _named_exports(machine)]


def _named_exports(machine: Machine) -> List[Tuple[str, ExportSpec]]:
    """(directory name, export) of an NFS VM with an address; [] for any other VM."""
    record = machine.record
    if record.mjf_transport != "nfs" or not record.address:
        return []
    return [
        (name, ExportSpec(uuid=record.uuid, client=record.address, path=path, pseudo=f"/{record.uuid}/{name}",
                          readonly=readonly))
        for name, path, readonly in (("machinefeatures", machine.machinefeatures_dir, True),
                                     ("jobfeatures", machine.jobfeatures_dir, True),
                                     ("joboutputs", machine.joboutputs_dir, False))
    ]


#: the address VMs mount their exports from (nfs-ganesha binds it; the kernel server listens on
#: every address, the VM network's included)
NFS_SERVER = METADATA_ADDRESS


def exporter_kind(exporter: Exporter) -> str:
    """The ``nfs_exporter`` setting ``exporter`` implements: ganesha, exportfs or none."""
    if isinstance(exporter, GaneshaExporter):
        return "ganesha"
    if isinstance(exporter, ExportfsExporter):
        return "exportfs"
    return "none"


def nfs_meta(machine: Machine, nfs_exporter: str) -> Dict[str, str]:
    """Where an NFS VM mounts its exports, for its meta_data.json ``meta``: ``nfs_server`` and
    ``machinefeatures_nfs_path``, ``jobfeatures_nfs_path``, ``joboutputs_nfs_path`` (ganesha's
    pseudo paths, or the real directories for exportfs). {} for HTTP VMs, VMs without an
    address, and ``nfs_exporter = none`` (nothing is exported)."""
    exports = _named_exports(machine)
    if not exports or nfs_exporter not in ("ganesha", "exportfs"):
        return {}
    meta = {"nfs_server": NFS_SERVER}
    for name, spec in exports:
        meta[f"{name}_nfs_path"] = spec.pseudo if nfs_exporter == "ganesha" else spec.path
    return meta


# -- what every VM is offered -------------------------------------------------------------

#: the root key files' warnings, logged once per file and change (engine.rootkeys)
_KEY_NOTICES = KeyFileNotices()


def vm_meta(config) -> Dict[str, str]:
    """The metadata every VM is offered (:attr:`VMEndpoint.meta`): the availability zone
    (the factory's name, as Vac did) and ``public_key``: every key line of the
    ``root_public_key`` file, one per line (served as meta_data.json ``public_keys`` and EC2
    ``public-keys/0/openssh-key``, as Vac served the file). A file that cannot be read, or
    holds no key, offers none: the VM is still created (Vac's "no ssh access"), and the
    reason is logged once (engine.rootkeys)."""
    s = config.settings
    meta = {"availability_zone": s.factory_name}
    if s.root_public_key:
        origin = config.origins.get("settings", {}).get("root_public_key", "default")
        keys = read_public_keys(s.root_public_key)
        _KEY_NOTICES.report(keys, origin)
        if keys.keys:
            meta["public_key"] = "\n".join(keys.keys)
    return meta
