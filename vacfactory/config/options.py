"""The option table: every configuration option, its type, default, rules and documentation.

This is the only place that names options. The loader walks these rows to parse and validate a
configuration, the model builds its ``Settings`` and ``MachineType`` classes from them, and
``docs.py`` renders docs/configuration.md and vacfactory.conf(5) from them, so parsing,
defaults and documentation cannot drift apart.

Rows are grouped by section: ``settings`` ([settings]), ``machinetype`` ([machinetype NAME],
legacy [vmtype NAME]) and ``vacuum_pipe`` ([vacuum_pipe PREFIX], which also accepts every
machinetype option as a default for the machinetypes the pipe defines). Within a section,
computed defaults are evaluated in table order, so a default may only depend on rows above it
(or on any explicitly set value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.parsers import (
    TRUE_WORDS,
    HOSTNAME_PATTERN,
    Boolean,
    Choice,
    Integer,
    Location,
    Number,
    Path,
    RegexText,
    Text,
    ValueType,
    Words,
)
from vacfactory.core import apel, mjf, values

SETTINGS = "settings"
MACHINETYPE = "machinetype"
VACUUM_PIPE = "vacuum_pipe"
SECTIONS = (SETTINGS, MACHINETYPE, VACUUM_PIPE)

#: The option that locates the runtime override file (``<state_dir>/runtime.conf``).
STATE_DIR = "state_dir"
#: The runtime override file's name inside state_dir.
RUNTIME_OVERRIDE_NAME = "runtime.conf"
#: The machinetype option whose ``files/`` subdirectory relative paths are resolved against.
FILES_BASE = "machinetype_path"

#: Machine models vacfactory starts as libvirt VMs.
VM_MODELS = ("cernvm3", "cernvm4", "vm-raw")
#: Machine models Vac also ran as containers: docker is started through the Docker Engine API
#: (hypervisor/containers.py); singularity is understood but never started.
CONTAINER_MODELS = ("docker", "singularity")
#: Container models vacfactory starts.
STARTED_CONTAINER_MODELS = ("docker",)
#: Where a docker machinetype's container finds its files (Vac's binds); tmp_binds may not use them.
CONTAINER_BIND_TARGETS = ("/var/spool/joboutputs", "/etc/machinefeatures", "/etc/jobfeatures", "/user_data",
                          "/cvmfs")

#: Names of machinetypes and vacuum pipe prefixes (Vac's rule; '_' separates fields on disk).
SECTION_NAME_PATTERN = r"[a-z0-9-]+"


@dataclass(frozen=True)
class DefaultContext:
    """What a computed default or a rule may look at."""

    host: HostFacts
    #: values of this section known so far (explicit ones and defaults of rows above)
    values: Mapping[str, Any]
    #: the [settings] values when evaluating a machinetype (empty for [settings] itself)
    settings: Mapping[str, Any]
    #: machinetype name or vacuum pipe prefix; None for [settings]
    section_name: Optional[str] = None
    #: the configuration is a Vac site's (read as Vac 03.01 reads it, see Option.vac_parse)
    vac: bool = False


@dataclass(frozen=True)
class Computed:
    """A default computed from the host or from other options."""

    describe: str
    compute: Callable[[DefaultContext], Any]


@dataclass(frozen=True)
class Option:
    """One row of the table."""

    name: str
    section: str
    type: ValueType
    default: Any = None
    required: bool = False
    aliases: Tuple[str, ...] = ()
    doc: str = ""
    #: True if Vac 03.01 has this option (possibly with other semantics, see doc)
    vac: bool = True
    #: never printed by `config show` or in errors
    secret: bool = False
    #: old spellings of values, accepted with a warning: (text, value)
    legacy_values: Tuple[Tuple[str, Any], ...] = ()
    #: relative paths are resolved against <machinetype_path>/files/
    relative_to_files: bool = False
    #: may not be set by the runtime override file
    not_in_override: bool = False
    #: non-empty: a Vac option vacfactory accepts and ignores, with a warning when it is set;
    #: the text says what vacfactory does instead
    ignored: str = ""
    #: how a Vac file's text is read (Vac 03.01's readConf()): returns the value, a Noted value
    #: (loaded with a warning), or raises ValueError where Vac refuses it too. None: as here.
    vac_parse: Optional[Callable[[str], Any]] = None
    #: where a Vac file's value means something else than the same text here, in words; every
    #: row with vac_parse has one (docs/configuration.md and the migration table show it)
    vac_reading: str = ""
    #: what to write in a vacfactory file to say what the Vac file meant
    vac_write: str = ""


#: Vac's own state directory: machinetype files, the vacuum pipe and image caches in Vac mode.
VAC_STATE_DIR = "/var/lib/vac"


@dataclass(frozen=True)
class Noted:
    """A value read from a Vac file that loads, but with a warning saying what it means here."""

    value: Any
    message: str


#: A Vac value read as "not set": the option's default applies (see Noted).
VAC_UNSET = object()


#: How docs and warnings introduce an option with ``Option.ignored``.
IGNORED_PREFIX = "accepted for compatibility with Vac and ignored"


def option_doc(option: Option) -> str:
    """The documentation of a row: its doc, then, for an ignored option, what happens instead."""
    if not option.ignored:
        return option.doc
    return f"{option.doc} {IGNORED_PREFIX[0].upper()}{IGNORED_PREFIX[1:]} (with a warning when set): {option.ignored}."


@dataclass(frozen=True)
class OptionFamily:
    """Options named ``<prefix>XXX`` with an admin-chosen suffix XXX."""

    prefix: str
    sections: Tuple[str, ...]
    type: ValueType
    #: attribute of Settings / MachineType holding {XXX: value}
    attribute: str
    doc: str
    vac: bool = True
    suffix_pattern: str = "[a-z0-9_]+"
    relative_to_files: bool = False
    #: suffixes that are an error, and why (``'XXX' <reserved_why>``)
    reserved: Tuple[str, ...] = ()
    reserved_why: str = ""


@dataclass(frozen=True)
class IgnoredOption:
    """An option Vac once had: accepted, ignored, and warned about."""

    name: str
    section: str
    reason: str


@dataclass(frozen=True)
class Rule:
    """A rule between options of one section, reported at ``option``'s file and line.

    ``test`` returns a message when the rule is broken. It runs only when every option in
    ``needs`` parsed. A ``warning`` rule may give ``replacement``: the value ``option`` takes.
    """

    section: str
    option: str
    needs: Tuple[str, ...]
    test: Callable[[DefaultContext], Optional[str]]
    doc: str
    severity: str = "error"
    replacement: Optional[Callable[[DefaultContext], Any]] = None
    #: in a Vac configuration: "warning" (Vac loads it; the text says what it means here) or
    #: None (the same as here); vac_replacement is the value ``option`` then takes
    vac_severity: Optional[str] = None
    vac_replacement: Optional[Callable[[DefaultContext], Any]] = None


def _default_machinegroup(ctx: DefaultContext) -> Any:
    return ctx.values.get("accounting_fqan") or ctx.section_name


def _default_machinetype_path(ctx: DefaultContext) -> Any:
    state_dir = VAC_STATE_DIR if ctx.vac else (ctx.settings.get(STATE_DIR) or "/var/lib/vacfactory")
    return f"{state_dir.rstrip('/')}/machinetypes/{ctx.section_name}"


def _default_cache_dir(name: str) -> Callable[[DefaultContext], Any]:
    def compute(ctx: DefaultContext) -> Any:
        state_dir = VAC_STATE_DIR if ctx.vac else ctx.values.get(STATE_DIR)
        return f"{state_dir.rstrip('/')}/{name}" if state_dir else None

    return compute


# ---- Vac 03.01's readings of values (Option.vac_parse); each says what Vac does in its docstring


def _vac_word(on: str) -> Callable[[str], Any]:
    """A boolean Vac compares with one word (lower-cased): anything else is off. A word that is
    on in vacfactory's own files (yes/true/on/1) but off here gets a warning, so the difference
    is never silent."""

    def parse(text: str) -> Any:
        word = text.strip().lower()
        if word == on:
            return True
        if word in TRUE_WORDS:
            return Noted(False, f"{text!r} is off in a Vac file (Vac turns this on only for {on!r}); "
                                "in a vacfactory file it would be on")
        return False

    parse.__doc__ = f"on only for {on!r}"
    return parse


def _vac_text(text: str) -> str:
    """Any text, empty included (Vac stores it and never checks it)."""
    return text


def _vac_version_logger(text: str) -> Any:
    """true = 1, false = 0, an integer as is; anything else: off (0), with a warning."""
    word = text.strip().lower()
    if word in ("true", "false"):
        return 1 if word == "true" else 0
    try:
        return Integer(min=0).parse(text)
    except ValueError:
        return Noted(0, f"{text!r} is not true, false or a count: read as 0 (off), as Vac does")


def _vac_share(text: str) -> Any:
    """Python's float(); a share <= 0 never starts (Vac's test is share > 0), so negative = 0."""
    value = Number().parse(text)
    if value < 0:
        return Noted(0.0, f"{text!r}: a negative share is read as 0 (never started), as Vac does")
    return value


def _vac_machinetype_disk(text: str) -> Any:
    """Vac 03.01 does not read it in a machinetype: a value that is not a count is ignored."""
    try:
        return _NONNEG_INT.parse(text)
    except ValueError as error:
        return Noted(VAC_UNSET, f"{error}: ignored, as Vac 03.01 ignores this option in a machinetype "
                                "(the [settings] value applies)")


_POSITIVE_INT = Integer(min=1)
_NONNEG_INT = Integer(min=0)
_BYTES = Integer(name="bytes", min=1)
_SECONDS = Integer(name="seconds", min=0)
_NAME = Text()
_PATH = Path()
_INTERFACE = Text(name="interface name", check=values.check_interface_name, pattern_doc=values.INTERFACE_NAME_DOC)
_DEVICE = Text(name="device name", check=values.check_guest_disk_device, pattern_doc=values.GUEST_DISK_DEVICE_DOC)
_FILE_NAME = Text(
    name="file name",
    pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    pattern_doc="must be a plain file name (A-Z a-z 0-9 _ . -, no '/')",
)

_HOSTPORT = Text(
    name="host:port",
    pattern=rf"(?:{HOSTNAME_PATTERN}:[0-9]{{1,5}})?",
    pattern_doc="must be host:port (a host name or IPv4 address, and a port), or empty",
    allow_empty=True,
)

S, M, P = SETTINGS, MACHINETYPE, VACUUM_PIPE

OPTIONS: Tuple[Option, ...] = (
    # ---------------------------------------------------------------- [settings]: the space
    Option("vac_space", S, Text(name="space name", pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*",
                                pattern_doc="must be a DNS-like name (A-Z a-z 0-9 . _ -)"),
           required=True,
           doc="Name of the Vac space this factory belongs to, a DNS-like name such as "
               "vac01.example.com. Factories answer VacQuery requests only for their own space."),
    Option("factory_name", S, Text(name="host name", check=values.check_factory_name,
                                   pattern_doc=values.FACTORY_NAME_DOC),
           default=Computed("this host's name (os.uname().nodename)", lambda c: c.host.fqdn), vac=False,
           doc="Name of this factory in the space: VM names (<short>-NN.<domain>), the APEL "
               "SubmitHost (<space>/vacfactory-<name>), the factory field of VacQuery replies (peers "
               "accept a reply only from a name in their factories list). The default is the "
               "kernel's host name (uname -n, no DNS lookup), as in Vac, which has no such "
               "option; like Vac we insist it is fully qualified (contains a dot)."),
    Option("factories", S, Words(item=Text(pattern=rf"\.|{HOSTNAME_PATTERN}",
                                           pattern_doc="must be a host name, or '.' for this factory"),
                                 lower=True),
           default=(),
           doc="The other factories of the space, queried by UDP to share out the target shares. "
               "'.' stands for this factory. Empty: this factory decides alone."),
    Option("description", S, _NAME, doc="Free-text description of the space (Vac parses it but does not use it).",
           vac_parse=_vac_text, vac_reading="any text, also empty (an empty description is an error here)",
           vac_write="leave description out, or write some text"),
    Option("udp_timeout_seconds", S, Number(name="seconds", min=0, min_exclusive=True), default=10.0,
           doc="Overall time to wait for VacQuery replies from the other factories."),
    Option("udp_port", S, Integer(name="port", min=1, max=65535), default=995, vac=False,
           doc="UDP port of the VacQuery responder and of the factories it queries (Vac: fixed 995)."),
    Option("space_key", S, Text(), secret=True, vac=False,
           doc="Shared secret of the space: when set, VacQuery messages carry an HMAC and unsigned "
               "or wrongly signed messages are dropped. Prefer space_key_file, which keeps the "
               "secret out of the configuration."),
    Option("space_key_file", S, _PATH, vac=False,
           doc="File holding the space key (first line). Mutually exclusive with space_key."),
    # ---------------------------------------------------------------- [settings]: the host
    Option("domain_type", S, Choice(choices=("kvm", "qemu", "test"), choice_docs=(
        ("kvm", "hardware virtualisation (production)"),
        ("qemu", "software emulation (TCG), where KVM is unusable"),
        ("test", "libvirt's test driver (unit tests); lifts the total_processors limit"))),
           default="kvm", legacy_values=(("xen", "kvm"),),
           doc="libvirt domain type. Vac 03.01 listed domain_type as deprecated and ignored it "
               "(it always ran KVM); vacfactory uses it again. A Vac configuration's xen loads as "
               "kvm, with a warning."),
    Option("libvirt_uri", S, Text(), default="qemu:///system", vac=False,
           doc="libvirt connection URI."),
    Option("container_socket", S, Path(), default="/var/run/docker.sock", vac=False,
           doc="Unix socket of the Docker Engine API that runs machine_model = docker machinetypes "
               "(Docker, or Podman's Docker-compatible service: `podman system service`). Used only "
               "when a docker machinetype is configured."),
    Option("container_stop_seconds", S, Integer(name="seconds", min=0, max=3600), default=30, vac=False,
           doc="When a container is killed (wallclock, heartbeat, shutdown_time, a drain), it gets "
               "SIGTERM and is killed this many seconds later if it has not exited."),
    Option("cpu_mode", S, Choice(choices=("host-passthrough", "host-model", "none")),
           default="host-passthrough", vac=False,
           doc="CPU model given to VMs; 'none' leaves it to libvirt (use it with domain_type = qemu)."),
    Option("total_processors", S, Integer(min=1, max=values.VM_SLOTS), aliases=("cpu_total",),
           default=Computed("this host's processor count (/proc/cpuinfo)", lambda c: c.host.cpu_count),
           doc="Processors this factory may give to VMs. More than the host has is an error, "
               "except with domain_type = test.",
           vac_parse=Integer(min=0, max=values.VM_SLOTS).parse,
           vac_reading="0 is accepted and gives VMs no processors, so no VM starts (here the least is 1; "
                       "write draining = yes to stop starting VMs)",
           vac_write="draining = yes to start no VMs; total_processors is at least 1"),
    Option("total_memory_mb", S, Integer(name="MiB", min=1),
           vac=False, doc="Memory (MiB) this factory may give to VMs in total: no VM is created "
                          "that would take the VMs' memory (mb_per_processor x processors each) "
                          "past it. Unset (the default): no memory cap, as in Vac, whose "
                          "vac.conf(5) tells admins to overcommit memory by raising "
                          "mb_per_processor."),
    Option("mb_per_processor", S, Integer(name="MiB", min=1), default=2048, aliases=("mb_per_cpu",),
           doc="Memory (MiB) given to a VM per processor it has."),
    Option("hs06_per_processor", S, Number(min=0, min_exclusive=True), aliases=("hs06_per_cpu",),
           doc="Benchmark power of one processor (HS06, or HEPscore23 with accounting_benchmark). "
               "Unset: 1.0 is used for shares and no hs06 MJF files are written; APEL records are "
               "still archived (with ServiceLevel 1.0) but never queued for sending nor counted in "
               "sync records (as in Vac). A VM keeps the value it was created with."),
    Option("processors_per_superslot", S, _POSITIVE_INT, default=1,
           aliases=("vcpu_per_machine", "cpu_per_machine"),
           doc="Size of a superslot: VMs started together share one end time."),
    Option("overload_per_processor", S, Number(min=0, min_exclusive=True), default=1.25,
           aliases=("overload_per_cpu",),
           doc="No VM is started while the load average exceeds this times the running (or total) "
               "processors.",
           vac_parse=Number().parse,
           vac_reading="0 (or less) is accepted: no VM starts while the host has any load (here it must "
                       "be > 0)",
           vac_write="draining = yes to start no VMs; overload_per_processor above 0"),
    Option("disk_gb_per_processor", S, _NONNEG_INT, aliases=("scratch_gb", "disk_gb_per_cpu"),
           doc="Disk (GB, 10^9 bytes) per processor for each VM's scratch or root disk (a qcow2 "
               "file). Unset or 0: cernvm3/cernvm4 root disks get 40 GB per processor (Vac's size "
               "for file-backed disks) and vm-raw VMs get no scratch disk."),
    Option("volume_group", S, Text(name="volume group", pattern=r"[A-Za-z0-9+_.-]+",
                                   pattern_doc="must be an LVM volume group name"),
           doc="LVM volume group Vac put VM disks in (unset: vac_volume_group if it existed).",
           ignored="VM disks are always qcow2 files in <state_dir>/machines/<uuid>/disks/ (sized by "
                   "disk_gb_per_processor)"),
    Option("root_public_key", S, _PATH, default="/root/.ssh/id_rsa.pub",
           doc="File of OpenSSH public keys offered to VMs as root's keys (meta_data.json public_keys "
               "and EC2 public-keys/0/openssh-key, one key per line), written like authorized_keys: blank "
               "lines and # comments are skipped, options before a key are kept, any other line is "
               "skipped with a warning naming file:line. A file that cannot be read or holds no key never "
               "stops a VM (Vac: \"no ssh access\"): one warning per file and change, and VMs are created "
               "without a key."),
    Option("singularity_user", S, Text(name="user name"),
           doc="Unprivileged user that ran Singularity containers in Vac.",
           ignored="vacfactory starts no Singularity containers (docker ones run through the Docker Engine API)"),
    # ---------------------------------------------------------------- [settings]: the engine
    Option("state_dir", S, Path(relative_to_config=True), default="/var/lib/vacfactory", vac=False,
           not_in_override=True,
           doc="Directory of all state: machines, finishes, accounting, caches, and the runtime "
               "override file runtime.conf (which may not set state_dir itself). A relative path "
               "is relative to the directory of the file that sets it."),
    Option("pipes_cache_dir", S, _PATH, vac=False, not_in_override=True,
           default=Computed("<state_dir>/pipescache; Vac's /var/lib/vac/pipescache in a Vac configuration",
                            _default_cache_dir("pipescache")),
           doc="Directory of the vacuum pipe caches (<prefix>.pipe, the last good document, as Vac "
               "keeps it, and <prefix>.meta.json). A Vac site's caches are used at once, before the "
               "first download.",
           vac_reading="defaults to Vac's /var/lib/vac/pipescache",
           vac_write="pipes_cache_dir = /var/lib/vac/pipescache to share Vac's caches"),
    Option("image_cache_dir", S, _PATH, vac=False, not_in_override=True,
           default=Computed("<state_dir>/imagecache; Vac's /var/lib/vac/imagecache in a Vac configuration",
                            _default_cache_dir("imagecache")),
           doc="Directory of downloaded root images and user_data templates. vacfactory names its "
               "files differently from Vac and never deletes a file it did not write.",
           vac_reading="defaults to Vac's /var/lib/vac/imagecache",
           vac_write="image_cache_dir = /var/lib/vac/imagecache"),
    Option("log_to", S, Choice(choices=("stderr", "file", "syslog"), choice_docs=(
        ("stderr", "standard error (systemd's journal under `vacfactory run`)"),
        ("file", "the file log_file, reopened when logrotate moves it"),
        ("syslog", "the local syslog socket /dev/log with syslog priorities (journald reads them), "
                   "facility daemon, identifier vacfactory"))),
           default="stderr", vac=False, not_in_override=True,
           doc="Where the daemon logs. The command line's --log-file wins; a change needs a "
               "restart. `vacfactory daemon` logs to log_file when this is stderr, as its "
               "stderr is closed once it detaches."),
    Option("log_file", S, Path(relative_to_config=True), default="/var/log/vacfactory.log", vac=False,
           not_in_override=True,
           doc="The log file of log_to = file (and of `vacfactory daemon` with log_to = stderr). "
               "A relative path is relative to the directory of the file that sets it."),
    Option("cycle_seconds", S, Number(name="seconds", min=0.1, max=120), default=10.0, vac=False,
           doc="Longest time between two decision rounds; libvirt events wake the engine sooner "
               "(Vac: one round, then a 60 s sleep). At most 120: every round tells systemd's "
               "watchdog the daemon is alive (WatchdogSec=300 in conf/vacfactory.service)."),
    Option("max_starting_processors", S, _POSITIVE_INT, default=64, vac=False,
           doc="At most this many processors may belong to VMs still starting (younger than "
               "starting_seconds), so a fresh factory ramps up without overloading the host."),
    Option("starting_seconds", S, Number(name="seconds", min=0), default=60.0, vac=False,
           doc="How long a new VM counts as starting for max_starting_processors."),
    Option("shutdown_time", S, Integer(name="epoch seconds", min=0),
           doc="Unix time at which all VMs must have stopped; none are started that would run "
               "past it. Usually set temporarily in the runtime override file."),
    Option("draining", S, Boolean(), default=False,
           doc="Start no new VMs; running ones finish normally.",
           vac_parse=_vac_word("yes"),
           vac_reading="on only for yes (any case); true, on and 1 are off (here they are on)",
           vac_write="draining = yes for on; draining = no, or leave it out, for off"),
    Option("abort_on_700", S, Boolean(), default=True, vac=False,
           doc="Count shutdown_message codes 700-799 as aborts, which trigger backoff (Vac 03.00 "
               "does; Vcycle does not)."),
    Option("grace_seconds", S, _SECONDS, default=0, vac=False,
           doc="MJF grace_secs: a VM still running at its shutdown time is killed this much later."),
    Option("fix_networking", S, Boolean(), default=True,
           doc="Vac: repair a libvirt network that has the wrong addresses by recreating it "
               "(false disabled it).",
           vac_parse=_vac_word("true"),
           vac_reading="on only for true (any case); anything else is off (here yes/no, on/off, 1/0 "
                       "also work and anything else is an error)",
           vac_write="leave it out: vacfactory ignores it and always repairs the network",
           ignored="the private VM network is always checked every minute and repaired (recreated "
                   "if it differs, its DHCP table updated in place while VMs use it)"),
    # ---------------------------------------------------------------- [settings]: network, I/O
    Option("network_name", S, Text(name="network name", check=values.check_network_name,
                                   pattern_doc=values.NETWORK_NAME_DOC),
           default="vacfactory", vac=False, doc="Name of the libvirt NAT network of the VMs."),
    Option("network_bridge", S, _INTERFACE, default="vacbr0", vac=False,
           doc="Linux bridge of that network."),
    Option("forward_dev", S, _INTERFACE, doc="Host interface the NAT network forwards through "
                                             "(libvirt's <forward dev=...>). Unset: any."),
    Option("http_port", S, Integer(name="port", min=1, max=65535), default=80, vac=False,
           doc="Port of the MJF/joboutputs and metadata HTTP server on 169.254.169.253/254; every URL "
               "given to a VM carries it when it is not 80. Read when the daemon starts: a change needs "
               "a restart."),
    Option("nfs_exporter", S, Choice(choices=("none", "ganesha", "exportfs"), choice_docs=(
        ("none", "no NFS: VMs use HTTP (mjf_transport = http)"),
        ("ganesha", "userspace nfs-ganesha"),
        ("exportfs", "the kernel NFS server"))),
           default="ganesha", vac=False, doc="How machine directories are exported to VMs over NFS."),
    Option("joboutputs_nfs_filesystem", S, Choice(choices=("ext4", "tmpfs", "none"), choice_docs=(
        ("ext4", "a sparse file machines/<uuid>/joboutputs.img formatted ext4 and loop-mounted "
                 "(costs the state disk what the VM writes, at most the cap plus ext4's overhead)"),
        ("tmpfs", "a size-limited tmpfs (no loop device; costs RAM, lost with a host reboot)"),
        ("none", "a plain directory, only trimmed every few seconds: a writer that keeps a file "
                 "open can fill the state disk"))),
           default="ext4", vac=False,
           doc="Each NFS VM's joboutputs is a filesystem of its own of joboutputs_max_total_bytes "
               "(and joboutputs_max_files plus 64 inodes), so a VM writing over NFS gets ENOSPC at "
               "its cap even if it keeps a file open. When the VM is cleaned, the files within the "
               "caps are copied out, the filesystem is unmounted and its image deleted. Needs root "
               "and mount (ext4: loop devices and mkfs.ext4). Read when the daemon starts; "
               "unused with nfs_exporter = none."),
    Option("joboutputs_max_file_bytes", S, _BYTES, default=10485760, vac=False,
           doc="Largest single file a VM may write into joboutputs."),
    Option("joboutputs_max_total_bytes", S, _BYTES, default=104857600, vac=False,
           doc="Most bytes a VM may write into joboutputs in total."),
    Option("joboutputs_max_files", S, _POSITIVE_INT, default=256, vac=False,
           doc="Most files a VM may create in joboutputs."),
    # ---------------------------------------------------------------- [settings]: traceability
    Option("syslog_server", S, _HOSTPORT, default="169.254.169.254:514", vac=False,
           doc="Syslog server (UDP) VMs are told to log to: machinefeatures/syslog and "
               "##user_data_syslog_server##, for rsyslog early in boot. When it is one of the "
               "factory's addresses on the private network (169.254.169.254 or .253), the factory "
               "receives the messages itself and files them per VM in <machine "
               "dir>/syslog/messages (see `vacfactory machine`); any other host is only published. "
               "Empty: no syslog key, no receiver."),
    Option("syslog_forward", S, _HOSTPORT, vac=False,
           doc="The site's central syslog (UDP host:port, preferably an IP address): every message "
               "the factory receives within the rate limit is also sent there, as RFC 5424 with the "
               "VM's hostname and address. Unset or empty: no forwarding."),
    Option("syslog_days", S, Number(name="days"), default=7.0, vac=False,
           doc="Delete a VM's syslog files once their last message is this many days old (files "
               "rotate daily while the VM runs). A machine directory deleted earlier "
               "(machines_dir_days) takes its syslog with it. <= 0: keep them as long as the "
               "machine directory."),
    Option("syslog_max_bytes_per_vm", S, Integer(name="bytes", min=4096), default=20971520, vac=False,
           doc="Most bytes of syslog kept per VM; beyond it a last line says so and further "
               "messages are dropped (and counted)."),
    Option("syslog_rate_per_vm", S, Number(name="messages per second", min=0, min_exclusive=True),
           default=50.0, vac=False,
           doc="Messages per second accepted from one VM on average (a token bucket with "
               "syslog_burst_per_vm); the excess is dropped and counted, so one flooding VM cannot "
               "starve the others."),
    Option("syslog_burst_per_vm", S, _POSITIVE_INT, default=500, vac=False,
           doc="Messages one VM may send at once above syslog_rate_per_vm (a boot's worth)."),
    Option("keep_on_abnormal_end", S, Boolean(), default=False, vac=False,
           doc="Keep the disks of a VM that ended abnormally (killed for its heartbeat or "
               "wallclock, found paused or crashed, or a shutdown_message code 500-799) in "
               "<state_dir>/kept/<uuid>/, read-only, for keep_days, instead of deleting them. "
               "The cached base image they need is kept as long."),
    Option("keep_days", S, Number(name="days", min=0, min_exclusive=True), default=7.0, vac=False,
           doc="How long kept disks (keep_on_abnormal_end) are kept."),
    Option("keep_max_overlays", S, _POSITIVE_INT, default=8, vac=False,
           doc="At most this many VMs' disks are kept at once; beyond it new ones are deleted as "
               "usual (logged), so a burst of failures cannot fill the disk and older evidence "
               "is never pushed out."),
    # ---------------------------------------------------------------- [settings]: accounting
    Option("gocdb_sitename", S, _NAME, doc="GOCDB site name: Site of APEL records."),
    Option("gocdb_cert_file", S, _PATH, doc="Certificate Vac used to update GOCDB with the space census.",
           ignored="vacfactory never updates GOCDB (gocdb_sitename still names the Site of APEL "
                   "records)"),
    Option("gocdb_key_file", S, _PATH, doc="Key of gocdb_cert_file.",
           ignored="vacfactory never updates GOCDB"),
    Option("accounting_benchmark", S, Choice(choices=("HEPSPEC", "HEPscore23")), default="HEPSPEC",
           vac=False, doc="ServiceLevelType of APEL records (the benchmark hs06_per_processor is in)."),
    Option("apel_infrastructure_description", S, Text(max_length=100), default="APEL-VACFACTORY",
           vac=False, doc="InfrastructureDescription of APEL records (Vac wrote APEL-VAC)."),
    Option("apel_infrastructure_type", S, Text(max_length=20), default="grid", vac=False,
           doc="InfrastructureType of APEL records."),
    Option("apel_cloud_records", S, Boolean(), default=False, vac=False,
           doc="Also write APEL-cloud-message v0.4 records."),
    Option("apel_send", S, Boolean(), default=False, vac=False,
           doc="The daemon sends queued APEL records itself (STOMP, or ARGO AMS with "
               "apel_sender_cfg). No: run ssmsend from cron on apel-outgoing, as with Vac."),
    Option("apel_broker_host", S, Text(name="host name", pattern=HOSTNAME_PATTERN,
                                       pattern_doc="must be a host name"),
           vac=False, doc="STOMP broker host; required with apel_send = yes."),
    Option("apel_broker_port", S, Integer(name="port", min=1, max=65535), default=61613, vac=False,
           doc="STOMP broker port."),
    Option("apel_destination", S, Text(), default="/queue/global.accounting.cpu.central", vac=False,
           doc="STOMP destination of APEL records."),
    Option("apel_cloud_destination", S, Text(), default="/queue/global.accounting.cloud.CENTRAL", vac=False,
           doc="STOMP destination of APEL cloud records (apel_cloud_records), for the built-in sender. "
               "The default is chosen by analogy with the grid queue of apel_destination, not taken "
               "from APEL's documentation: confirm it with your broker's operators. EGI's production "
               "service takes cloud records over ARGO AMS (topic eu-egi-cloud-accounting) from the "
               "real ssmsend."),
    Option("apel_use_ssl", S, Boolean(), default=True, vac=False, doc="Connect to the broker with TLS."),
    Option("apel_host_cert", S, _PATH, default="/etc/grid-security/hostcert.pem", vac=False,
           doc="Certificate that signs APEL messages and authenticates to the broker."),
    Option("apel_host_key", S, _PATH, default="/etc/grid-security/hostkey.pem", vac=False,
           doc="Key of apel_host_cert."),
    Option("apel_capath", S, _PATH, default="/etc/grid-security/certificates", vac=False,
           doc="CA directory for verifying the broker."),
    Option("apel_send_interval_seconds", S, Integer(name="seconds", min=1), default=3600, vac=False,
           doc="How often queued APEL records are sent."),
    Option("apel_sender_cfg", S, _PATH, vac=False,
           doc="The ssmsend sender.cfg the built-in sender reads (protocol STOMP or AMS, host, "
               "certificates, destination, ams_project, token, path): set it and the built-in "
               "sender goes exactly where ssmsend would, overriding apel_broker_host, "
               "apel_broker_port, apel_use_ssl, apel_destination and the apel_host_* and "
               "apel_capath options. Its path must be this factory's apel-outgoing, path_type dirq."),
    Option("apel_batch", S, Boolean(), default=False, vac=False,
           doc="The built-in sender packs up to apel_batch_records queued job records into one "
               "APEL message (never over AMS's 1 MB limit). Records stay archived one by one; "
               "republish and sync are unchanged."),
    Option("apel_batch_records", S, Integer(name="records", min=1, max=1000), default=500, vac=False,
           doc="Most job records in one message with apel_batch = yes (APEL's own client sends "
               "1000)."),
    # ---------------------------------------------------------------- [settings]: monitoring
    Option("version_logger", S, _NONNEG_INT, default=1, legacy_values=(("true", 1), ("false", 0)),
           vac_parse=_vac_version_logger,
           vac_reading="read as a count: true is 1, false is 0; anything else (no, off) is 0 with a "
                       "warning (here an error)",
           vac_write="leave it out: vacfactory sends nothing to the version logger",
           doc="Messages per day Vac sent to its version logger (0 disabled it; true/false were "
               "legacy spellings of 1/0).",
           ignored="vacfactory sends nothing to Vac's version logger; factory status goes to the "
                   "VacMon collectors of vacmon_hostport"),
    Option("vacmon_hostport", S, Words(item=Text(pattern=r"[a-z0-9.-]+:[0-9]+",
                                                 pattern_doc="must be host.domain:port"), lower=True),
           default=(), doc="VacMon collectors that receive factory and machinetype status messages."),
    Option("metrics_port", S, Integer(name="port", min=0, max=65535), default=0, vac=False,
           doc="TCP port of the admin listener: the Prometheus text endpoint GET /metrics and the "
               "read-only status page (GET /, /status.json, /history.json; see docs/status-page.md), "
               "bound to metrics_address (scrape it through a local agent or a reverse proxy). "
               "0: no listener."),
    Option("metrics_address", S, Text(pattern=r"[0-9]{1,3}(\.[0-9]{1,3}){3}",
                                      pattern_doc="must be an IPv4 address"), default="127.0.0.1", vac=False,
           doc="IPv4 address the admin listener of metrics_port binds: 127.0.0.1 (the default) for "
               "this host only, a site monitoring network's address to show /metrics and the status "
               "page there (read-only, no secrets; anyone who can reach it sees what the factory runs)."),
    Option("check_disk_free_warning_mb", S, Integer(name="MiB", min=0), default=10240, vac=False,
           doc="`vacfactory check` warns when the file system of state_dir has less free space "
               "than this (MiB)."),
    Option("check_disk_free_critical_mb", S, Integer(name="MiB", min=0), default=1024, vac=False,
           doc="`vacfactory check` is critical when the file system of state_dir has less free "
               "space than this (MiB; Vac stopped creating VMs below 1 GB, or meant to); must be "
               "<= check_disk_free_warning_mb."),
    Option("check_apel_backlog_warning_seconds", S, Integer(name="seconds", min=1), default=86400,
           vac=False,
           doc="`vacfactory check` warns when the oldest APEL message waiting in apel-outgoing is "
               "older than this: ssmsend (or apel_send) is not delivering."),
    # ---------------------------------------------------------------- [settings]: downloads
    Option("pipe_ca_path", S, _PATH, vac=False,
           doc="CA certificates (a hashed directory such as /etc/grid-security/certificates, or "
               "one PEM bundle) that verify https vacuum pipes and root images. Unset: "
               "/etc/grid-security/certificates if it exists, else the system's CAs."),
    Option("pipe_fetch_timeout_seconds", S, Number(name="seconds", min=1, max=600), default=30.0,
           vac=False,
           doc="Longest time one vacuum pipe download may take in total (Vac: 30 s). On failure "
               "the cached copy stays in use."),
    Option("image_fetch_timeout_seconds", S, Number(name="seconds", min=1, max=86400), default=120.0,
           vac=False,
           doc="Longest time one root_image download may take in total (Vac: 120 s per read). On "
               "failure the cached copy stays in use."),
    Option("image_check_seconds", S, Number(name="seconds", min=0), default=300.0, vac=False,
           doc="A cached http(s) root_image or user_data template is checked with its server (a "
               "conditional GET with If-None-Match/If-Modified-Since) at most this often, in the "
               "background. 0: at every VM creation (Vac fetched both every time)."),
    Option("internal_url_hosts", S, Words(item=Text(
        name="host or network", lower=True, pattern=r"[a-z0-9.-]+|[0-9a-f:.]+(/[0-9]{1,3})?",
        pattern_doc="must be a host name, an address or a CIDR network")), default=(), vac=False,
           doc="Site-internal mirrors that URLs from vacuum pipes (root_image, user_data) and every "
               "redirect may reach: host names (that name, whatever it resolves to) and addresses or "
               "CIDR networks (any host resolving into them). Everything else must resolve to public "
               "addresses only: loopback, link-local (169.254.0.0/16), private, shared, unique-local "
               "(fc00::/7), multicast, reserved and unspecified addresses and the factory's own "
               "addresses are refused. URLs written in the configuration files are trusted for their "
               "first host; their redirects are checked too, and https never redirects to http."),
    Option("image_max_download_gb", S, Number(name="GiB", min=0, min_exclusive=True), default=20.0, vac=False,
           doc="Largest root_image download (GiB, 2^30 bytes): a larger body is cut off and its "
               "partial file deleted. user_data templates are limited to 4 MiB."),
    Option("image_download_reserve_mb", S, Integer(name="MiB", min=0), default=256, vac=False,
           doc="A download into <state_dir>/imagecache stops, and its partial file is deleted, when "
               "the filesystem would have less than this much free space (MiB): a large or endless "
               "image can never fill the disk the VMs' files and the accounting records live on."),
    Option("max_root_image_gb", S, Number(name="GiB", min=0, min_exclusive=True), vac=False,
           doc="Largest virtual size (GiB, 2^30 bytes) a qcow2 or raw root_image may claim; larger "
               "images are refused (a small qcow2 may claim a petabyte, and its overlay lets the "
               "guest grow that far on the host). Unset: 100 GiB, or disk_gb_per_processor x "
               "max_processors of the machinetype if that is larger."),
    # ================================================================ [machinetype NAME]
    Option("target_share", M, Number(min=0), default=0.0,
           doc="Share of the space's processing power (HS06) for this machinetype; 0 never starts it.",
           vac_parse=_vac_share,
           vac_reading="a negative share is read as 0, with a warning: never started (here an error)",
           vac_write="target_share = 0 for a machinetype that never starts"),
    Option("machine_model", M, Choice(choices=VM_MODELS + CONTAINER_MODELS, choice_docs=(
        ("cernvm3", "a CernVM 3 ISO as a cdrom plus a scratch disk"),
        ("cernvm4", "a CernVM 4 image"),
        ("vm-raw", "a raw or qcow2 disk image, used through a qcow2 overlay"),
        ("docker", "a container from root_image = docker://IMAGE[:TAG], through the Docker Engine API"),
        ("singularity", "a Singularity container (Vac only: vacfactory warns and never starts it)"))),
           default="cernvm3", aliases=("vm_model",),
           doc="What kind of machine this is. VMs and docker containers are started; singularity "
               "machinetypes load with a warning and are never started."),
    Option("root_image", M, Location(schemes=("http", "https", "docker")), relative_to_files=True,
           doc="Boot image: an absolute path, a path relative to <machinetype_path>/files/, an "
               "http(s) URL (cached), or docker://... for docker machinetypes. A startable "
               "machinetype needs root_image or kernel_image.",
           vac_reading="a machinetype without one loads: with target_share 0 silently, otherwise with a "
                       "warning, and it is never started (here an error)",
           vac_write="a root_image, or leave the machinetype out"),
    Option("root_image_sha256", M, Text(name="sha256", pattern=r"[0-9a-f]{64}", lower=True,
                                        pattern_doc="must be 64 hexadecimal digits"),
           vac=False,
           doc="SHA-256 of root_image. When set, a downloaded (or local) image whose digest "
               "differs is refused, and the cached copy is used only if it matches. May also be "
               "given by a vacuum pipe."),
    Option("kernel_image", M, Path(absolute=False), relative_to_files=True, vac=False,
           doc="Kernel to boot directly (libvirt <kernel>), for images without a boot loader."),
    Option("initrd_image", M, Path(absolute=False), relative_to_files=True, vac=False,
           doc="Initial ramdisk for kernel_image."),
    Option("kernel_cmdline", M, Text(allow_empty=True), vac=False,
           doc="Kernel command line for kernel_image: one line of printable characters."),
    Option("user_data", M, Location(schemes=("http", "https")), relative_to_files=True,
           doc="user_data template: an absolute path, a path relative to <machinetype_path>/files/, "
               "or an http(s) URL. ##user_data_...## patterns in it are substituted. A URL is "
               "fetched into the image cache in the background (checked like a root_image, every "
               "image_check_seconds); until the first copy arrives the machinetype is not started. "
               "At most 4 MiB."),
    Option("machinetype_path", M, _PATH,
           default=Computed("<state_dir>/machinetypes/<name>", _default_machinetype_path),
           doc="Directory of this machinetype's files (files/, x509cert.pem, x509key.pem). "
               "Undocumented in Vac, which used /var/lib/vac/machinetypes/<name>.",
           vac_reading="defaults to Vac's /var/lib/vac/machinetypes/<name> (a vacuum pipe's machinetypes: "
                       "/var/lib/vac/machinetypes/<prefix>), so relative root_image, user_data and "
                       "user_data_file_XXX are found in Vac's files/ directory and the proxy's "
                       "x509cert.pem and x509key.pem next to it (here the default is under state_dir)",
           vac_write="machinetype_path = /var/lib/vac/machinetypes/NAME to keep using the files where Vac had them"),
    Option("root_device", M, _DEVICE, default="vda",
           doc="Guest device of the root disk (virtio if it contains 'vd', else IDE)."),
    Option("scratch_device", M, _DEVICE, default="vdb", doc="Guest device of the scratch disk."),
    Option("container_command", M, Text(check=values.command_words), default="/user_data",
           doc="Command a docker container runs, split into words as a shell would (no shell runs "
               "it). The default runs the rendered user_data, bound read-only and executable at "
               "/user_data."),
    Option("tmp_binds", M, Words(item=Path()), default=(),
           doc="Absolute paths in a docker container that each get a private, empty scratch "
               "directory of the factory's (kept with the container's machine directory)."),
    Option("cvmfs_repositories", M, Words(item=Text(pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*",
                                                    pattern_doc="must be a repository name")),
           default=(), doc="CernVM-FS repositories the machinetype needs. A docker container gets "
                            "the host's /cvmfs read-only when this is set (as in Vac); VMs mount "
                            "CernVM-FS themselves and are not affected."),
    Option("disk_gb_per_processor", M, _NONNEG_INT,
           doc="Overrides the [settings] value for this machinetype, but only downwards: a larger "
               "value is ignored with a warning (Vac's rule).",
           vac_parse=_vac_machinetype_disk,
           vac_reading="Vac 03.01 does not read it in a machinetype, so any text loads: a value that is "
                       "not a count (40GB) is ignored with a warning (here an error)",
           vac_write="a plain count of GB (40), or leave it out to use the [settings] value"),
    Option("min_processors", M, _POSITIVE_INT, default=1, doc="Fewest processors a VM of this type gets."),
    Option("max_processors", M, _POSITIVE_INT, default=1,
           doc="Most processors a VM of this type gets; must be >= min_processors."),
    Option("max_wallclock_seconds", M, Integer(name="seconds", min=1), default=86400,
           doc="Longest life of a VM; it is stopped at start + this (plus grace_seconds)."),
    Option("min_wallclock_seconds", M, _SECONDS,
           default=Computed("max_wallclock_seconds", lambda c: c.values.get("max_wallclock_seconds")),
           doc="Shortest remaining time for which a VM of this type is started into an existing "
               "superslot; must be <= max_wallclock_seconds.",
           vac_reading="more than max_wallclock_seconds loads with a warning: such VMs never join an "
                       "existing superslot (here an error)",
           vac_write="min_wallclock_seconds <= max_wallclock_seconds"),
    Option("backoff_seconds", M, _SECONDS, default=10,
           doc="When the most recent finished VM of this type aborted (or fizzled), no VM of the "
               "type is started until this long after that VM's end; while another VM of the type is still within its "
               "fizzle_seconds (younger than that since it started, or not started yet), "
               "fizzle_seconds is added, so after a backoff one VM at a time proves the work is back "
               "(Vac's rule). Aborts seen at other factories of the space count too. Default: Vac's "
               "code default; its man page gave none."),
    Option("fizzle_seconds", M, _SECONDS, default=600,
           doc="A VM that stops sooner than this after starting, without a success code, fizzled."),
    Option("heartbeat_file", M, _FILE_NAME,
           doc="File in joboutputs the VM must create within fizzle_seconds and keep fresh."),
    Option("heartbeat_seconds", M, _SECONDS, default=0,
           doc="Kill the VM if heartbeat_file is older than this; 0: only check that it exists."),
    Option("accounting_fqan", M, _NAME,
           doc="FQAN put in APEL records (e.g. /lhcb/Role=NULL/Capability=NULL). It is checked "
               "with the APEL record rules when the configuration is loaded (it must start with "
               "'/'), because it is stored in each VM when the VM is created: a bad one would make "
               "every VM of the machinetype unaccountable.",
           vac_reading="a value APEL refuses (lhcb) loads with a warning: it still names the machinegroup, "
                       "but APEL records of the machinetype carry no FQAN, so none is refused (here an error)",
           vac_write="accounting_fqan = /lhcb/Role=NULL/Capability=NULL and, to keep the group, machinegroup = lhcb"),
    Option("machinegroup", M, _NAME,
           default=Computed("accounting_fqan, else the machinetype name", _default_machinegroup),
           doc="Group used for space-wide share accounting. Undocumented in Vac."),
    Option("machines_dir_days", M, Number(name="days"), default=3.0, aliases=("machineoutputs_days",),
           doc="Keep finished machine directories this many days; <= 0 keeps them for ever."),
    Option("image_signing_dn", M, RegexText(), aliases=("cernvm_signing_dn",),
           doc="Regular expression the DN of the root_image signer had to match (CernVM images). "
               "Vac stored it under a name it then never read.",
           ignored="root images are not signature-checked; pin an image with root_image_sha256"),
    Option("user_data_proxy", M, Boolean(), default=False,
           doc="Make a limited X.509 proxy from <machinetype_path>/x509cert.pem and x509key.pem "
               "and substitute it for ##user_data_option_x509_proxy##.",
           vac_parse=_vac_word("true"),
           vac_reading="on only for true (any case); yes, on and 1 are off (here they are on)",
           vac_write="yes (or true) for on; no, or leave it out, for off"),
    Option("legacy_proxy", M, Boolean(), default=False,
           doc="Make the proxy in the legacy (pre-RFC 3820) format.",
           vac_parse=_vac_word("true"),
           vac_reading="on only for true (any case); yes, on and 1 are off (here they are on)",
           vac_write="yes (or true) for on; no, or leave it out, for off"),
    Option("mjf_transport", M, Choice(choices=("http", "nfs")), default="http", vac=False,
           doc="How the VM reaches machinefeatures/jobfeatures/joboutputs: HTTP on 169.254.169.253, "
               "or NFS (needs nfs_exporter = ganesha or exportfs: with none it is an error)."),
    Option("config_drive", M, Boolean(), default=False, vac=False,
           doc="Also attach an OpenStack-style config drive (ISO) holding user_data and metadata."),
    # ================================================================ [vacuum_pipe PREFIX]
    Option("vacuum_pipe_url", P, Location(name="URL", schemes=("http", "https", "file"), allow_paths=False),
           required=True, doc="URL of the JSON vacuum pipe defining machinetypes <prefix>-<suffix>."),
    Option("target_share", P, Number(min=0), default=0.0,
           doc="Total share of the pipe, divided among its machinetypes by their own target_share.",
           vac_parse=_vac_share,
           vac_reading="a negative share is read as 0, with a warning: never started (here an error)",
           vac_write="target_share = 0 for a machinetype that never starts"),
    # ================================================= [settings]: scheduling beyond Vac
    Option("adaptive_backoff", S, Boolean(), default=False, vac=False,
           doc="Learn how long a machinetype with no work waits after an abort: each abort the "
               "space saw in the last 4 x adaptive_backoff_max_seconds (every factory reports "
               "its latest finished VM's outcome) doubles the wait, from max(backoff_seconds, "
               "60) up to adaptive_backoff_max_seconds; the fizzle window still applies, so one "
               "probe that finds work opens the machinetype again. Off: Vac's fixed "
               "backoff_seconds. The processors saved go to machinetypes that have work."),
    Option("adaptive_backoff_max_seconds", S, Integer(name="seconds", min=60), default=1800,
           vac=False,
           doc="The longest wait adaptive_backoff imposes after an abort; also how fast it "
               "notices that work is back (on average within half of this)."),
    Option("rebalance", S, Boolean(), default=False, vac=False,
           doc="Graceful rebalancing: when a machinetype is over its target share (by more than "
               "1 point, space-wide) and another waits under its share with work, move the MJF "
               "shutdowntime and shutdowntime_job of this factory's part of the excess VMs to "
               "rebalance_notice_seconds from now. Pilots finish their payload and take no new "
               "one; no VM is killed before its (new) shutdown time. Off: shares move only as "
               "VMs end (Vac)."),
    Option("rebalance_notice_seconds", S, Integer(name="seconds", min=60), default=3600,
           vac=False,
           doc="How far ahead rebalancing moves a VM's shutdown time: at least the longest "
               "payload a pilot runs, so none is cut short."),
    Option("rebalance_max_percent", S, Number(name="percent", min=0, max=100), default=10.0,
           vac=False,
           doc="At most this percentage of the factory's processors may be in VMs given "
               "notice by rebalancing at once (the same bound holds for the space)."),
)

#: what vacfactory writes into machinefeatures itself (a site's extra may not replace it)
_MJF_KEYS = mjf.MACHINEFEATURES_KEYS + mjf.LEGACY_MACHINEFEATURES_KEYS

FAMILIES: Tuple[OptionFamily, ...] = (
    OptionFamily("user_data_option_", (SETTINGS, MACHINETYPE, VACUUM_PIPE), Text(multiline=True, allow_empty=True),
                 attribute="user_data_options",
                 doc="Replaces ##user_data_option_XXX## in user_data. In [settings]: a default for every "
                     "machinetype; a machinetype's own value wins."),
    OptionFamily("user_data_file_", (SETTINGS, MACHINETYPE, VACUUM_PIPE), Path(absolute=False),
                 attribute="user_data_files", relative_to_files=True,
                 doc="A file (absolute, or relative to <machinetype_path>/files/) whose contents replace "
                     "##user_data_file_XXX## and ##user_data_option_XXX## in user_data. In [settings]: a "
                     "default for every machinetype; a machinetype's own value wins."),
    OptionFamily("machinefeatures_option_", (SETTINGS,), Text(allow_empty=True),
                 attribute="machinefeatures_options",
                 reserved=_MJF_KEYS,
                 reserved_why="is a standard or legacy machinefeatures key, which vacfactory writes itself",
                 doc="Extra machinefeatures key XXX with this value (one line). XXX may not be a "
                     f"standard or legacy key ({', '.join(_MJF_KEYS)}): that is an error. Undocumented in Vac."),
)

IGNORED: Tuple[IgnoredOption, ...] = (
    IgnoredOption("total_machines", SETTINGS, "use total_processors"),
    IgnoredOption("delete_old_files", SETTINGS, "old files are always deleted"),
    IgnoredOption("mb_per_machine", SETTINGS, "Vac never read it either: use mb_per_processor"),
    IgnoredOption("rootpublickey", MACHINETYPE, "use root_public_key in [settings]"),
    IgnoredOption("root_public_key", MACHINETYPE, "use root_public_key in [settings]"),
    IgnoredOption("log_machineoutputs", MACHINETYPE, "use machines_dir_days"),
    IgnoredOption("user_data_proxy_cert", MACHINETYPE,
                  "use user_data_proxy = yes with <machinetype_path>/x509cert.pem"),
    IgnoredOption("user_data_proxy_key", MACHINETYPE,
                  "use user_data_proxy = yes with <machinetype_path>/x509key.pem"),
)



@dataclass(frozen=True)
class VacDifference:
    """One way a Vac file is read differently from vacfactory's own files, beyond one option's
    value (those are Option.vac_reading): a row of the migration table."""

    #: what the file says
    written: str
    #: what it means in a Vac file (read as Vac 03.01 reads it)
    vac: str
    #: what the same text does in a vacfactory file
    here: str
    #: what to write in a vacfactory file to say what the Vac file meant
    write: str


VAC_SYNTAX: Tuple[VacDifference, ...] = (
    VacDifference("600 ; ten minutes", "600: ';' after whitespace starts a comment (on the first line of a "
                  "value)", "an error: '600 ; ten minutes' is not an integer",
                  "the comment on a line of its own: ; ten minutes"),
    VacDifference("600 # ten minutes", "an error, as in Vac: '#' inline is part of the value", "the same",
                  "the comment on a line of its own"),
    VacDifference("the same option twice in a section", "the last one wins, with a warning",
                  "an error naming both lines", "the option once"),
    VacDifference("a deprecated name and its new name together (cpu_total and total_processors)",
                  "the one written last wins, with a warning", "an error naming both lines",
                  "only the new name"),
    VacDifference("[DEFAULT]", "its options apply to every section that accepts them (a section's own "
                  "value wins); options no section accepts are ignored with a warning",
                  "an error: unknown section", "the options in [settings] (user_data_option_XXX and "
                  "user_data_file_XXX there are defaults for every machinetype) or in each section"),
    VacDifference("[machinetype LHCb-Test]", "machinetype lhcb-test (Vac lower-cases machinetype and vacuum "
                  "pipe names)", "an error: names must match [a-z0-9-]+", "[machinetype lhcb-test]"),
    VacDifference("[Settings]", "not Vac's [settings] (Vac's section names are case-sensitive): ignored "
                  "with a warning", "[settings]", "[settings]"),
    VacDifference("a section Vac does not read ([monitoring], [targetshares], [factories])",
                  "ignored with one warning naming file:line (with 'did you mean' for a near-miss)",
                  "an error", "leave it out; target shares go in each machinetype's target_share, "
                  "factories in [settings] factories"),
    VacDifference("an option Vac does not read (or a misspelt one)", "ignored with one warning naming "
                  "file:line, with 'did you mean X' when it is close to a known option", "an error",
                  "the correct name, or leave it out"),
    VacDifference("an empty value (root_image =)", "unset, silently, for an option without a default; an "
                  "error, as in Vac, where a number is needed", "an error", "leave the option out"),
    VacDifference("any value of an option vacfactory ignores (volume_group, image_signing_dn, ...)",
                  "a value vacfactory could not parse is ignored with a warning", "an error",
                  "leave the option out"),
    VacDifference("root_image = docker://... in a machinetype that is not docker", "loads with a warning; the "
                  "machinetype is never started", "an error", "machine_model = docker, or a VM image"),
    VacDifference("a line Python 2's parser cannot read (an indented line right after a header, "
                  "text before the first header)", "an error naming file:line (Python 2's parser raises on it "
                  "too)", "the same",
                  "fix the line"),
    VacDifference("text that is not UTF-8", "read as Latin-1, with a warning (Vac is Python 2 and reads "
                  "bytes)", "an error", "UTF-8 text"),
    VacDifference("root_device = sde, or root_device = scratch_device in a vm-raw machinetype",
                  "an error naming the option (Vac 03.01 loads any a-z 0-9 name, and libvirt then refuses "
                  "every VM of the machinetype: the IDE bus has four places, hdX/sdX share them)", "the same",
                  "vdX or xvdX (virtio), or hda to hdd, sda to sdd (IDE), one disk each"),
)


#: Section kinds as written in headers; legacy kinds map to the canonical one with a warning.
SECTION_KINDS: Mapping[str, str] = {
    "settings": SETTINGS,
    "machinetype": MACHINETYPE,
    "vmtype": MACHINETYPE,
    "vacuum_pipe": VACUUM_PIPE,
}
LEGACY_SECTION_KINDS: Mapping[str, str] = {"vmtype": "machinetype"}

#: Sections that are errors, with the advice Vac gave.
FORBIDDEN_SECTIONS: Mapping[str, str] = {
    "factories": "use the factories option in [settings] instead of a [factories] section",
    "targetshares": "use a target_share option in each [machinetype NAME] section instead of a "
                    "[targetshares] section",
}


def machinetype_startable(values: Mapping[str, Any]) -> bool:
    """VM models and docker are started (a docker one only with a valid docker:// image);
    singularity machinetypes are kept but never started."""
    model = values.get("machine_model")
    if model in STARTED_CONTAINER_MODELS:
        return _docker_image_problem(values.get("root_image")) is None
    return model in VM_MODELS


def _docker_image_problem(image: Optional[str]) -> Optional[str]:
    if not image:
        return "root_image = docker://IMAGE[:TAG] is required"
    try:
        values.docker_image(image)
    except ValueError as error:
        return str(error)
    return None


def _rule_total_processors(c: DefaultContext) -> Optional[str]:
    v = c.values
    if v["domain_type"] != "test" and v["total_processors"] > c.host.cpu_count:
        return (f"must be <= this host's {c.host.cpu_count} processors "
                f"(got {v['total_processors']}; only domain_type = test may exceed it)")
    return None


def _rule_space_key(c: DefaultContext) -> Optional[str]:
    if c.values.get("space_key") is not None and c.values.get("space_key_file") is not None:
        return "cannot be set together with space_key: choose one"
    return None


def _rule_disk_thresholds(c: DefaultContext) -> Optional[str]:
    v = c.values
    if v["check_disk_free_critical_mb"] > v["check_disk_free_warning_mb"]:
        return f"must be <= check_disk_free_warning_mb ({v['check_disk_free_warning_mb']})"
    return None


def _rule_apel_broker(c: DefaultContext) -> Optional[str]:
    if c.values["apel_send"] and not c.values.get("apel_broker_host") and not c.values.get("apel_sender_cfg"):
        return "apel_broker_host (or apel_sender_cfg) is required when apel_send = yes"
    return None


def _rule_joboutputs(c: DefaultContext) -> Optional[str]:
    v = c.values
    if v["joboutputs_max_file_bytes"] > v["joboutputs_max_total_bytes"]:
        return f"must be <= joboutputs_max_total_bytes ({v['joboutputs_max_total_bytes']})"
    return None


def _rule_port(name: str) -> Callable[[DefaultContext], Optional[str]]:
    def test(c: DefaultContext) -> Optional[str]:
        value = c.values.get(name)
        if value and not 1 <= int(value.rpartition(":")[2]) <= 65535:
            return f"{value!r}: the port must be 1-65535"
        return None

    return test


def _rule_processors(c: DefaultContext) -> Optional[str]:
    if c.values["max_processors"] < c.values["min_processors"]:
        return f"must be >= min_processors ({c.values['min_processors']})"
    return None


def _rule_wallclock(c: DefaultContext) -> Optional[str]:
    if c.values["min_wallclock_seconds"] > c.values["max_wallclock_seconds"]:
        if c.vac:
            return (f"more than max_wallclock_seconds ({c.values['max_wallclock_seconds']}): loaded as Vac "
                    "does; VMs of this type never join an existing superslot")
        return f"must be <= max_wallclock_seconds ({c.values['max_wallclock_seconds']})"
    return None


def _rule_docker_image(c: DefaultContext) -> Optional[str]:
    image = c.values.get("root_image")
    if image and image.lower().startswith("docker://") and c.values["machine_model"] != "docker":
        if c.vac:
            return "a docker:// image needs machine_model = docker: no VM is started from it"
        return "a docker:// image needs machine_model = docker"
    return None


def _rule_container_image(c: DefaultContext) -> Optional[str]:
    if c.values["machine_model"] not in STARTED_CONTAINER_MODELS:
        return None
    problem = _docker_image_problem(c.values.get("root_image"))
    if problem is not None and c.vac:
        return f"{problem}: this machinetype is never started"
    return problem


def _rule_container_binds(c: DefaultContext) -> Optional[str]:
    for path in c.values.get("tmp_binds") or ():
        target = path.rstrip("/") or "/"
        taken = [t for t in CONTAINER_BIND_TARGETS if target == t or t.startswith(target + "/")
                 or target.startswith(t + "/")]
        if target == "/" or taken or "/../" in target + "/" or "/./" in target + "/":
            return (f"{path} is not a usable tmp_binds path (not /, no . or .., not over or under "
                    f"{', '.join(CONTAINER_BIND_TARGETS)})")
    return None


#: options a docker machinetype does not use (they describe a VM's boot and disks)
_VM_ONLY_OPTIONS = ("kernel_image", "initrd_image", "kernel_cmdline", "root_image_sha256")


def _rule_vm_only_options(c: DefaultContext) -> Optional[str]:
    if c.values["machine_model"] not in CONTAINER_MODELS:
        return None
    given = [name for name in _VM_ONLY_OPTIONS if c.values.get(name) is not None]
    if given:
        return f"{', '.join(given)}: ignored for machine_model {c.values['machine_model']} (VM options)"
    return None


def _rule_boot_image(c: DefaultContext) -> Optional[str]:
    if c.values.get("machine_model") in VM_MODELS and not c.values.get("root_image") and not c.values.get("kernel_image"):
        if c.vac:
            if not c.values.get("target_share", 0) > 0:
                return None  # Vac never starts it either, and says nothing
            return "no root_image (or kernel_image): this machinetype is never started"
        return "root_image (or kernel_image) is required"
    return None


def _rule_kernel_parts(c: DefaultContext) -> Optional[str]:
    if c.values.get("kernel_image"):
        return None
    given = [n for n in ("initrd_image", "kernel_cmdline") if c.values.get(n) is not None]
    if given:
        return f"{' and '.join(given)} need kernel_image"
    return None


def _rule_disk_places(c: DefaultContext) -> Optional[str]:
    """The disks the engine gives a VM of this machinetype (engine/vmbuild.py) each need
    their own place: a CernVM's ISO is on hdc, a config drive on hdd, vm-raw's scratch disk
    on scratch_device."""
    disks = [(c.values["root_device"], "root_device")]
    if c.values["machine_model"] in ("cernvm3", "cernvm4"):
        disks.append((values.CERNVM_ISO_DEVICE, "the CernVM ISO"))
    else:
        disks.append((c.values["scratch_device"], "scratch_device"))
    if c.values["config_drive"]:
        disks.append((values.CONFIG_DRIVE_DEVICE, "the config drive"))
    clash = values.disk_clash([(device, values.disk_bus(device)) for device, _ in disks])
    if clash is None:
        return None
    (first, first_role), (second, second_role) = disks[clash[0]], disks[clash[1]]
    return f"{first} ({first_role}) and {second} ({second_role}) would be the same disk"


def _rule_not_startable(c: DefaultContext) -> Optional[str]:
    model = c.values["machine_model"]
    if model in CONTAINER_MODELS and model not in STARTED_CONTAINER_MODELS:
        return (f"machine_model {model} is understood but vacfactory starts only VMs "
                f"({', '.join(VM_MODELS)}) and docker containers: this machinetype will never be started")
    return None


def _rule_fqan(c: DefaultContext) -> Optional[str]:
    fqan = c.values.get("accounting_fqan")
    if fqan is None:
        return None
    # APEL's own rules, applied to a record that is valid apart from the FQAN: the cloud record
    # needs the fewest other fields, and the job record has the same FQAN rules
    record = {"FQAN": fqan, "VMUUID": "0", "SiteName": "site"}
    try:
        apel.validate_fields(apel.CLOUD, record, now=0.0)
    except apel.FieldInvalid as error:
        if error.field != "FQAN":
            raise  # the probe record itself is wrong: a bug here, not in the configuration
        if c.vac:
            return (f"{error.reason}: APEL refuses such an FQAN, so records of this machinetype carry none "
                    f"(it still names the machinegroup; an FQAN looks like /vo/Role=NULL/Capability=NULL)")
        return (f"{error.reason}: APEL refuses such a record, so no VM of this machinetype could "
                "be accounted (an FQAN looks like /vo/Role=NULL/Capability=NULL)")
    return None


def _rule_gocdb_sitename(c: DefaultContext) -> Optional[str]:
    site = c.values.get("gocdb_sitename")
    if site is None:
        return None
    # APEL's rules for Site, applied to a sync record that is valid apart from it (job and
    # sync records share Site's rules; cloud records carry the same text as SiteName)
    record = {"Site": site, "NumberOfJobs": "0", "Month": "1", "Year": "2026"}
    try:
        apel.validate_fields(apel.SYNC, record, now=0.0)
    except apel.FieldInvalid as error:
        if error.field != "Site":
            raise  # the probe record itself is wrong: a bug here, not in the configuration
        return f"{error.reason}: APEL refuses such a record, so no VM could be accounted"
    return None


def _rule_nfs_transport(c: DefaultContext) -> Optional[str]:
    # a container gets its MJF by bind mounts: mjf_transport does not apply to it
    if (c.values["mjf_transport"] == "nfs" and c.values["machine_model"] in VM_MODELS
            and machinetype_startable(c.values) and c.settings.get("nfs_exporter") == "none"):
        return ("nfs needs NFS exports, but nfs_exporter = none in [settings]: set nfs_exporter = "
                "ganesha or exportfs, or use mjf_transport = http")
    return None


def _rule_disk_downwards(c: DefaultContext) -> Optional[str]:
    mine = c.values.get("disk_gb_per_processor")
    site = c.settings.get("disk_gb_per_processor")
    if mine is not None and site and mine > site:
        return f"larger than the [settings] value ({site}): using {site}"
    return None


def _rule_min_processors_fit(c: DefaultContext) -> Optional[str]:
    wanted = c.values["min_processors"]
    for limit in ("processors_per_superslot", "total_processors"):
        have = c.settings.get(limit)
        if have is not None and wanted > have:
            return f"{wanted} is more than {limit} ({have}): this machinetype can never start"
    return None



def _rule_internal_url_hosts(c: DefaultContext) -> Optional[str]:
    from vacfactory.fetch.urlpolicy import parse_internal_hosts  # urlpolicy needs nothing from config

    try:
        parse_internal_hosts(c.values["internal_url_hosts"])
    except ValueError as error:
        return str(error)
    return None


RULES: Tuple[Rule, ...] = (
    Rule(S, "total_processors", ("total_processors", "domain_type"), _rule_total_processors,
         "total_processors may not exceed the host's processor count unless domain_type = test."),
    Rule(S, "space_key_file", ("space_key", "space_key_file"), _rule_space_key,
         "space_key and space_key_file are mutually exclusive."),
    Rule(S, "check_disk_free_critical_mb", ("check_disk_free_critical_mb", "check_disk_free_warning_mb"),
         _rule_disk_thresholds, "check_disk_free_critical_mb may not exceed check_disk_free_warning_mb."),
    Rule(S, "apel_send", ("apel_send", "apel_broker_host", "apel_sender_cfg"), _rule_apel_broker,
         "apel_send = yes needs apel_broker_host or apel_sender_cfg."),
    Rule(S, "joboutputs_max_file_bytes", ("joboutputs_max_file_bytes", "joboutputs_max_total_bytes"),
         _rule_joboutputs, "joboutputs_max_file_bytes may not exceed joboutputs_max_total_bytes."),
    Rule(S, "gocdb_sitename", ("gocdb_sitename",), _rule_gocdb_sitename,
         "gocdb_sitename must pass APEL's rules for Site (printable ASCII, at most 255 characters, "
         "no '%%')."),
    Rule(S, "syslog_server", ("syslog_server",), _rule_port("syslog_server"),
         "syslog_server's port must be 1-65535."),
    Rule(S, "syslog_forward", ("syslog_forward",), _rule_port("syslog_forward"),
         "syslog_forward's port must be 1-65535."),
    Rule(M, "max_processors", ("min_processors", "max_processors"), _rule_processors,
         "max_processors may not be less than min_processors."),
    Rule(M, "min_wallclock_seconds", ("min_wallclock_seconds", "max_wallclock_seconds"), _rule_wallclock,
         "min_wallclock_seconds may not exceed max_wallclock_seconds.", vac_severity="warning"),
    Rule(M, "root_image", ("root_image", "machine_model"), _rule_docker_image,
         "docker:// images need machine_model = docker.",
         vac_severity="warning", vac_replacement=lambda c: None),
    Rule(M, "root_image", ("root_image", "kernel_image", "machine_model", "target_share"), _rule_boot_image,
         "A startable machinetype needs root_image or kernel_image.", vac_severity="warning"),
    Rule(M, "root_device", ("root_device", "scratch_device", "machine_model", "config_drive"), _rule_disk_places,
         "root_device, scratch_device (vm-raw), the CernVM ISO (hdc) and the config drive (hdd) must be "
         "different disks (on IDE, hdX and sdX with the same letter are the same place)."),
    Rule(M, "kernel_image", ("kernel_image", "initrd_image", "kernel_cmdline"), _rule_kernel_parts,
         "initrd_image and kernel_cmdline need kernel_image."),
    Rule(M, "accounting_fqan", ("accounting_fqan",), _rule_fqan,
         "accounting_fqan must pass APEL's rules for an FQAN (start with '/', printable ASCII).",
         vac_severity="warning", vac_replacement=lambda c: None),
    Rule(M, "mjf_transport", ("mjf_transport", "machine_model"), _rule_nfs_transport,
         "mjf_transport = nfs needs nfs_exporter = ganesha or exportfs in [settings]."),
    Rule(M, "machine_model", ("machine_model",), _rule_not_startable,
         "singularity machinetypes load with a warning and are never started.",
         severity="warning"),
    Rule(M, "root_image", ("root_image", "machine_model"), _rule_container_image,
         "A docker machinetype needs root_image = docker://IMAGE[:TAG], a valid image reference.",
         vac_severity="warning"),
    Rule(M, "tmp_binds", ("tmp_binds",), _rule_container_binds,
         "tmp_binds paths must be absolute, not /, and not over or under the container's own binds."),
    Rule(M, "machine_model", ("machine_model", "kernel_image", "initrd_image", "kernel_cmdline",
                              "root_image_sha256"), _rule_vm_only_options,
         "VM options (kernel_image, initrd_image, kernel_cmdline, root_image_sha256) in a container "
         "machinetype give a warning: they are ignored.", severity="warning"),
    Rule(M, "disk_gb_per_processor", ("disk_gb_per_processor",), _rule_disk_downwards,
         "A machinetype's disk_gb_per_processor larger than the [settings] one is ignored with a warning.",
         severity="warning", replacement=lambda c: c.settings.get("disk_gb_per_processor")),
    Rule(M, "min_processors", ("min_processors",), _rule_min_processors_fit,
         "A min_processors larger than processors_per_superslot or total_processors gives a warning: "
         "such a machinetype can never start.", severity="warning"),
    Rule(S, "internal_url_hosts", ("internal_url_hosts",), _rule_internal_url_hosts,
         "Every internal_url_hosts item must be a host name, an IP address or a CIDR network."),
)


def options_of(section: str) -> Tuple[Option, ...]:
    """The rows of one section, in table order."""
    return tuple(o for o in OPTIONS if o.section == section)


def families_of(section: str) -> Tuple[OptionFamily, ...]:
    return tuple(f for f in FAMILIES if section in f.sections)


def ignored_of(section: str) -> Dict[str, IgnoredOption]:
    """Ignored names of a section (a [vacuum_pipe] inherits the machinetype ones)."""
    kinds = (section, MACHINETYPE) if section == VACUUM_PIPE else (section,)
    return {i.name: i for i in IGNORED if i.section in kinds}


def aliases_of(section: str) -> Dict[str, str]:
    """Deprecated name -> canonical name, for every option a section accepts."""
    return {alias: o.name for o in accepted_options(section).values() for alias in o.aliases}


def accepted_options(section: str) -> Dict[str, Option]:
    """Canonical name -> row of every option a section accepts.

    A [vacuum_pipe] section accepts its own rows plus every machinetype row, whose values become
    defaults of the machinetypes the pipe defines.
    """
    rows = {o.name: o for o in options_of(section)}
    if section == VACUUM_PIPE:
        for row in options_of(MACHINETYPE):
            rows.setdefault(row.name, row)
    return rows


def describe_default(option: Option) -> str:
    """The default as the docs show it."""
    if isinstance(option.default, Computed):
        return option.default.describe
    if option.default is None:
        return "required" if option.required else "unset"
    if option.default == ():
        return "empty"
    return option.type.format(option.default)
