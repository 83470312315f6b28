"""Predict what a valid configuration will break at run time (``vacfactory config check``).

The loader answers "does this configuration parse and obey the option rules?". This module
answers "will the daemon work with it on this host?": files the engine will open, the state
directory, processors and memory that can never be used, and (online, see
:mod:`vacfactory.config.predict_online`) libvirt, ports and host names. Every check returns
:class:`Finding` values naming the file and line of the option concerned, so an admin sees
where to fix it.

Severity: an *error* is something the daemon will fail at (a VM creation, a server, the
start itself); a *warning* is something that works but probably not as meant (all shares 0,
processors no VM can use, memory overcommitted); a *note* is information. Nothing here
changes anything: the only file written is a temporary probe in state_dir, removed at once.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from vacfactory.config import options as table
from vacfactory.config.parsers import is_url
from vacfactory.errors import VacFactoryError

ERROR = "error"
WARNING = "warning"
NOTE = "note"
SEVERITIES = (ERROR, WARNING, NOTE)

#: the engine reads at most this much of a local user_data template (vmbuild's limit)
MAX_TEMPLATE_BYTES = 4 * 1024 * 1024
#: OpenSSH public key types, as the first field of a key line
_KEY_LINE = re.compile(r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)"
                       r"|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)\s+\S+")
#: an option line (not indented) as configparser splits it: name, then = or :, then the value
_OPTION_LINE = re.compile(r"(?P<name>[^\s=:\[][^=:]*?)\s*[=:]\s*(?P<value>.*)$")
_HEADER_LINE = re.compile(r"\s*\[(?P<header>[^\]]+)\]")


@dataclass(frozen=True)
class Finding:
    """One predicted problem, located like a configuration error."""

    severity: str
    message: str
    source: Optional[str] = None
    line: Optional[int] = None
    section: Optional[str] = None
    option: Optional[str] = None

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "") + ": "
        what = f"[{self.section}] " if self.section else ""
        what += f"{self.option}: " if self.option else ""
        return f"{where}{what}{self.message}"

    def as_dict(self) -> Dict[str, Any]:
        return {"severity": self.severity, "message": self.message, "source": self.source,
                "line": self.line, "section": self.section, "option": self.option, "text": str(self)}


# --------------------------------------------------------------------------- where an option is


class Locator:
    """File and line of an option of the effective configuration (``Config.origins``).

    An option left at its default has no line; such findings name the section's header
    instead (found by scanning the files), or for a pipe's machinetype the pipe's section.
    """

    def __init__(self, config: Any, files: Sequence[str]) -> None:
        self.config = config
        self.files = list(files)
        self._headers: Optional[Dict[str, Tuple[str, int]]] = None

    def finding(self, severity: str, message: str, section: str, option: Optional[str] = None) -> Finding:
        source, line = self.where(section, option)
        return Finding(severity, message, source, line, section, option)

    def where(self, section: str, option: Optional[str]) -> Tuple[Optional[str], Optional[int]]:
        origin = self.config.origins.get(section, {}).get(option, "default") if option else "default"
        if origin == "settings" and option:
            origin = self.config.origins.get(table.SETTINGS, {}).get(option, "default")
        source, _, line = origin.rpartition(":")
        if source and line.isdigit():
            return source, int(line)
        if origin not in ("default", "settings"):
            return origin, None
        return self.header(section)

    def header(self, section: str) -> Tuple[Optional[str], Optional[int]]:
        if self._headers is None:
            self._headers = _scan_headers(self.files)
        found = self._headers.get(_normal_title(section))
        if found is None and section.startswith(table.MACHINETYPE + " "):
            name = section.split(" ", 1)[1]
            for prefix in getattr(self.config, "vacuum_pipes", {}):
                if name.startswith(prefix + "-"):
                    found = self._headers.get(f"{table.VACUUM_PIPE} {prefix}")
        if found is None:
            return (self.files[-1] if self.files else None), None
        return found


def _normal_title(title: str) -> str:
    words = title.lower().split()
    if words and words[0] == "vmtype":
        words[0] = table.MACHINETYPE
    return " ".join(words)


def _scan_headers(files: Iterable[str]) -> Dict[str, Tuple[str, int]]:
    """The first place each section header appears (later files add, never replace)."""
    found: Dict[str, Tuple[str, int]] = {}
    for path in files:
        for lineno, line in _lines(path):
            match = _HEADER_LINE.match(line)
            if match:
                found.setdefault(_normal_title(match.group("header")), (path, lineno))
    return found


def _lines(path: str) -> List[Tuple[int, str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return list(enumerate(f.read().split("\n"), start=1))
    except OSError:
        return []


# --------------------------------------------------------------------------- ' #' in values


def inline_comments(files: Iterable[str]) -> List[Finding]:
    """Values that contain `` #``: configparser (and Vac's parser) keep it as part of the value.

    Runs on the raw files, so it also explains a value that failed to parse because of it.
    """
    findings: List[Finding] = []
    for path in files:
        section: Optional[str] = None
        option: Optional[str] = None
        for lineno, line in _lines(path):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", ";")):
                continue
            header = _HEADER_LINE.match(line)
            if header and not line[:1].isspace():
                section, option = header.group("header").strip(), None
                continue
            if line[:1].isspace() and option is not None:
                value = stripped  # a continuation line of the option above
            else:
                match = _OPTION_LINE.match(line)
                if match is None:
                    continue
                option, value = match.group("name").strip().lower(), match.group("value")
            if re.search(r"\s#", value):
                findings.append(Finding(
                    WARNING,
                    f"the value {value.strip()!r} contains ' #': that is part of the value, not a "
                    "comment (Vac's parser keeps it too: '#' starts a comment only at the start of "
                    "a line); put the comment on a line of its own",
                    path, lineno, section, option))
    return findings


# --------------------------------------------------------------------------- state_dir


def state_dir(path: str, locator: Locator) -> List[Finding]:
    """The state directory exists and is writable, or can be created."""
    def found(severity: str, message: str) -> List[Finding]:
        return [locator.finding(severity, message, table.SETTINGS, table.STATE_DIR)]

    if os.path.lexists(path) and not os.path.isdir(path):
        return found(ERROR, f"{path} exists and is not a directory: the daemon cannot start")
    if os.path.isdir(path):
        try:
            fd, probe = tempfile.mkstemp(prefix=".vacfactory-check-", dir=path)
        except OSError as error:
            return found(ERROR, f"{path} is not writable ({error.strerror}) by uid {os.geteuid()}: "
                                "the daemon cannot keep its state there")
        os.close(fd)
        os.unlink(probe)
        return []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return found(ERROR, f"{path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        return found(ERROR, f"{path} cannot be created: {parent} is not writable by uid {os.geteuid()}")
    return found(NOTE, f"{path} does not exist yet; the daemon creates it")


# --------------------------------------------------------------------------- machinetype files


#: probe of a root image's format (hypervisor.disks.image_format: qemu-img info)
ImageProbe = Callable[[str], str]


def machinetype_files(config: Any, locator: Locator, image_format: ImageProbe) -> List[Finding]:
    """root_image, kernel_image, initrd_image, user_data and user_data_file_* of every
    machinetype exist and are readable; a vm-raw root image is a qcow2 or raw image.

    A machinetype that is never started (share 0, or a container model) gets warnings, not
    errors: nothing fails until its share is raised.
    """
    findings: List[Finding] = []
    for name, mt in config.machinetypes.items():
        if not mt.startable:
            continue
        title = f"{table.MACHINETYPE} {name}"
        severity = ERROR if mt.target_share > 0 else WARNING
        later = "" if severity == ERROR else " (not started while target_share is 0)"

        def add(option: str, message: str) -> None:
            findings.append(locator.finding(severity, message + later, title, option))

        if not mt.root_image and not mt.kernel_image:
            add("root_image", "neither root_image nor kernel_image is set: no VM can be created")
        if mt.root_image and not is_url(mt.root_image):
            why = _unreadable(mt.root_image)
            if why is None and mt.machine_model == "vm-raw":
                why = _image_problem(mt.root_image, image_format)
            if why:
                add("root_image", why)
        for option in ("kernel_image", "initrd_image"):
            path = getattr(mt, option)
            why = _unreadable(path) if path else None
            if why:
                add(option, why)
        if mt.user_data and not is_url(mt.user_data):
            why = _unreadable(mt.user_data, MAX_TEMPLATE_BYTES)
            if why:
                add("user_data", why)
        for suffix, path in mt.user_data_files.items():
            why = _unreadable(path) if path and not is_url(path) else None
            if why:
                add(f"user_data_file_{suffix}", why)
        if mt.user_data_proxy:
            for file_name in ("x509cert.pem", "x509key.pem"):
                why = _unreadable(os.path.join(mt.machinetype_path, file_name))
                if why:
                    add("user_data_proxy", f"needs {file_name} in {mt.machinetype_path}: {why}")
    return findings


def _unreadable(path: str, max_bytes: Optional[int] = None) -> Optional[str]:
    """Why the engine could not read ``path`` as a file; None if it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path}: no such file"
    except IsADirectoryError:
        return f"{path}: is a directory, not a file"
    except OSError as error:
        return f"{path}: cannot read: {error.strerror or error}"
    if max_bytes is not None and size > max_bytes:
        return f"{path}: {size} bytes, more than the {max_bytes} the engine reads"
    return None


