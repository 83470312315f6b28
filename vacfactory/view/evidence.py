"""Everything recorded about one VM, gathered for an investigation (``vacfactory machine``).

Why: after a security incident or a misbehaving pilot, a site must go from whatever it has (a
UUID from an experiment's job record, i.e. the MJF ``job_id`` and APEL ``LocalJobId``; a
hostname from a firewall log; a prefix) to everything the factory kept about that VM, in one
command: its identity and lifetime, how it ended, its CPU efficiency, its APEL record, the
libvirt domain log, its console, the files it left in joboutputs, its syslog, and its disks if
they were kept (``keep_on_abnormal_end``).

Read-only: nothing here writes anything. Files a VM wrote or filled (joboutputs, console,
syslog) are hostile: joboutputs are read only through ``vmio.joboutputs`` (no symlink, FIFO or
device is ever opened), every other file is opened with ``O_NOFOLLOW|O_NONBLOCK`` and must be a
regular file, reads are bounded, and every line shown is escaped (``#ooo``, as syslog files are)
so a console full of terminal escape sequences cannot act on the admin's terminal. Hashes
(SHA-256) let the files be shown unchanged later; kept disk images are listed with their sizes
but not hashed (they can be tens of GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from vacfactory.core.apel import parse_message
from vacfactory.core.efficiency import vm_efficiency
from vacfactory.errors import RecordInvalid, StateError
from vacfactory.state import kept as kept_store
from vacfactory.state.machines import NEW_PREFIX, Machine, MachineStore
from vacfactory.state.records import to_json
from vacfactory.vmio import joboutputs as jo
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.syslogd import escape_text, syslog_files

log = logging.getLogger(__name__)

LIBVIRT_LOG_DIR = "/var/log/libvirt/qemu"
#: lines of the console and of syslog shown by default
DEFAULT_LINES = 40
#: bytes read from the end of a file for its last lines
TAIL_BYTES = 256 * 1024
#: the part of a libvirt domain log searched for this VM's start (it holds every VM of the name)
LIBVIRT_LOG_BYTES = 8 * 1024 * 1024
#: lines of the libvirt log section kept (its last ones)
LIBVIRT_LOG_LINES = 200
#: characters shown of one line (qemu's command line is one long line)
LINE_CHARS = 4096
#: files larger than this are listed without a hash
MAX_HASH_BYTES = 1 << 30

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_IDENT = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,252}\Z")
_LIBVIRT_START = re.compile(rb": starting up ")


class UnknownMachine(StateError):
    """No machine directory matches what was asked for."""


class AmbiguousMachine(StateError):
    """A UUID prefix matches several machine directories."""

    def __init__(self, ident: str, candidates: Sequence[str]) -> None:
        self.candidates = tuple(candidates)
        shown = ", ".join(self.candidates[:10]) + (" ..." if len(self.candidates) > 10 else "")
        super().__init__(f"{ident!r} matches {len(self.candidates)} machines: {shown}")


@dataclass(frozen=True)
class FileEvidence:
    """One file: where it is, whether it exists, its size, mtime and SHA-256 (when read)."""

    path: str
    exists: bool
    size: Optional[int] = None
    mtime: Optional[float] = None
    sha256: Optional[str] = None
    #: why there is no hash (too big, not a regular file, unreadable)
    note: Optional[str] = None


@dataclass(frozen=True)
class Evidence:
    """Everything about one VM. ``uuid`` is also its MJF ``job_id`` and APEL ``LocalJobId``."""

    uuid: str
    hostname: str
    machinetype: str
    state: str
    machine_dir: str
    #: vm.json without the per-VM token (a secret of the VM's HTTP identity)
    record: Mapping[str, Any]
    created: float
    started: Optional[float]
    end_time: Optional[float]
    finished: Optional[Mapping[str, Any]]
    cpu_seconds: Optional[float]
    wall_seconds: Optional[float]
    #: CPU seconds / (wall seconds x processors); for a running VM, so far
    cpu_efficiency: Optional[float]
    accounted: Optional[Mapping[str, Any]]
    apel_record: Optional[FileEvidence]
    apel_fields: Mapping[str, str]
    console_log: FileEvidence
    libvirt_log: FileEvidence
    #: this VM's section of the libvirt domain log (from its "starting up" line)
    libvirt_log_excerpt: Tuple[str, ...]
    joboutputs: Tuple[FileEvidence, ...]
    #: (name, reason) of joboutputs entries a VM may not leave there (symlinks, devices, ...)
    joboutputs_rejected: Tuple[Tuple[str, str], ...]
    syslog: Tuple[FileEvidence, ...]
    kept_overlay: Optional[Mapping[str, Any]]
    kept_disks: Tuple[FileEvidence, ...]
    console_tail: Tuple[str, ...]
    syslog_tail: Tuple[str, ...]
    #: other machine directories with the same hostname (a slot's name is reused), newest first
    other_matches: Tuple[str, ...] = ()

    def as_dict(self) -> Dict[str, Any]:
        """Everything, as JSON-ready values (``vacfactory machine --json``)."""
        value = dataclasses.asdict(self)
        value["job_id"] = value["apel_local_job_id"] = self.uuid
        return value


# --------------------------------------------------------------------------------------------
# finding the machine


def _vm_json_name(path: str) -> Tuple[Optional[str], float]:
    try:
        with open(os.path.join(path, "vm.json"), "rb") as f:
            value = json.loads(f.read(1 << 20))
        return str(value.get("name")), float(value.get("created") or 0.0)
    except (OSError, ValueError, AttributeError, TypeError):
        return None, 0.0


def find_machine(state_dir: str, ident: str) -> Tuple[str, Tuple[str, ...]]:
    """(machine directory, other directories of the same hostname) for a UUID, a unique UUID
    prefix, or a hostname (full, or its first label: the newest VM of that name wins).

    Raises UnknownMachine or AmbiguousMachine.
    """
    machines_dir = os.path.join(state_dir, "machines")
    if not os.path.isdir(machines_dir):
        raise UnknownMachine("no machines directory (has the factory ever run here?)", path=machines_dir)
    if not _IDENT.match(ident):
        raise UnknownMachine("not a UUID, UUID prefix or host name", machine=repr(ident))
    exact = os.path.join(machines_dir, ident)
    if os.path.isfile(os.path.join(exact, "vm.json")):
        return exact, ()
    entries = sorted(e for e in os.listdir(machines_dir) if not e.startswith((".", NEW_PREFIX)))
    prefixed = [e for e in entries if e.startswith(ident.lower()) or e.startswith(ident)]
    if len(prefixed) > 1:
        raise AmbiguousMachine(ident, prefixed)
    if prefixed:
        return os.path.join(machines_dir, prefixed[0]), ()
    named: List[Tuple[float, str]] = []
    for entry in entries:
        path = os.path.join(machines_dir, entry)
        name, created = _vm_json_name(path)
        if name and (name == ident or name.split(".")[0] == ident):
            named.append((created, path))
    if not named:
        message = "no VM with this UUID, UUID prefix or host name"
        kept = [k for k in kept_store.list_kept(state_dir)
                if k.uuid.startswith(ident) or k.name == ident or k.name.split(".")[0] == ident]
        if kept:  # kept disks outlive machine directories when keep_days > machines_dir_days
            message += "; its machine directory is gone, but kept disks are: " + ", ".join(
                f"{k.path} ({k.name}, {k.reason})" for k in kept[:5])
        raise UnknownMachine(message, machine=ident)
    named.sort(reverse=True)
    return named[0][1], tuple(os.path.basename(p) for _, p in named[1:])


# --------------------------------------------------------------------------------------------
# reading files safely


def _open_regular(path: str) -> Optional[Tuple[int, os.stat_result]]:
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def file_evidence(path: str, hash_it: bool = True) -> FileEvidence:
    """Size, mtime and SHA-256 of ``path``, never following a symlink or opening a FIFO."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return FileEvidence(path, False)
    except OSError as error:
        return FileEvidence(path, False, note=f"unreadable: {error.strerror}")
    if not stat.S_ISREG(lst.st_mode):
        return FileEvidence(path, True, note="not a regular file")
    if not hash_it or lst.st_size > MAX_HASH_BYTES:
        return FileEvidence(path, True, lst.st_size, lst.st_mtime,
                            note=None if not hash_it else f"larger than {MAX_HASH_BYTES} bytes: not hashed")
    opened = _open_regular(path)
    if opened is None:
        return FileEvidence(path, True, lst.st_size, lst.st_mtime, note="could not be opened")
    fd, st = opened
    digest = hashlib.sha256()
    size = 0
    try:
        while size <= MAX_HASH_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    except OSError as error:
        return FileEvidence(path, True, st.st_size, st.st_mtime, note=f"read failed: {error.strerror}")
    finally:
        os.close(fd)
    return FileEvidence(path, True, size, st.st_mtime, digest.hexdigest())


