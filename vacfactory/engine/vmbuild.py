"""Turn a machinetype and a new VM's record into what the adapters need to start it.

- ``new_record``: the VM's identity (name, slot, address, token, sizes, times).
- ``features``: its machine/job features (core.mjf computes them).
- ``user_data``: the rendered contextualization (core.userdata), with an optional proxy.
  A template given as an http(s) URL (usual with Vac and vacuum pipes) comes from the image
  cache, like a root image by URL: the daemon's cache never makes the engine wait for the
  network (see vacfactory.fetch.imagecache). The copy at hand is used while a due revalidation (a
  conditional GET at most every ``image_check_seconds``) runs in the background; a server that
  is down leaves the cached copy in use; with no copy yet the machinetype is not startable this
  round (``ImageNotReady``), which is not a failed creation. ``##user_data_url##`` is the URL.
  A template or ``user_data_file_XXX`` over ``MAX_TEMPLATE_BYTES`` is a BuildError.
- ``machine_spec``: what the hypervisor starts. For a VM, ``domain_spec``: the
  hypervisor.VMSpec, the domain and the disks the hypervisor makes for it in the machine
  directory (overlay, scratch disk, the optional config drive, whose meta_data.json is the one
  the HTTP server serves). For ``machine_model = docker``, a ContainerSpec
  (engine.containerbuild). It creates nothing itself.

A docker machine has no slot address (its MJF, joboutputs and user_data are bind mounts, so
its record's ``mjf_transport`` is "bind") and no root image file: its image is the runtime's,
and a machinetype whose image the runtime does not have yet is not startable this round
(``container_images(reference)`` says why; the runtime pulls it in the background).

Every URL a VM is given uses ``http_port`` (omitted when it is 80).

Machine models (Vac's): ``vm-raw`` boots a qcow2 overlay on ``root_image``; ``cernvm3``/
``cernvm4`` boot the ``root_image`` ISO from CD with an empty disk as ``root_device``; any VM
model may instead (or also) boot a kernel directly (``kernel_image``, ``initrd_image``,
``kernel_cmdline``), which is how the tiny demo guest runs. Relative paths are looked up in
``<state_dir>/machinetypes/<name>/files/`` as Vac does.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from typing import Callable, Dict, Mapping, Optional, Tuple

from vacfactory import __version__
from vacfactory.config import pipes
from vacfactory.core import mjf, userdata, values
from vacfactory.engine import containerbuild, policies
from vacfactory.engine.boundary import nfs_meta, vm_meta
from vacfactory.engine.hostfacts_mjf import merge_extras, syslog_machinefeatures, syslog_substitutions
from vacfactory.errors import HypervisorError, ImageError, VacFactoryError
from vacfactory.hypervisor.addressing import slot_ip, slot_mac, slot_port
from vacfactory.hypervisor.base import ConfigDrive, DiskSpec, InterfaceSpec, MachineSpec, Overlay, Scratch, VMSpec
from vacfactory.fetch.imagecache import ImageCache, ImageNotReady
from vacfactory.state.machines import Machine
from vacfactory.state.records import VMRecord
from vacfactory.vmio.http import METADATA_ADDRESS, MJF_ADDRESS, base_url, meta_data_document

log = logging.getLogger(__name__)

#: largest virtual size of a root image when max_root_image_gb is unset (see max_root_image_bytes)
DEFAULT_MAX_ROOT_IMAGE_GIB = 100
#: largest user_data template or user_data_file_XXX (each); larger is an error, never truncated
MAX_TEMPLATE_BYTES = 4 << 20


class BuildError(VacFactoryError):
    """A VM could not be prepared (missing image, unreadable template, bad file)."""


class VMBuilder:
    """Stateless apart from the image cache that root images by URL (or path) go through."""

    def __init__(self, state_dir: str, images: Optional[ImageCache] = None,
                 host_features: Optional[Mapping[str, str]] = None,
                 container_images: Optional[Callable[[str], Optional[str]]] = None) -> None:
        self.state_dir = state_dir
        self.images = images
        #: reference -> None if the container runtime has the image, else why not (it pulls it
        #: in the background); None: no container runtime, docker machinetypes wait
        self.container_images = container_images
        #: host facts published in every VM's machinefeatures (engine.hostfacts_mjf)
        self.host_features = dict(host_features or {})

    # -- identity and features ----------------------------------------------------------

    def new_record(self, config, mt, *, uuid: str, slot: int, name: str, processors: int,
                   created: float, shutdown_time: float) -> VMRecord:
        s = config.settings
        container = is_container(mt)
        networked = uses_network(config) and not container
        if container:
            self.container_image_ready(mt)
        root_image_path = self.root_image(mt, config) if mt.root_image and not container else None
        return VMRecord(
            uuid=uuid,
            name=name,
            slot=slot,
            factory=s.factory_name,
            space=s.vac_space,
            machinetype=mt.name,
            machine_model=mt.machine_model,
            processors=processors,
            memory_mb=s.mb_per_processor * processors,
            created=created,
            shutdown_time=shutdown_time,
            hs06_per_processor=s.hs06_per_processor,
            accounting_fqan=mt.accounting_fqan,
            machinegroup=mt.machinegroup,
            fizzle_seconds=float(mt.fizzle_seconds),
            mjf_transport="bind" if container else mt.mjf_transport,
            address=slot_ip(slot) if networked else None,
            mac=slot_mac(slot) if networked else None,
            token=secrets.token_hex(16),
            root_image_path=root_image_path,
        )

    def root_image(self, mt, config=None) -> str:
        """A verified local copy of the machinetype's root image (fetched by URL if need be).

        The cache never replaces a file in place, so the path stays valid for the VM's life.
        A URL from a vacuum pipe is fetched under the site's URL policy.
        """
        if self.images is not None:
            try:
                return self.images.get(mt.root_image, mt.root_image_sha256,
                                       pipe=pipes.pipe_source(config, mt.name, "root_image"))
            except ImageError as error:
                raise BuildError(f"machinetype {mt.name}: {error}") from None
        return self.resolve(mt, mt.root_image)

    def container_image_ready(self, mt) -> None:
        """ImageNotReady unless the container runtime has the machinetype's image."""
        reference = containerbuild.image_reference(mt)
        if self.container_images is None:
            raise ImageNotReady(f"{reference}: no container runtime is connected (a docker machinetype added by a "
                                f"reload starts after a restart of vacfactory)")
        try:
            why = self.container_images(reference)
        except HypervisorError as error:  # the runtime is down: the machinetype waits
            raise ImageNotReady(f"{reference}: {error}") from None
        if why is not None:
            raise ImageNotReady(f"{reference}: {why}")

    def features(self, config, record: VMRecord) -> Tuple[Dict[str, str], Dict[str, str]]:
        s = config.settings
        extras = merge_extras(self.host_features, syslog_machinefeatures(s.syslog_server),
                              s.machinefeatures_options)
        inputs = policies.mjf_input(config, record, extras)
        return mjf.machinefeatures(inputs), mjf.jobfeatures(inputs)

    def user_data(self, config, mt, record: VMRecord) -> Optional[bytes]:
        """Render the machinetype's user_data template, or None if it has none."""
        if not mt.user_data:
            return None
        template = self._template(mt, config)
        files = {name: self._read_text(mt, path, f"user_data_file_{name}") for name, path in mt.user_data_files.items()}
        options = dict(mt.user_data_options)
        if mt.user_data_proxy:
            options["x509_proxy"] = self._proxy(mt, record)
        mjf_url = mjf_base_url(config)
        paths = container_paths() if record.machine_model == "docker" else None
        substitutions = userdata.standard_substitutions(
            space=record.space,
            machinetype=record.machinetype,
            machine_hostname=record.name,
            manager_version=f"vacfactory {__version__}",
            manager_hostname=record.factory,
            uuid=record.uuid,
            machinefeatures_url=paths[0] if paths else f"{mjf_url}/machinefeatures",
            jobfeatures_url=paths[1] if paths else f"{mjf_url}/jobfeatures",
            joboutputs_url=paths[2] if paths else f"{mjf_url}/joboutputs",
            root_image_url=mt.root_image if is_url(mt.root_image) else None,
            user_data_url=mt.user_data if is_url(mt.user_data) else None,
            site=config.settings.gocdb_sitename,
            extra=syslog_substitutions(config.settings.syslog_server),
        )
        return userdata.render_user_data(template, substitutions, options, files).encode("utf-8")

    def _proxy(self, mt, record: VMRecord) -> str:
        from datetime import datetime, timezone

        from vacfactory.vmio import proxy

        directory = mt.machinetype_path
        try:
            with open(os.path.join(directory, "x509cert.pem"), "rb") as f:
                cert = f.read()
            with open(os.path.join(directory, "x509key.pem"), "rb") as f:
                key = f.read()
        except OSError as error:
            raise BuildError(f"machinetype {mt.name}: user_data_proxy needs x509cert.pem and x509key.pem "
                             f"in {directory}: {error}") from None
        not_after = datetime.fromtimestamp(record.shutdown_time, tz=timezone.utc)
        try:
            made = proxy.make_limited_proxy(cert, key, not_after, mt.name, legacy=bool(mt.legacy_proxy))
        except proxy.ProxyError as error:
            raise BuildError(f"machinetype {mt.name}: user_data_proxy ({directory}): {error}") from None
        return made.decode("ascii")

    # -- the domain ---------------------------------------------------------------------

    def machine_spec(self, config, mt, machine: Machine) -> MachineSpec:
        """What the hypervisor starts for ``machine``: a container for a docker machinetype,
        else a domain. A value the spec refuses is a BuildError."""
        if is_container(mt):
            try:
                return containerbuild.container_spec(config, mt, machine)
            except VacFactoryError as error:
                raise BuildError(str(error)) from None
        return self.domain_spec(config, mt, machine)

    def domain_spec(self, config, mt, machine: Machine) -> VMSpec:
        """Describe the VM's domain and the disks the hypervisor makes for it (pure: no file
        is created here). A value the spec refuses (``root_device = xvda``) is a BuildError."""
        try:
            return self._domain_spec(config, mt, machine)
        except ValueError as error:  # the spec validates itself
            raise BuildError(f"machinetype {mt.name}: {error}") from None

    def _domain_spec(self, config, mt, machine: Machine) -> VMSpec:
        s = config.settings
        record = machine.record
        disk_list = []
        boot = "hd"
        root_image = record.root_image_path
        scratch_bytes = policies.scratch_disk_bytes(s, mt, record.processors)
        root = os.path.join(machine.disks_dir, "root.qcow2")
        if mt.machine_model in ("cernvm3", "cernvm4") and root_image:
            # IDE cdrom on hdc as Vac does: the `pc` machine type has IDE built in
            disk_list.append(DiskSpec(path=root_image, target_dev="hdc", fmt="raw", device="cdrom",
                                      readonly=True, bus="ide"))
            disk_list.append(DiskSpec(path=root, target_dev=mt.root_device, bus=bus_for(mt.root_device),
                                      source=Scratch(scratch_bytes)))
            boot = "cdrom"
        elif root_image:
            disk_list.append(DiskSpec(path=root, target_dev=mt.root_device, bus=bus_for(mt.root_device),
                                      source=Overlay(root_image, max_root_image_bytes(s, mt))))
            if scratch_bytes:
                disk_list.append(DiskSpec(path=os.path.join(machine.disks_dir, "scratch.qcow2"),
                                          target_dev=mt.scratch_device, bus=bus_for(mt.scratch_device),
                                          source=Scratch(scratch_bytes)))
        if mt.config_drive:
            disk_list.append(self._config_drive(config, machine))
        interface = None
        if record.mac is not None:
            # nwfilter clean-traffic: the HTTP server and the NFS exports know a VM by its
            # address, so a VM must not send from another slot's IP or MAC (it could otherwise
            # read and write that VM's files: tests/integration/test_vm_boundary_qemu.py)
            interface = InterfaceSpec(network=s.network_name, mac=record.mac, anti_spoofing=True,
                                      ip=record.address, port=slot_port(record.slot))
        kernel = self.resolve(mt, mt.kernel_image) if mt.kernel_image else None
        initrd = self.resolve(mt, mt.initrd_image) if mt.initrd_image else None
        if kernel is None and not root_image:
            raise BuildError(f"machinetype {mt.name}: neither root_image nor kernel_image is set")
        return VMSpec(
            name=record.name,
            uuid=record.uuid,
            vcpus=record.processors,
            memory_mib=record.memory_mb,
            domain_type=s.domain_type,
            cpu_mode=s.cpu_mode,
            console_log=machine.console_log,
            kernel=kernel,
            initrd=initrd,
            cmdline=mt.kernel_cmdline,
            disks=tuple(disk_list),
            interface=interface,
            boot=boot,
        )

    def _config_drive(self, config, machine: Machine) -> DiskSpec:
        """The config-2 ISO: the VM's user_data and the meta_data.json the HTTP server serves."""
        try:
            with open(machine.user_data_path, "rb") as f:
                user_data = f.read()
        except FileNotFoundError:
            user_data = b""
        path = os.path.join(machine.disks_dir, "config.iso")
        meta = json.dumps(meta_data(config, machine.record, machine), sort_keys=True)
        return DiskSpec(path=path, target_dev="hdd", fmt="raw", device="cdrom", readonly=True, bus="ide",
                        source=ConfigDrive(user_data, meta))

    # -- files of a machinetype ---------------------------------------------------------

    def resolve(self, mt, path: str) -> str:
        """An existing file: the configuration already made relative paths absolute under
        ``<machinetype_path>/files/`` (Vac's rule)."""
        if is_url(path):
            raise BuildError(f"machinetype {mt.name}: {path}: fetching images by URL needs the image cache")
        if not os.path.isabs(path):
            path = os.path.join(mt.machinetype_path, "files", path)
        if not os.path.isfile(path):
            raise BuildError(f"machinetype {mt.name}: {path}: no such file")
        return path

    def _template(self, mt, config=None) -> str:
        """The user_data template's text: a file, or the cached copy of a URL.

        Raises ImageNotReady (not a BuildError) while a URL has no cached copy yet."""
        if not is_url(mt.user_data):
            return self._read_text(mt, mt.user_data, "user_data")
        if self.images is None:
            raise BuildError(f"machinetype {mt.name}: user_data {mt.user_data}: "
                             "fetching by URL needs the image cache")
        try:
            path = self.images.get(mt.user_data, max_bytes=MAX_TEMPLATE_BYTES,
                                   pipe=pipes.pipe_source(config, mt.name, "user_data"))
        except ImageError as error:
            raise BuildError(f"machinetype {mt.name}: user_data {error}") from None
        return self._read_file(mt, path, f"user_data {mt.user_data} (cached as {path})")

    def _read_text(self, mt, path: str, what: str) -> str:
        resolved = self.resolve(mt, path)
        return self._read_file(mt, resolved, f"{what} {resolved}")

    @staticmethod
    def _read_file(mt, path: str, what: str) -> str:
        """At most MAX_TEMPLATE_BYTES of text; a larger file is a BuildError naming ``what``."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as error:
            raise BuildError(f"machinetype {mt.name}: {what}: {error.strerror or error}") from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise BuildError(f"machinetype {mt.name}: {what}: larger than the {MAX_TEMPLATE_BYTES}-byte "
                             f"limit ({MAX_TEMPLATE_BYTES >> 20} MiB) for user_data templates and files")
        return data.decode("utf-8", errors="replace")


def max_root_image_bytes(settings, mt) -> int:
    """Largest virtual size a root image may claim: max_root_image_gb, else 100 GiB or the
    machinetype's disk budget (disk_gb_per_processor x max_processors) if that is larger."""
    if settings.max_root_image_gb:
        return int(settings.max_root_image_gb * (1 << 30))
    disk_gb = mt.disk_gb_per_processor or settings.disk_gb_per_processor or 0
    return max(DEFAULT_MAX_ROOT_IMAGE_GIB << 30, int(disk_gb * mt.max_processors * 10**9))