def _image_problem(path: str, image_format: ImageProbe) -> Optional[str]:
    try:
        image_format(path)
    except (VacFactoryError, ValueError) as error:
        text = str(error)
        return text if text.startswith(path) else f"{path}: {text}"
    return None


# --------------------------------------------------------------------------- QEMU's view


@dataclass(frozen=True)
class QemuUser:
    """The user qemu runs as under libvirt's system instance (Debian libvirt-qemu, EL qemu)."""

    name: str
    uid: int
    gids: Tuple[int, ...]


def find_qemu_user(names: Sequence[str] = ("libvirt-qemu", "qemu")) -> Optional[QemuUser]:
    import grp
    import pwd

    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return QemuUser(name, entry.pw_uid, tuple(sorted(groups)))
    return None


def qemu_access(config: Any, locator: Locator, qemu: Optional[QemuUser]) -> List[Finding]:
    """Every directory above the VMs' disks, root images, kernels and initrds must be
    searchable by qemu's user: libvirt chowns the files, never the directories, and
    otherwise refuses to start the domain ("Cannot access storage file ... Permission
    denied"). Only for qemu:///system, where qemu does not run as root."""
    s = config.settings
    if qemu is None or s.domain_type == "test" or not s.libvirt_uri.startswith("qemu:///system"):
        return []
    findings: List[Finding] = []
    why = _unsearchable(s.state_dir, qemu)
    if why:
        findings.append(locator.finding(ERROR, f"{why}: no VM can start (its disks are under {s.state_dir}); "
                                               "mode 0711 is enough", table.SETTINGS, table.STATE_DIR))
    for name, mt in config.machinetypes.items():
        if not (mt.startable and mt.target_share > 0):
            continue
        for option in ("root_image", "kernel_image", "initrd_image"):
            path = getattr(mt, option)
            why = _unsearchable(os.path.dirname(path), qemu) if path and not is_url(path) else None
            if why:
                findings.append(locator.finding(ERROR, f"{why}: qemu cannot open {path}; mode 0711 is enough",
                                                f"{table.MACHINETYPE} {name}", option))
    return findings


