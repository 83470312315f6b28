"""The narrow hypervisor interface the engine codes against, and the values that cross it.

Like Nova's virt driver interface: the engine only ever creates, destroys, lists and
inspects transient domains, and hears about their lifecycle. Everything libvirt-specific
(XML, connections, error codes, event loops) stays behind :class:`Hypervisor`, so the engine
can be tested against the libvirt ``test:///default`` driver or a fake.

The specs validate themselves on construction: they end up in domain XML and in qemu-img
argument lists, so a bad value must fail here, early and with a clear message, rather than as
an obscure libvirt error (or worse, as an option injected into a command line). The rules for
single values are those of ``core/values.py``, which the option table uses too, so a spec
never refuses what the configuration accepted; a refusal is an ``InvalidValue``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, List, Optional, Protocol, Tuple, Union

from vacfactory.core import values
from vacfactory.errors import InvalidValue

from .addressing import NetworkSpec, check_port

__all__ = [
    "DomainState",
    "DiskSpec",
    "Overlay",
    "Scratch",
    "ConfigDrive",
    "DiskSource",
    "InterfaceSpec",
    "FilesystemSpec",
    "VMSpec",
    "BindSpec",
    "ContainerSpec",
    "MachineSpec",
    "DomainInfo",
    "DomainEvent",
    "EVENT_KINDS",
    "Hypervisor",
    "NetworkSpec",
    "check_path",
    "check_uuid",
]


class DomainState(str, Enum):
    """What the engine needs to know about a domain's run state (libvirt has more)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


#: the kinds a DomainEvent can carry
EVENT_KINDS = ("started", "stopped", "shutdown", "crashed", "suspended", "resumed", "other")

def check_path(what: str, path: str) -> str:
    """Return ``path`` if it is safe to hand to libvirt or a subprocess (core/values.py)."""
    return values.check_absolute_path(path, what)


def check_uuid(value: str) -> str:
    """Return the canonical lower-case form of a UUID string; InvalidValue if it is not one."""
    return values.check_uuid(value)


@dataclass(frozen=True)
class Overlay:
    """A qcow2 overlay on ``backing`` (a root image whose format qemu-img reads; one that
    claims more than ``max_virtual_bytes`` is refused)."""

    backing: str
    max_virtual_bytes: Optional[int] = None


@dataclass(frozen=True)
class Scratch:
    """An empty sparse qcow2 disk of ``size_bytes`` (guest-visible size)."""

    size_bytes: int


@dataclass(frozen=True)
class ConfigDrive:
    """An OpenStack config-drive ISO holding ``user_data`` and ``meta_data`` (JSON text)."""

    user_data: bytes
    meta_data: str


#: how the hypervisor makes a disk before the domain starts
DiskSource = Union[Overlay, Scratch, ConfigDrive]


@dataclass(frozen=True)
class DiskSpec:
    """One block device: an image file the factory created (overlay, scratch) or an ISO.

    ``source`` says how the hypervisor makes the file when it creates the domain (behind the
    seam: the engine only describes); None means the file exists already (a root image ISO).
    """

    path: str
    target_dev: str = "vda"
    fmt: str = "qcow2"  # qcow2 | raw
    device: str = "disk"  # disk | cdrom
    readonly: bool = False
    bus: str = "virtio"  # virtio | sata | ide (cdrom: sata)
    source: Optional[DiskSource] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_path("disk", self.path)
        where = f"disk {self.path}"
        _one_of(where, "fmt", self.fmt, ("qcow2", "raw"))
        _one_of(where, "device", self.device, ("disk", "cdrom"))
        values.check_disk_target(self.target_dev, self.bus, where)
        if self.device == "cdrom" and self.bus == "virtio":
            raise InvalidValue(f"{where}: a cdrom cannot be on the virtio bus")