def is_container(mt) -> bool:
    return mt.machine_model == "docker"


def container_paths() -> Tuple[str, str, str]:
    """Where a container finds its machinefeatures, jobfeatures and joboutputs (the
    ##user_data_machinefeatures_url## etc. of its user_data: MJF allows a directory path)."""
    return (containerbuild.MACHINEFEATURES_TARGET, containerbuild.JOBFEATURES_TARGET,
            containerbuild.JOBOUTPUTS_TARGET)


def bus_for(device: str) -> str:
    """Vac's rule (core/values.py): virtio for vdX and xvdX devices, IDE otherwise."""
    return values.disk_bus(device)


def is_url(value: Optional[str]) -> bool:
    return bool(value) and value.startswith(("http://", "https://"))


def mjf_base_url(config) -> str:
    """``http://169.254.169.253`` (with ``:http_port`` unless it is 80), as VMs reach it."""
    return base_url(MJF_ADDRESS, config.settings.http_port)


def meta_data(config, record: VMRecord, machine: Optional[Machine] = None) -> Dict[str, object]:
    """The VM's OpenStack meta_data.json, built as the HTTP server builds it (with ``machine``,
    an NFS VM's mount paths too, for the configured nfs_exporter: engine.boundary.nfs_meta)."""
    meta = vm_meta(config)
    if machine is not None:
        meta.update(nfs_meta(machine, config.settings.nfs_exporter))
    return meta_data_document(
        uuid=record.uuid, name=record.name, token=record.token, machinetype=record.machinetype,
        meta=meta, mjf_base_url=mjf_base_url(config),
        metadata_base_url=base_url(METADATA_ADDRESS, config.settings.http_port))


def uses_network(config) -> bool:
    """VMs get the private network unless this is libvirt's in-process test driver."""
    return config.settings.domain_type != "test" and bool(config.settings.network_name)