def _unsearchable(directory: str, qemu: QemuUser) -> Optional[str]:
    """Why ``qemu`` cannot pass through ``directory`` or one above it; None if it can (or a
    directory does not exist yet: the daemon makes those itself, searchable)."""
    path = os.path.abspath(directory)
    chain = []
    while True:
        chain.append(path)
        if path == os.path.dirname(path):
            break
        path = os.path.dirname(path)
    for path in reversed(chain):
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_uid == qemu.uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in qemu.gids:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return f"{path} (mode {st.st_mode & 0o7777:04o}) is not searchable by {qemu.name}"
    return None


# --------------------------------------------------------------------------- keys


def keys(config: Any, locator: Locator) -> List[Finding]:
    """root_public_key readable (else VMs get no ssh key, as in Vac; a missing file at the
    default path is not worth a word: most hosts have no root key); space_key_file readable."""
    s = config.settings
    findings: List[Finding] = []
    path = s.root_public_key
    explicit = config.origins.get(table.SETTINGS, {}).get("root_public_key", "default") != "default"
    if path and (explicit or os.path.exists(path)):  # the default path missing: no key, silently
        try:
            with open(path, "rb") as f:
                text = f.read(65536).decode("ascii", "replace")
        except OSError as error:
            findings.append(locator.finding(
                WARNING, f"{path}: {error.strerror or error}: no ssh access: VMs are created without "
                         "a root key (as Vac does)", table.SETTINGS, "root_public_key"))
        else:
            if not any(_KEY_LINE.match(line.strip()) for line in text.splitlines()):
                findings.append(locator.finding(
                    WARNING, f"{path} holds no OpenSSH public key line (such as 'ssh-ed25519 AAAA...'): "
                             "no ssh access", table.SETTINGS, "root_public_key"))
    if s.space_key_file:
        from vacfactory.space.auth import load_space_key

        try:
            load_space_key(None, s.space_key_file)
        except VacFactoryError as error:
            message = getattr(error, "message", str(error))
            findings.append(locator.finding(
                ERROR, f"{s.space_key_file}: {message}: the factory can neither query nor answer "
                       "its space", table.SETTINGS, "space_key_file"))
    return findings