def safe_lines(data: bytes, partial_first: bool, count: int) -> Tuple[str, ...]:
    """The last ``count`` lines of ``data``, decoded leniently and escaped (one safe line each).

    ``partial_first``: ``data`` starts mid-file, so its first line is incomplete and dropped.
    """
    lines = data.split(b"\n")
    if partial_first and len(lines) > 1:
        lines = lines[1:]
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    chosen = lines[-count:] if count > 0 else []
    return tuple(escape_text(line.rstrip(b"\r").decode("utf-8", errors="backslashreplace"), LINE_CHARS)
                 for line in chosen)


def _read_tail(path: str, max_bytes: int) -> Tuple[bytes, bool]:
    """The last ``max_bytes`` of a regular file (and whether that is not the whole file)."""
    opened = _open_regular(path)
    if opened is None:
        return b"", False
    fd, st = opened
    try:
        start = max(0, st.st_size - max_bytes)
        os.lseek(fd, start, os.SEEK_SET)
        chunks = []
        remaining = max_bytes
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks), start > 0
    except OSError:
        return b"", False
    finally:
        os.close(fd)


def tail_lines(path: str, count: int, max_bytes: int = TAIL_BYTES) -> Tuple[str, ...]:
    """The last ``count`` lines of ``path`` (escaped), reading at most ``max_bytes``."""
    data, partial = _read_tail(path, max_bytes)
    return safe_lines(data, partial, count)