@dataclass(frozen=True)
class InterfaceSpec:
    """The VM's one NIC on the factory's private libvirt network (fixed MAC -> fixed IP)."""

    network: str
    mac: str
    anti_spoofing: bool = False  # nwfilter clean-traffic
    #: the VM's fixed address; with anti_spoofing the filter allows only it from the start
    #: (otherwise libvirt learns it from the VM's first packet, which a hostile VM chooses)
    ip: Optional[str] = None
    #: the slot's persistent host tap ("vfslot007"): when set, the NIC is that tap on the
    #: network's bridge and the clean-traffic filter is bound to it once, not at every start
    #: (see network.ensure_tap); None: libvirt makes a tap on ``network`` per domain
    port: Optional[str] = None

    def __post_init__(self) -> None:
        values.check_network_name(self.network, "interface network")
        if self.port is not None:
            check_port(self.port)
            if not self.anti_spoofing or self.ip is None:
                # a slot port is only ever used with its filter: never an unfiltered NIC
                raise InvalidValue(f"interface {self.port}: a slot port needs anti_spoofing and ip")
        if self.ip is not None:
            values.check_ipv4(self.ip, "interface address")
        values.check_mac(self.mac, "interface")


@dataclass(frozen=True)
class FilesystemSpec:
    """A host directory shared into the VM over virtio-9p (accessmode mapped).

    libvirt does not chown these: qemu (libvirt-qemu) must be able to open the directory
    (measured: a root 0700 source makes createXML fail with "cannot initialize fsdev ...
    Permission denied"), and to write into it, it must own it. In mapped mode the files it
    creates are libvirt-qemu's, 0600, with the guest's owner and mode kept in xattrs.
    """

    source_dir: str
    tag: str
    readonly: bool = False

    def __post_init__(self) -> None:
        check_path("filesystem", self.source_dir)
        values.check_mount_tag(self.tag, f"filesystem {self.source_dir}")


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start one transient domain; the engine builds it, XML is derived."""

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    domain_type: str  # kvm | qemu | test
    cpu_mode: str = "host-passthrough"  # host-passthrough | host-model | none (kvm only)
    console_log: Optional[str] = None
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    disks: Tuple[DiskSpec, ...] = ()
    interface: Optional[InterfaceSpec] = None
    filesystems: Tuple[FilesystemSpec, ...] = ()
    boot: str = "hd"  # hd | cdrom, when there is no kernel

    def __post_init__(self) -> None:
        values.check_domain_name(self.name, "VM name")
        check_uuid(self.uuid)
        for what in ("vcpus", "memory_mib"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidValue(f"{self.name}: {what} must be a positive integer, got {value!r}")
        _one_of(self.name, "domain_type", self.domain_type, ("kvm", "qemu", "test"))
        _one_of(self.name, "cpu_mode", self.cpu_mode, ("host-passthrough", "host-model", "none"))
        _one_of(self.name, "boot", self.boot, ("hd", "cdrom"))
        for what in ("console_log", "kernel", "initrd"):
            value = getattr(self, what)
            if value is not None:
                check_path(f"{self.name} {what}", value)
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise InvalidValue(f"{self.name}: initrd and cmdline need a kernel")
        if self.cmdline is not None:
            values.check_single_line(self.cmdline, f"{self.name} cmdline")
        clash = values.disk_clash([(d.target_dev, d.bus) for d in self.disks])
        if clash:
            first, second = (self.disks[i].target_dev for i in clash)
            raise InvalidValue(f"{self.name}: disks {first} and {second} would be the same disk")
        tags = [f.tag for f in self.filesystems]
        if len(set(tags)) != len(tags):
            raise InvalidValue(f"{self.name}: duplicate filesystem tag in {tags}")


@dataclass(frozen=True)
class BindSpec:
    """A host directory bound into a container at ``target`` (Vac's docker ``-v``)."""

    source: str
    target: str
    readonly: bool = True
    #: a private scratch directory: the hypervisor makes it (empty) before the container starts
    scratch: bool = False

    def __post_init__(self) -> None:
        check_path("bind source", self.source)
        check_path(f"bind {self.source} target", self.target)
        if "/../" in self.target + "/" or ":" in self.target or ":" in self.source:
            raise InvalidValue(f"bind {self.source}: {self.target!r} is not a plain container path")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one container for a ``machine_model = docker`` slot.

    Like a VM, it is named after its slot (the name is also its hostname) and known by the
    factory's UUID (a label on the container: the runtime's own ID is not a UUID). It gets
    ``processors`` x 1024 CPU shares and a memory limit of ``memory_mib``, only the listed
    binds as host paths, no privileges, no new privileges, the runtime's default seccomp
    profile. ``stop_grace_seconds``: a destroy stops it with SIGTERM and kills it after that.
    """

    name: str
    uuid: str
    image: str  # a reference without docker:// (core.values.check_image_reference)
    command: Tuple[str, ...]
    processors: int
    memory_mib: int
    binds: Tuple[BindSpec, ...] = ()
    stop_grace_seconds: int = 10

    def __post_init__(self) -> None:
        values.check_domain_name(self.name, "container name")
        check_uuid(self.uuid)
        values.check_image_reference(self.image, f"{self.name} image")
        for what in ("processors", "memory_mib"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidValue(f"{self.name}: {what} must be a positive integer, got {value!r}")
        if not isinstance(self.stop_grace_seconds, int) or self.stop_grace_seconds < 0:
            raise InvalidValue(f"{self.name}: stop_grace_seconds must be >= 0, got {self.stop_grace_seconds!r}")
        if not self.command:
            raise InvalidValue(f"{self.name}: a container needs a command")
        for part in self.command:
            values.check_single_line(part, f"{self.name} command")
        targets = [b.target.rstrip("/") or "/" for b in self.binds]
        if len(set(targets)) != len(targets):
            raise InvalidValue(f"{self.name}: two binds at one container path in {targets}")


#: what ``Hypervisor.create`` starts: a VM (libvirt) or a container (Docker Engine API)
MachineSpec = Union[VMSpec, ContainerSpec]


def _one_of(where: str, what: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidValue(f"{where}: {what} must be {' or '.join(allowed)}, not {value!r}")


@dataclass(frozen=True)
class DomainInfo:
    """One domain as the hypervisor sees it now."""

    name: str
    uuid: str
    state: DomainState
    cpu_seconds: float
    vcpus: int
    memory_kib: int


@dataclass(frozen=True)
class DomainEvent:
    """One lifecycle event; ``kind`` is one of :data:`EVENT_KINDS`.

    ``cpu_seconds`` is only filled in for ``shutdown`` (guest-initiated power-off), read in
    the moment between the guest powering off and qemu exiting, because a transient domain
    is gone a moment later and accounting wants its final CPU time. It is best effort: None
    means "not available" (always so for the ``shutdown`` that a ``destroy`` causes); use the
    last CPU time observed through ``list_domains``/``domain_info`` instead.

    ``time`` is when the event reached us (epoch seconds). For qemu a start gives
    ``resumed`` then ``started``; a guest power-off ``shutdown`` then ``stopped``; a destroy
    ``shutdown`` then ``stopped`` too.
    """

    uuid: str
    name: str
    kind: str
    time: float
    cpu_seconds: Optional[float] = None
    #: when it really happened, for an event found late (a container that exited while no
    #: process followed the runtime's events): the runtime's record; None: as it arrives
    at: Optional[float] = None


class Hypervisor(Protocol):
    """What the engine and the daemon need from a hypervisor, and nothing more.

    The hypervisor owns a VM's disks and its slot port: ``create`` makes the disks its spec
    describes (overlays, scratch disks, config drives) and the slot's port before starting
    the domain, and ``remove_disks`` deletes them once the domain is gone. ``create`` may be
    called from several threads at once (a round's creations run in parallel).
    """

    def create(self, spec: "MachineSpec") -> None:
        """Make the spec's disks and port, start a transient domain (or, for a ContainerSpec,
        a container); HypervisorError on failure."""

    def remove_disks(self, directory: str) -> None:
        """Delete every disk image in ``directory`` (the VM's domain is gone). Idempotent."""

    def describe(self) -> str:
        """The hypervisor in one line (machinefeatures), e.g. "QEMU 7.2.0 libvirt 9.0.0"."""

    def destroy(self, uuid: str) -> bool:
        """Hard stop; False if the domain was already gone. Idempotent."""

    def list_domains(self) -> List[DomainInfo]:
        """Every domain on the connection, in as few hypervisor calls as possible."""

    def domain_info(self, uuid: str) -> Optional[DomainInfo]:
        """One domain, or None if it does not exist (any more)."""

    def set_event_callback(self, callback: Callable[[DomainEvent], None]) -> None:
        """Deliver lifecycle events to ``callback``, called from the event thread."""

    def ping(self) -> bool:
        """Is the hypervisor reachable now."""

    def ensure_network(self, spec: NetworkSpec) -> None:
        """Create or repair the factory's private VM network."""

    def close(self) -> None:
        """Release the connection; the object may be used again (it reconnects)."""