# --------------------------------------------------------------------------- shares, processors, memory


def _active(config: Any) -> List[Any]:
    """Machinetypes the scheduler may start: a VM model and a share above 0."""
    return [mt for mt in config.machinetypes.values() if mt.startable and mt.target_share > 0]


def shares(config: Any, locator: Locator) -> List[Finding]:
    """Warn when no machinetype can ever be started because every share is 0."""
    startable = [mt for mt in config.machinetypes.values() if mt.startable]
    if not startable or _active(config):
        return []
    names = ", ".join(mt.name for mt in startable)
    first = startable[0].name
    return [locator.finding(WARNING, f"every machinetype's target_share is 0 ({names}): no VM will ever "
                                     "be started", f"{table.MACHINETYPE} {first}", "target_share")]


def processors(config: Any, locator: Locator) -> List[Finding]:
    """Processors that can never be used: VM sizes capped below max_processors, machinetypes
    whose min_processors never fits, and a last partial superslot no machinetype can use."""
    s = config.settings
    findings: List[Finding] = []
    caps = (("processors_per_superslot", s.processors_per_superslot),
            ("max_starting_processors", s.max_starting_processors),
            ("total_processors", s.total_processors))
    limit_name, limit = min(caps, key=lambda cap: cap[1])
    active = _active(config)
    for mt in active:
        title = f"{table.MACHINETYPE} {mt.name}"
        if mt.min_processors > limit:
            findings.append(locator.finding(
                WARNING, f"{mt.min_processors} processors needed, but a VM gets at most {limit} "
                         f"({limit_name} = {limit}): this machinetype is never started",
                title, "min_processors"))
        elif mt.max_processors > limit:
            findings.append(locator.finding(
                WARNING, f"{mt.max_processors}, but VMs get at most {limit} processors "
                         f"({limit_name} = {limit} in [settings])", title, "max_processors"))
    pps = s.processors_per_superslot
    rest = s.total_processors % pps
    if rest and active:
        users = [mt.name for mt in active if mt.min_processors <= rest]
        start = f"total_processors = {s.total_processors} is not a multiple of processors_per_superslot = {pps}"
        if users:
            message = f"{start}: the last {rest} form a smaller superslot (VMs of at most {rest} processors)"
        else:
            message = (f"{start}: the last {rest} can only take VMs of at most {rest} processors, and "
                       "every machinetype's min_processors is larger: they are never used")
        findings.append(locator.finding(WARNING, message, table.SETTINGS, "processors_per_superslot"))
    return findings