def libvirt_section(path: str, uuid: str, max_lines: int = LIBVIRT_LOG_LINES) -> Tuple[str, ...]:
    """This VM's part of its libvirt domain log: from the "starting up" line of the start whose
    qemu command line names ``uuid`` up to the next start (the name is reused per slot)."""
    data, partial = _read_tail(path, LIBVIRT_LOG_BYTES)
    if not data:
        return ()
    lines = data.split(b"\n")
    if partial:
        lines = lines[1:]
    needle = uuid.encode("ascii", errors="replace")
    starts = [i for i, line in enumerate(lines) if _LIBVIRT_START.search(line)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    chosen: Optional[Tuple[int, int]] = None
    for n, begin in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        if any(needle in line for line in lines[begin:end]):
            chosen = (begin, end)
    if chosen is None:
        return ()
    section = b"\n".join(lines[chosen[0]:chosen[1]])
    return safe_lines(section, False, max_lines)


# --------------------------------------------------------------------------------------------
# the pieces


def _joboutputs(joboutputs_dir: str, limits: JobOutputsLimits
                ) -> Tuple[Tuple[FileEvidence, ...], Tuple[Tuple[str, str], ...]]:
    """Accepted joboutputs files with their hashes (read through the hostile-input helpers)."""
    report = jo.scan(joboutputs_dir, limits)
    files: List[FileEvidence] = []
    try:
        dir_fd = jo.open_directory(joboutputs_dir)
    except OSError:
        return (), report.rejected
    try:
        for name, _size in report.files:
            path = os.path.join(joboutputs_dir, name)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                files.append(FileEvidence(path, False))
                continue
            data = jo.read_regular_prefix(dir_fd, name, limits.max_file_bytes, limits.max_file_bytes)
            if data is None:
                files.append(FileEvidence(path, True, st.st_size, st.st_mtime, note="refused when read"))
                continue
            files.append(FileEvidence(path, True, len(data), st.st_mtime, hashlib.sha256(data).hexdigest()))
    finally:
        os.close(dir_fd)
    return tuple(files), report.rejected


def _apel(accounted: Optional[Mapping[str, Any]]) -> Tuple[Optional[FileEvidence], Dict[str, str]]:
    path = accounted.get("archive") if accounted else None
    if not path:
        return None, {}
    evidence = file_evidence(str(path))
    fields: Dict[str, str] = {}
    if evidence.exists and evidence.sha256:
        try:
            with open(str(path), "r", encoding="ascii") as f:
                message = parse_message(f.read(65536))
            if message.records:
                fields = dict(message.records[0])
        except (OSError, UnicodeDecodeError, RecordInvalid) as error:
            log.warning("%s: APEL archive record unreadable: %s", path, error)
    return evidence, fields


def _times(machine: Machine) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(end_time, cpu_seconds, wall_seconds): finished, or so far for a running VM."""
    started = machine.started.time if machine.started else None
    if machine.finished is not None:
        end = machine.finished.end_time
        wall = end - started if started is not None else None
        return end, machine.finished.cpu_seconds, wall
    if machine.heartbeat is not None and started is not None:
        return None, machine.heartbeat.cpu_seconds, machine.heartbeat.time - started
    return None, None, None


def collect(
    state_dir: str,
    uuid: str,
    *,
    lines: int = DEFAULT_LINES,
    libvirt_log_dir: str = LIBVIRT_LOG_DIR,
    limits: JobOutputsLimits = JobOutputsLimits(),
) -> Evidence:
    """Gather the evidence of the VM named by ``uuid`` (a UUID, a unique prefix or a hostname).

    Raises UnknownMachine, AmbiguousMachine, or StateError for an unreadable machine directory.
    """
    path, others = find_machine(state_dir, uuid)
    machine = MachineStore(state_dir, create=False).load(path)
    record = machine.record
    end_time, cpu, wall = _times(machine)
    stored = getattr(machine.finished, "cpu_efficiency", None) if machine.finished else None
    efficiency = stored if stored is not None else (
        vm_efficiency(cpu, wall, record.processors) if cpu is not None and wall is not None else None)
    accounted = to_json(machine.accounted) if machine.accounted else None
    apel_file, apel_fields = _apel(accounted)
    outputs, rejected = _joboutputs(machine.joboutputs_dir, limits)
    syslog = tuple(file_evidence(f.path) for f in syslog_files(path))
    syslog_tail: Tuple[str, ...] = ()
    for entry in reversed(syslog):
        syslog_tail = tail_lines(entry.path, lines) if entry.exists else ()
        if syslog_tail:
            break
    kept = kept_store.load_kept(state_dir, record.uuid)
    libvirt_log = os.path.join(libvirt_log_dir, f"{record.name}.log")
    vm_json = {k: v for k, v in to_json(record).items() if k != "token"}
    return Evidence(
        uuid=record.uuid,
        hostname=record.name,
        machinetype=record.machinetype,
        state=machine.state,
        machine_dir=path,
        record=vm_json,
        created=record.created,
        started=machine.started.time if machine.started else None,
        end_time=end_time,
        finished=to_json(machine.finished) if machine.finished else None,
        cpu_seconds=cpu,
        wall_seconds=wall,
        cpu_efficiency=efficiency,
        accounted=accounted,
        apel_record=apel_file,
        apel_fields=apel_fields,
        console_log=file_evidence(machine.console_log),
        libvirt_log=file_evidence(libvirt_log, hash_it=False),
        libvirt_log_excerpt=libvirt_section(libvirt_log, record.uuid),
        joboutputs=outputs,
        joboutputs_rejected=tuple(rejected),
        syslog=syslog,
        kept_overlay=kept.as_json() if kept else None,
        kept_disks=tuple(file_evidence(p, hash_it=False) for p in kept.disk_paths()) if kept else (),
        console_tail=tail_lines(machine.console_log, lines),
        syslog_tail=syslog_tail,
        other_matches=others,
    )


# --------------------------------------------------------------------------------------------
# the readable form


def _when(epoch: Optional[float]) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def _file_line(label: str, f: Optional[FileEvidence]) -> str:
    if f is None:
        return f"{label}: none"
    if not f.exists:
        return f"{label}: {f.path} (missing)"
    parts = [f"{f.size} bytes" if f.size is not None else "", f"modified {_when(f.mtime)}" if f.mtime else "",
             f"sha256 {f.sha256}" if f.sha256 else "", f.note or ""]
    return f"{label}: {f.path} (" + ", ".join(p for p in parts if p) + ")"


def format_evidence(ev: Evidence) -> List[str]:
    """The evidence as lines for a terminal (everything VM-written is already escaped)."""
    out = [
        f"VM {ev.hostname}",
        f"  uuid (MJF job_id, APEL LocalJobId): {ev.uuid}",
        f"  machinetype {ev.machinetype}, {ev.record.get('processors')} processors, "
        f"{ev.record.get('memory_mb')} MiB, slot {ev.record.get('slot')}, address {ev.record.get('address') or '-'}",
        f"  state {ev.state}; created {_when(ev.created)}, started {_when(ev.started)}, ended {_when(ev.end_time)}",
    ]
    if ev.finished:
        f = ev.finished
        message = f"{f.get('code')} {f.get('text')}".strip() if f.get("code") is not None else "none"
        out.append(f"  outcome {f.get('outcome')} ({f.get('reason')}); shutdown_message: {escape_text(message)}")
    if ev.cpu_seconds is not None:
        eff = f"{100 * ev.cpu_efficiency:.1f}%" if ev.cpu_efficiency is not None else "-"
        out.append(f"  CPU {ev.cpu_seconds:.0f} s over {ev.wall_seconds or 0:.0f} s wall: efficiency {eff}"
                   + ("" if ev.finished else " (so far)"))
    if ev.other_matches:
        out.append(f"  (older VMs with this name: {', '.join(ev.other_matches[:10])})")
    out.append(f"  machine directory: {ev.machine_dir}")
    if ev.accounted:
        why = ev.accounted.get("skipped")
        out.append(_file_line("  APEL record", ev.apel_record) if ev.apel_record else
                   f"  APEL record: none ({why or 'not written'})")
    else:
        out.append("  APEL record: not accounted yet")
    out.append(_file_line("  console log", ev.console_log))
    out.append(_file_line("  libvirt log", ev.libvirt_log))
    out.append(f"  joboutputs: {len(ev.joboutputs)} files" +
               (f", {len(ev.joboutputs_rejected)} rejected entries" if ev.joboutputs_rejected else ""))
    out += [_file_line("    " + os.path.basename(f.path), f) for f in ev.joboutputs]
    out += [f"    rejected {name}: {reason}" for name, reason in ev.joboutputs_rejected]
    out.append(f"  syslog: {len(ev.syslog)} files")
    out += [_file_line("    " + os.path.basename(f.path), f) for f in ev.syslog]
    if ev.kept_overlay:
        k = ev.kept_overlay
        out.append(f"  kept disks: {k.get('path')} ({k.get('reason')}; until {_when(k.get('until'))}; "
                   f"base image {k.get('backing_file') or '-'})")
        out += [_file_line("    " + os.path.basename(f.path), f) for f in ev.kept_disks]
    else:
        out.append("  kept disks: none")
    for title, lines in (("libvirt log (this VM's start)", ev.libvirt_log_excerpt),
                         ("console (last lines)", ev.console_tail), ("syslog (last lines)", ev.syslog_tail)):
        if lines:
            out.append(f"--- {title}")
            out += [f"  {line}" for line in lines]
    return out
