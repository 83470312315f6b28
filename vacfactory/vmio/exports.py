"""NFS exports of each VM's directories, to that VM's address only.

One interface (:class:`Exporter`), three implementations:

- :class:`GaneshaExporter` — userspace nfs-ganesha (works everywhere, including hosts whose
  kernel has no nfsd). The exporter owns ganesha's whole configuration file, rewrites it
  atomically on every change and reloads ganesha with SIGHUP, then confirms the reload in
  ganesha's log: ``Reread exports complete``, no CRIT/MAJ/FATAL line, and the export list
  that ganesha logs after the reload ("Exports after update", component EXPORT at INFO) equal
  to what we asked for. Measured with ganesha 4.3: adding and removing exports both take
  effect on SIGHUP (``reread_exports`` prunes exports missing from the file), a few ms each.
- :class:`ExportfsExporter` — the kernel server via ``exportfs -o ... CLIENT:PATH`` and
  ``exportfs -u CLIENT:PATH``.
- :class:`NullExporter` — no NFS (VMs use the HTTP server only).

Access rules (both real exporters): NFSv4 only, ``sec=sys``, exactly one client (the VM's
IPv4 address) per export, no access for anyone else, and **every** client identity squashed
to an anonymous uid/gid (default 65534), read-only exports RO and joboutputs RW. Squashing
root too (unlike Vac 0.19's ``no_root_squash``) means the VM's root can never create
setuid-root programs or device nodes on the host; the price is that a read-write export's
root directory must be writable by the anonymous identity, so :class:`GaneshaExporter` and
:class:`ExportfsExporter` chown each RW export root to it (``prepare_rw=True``). Read-only
trees must be world-readable (0755 directories, 0644 files: what ``state/`` writes).

Export ids (ganesha): ganesha refuses to change the path of an existing ``Export_Id`` within
one reload and then drops that export, so an id is never reused for a different export while
it is live: ids come from a counter kept in the configuration file, wrapping at 65535 and
skipping ids in use.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Set, Tuple

from vacfactory.atomic import atomic_write_text
from vacfactory.errors import ExportError

log = logging.getLogger(__name__)

ANONYMOUS_ID = 65534
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+=@,-]*")
MAX_EXPORT_ID = 65535


@dataclass(frozen=True)
class ExportSpec:
    """One directory exported to one VM."""

    uuid: str
    client: str
    path: str
    pseudo: str
    readonly: bool

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.client)
        except ValueError:
            raise ExportError(f"{self.uuid}: export client {self.client!r} is not an IPv4 "
                              "address") from None
        for what, value in (("path", self.path), ("pseudo path", self.pseudo)):
            if not _SAFE_PATH.fullmatch(value) or "/../" in value + "/" or "//" in value:
                raise ExportError(f"{self.uuid}: export {what} {value!r} must be absolute and "
                                  "use only [A-Za-z0-9._/+=@,-]")
        if self.pseudo == "/":
            raise ExportError(f"{self.uuid}: the pseudo root cannot be a VM export")

    @property
    def key(self) -> Tuple[str, str, str, bool]:
        return (self.client, self.path, self.pseudo, self.readonly)


class Exporter(Protocol):
    """What the engine needs from an NFS exporter."""

    def set_exports(self, uuid: str, specs: Sequence[ExportSpec]) -> None:
        """Make exactly ``specs`` the exports of VM ``uuid`` (before its domain starts)."""

    def remove_exports(self, uuid: str) -> None:
        """Withdraw every export of VM ``uuid`` (when it has ended)."""

    def reconcile(self, expected: Mapping[str, Sequence[ExportSpec]]) -> None:
        """At start-up: exactly ``expected`` (live VMs) stays exported, all else goes."""

    def close(self) -> None:
        """Release resources; the NFS server itself keeps serving."""


def _check_uuid(uuid: str, specs: Sequence[ExportSpec]) -> None:
    for spec in specs:
        if spec.uuid != uuid:
            raise ExportError(f"{uuid}: export spec belongs to {spec.uuid}")


def prepare_rw_root(spec: ExportSpec, uid: int, gid: int) -> None:
    """chown a read-write export's root to the squashed identity (not following links)."""
    try:
        fd = os.open(spec.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ExportError(f"{spec.uuid}: cannot open export path {spec.path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
    except OSError as e:
        raise ExportError(f"{spec.uuid}: cannot chown {spec.path}: {e.strerror}") from e
    finally:
        os.close(fd)


class NullExporter:
    """No NFS: remembers what it was asked, exports nothing."""

    def __init__(self) -> None:
        self.exports: Dict[str, Tuple[ExportSpec, ...]] = {}

    def set_exports(self, uuid: str, specs: Sequence[ExportSpec]) -> None:
        _check_uuid(uuid, specs)
        if specs:
            self.exports[uuid] = tuple(specs)
        else:
            self.exports.pop(uuid, None)

    def remove_exports(self, uuid: str) -> None:
        self.exports.pop(uuid, None)

    def reconcile(self, expected: Mapping[str, Sequence[ExportSpec]]) -> None:
        self.exports = {u: tuple(s) for u, s in expected.items() if s}

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# kernel nfsd through exportfs


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run an argument list (never a shell string) with a timeout."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExportError(f"{argv[0]}: {e}") from e
    return CommandResult(done.returncode, done.stdout, done.stderr)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def parse_exportfs_list(text: str) -> List[Tuple[str, str]]:
    """(client, path) pairs from ``exportfs -v`` output (long paths wrap onto a second line)."""
    pairs: List[Tuple[str, str]] = []
    pending: Optional[str] = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            path = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[0])
            if len(fields) > 1:
                pairs.append((fields[1].split("(", 1)[0], path))
                pending = None
            else:
                pending = path
        elif pending is not None:
            pairs.append((line.split()[0].split("(", 1)[0], pending))
            pending = None
    return pairs


class ExportfsExporter:
    """Kernel NFS exports through ``exportfs``.

    ``managed_prefix`` (the machines directory) marks which kernel exports are ours, so
    :meth:`reconcile` can drop those of VMs that are gone after a restart without touching
    the site's own exports. ``runner`` is injectable: this machine has no kernel nfsd, so the
    tests check the exact argument lists.
    """

    def __init__(
        self,
        binary: str = "exportfs",
        *,
        managed_prefix: Optional[str] = None,
        anonymous_uid: int = ANONYMOUS_ID,
        anonymous_gid: int = ANONYMOUS_ID,
        prepare_rw: bool = True,
        runner: Runner = run_command,
    ) -> None:
        self.binary = binary
        self.managed_prefix = managed_prefix.rstrip("/") + "/" if managed_prefix else None
        self.anonymous_uid = anonymous_uid
        self.anonymous_gid = anonymous_gid
        self.prepare_rw = prepare_rw
        self.runner = runner
        self._exports: Dict[str, Tuple[ExportSpec, ...]] = {}
        self._lock = threading.Lock()

    def options(self, spec: ExportSpec) -> str:
        return ",".join([
            "ro" if spec.readonly else "rw",
            "sync", "no_subtree_check", "sec=sys", "all_squash",
            f"anonuid={self.anonymous_uid}", f"anongid={self.anonymous_gid}",
        ])

    def export_argv(self, spec: ExportSpec) -> List[str]:
        return [self.binary, "-o", self.options(spec), f"{spec.client}:{spec.path}"]

    def unexport_argv(self, client: str, path: str) -> List[str]:
        return [self.binary, "-u", f"{client}:{path}"]

    def _run(self, argv: Sequence[str], what: str) -> CommandResult:
        result = self.runner(argv)
        if result.returncode != 0:
            raise ExportError(f"{what}: {' '.join(argv)} failed ({result.returncode}): "
                              f"{result.stderr.strip()}")
        return result

    def set_exports(self, uuid: str, specs: Sequence[ExportSpec]) -> None:
        _check_uuid(uuid, specs)
        with self._lock:
            old = self._exports.get(uuid, ())
            new_keys = {s.key for s in specs}
            for spec in specs:
                if not spec.readonly and self.prepare_rw:
                    prepare_rw_root(spec, self.anonymous_uid, self.anonymous_gid)
                self._run(self.export_argv(spec), uuid)
            for spec in old:
                if spec.key not in new_keys and (spec.client, spec.path) not in \
                        {(s.client, s.path) for s in specs}:
                    self._run(self.unexport_argv(spec.client, spec.path), uuid)
            if specs:
                self._exports[uuid] = tuple(specs)
            else:
                self._exports.pop(uuid, None)
        log.info("%s: %d kernel NFS exports set", uuid, len(specs))

    def remove_exports(self, uuid: str) -> None:
        with self._lock:
            errors = []
            for spec in self._exports.pop(uuid, ()):
                try:
                    self._run(self.unexport_argv(spec.client, spec.path), uuid)
                except ExportError as e:
                    errors.append(str(e))
        if errors:
            raise ExportError("; ".join(errors))
        log.info("%s: kernel NFS exports withdrawn", uuid)

    def reconcile(self, expected: Mapping[str, Sequence[ExportSpec]]) -> None:
        wanted = {(s.client, s.path) for specs in expected.values() for s in specs}
        listed = self._run([self.binary, "-v"], "listing exports").stdout
        for client, path in parse_exportfs_list(listed):
            ours = self.managed_prefix is not None and (path + "/").startswith(self.managed_prefix)
            if ours and (client, path) not in wanted:
                log.info("dropping stale kernel export %s:%s", client, path)
                self._run(self.unexport_argv(client, path), "reconcile")
        for uuid in sorted(expected):
            self.set_exports(uuid, expected[uuid])

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# nfs-ganesha


_MARK = "# vacfactory-export "
_STATE = "# vacfactory-state "
_EXPORT_LINE = re.compile(r"Export\s+(\d+) pseudo \((.*?)\) with path \((.*?)\)")
_BAD_LEVEL = re.compile(r" :(CRIT|MAJ|FATAL) :")
#: ganesha lines at those levels that are expected on hosts without dbus, krb5 or rpcbind
#: (NFSv4 needs none of them)
_HARMLESS = ("DBUS", "gssd_refresh_krb5", "__Register_program")


@dataclass(frozen=True)
class _Entry:
    spec: ExportSpec
    export_id: int


class GaneshaExporter:
    """nfs-ganesha exports, reloaded with SIGHUP and confirmed in ganesha's log.

    The exporter starts ganesha.nfsd (daemonised, so it keeps serving across factory
    restarts) when it is not running according to ``pid_file``. All paths are made absolute
    (ganesha chdirs to / when it daemonises).
    """

    def __init__(
        self,
        config_path: str,
        pid_file: str,
        log_path: str,
        bind_address: str = "169.254.169.254",
        port: int = 2049,
        binary: str = "ganesha.nfsd",
        *,
        recovery_dir: Optional[str] = None,
        anonymous_uid: int = ANONYMOUS_ID,
        anonymous_gid: int = ANONYMOUS_ID,
        prepare_rw: bool = True,
        reload_timeout: float = 5.0,
        start_timeout: float = 15.0,
        max_log_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.config_path = os.path.abspath(config_path)
        self.pid_file = os.path.abspath(pid_file)
        self.log_path = os.path.abspath(log_path)
        self.bind_address = str(ipaddress.ip_address(bind_address))
        self.port = int(port)
        self.binary = binary
        self.recovery_dir = os.path.abspath(
            recovery_dir or os.path.join(os.path.dirname(self.config_path), "ganesha-recovery"))
        self.anonymous_uid = anonymous_uid
        self.anonymous_gid = anonymous_gid
        self.prepare_rw = prepare_rw
        self.reload_timeout = reload_timeout
        self.start_timeout = start_timeout
        self.max_log_bytes = max_log_bytes
        self._lock = threading.Lock()
        self._exports: Dict[str, Tuple[_Entry, ...]] = {}
        self._next_id = 1
        self._load_state()

    # state ------------------------------------------------------------------------------

    def _load_state(self) -> None:
        """Recover exports and the id counter from our own configuration file, if present."""
        try:
            with open(self.config_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        except OSError as e:
            raise ExportError(f"{self.config_path}: {e.strerror}") from e
        exports: Dict[str, List[_Entry]] = {}
        for line in lines:
            try:
                if line.startswith(_STATE):
                    self._next_id = int(json.loads(line[len(_STATE):])["next_id"])
                elif line.startswith(_MARK):
                    d = json.loads(line[len(_MARK):])
                    spec = ExportSpec(d["uuid"], d["client"], d["path"], d["pseudo"],
                                      bool(d["readonly"]))
                    exports.setdefault(spec.uuid, []).append(_Entry(spec, int(d["id"])))
            except (ValueError, KeyError, TypeError, ExportError) as e:
                log.warning("%s: ignoring unreadable vacfactory line (%s)", self.config_path, e)
        self._exports = {u: tuple(e) for u, e in exports.items()}

    @property
    def exports(self) -> Dict[str, Tuple[Tuple[ExportSpec, int], ...]]:
        """uuid -> ((spec, export id), ...) as currently configured."""
        with self._lock:
            return {u: tuple((e.spec, e.export_id) for e in es) for u, es in self._exports.items()}

    def _allocate(self, in_use: Set[int]) -> int:
        for _ in range(MAX_EXPORT_ID):
            candidate = self._next_id
            self._next_id = candidate % MAX_EXPORT_ID + 1
            if candidate not in in_use:
                in_use.add(candidate)
                return candidate
        raise ExportError("no free nfs-ganesha export id")

    def _plan(self, wanted: Mapping[str, Sequence[ExportSpec]]) -> Dict[str, Tuple[_Entry, ...]]:
        """New uuid -> entries; unchanged specs keep their ids, new ones get fresh ids that
        are not live now (so no id changes its path within one reload)."""
        in_use = {e.export_id for es in self._exports.values() for e in es}
        plan: Dict[str, Tuple[_Entry, ...]] = {}
        pseudos: Dict[str, str] = {}
        for uuid in sorted(wanted):
            specs = wanted[uuid]
            _check_uuid(uuid, specs)
            old = {e.spec: e.export_id for e in self._exports.get(uuid, ())}
            entries = []
            for spec in specs:
                if spec.pseudo in pseudos:
                    raise ExportError(f"{uuid}: pseudo path {spec.pseudo} already used by "
                                      f"{pseudos[spec.pseudo]}")
                pseudos[spec.pseudo] = uuid
                export_id = old.get(spec) or self._allocate(in_use)
                entries.append(_Entry(spec, export_id))
            if entries:
                plan[uuid] = tuple(entries)
        return plan

    # configuration ------------------------------------------------------------------------

    def render(self, exports: Optional[Mapping[str, Sequence[_Entry]]] = None) -> str:
        """ganesha.conf for ``exports`` (default: the current ones)."""
        exports = self._exports if exports is None else exports
        out = [
            "# Written by vacfactory (vacfactory/vmio/exports.py); rewritten on every change.",
            _STATE + json.dumps({"next_id": self._next_id}),
            "NFS_CORE_PARAM {",
            f"    Bind_addr = {self.bind_address};",
            f"    NFS_Port = {self.port};",
            "    Protocols = 4;",
            "    Enable_NLM = false;",
            "    Enable_RQUOTA = false;",
            "    Enable_UDP = false;",
            "}",
            "NFSV4 {",
            "    Graceless = true;",
            "    RecoveryBackend = fs;",
            f'    RecoveryRoot = "{self.recovery_dir}";',
            "}",
            "NFS_KRB5 { Active_krb5 = false; }",
            "LOG {",
            "    Default_Log_Level = EVENT;",
            "    COMPONENTS { EXPORT = INFO; }",
            "}",
            "EXPORT_DEFAULTS {",
            "    Access_Type = None;",
            "    Squash = All_Squash;",
            f"    Anonymous_Uid = {self.anonymous_uid};",
            f"    Anonymous_Gid = {self.anonymous_gid};",
            "    SecType = sys;",
            "    Protocols = 4;",
            "    Transports = TCP;",
            "}",
        ]
        entries = sorted((e for es in exports.values() for e in es), key=lambda e: e.export_id)
        for entry in entries:
            spec = entry.spec
            out += [
                _MARK + json.dumps({"uuid": spec.uuid, "client": spec.client, "path": spec.path,
                                    "pseudo": spec.pseudo, "readonly": spec.readonly,
                                    "id": entry.export_id}, sort_keys=True),
                "EXPORT {",
                f"    Export_Id = {entry.export_id};",
                f'    Path = "{spec.path}";',
                f'    Pseudo = "{spec.pseudo}";',
                "    Access_Type = None;",
                "    Squash = All_Squash;",
                f"    Anonymous_Uid = {self.anonymous_uid};",
                f"    Anonymous_Gid = {self.anonymous_gid};",
                "    SecType = sys;",
                "    Protocols = 4;",
                "    Transports = TCP;",
                f"    CLIENT {{ Clients = {spec.client}; "
                f"Access_Type = {'RO' if spec.readonly else 'RW'}; Protocols = 4; }}",
                "    FSAL { Name = VFS; }",
                "}",
            ]
        return "\n".join(out) + "\n"

    # public API ---------------------------------------------------------------------------

    def set_exports(self, uuid: str, specs: Sequence[ExportSpec]) -> None:
        with self._lock:
            wanted = {u: [e.spec for e in es] for u, es in self._exports.items()}
            wanted[uuid] = list(specs)
            self._apply(wanted, f"{uuid}: set {len(specs)} exports")

    def remove_exports(self, uuid: str) -> None:
        with self._lock:
            if uuid not in self._exports:
                return
            wanted = {u: [e.spec for e in es] for u, es in self._exports.items() if u != uuid}
            self._apply(wanted, f"{uuid}: removed exports")

    def reconcile(self, expected: Mapping[str, Sequence[ExportSpec]]) -> None:
        with self._lock:
            stale = sorted(set(self._exports) - set(expected))
            if stale:
                log.info("dropping nfs-ganesha exports of %d VMs no longer alive: %s",
                         len(stale), ", ".join(stale))
            self._apply({u: list(s) for u, s in expected.items()}, "reconciled exports",
                        force_reload=True)

    def close(self) -> None:
        """Nothing to release: ganesha keeps serving the live VMs across factory restarts."""
        return None

    def _apply(self, wanted: Mapping[str, Sequence[ExportSpec]], what: str,
               force_reload: bool = False) -> None:
        plan = self._plan(wanted)
        for entries in plan.values():
            for entry in entries:
                if not os.path.isdir(entry.spec.path) or os.path.islink(entry.spec.path):
                    raise ExportError(f"{entry.spec.uuid}: export path {entry.spec.path} is not "
                                      "a directory")
                if not entry.spec.readonly and self.prepare_rw:
                    prepare_rw_root(entry.spec, self.anonymous_uid, self.anonymous_gid)
        if plan == self._exports and not force_reload and self.running_pid() is not None:
            return
        self._exports = plan
        self._write_config()
        start = time.monotonic()
        pid = self.running_pid()
        if pid is None and not any(plan.values()):
            return  # nothing to serve: ganesha starts with the first VM that mounts over NFS
        if pid is None:
            self._start()
        else:
            self._reload(pid)
        log.info("nfs-ganesha: %s (%d exports live, %.0f ms)", what,
                 sum(len(es) for es in plan.values()), 1000 * (time.monotonic() - start))

    def _write_config(self) -> None:
        os.makedirs(os.path.dirname(self.config_path), exist_ok=True)
        atomic_write_text(self.config_path, self.render(), mode=0o600)

    # the ganesha process --------------------------------------------------------------------

    def running_pid(self) -> Optional[int]:
        """ganesha's pid from the pid file if that process is alive (not a zombie)."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().strip() or "0")
        except (OSError, ValueError):
            return None
        return pid if pid > 0 and _alive(pid) and _is_ganesha(pid, self.binary) else None

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def _read_log_from(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(4 * 1024 * 1024).decode("utf-8", "replace")
        except OSError:
            return ""

    def _rotate_log(self) -> None:
        """ganesha opens its log per message, so renaming it is a safe rotation."""
        if self._log_size() > self.max_log_bytes:
            try:
                os.replace(self.log_path, self.log_path + ".1")
            except OSError as e:
                log.warning("cannot rotate %s: %s", self.log_path, e.strerror)

    def _start(self) -> None:
        os.makedirs(self.recovery_dir, exist_ok=True)
        self._rotate_log()
        offset = self._log_size()
        argv = [self.binary, "-f", self.config_path, "-L", self.log_path, "-p", self.pid_file,
                "-N", "NIV_EVENT"]
        # ganesha daemonises: its output goes to a file, not a pipe, so that a daemon keeping
        # the descriptor open can never make us wait for EOF
        with tempfile.TemporaryFile() as output:
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=output,
                                      stderr=subprocess.STDOUT, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise ExportError(f"cannot run {self.binary}: {e}") from e
            if done.returncode != 0:
                output.seek(0)
                text = output.read(4096).decode("utf-8", "replace").strip()
                raise ExportError(f"{self.binary} exited with {done.returncode}: {text[-500:]}")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            text = self._read_log_from(offset)
            if "NFS SERVER INITIALIZED" in text and self.running_pid() is not None:
                self._verify(text, "start-up")
                log.info("nfs-ganesha started (pid %s) on %s:%d", self.running_pid(),
                         self.bind_address, self.port)
                return
            if "NFS EXIT" in text or ":FATAL :" in text:
                break
            time.sleep(0.01)
        raise ExportError(f"nfs-ganesha did not start: {_problems(self._read_log_from(offset))}")

    def _reload(self, pid: int) -> None:
        self._rotate_log()
        offset = self._log_size()
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as e:
            raise ExportError(f"cannot signal nfs-ganesha (pid {pid}): {e.strerror}") from e
        deadline = time.monotonic() + self.reload_timeout
        text = ""
        while time.monotonic() < deadline:
            text = self._read_log_from(offset)
            if "Reread exports complete" in text:
                text = self._settle(offset, deadline)
                self._verify(text, "reload")
                return
            if not _alive(pid):
                raise ExportError(f"nfs-ganesha (pid {pid}) died on reload: {_problems(text)}")
            time.sleep(0.002)
        raise ExportError(f"nfs-ganesha (pid {pid}) did not confirm the reload within "
                          f"{self.reload_timeout} s: {_problems(text)}")

    def _settle(self, offset: int, deadline: float) -> str:
        """The log from ``offset`` once ganesha stops writing (the export list and any config
        errors follow the 'complete' line)."""
        text = self._read_log_from(offset)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.005)
            again = self._read_log_from(offset)
            if len(again) != len(text):
                text, quiet_since = again, time.monotonic()
            elif time.monotonic() - quiet_since >= 0.03:
                break
        return text

    def _verify(self, text: str, when: str) -> None:
        """Raise ExportError unless the log shows exactly our exports and no errors."""
        problems = [line for line in text.splitlines()
                    if _BAD_LEVEL.search(line) and not any(h in line for h in _HARMLESS)]
        marker = "Exports after update" if when == "reload" else "ReadExports"
        section = text[text.find(marker):] if marker in text else text
        listed = {(int(m.group(1)), m.group(2), m.group(3))
                  for m in _EXPORT_LINE.finditer(section) if int(m.group(1)) != 0}
        wanted = {(e.export_id, e.spec.pseudo, e.spec.path)
                  for es in self._exports.values() for e in es}
        if listed != wanted:
            missing = sorted(wanted - listed)
            extra = sorted(listed - wanted)
            problems.append(f"export list differs: missing {missing}, unexpected {extra}")
        if problems:
            raise ExportError(f"nfs-ganesha {when} failed: " + " | ".join(problems[:10]))

    def stop_server(self, timeout: float = 10.0) -> None:
        """Stop the ganesha we manage (tests, uninstall); the factory never calls this."""
        pid = self.running_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (PID 1 here reaps lazily)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] not in (b"Z", b"X")


def _is_ganesha(pid: int, binary: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        return False
    return os.path.basename(argv0) == os.path.basename(binary)


def _problems(text: str) -> str:
    lines = [line for line in text.splitlines()
             if _BAD_LEVEL.search(line) and not any(h in line for h in _HARMLESS)]
    return " | ".join(lines[-5:]) or (text.strip().splitlines() or ["(empty log)"])[-1]