def memory(config: Any, locator: Locator, host_mb: int) -> List[Finding]:
    """Memory of the configured VMs against total_memory_mb (a cap: processors go unused) and
    against the host's memory (overcommit, which vac.conf(5) allows: a warning only)."""
    s = config.settings
    findings: List[Finding] = []
    per = s.mb_per_processor
    wanted = s.total_processors * per
    cap = getattr(s, "total_memory_mb", None)
    if cap is not None:
        for mt in _active(config):
            if mt.min_processors * per > cap:
                findings.append(locator.finding(
                    WARNING, f"{per} MiB per processor: the smallest VM of machinetype {mt.name} "
                             f"({mt.min_processors} x {per} MiB) does not fit in total_memory_mb = {cap}: "
                             "it is never started",
                    table.SETTINGS, "mb_per_processor"))
        if wanted > cap and _active(config):
            usable = cap // per
            findings.append(locator.finding(
                WARNING, f"{cap} MiB holds VMs for only {usable} of the {s.total_processors} processors "
                         f"(mb_per_processor = {per}): {s.total_processors - usable} processors are never used",
                table.SETTINGS, "total_memory_mb"))
    if host_mb > 0 and wanted > host_mb and s.domain_type != "test":
        findings.append(locator.finding(
            WARNING, f"{s.total_processors} processors x {per} MiB = {wanted} MiB, more than this host's "
                     f"{host_mb} MiB: memory is overcommitted (vac.conf(5) allows it; if the VMs use it "
                     "all the host swaps or the kernel kills VMs)", table.SETTINGS, "mb_per_processor"))
    return findings


# --------------------------------------------------------------------------- vacuum pipes


def pipes(config: Any, locator: Locator) -> List[Finding]:
    """The last fetch error of each pipe that still has a cached copy (without one, the loader
    already says the pipe defines nothing yet, and why)."""
    from vacfactory.config.loader import pipe_cache_path, pipe_meta_path

    findings: List[Finding] = []
    state = config.settings.state_dir
    for prefix, pipe in config.vacuum_pipes.items():
        meta = read_pipe_meta(pipe_meta_path(state, prefix))
        if not meta.get("error") or not os.path.isfile(pipe_cache_path(state, prefix)):
            continue
        fetched = meta.get("fetched")
        since = f"from {utc(fetched)}" if isinstance(fetched, (int, float)) else "from an earlier download"
        findings.append(locator.finding(
            WARNING, f"the last fetch of {pipe.url} failed {_at(meta.get('attempted'))}: "
                     f"{meta['error']}; the cached copy {since} stays in use",
            f"{table.VACUUM_PIPE} {prefix}", "vacuum_pipe_url"))
    return findings


def read_pipe_meta(path: str) -> Dict[str, Any]:
    """A pipe cache's sidecar ({} if missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _at(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return "at an unknown time"
    return f"at {utc(epoch)}"


# --------------------------------------------------------------------------- all together


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


def predict(config: Any, files: Sequence[str], probes: Optional[HostProbes] = None) -> List[Finding]:
    """Every offline finding about a valid configuration (not the ' #' scan: see
    :func:`inline_comments`, which also runs on invalid ones)."""
    probes = probes or default_probes()
    locator = Locator(config, files)
    findings: List[Finding] = []
    findings += state_dir(config.settings.state_dir, locator)
    findings += machinetype_files(config, locator, probes.image_format)
    findings += qemu_access(config, locator, probes.qemu_user)
    findings += keys(config, locator)
    findings += shares(config, locator)
    findings += processors(config, locator)
    findings += memory(config, locator, probes.memory_mb)
    findings += pipes(config, locator)
    return findings


def ordered(findings: Iterable[Finding], files: Sequence[str]) -> List[Finding]:
    """Errors, warnings, notes; each group in file and line order, as an admin reads them."""
    order = {path: i for i, path in enumerate(files)}
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (rank[f.severity], order.get(f.source or "", len(order)),
                                           f.line or 0))


def count(findings: Iterable[Finding], severity: str) -> int:
    return sum(1 for f in findings if f.severity == severity)


def as_mapping(findings: Iterable[Finding]) -> List[Mapping[str, Any]]:
    return [f.as_dict() for f in findings]
