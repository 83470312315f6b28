"""The one checker every fault trial ends with: what must hold after the factory recovered.

:func:`check` reads a factory's state directory, APEL archive and outgoing queue, the domains
the hypervisor lists, and (where the trial has it) the ground truth recorded outside the
factory (:mod:`tests.faults.guests`), and returns every violation it finds:

state files
    every machine directory loads (vm.json and each of started/heartbeat/finished/accounted/
    cleaned parses with its schema), every ``finishes/*.json``, ``status.json`` and
    ``factory-heartbeat`` parses; no interrupted preparation (``machines/.new-*``) and no
    temporary file (``.tmp-*``) left in the machine, finishes or state directory.
VMs and domains
    every domain named like this factory's belongs to a live VM record (no zombie) and every
    live VM record has its domain and its ``started`` (none lost, none half-created); domain
    names are unique, no slot is used twice, the live VMs fit in ``total_processors``.
finished VMs
    accounted and cleaned (``settled``), no disk file left in any VM that is not live, no done
    machine directory kept beyond its machinetype's ``machines_dir_days`` (plus
    ``retention_slack``).
NFS exports (nfs-ganesha)
    no export of a VM that is not live in ganesha's configuration (``ganesha/ganesha.conf``,
    one ``# vacfactory-export`` line per export); with ``nfs_exporter = "ganesha"``, exactly
    the live VMs are exported: the configuration and the export list that the running
    ganesha last logged (``ganesha.log``: at start-up, and "Exports after update" after each
    reload) both hold the three exports (machinefeatures, jobfeatures RO; joboutputs RW, to
    the VM's address) of every live ``mjf_transport = nfs`` VM and nothing else.
accounting
    at most one archived APEL job record per VM UUID, each one also in the dirq outgoing queue
    with an identical body (unless a consumer took it: ``sent``), nothing queued that is not
    archived; every archive file one job record, every queue element a valid job or sync
    message; no negative WallDuration, no EndTime before StartTime; a record exactly when the
    VM's recorded wall time reaches its fizzle_seconds (the engine's own rule, applied to its
    own files).
against the ground truth (when given)
    every domain that ever ran has a machine directory or, once deleted by retention, the
    record it was due: exactly one APEL record for a VM that ran at least ``fizzle_seconds +
    end_slack + tolerance``, none for one that ran less than ``fizzle_seconds - tolerance``;
    a domain that stopped before the moment checked has a finished record; the recorded start
    within ``tolerance`` of the truth; the recorded end never more than ``tolerance`` after
    the real end (nothing charged beyond it), never before the VM's last console output, and
    at most ``end_slack`` before the real end (a VM that ended while the factory was dead or
    blind ends at its last sign of life); the record's WallDuration to match.

The moment checked is the start of the round the claim is about: a domain that ends after
that round listed it is not yet the factory's to know about.

Damage (a corrupt state file, archive file or queue element, a VM accounted twice) is never
transient: :func:`damage` picks it out of a check made at any moment (a full disk).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import AbstractSet, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from vacfactory.atomic import TEMP_PREFIX
from vacfactory.core import apel
from vacfactory.core.views import FinishedVM
from vacfactory.engine import naming
from vacfactory.errors import RecordInvalid, StateError
from vacfactory.state.machines import NEW_PREFIX, Machine, MachineStore
from vacfactory.state.records import from_json

JOB_HEADER = "APEL-individual-job-message:"
_MONTH = re.compile(r"^[0-9]{6}$")
_QUEUE_DIR = re.compile(r"^[0-9a-f]{8}$")
_QUEUE_FILE = re.compile(r"^[0-9a-f]{14}$")
#: vmio.exports: one JSON line per export in ganesha.conf
_GANESHA_MARK = "# vacfactory-export "
#: ganesha.log: one line per export in its export list, and the client line after it
_GANESHA_EXPORT = re.compile(r"Export\s+(\d+) pseudo \((.*?)\) with path \((.*?)\)")
_GANESHA_CLIENT = re.compile(r"NETWORK_CLIENT: ([0-9.]+)/32")
#: violations that are damage, wrong at any moment (not a step the factory has yet to take)
DAMAGE = ("corrupt", "archived APEL records", "queued record that is not archived")
DEFAULT_RETENTION_SECONDS = 3 * 86400.0


@dataclass
class Context:
    """What the checker is told about the factory and the moment it checks."""

    state_dir: str
    factory_name: str
    total_processors: int
    #: the hypervisor's domains now (all of them; the checker picks this factory's)
    domains: Sequence
    #: the time the invariants are claimed for (the start of the recovery round)
    check_time: float
    #: machinetype -> machines_dir_days in seconds (others: 3 days)
    retention_seconds: Mapping[str, float] = field(default_factory=dict)
    #: how much later than its retention a done directory may still exist (0 just after a
    #: restart's first round; RETENTION_SECONDS + a cycle for a long-running engine)
    retention_slack: float = 0.0
    #: uuid -> tests.faults.guests.Life, or None when the trial has no ground truth
    truth: Optional[Mapping] = None
    #: the truth saw every domain since the factory was born (so unknown records are errors)
    truth_complete: bool = False
    tolerance: float = 1.0
    #: how much earlier than its domain's real end a VM's recorded end may be, for a VM that
    #: ended unobserved (the factory was dead or blind): it ends at its last sign of life, and
    #: a real guest prints its last console line seconds before qemu exits (None: tolerance)
    end_slack: Optional[float] = None
    #: fizzle_seconds for VMs whose machine directory is gone (retention), by default
    default_fizzle: Optional[float] = None
    #: every finished VM must already be accounted and cleaned
    settled: bool = True
    #: the factory's nfs_exporter: with "ganesha", exactly the live NFS VMs must be exported
    nfs_exporter: str = "none"
    #: VM uuids whose queued record a consumer (ssmsend) has taken: archived, no longer queued
    sent: AbstractSet[str] = frozenset()


@dataclass
class Result:
    violations: List[str]
    stats: Dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self, limit: int = 12) -> str:
        shown = self.violations[:limit]
        more = len(self.violations) - len(shown)
        return "\n".join(shown + ([f"... and {more} more"] if more > 0 else []))


@dataclass(frozen=True)
class Record:
    path: str
    text: str
    fields: Dict[str, str]


def check(ctx: Context) -> Result:
    v: List[str] = []
    stats: Dict[str, int] = {}
    machines = _load_machines(ctx, v)
    _check_state_files(ctx, v)
    live = {u: m for u, m in machines.items() if m.live}
    _check_domains(ctx, machines, live, v)
    _check_finished(ctx, machines, v)
    _check_exports(ctx, machines, live, v)
    archive = archive_records(ctx.state_dir, v)
    queue = queued_records(ctx.state_dir, v)
    _check_accounting(ctx, machines, archive, queue, v, stats)
    if ctx.truth is not None:
        _check_truth(ctx, machines, archive, v)
    stats.update(
        machines=len(machines), live=len(live),
        done=sum(1 for m in machines.values() if m.state == "done"),
        records=sum(len(r) for r in archive.values()),
        queued=sum(len(q) for q in queue.values()),
    )
    return Result(v, stats)


def damage(result: Result) -> List[str]:
    """The violations of ``result`` that are damage (see the module doc)."""
    return [p for p in result.violations if any(word in p for word in DAMAGE)]


# -- state files ------------------------------------------------------------------------------


def _load_machines(ctx: Context, v: List[str]) -> Dict[str, Machine]:
    store = MachineStore(ctx.state_dir, create=False)
    machines: Dict[str, Machine] = {}
    for entry in sorted(os.listdir(store.machines_dir)):
        path = os.path.join(store.machines_dir, entry)
        if entry.startswith(NEW_PREFIX):
            v.append(f"machines/{entry}: an interrupted preparation was left behind")
            continue
        if entry.startswith(TEMP_PREFIX):
            v.append(f"machines/{entry}: stray temporary file")
            continue
        if entry.startswith(".") or not os.path.isdir(path):
            continue
        try:
            machine = store.load(path)
        except StateError as error:
            v.append(f"machines/{entry}: corrupt machine directory: {error}")
            continue
        for name in os.listdir(path):
            if name.startswith(TEMP_PREFIX):
                v.append(f"machines/{entry}/{name}: stray temporary file")
        machines[machine.uuid] = machine
    return machines


def _check_state_files(ctx: Context, v: List[str]) -> None:
    finishes = os.path.join(ctx.state_dir, "finishes")
    for directory, label in ((finishes, "finishes/"), (ctx.state_dir, "")):
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            if name.startswith(TEMP_PREFIX):
                v.append(f"{label}{name}: stray temporary file")
    for name in os.listdir(finishes) if os.path.isdir(finishes) else ():
        if name.endswith(".json") and not name.startswith("."):
            path = os.path.join(finishes, name)
            try:
                with open(path) as f:
                    from_json(FinishedVM, json.load(f), path)
            except (OSError, ValueError, StateError) as error:
                v.append(f"finishes/{name}: corrupt: {error}")
    status = os.path.join(ctx.state_dir, "status.json")
    if os.path.exists(status):
        try:
            with open(status) as f:
                if not isinstance(json.load(f), dict):
                    v.append("status.json: not a JSON object")
        except (OSError, ValueError) as error:
            v.append(f"status.json: corrupt: {error}")
    beat = os.path.join(ctx.state_dir, "factory-heartbeat")
    if os.path.exists(beat):
        try:
            with open(beat) as f:
                float(f.read().strip())
        except (OSError, ValueError) as error:
            v.append(f"factory-heartbeat: corrupt: {error}")


# -- VMs and domains --------------------------------------------------------------------------


def _check_domains(ctx: Context, machines: Mapping[str, Machine], live: Mapping[str, Machine],
                   v: List[str]) -> None:
    pattern = naming.domain_pattern(ctx.factory_name)
    ours = [d for d in ctx.domains if pattern.match(d.name)]
    for name, count in Counter(d.name for d in ours).items():
        if count > 1:
            v.append(f"{name}: {count} domains with this name")
    listed = {d.uuid for d in ours}
    for d in ours:
        m = machines.get(d.uuid)
        if m is None:
            v.append(f"{d.name}: zombie domain {d.uuid} (no machine directory)")
        elif not m.live:
            v.append(f"{d.name}: zombie domain {d.uuid} (its VM is recorded as finished)")
        elif m.name != d.name:
            v.append(f"{d.name}: domain {d.uuid} is recorded as {m.name}")
    for uuid, m in live.items():
        if uuid not in listed and not _ended_after_check(ctx, uuid):
            v.append(f"{m.name}: VM {uuid} lost track of: recorded live but it has no domain")
        if m.started is None:
            v.append(f"{m.name}: VM {uuid} has a domain but no `started` (not adopted)")
    processors = sum(m.record.processors for m in live.values())
    if processors > ctx.total_processors:
        v.append(f"{processors} processors in live VMs > total_processors {ctx.total_processors}")
    slots = Counter(m.record.slot for m in machines.values() if m.cleaned is None)
    for slot, count in slots.items():
        if count > 1:
            v.append(f"slot {slot} is used by {count} VMs that are not cleaned")


def _mtime(path: str) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _ended_after_check(ctx: Context, uuid: str) -> bool:
    """The domain ended after the moment checked (the round had listed it): not a loss."""
    life = (ctx.truth or {}).get(uuid)
    return life is not None and life.stop is not None and life.stop >= ctx.check_time


def _check_finished(ctx: Context, machines: Mapping[str, Machine], v: List[str]) -> None:
    for uuid, m in machines.items():
        if m.live:
            continue
        if ctx.settled and m.accounted is None:
            v.append(f"{m.name}: VM {uuid} finished but not accounted")
        if ctx.settled and m.cleaned is None:
            v.append(f"{m.name}: VM {uuid} finished but not cleaned")
        try:
            left = os.listdir(m.disks_dir)
        except FileNotFoundError:
            left = []
        if left:
            v.append(f"{m.name}: VM {uuid} ({m.state}) left disk files {sorted(left)}")
        if m.cleaned is not None and (os.path.ismount(m.joboutputs_dir)
                                      or os.path.lexists(os.path.join(m.path, "joboutputs.img"))):
            v.append(f"{m.name}: VM {uuid} is cleaned but its joboutputs filesystem is still "
                     "mounted or its image is left: leaked")
        if m.state == "done":
            keep = ctx.retention_seconds.get(m.record.machinetype, DEFAULT_RETENTION_SECONDS)
            age = ctx.check_time - m.finished.time
            # a directory may only go once it is done: one that was accounted late (the disk was
            # full) is due from its cleaning, not from its finish
            overdue = ctx.check_time - max(m.finished.time + keep, m.cleaned.time)
            if keep > 0 and overdue > ctx.retention_slack:
                v.append(f"{m.name}: VM {uuid} kept {age:.0f} s after it finished and "
                         f"{ctx.check_time - m.cleaned.time:.0f} s after it was cleaned, beyond retention "
                         f"{keep:.0f} s (+{ctx.retention_slack:.0f} s)")


# -- NFS exports --------------------------------------------------------------------------

#: (uuid, pseudo path, path, client, read-only)
Export = Tuple[str, str, str, str, bool]


def _check_exports(ctx: Context, machines: Mapping[str, Machine], live: Mapping[str, Machine],
                   v: List[str]) -> None:
    configured = ganesha_configured(ctx.state_dir, v)
    for uuid in sorted({e[0] for e in configured}):
        if uuid not in live:
            m = machines.get(uuid)
            v.append(f"NFS export of {uuid}, which is not a live VM "
                     f"({'no machine directory' if m is None else m.state}): leaked")
    if ctx.nfs_exporter != "ganesha":
        return
    expected: Set[Export] = set()
    for uuid, m in live.items():
        if m.record.mjf_transport == "nfs" and m.record.address:
            expected |= {(uuid, f"/{uuid}/{name}", path, m.record.address, readonly)
                         for name, path, readonly in (("machinefeatures", m.machinefeatures_dir, True),
                                                      ("jobfeatures", m.jobfeatures_dir, True),
                                                      ("joboutputs", m.joboutputs_dir, False))}
    _compare_exports("ganesha.conf", configured, expected, v)
    served = ganesha_served(ctx.state_dir)
    if served is None:
        if expected:
            v.append(f"nfs-ganesha is not running, but {len({e[0] for e in expected})} live VMs need NFS exports")
        return
    _compare_exports("nfs-ganesha's export list (ganesha.log)", served,
                     {(e[1], e[2], e[3]) for e in expected}, v)


def _compare_exports(where: str, found, expected, v: List[str]) -> None:
    for export in sorted(set(expected) - set(found)):
        v.append(f"{where}: export {export} of a live VM is missing")
    for export in sorted(set(found) - set(expected)):
        v.append(f"{where}: unexpected export {export}")


def ganesha_configured(state_dir: str, v: Optional[List[str]] = None) -> Set[Export]:
    """The exports in the factory's ganesha.conf (its ``# vacfactory-export`` lines)."""
    path = os.path.join(state_dir, "ganesha", "ganesha.conf")
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.startswith(_GANESHA_MARK)]
    except FileNotFoundError:
        return set()
    found: Set[Export] = set()
    for line in lines:
        try:
            d = json.loads(line[len(_GANESHA_MARK):])
            found.add((d["uuid"], d["pseudo"], d["path"], d["client"], bool(d["readonly"])))
        except (ValueError, KeyError, TypeError) as error:
            if v is not None:
                v.append(f"ganesha/ganesha.conf: corrupt export line {line!r}: {error}")
    return found


def ganesha_served(state_dir: str) -> Optional[Set[Tuple[str, str, str]]]:
    """(pseudo, path, client) of every export the running nfs-ganesha last listed in its log
    (at start-up and after each reload), or None if it is not running."""
    directory = os.path.join(state_dir, "ganesha")
    try:
        with open(os.path.join(directory, "ganesha.pid")) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not os.path.basename(f.read().split(b"\0", 1)[0]).startswith(b"ganesha"):
                return None
        with open(os.path.join(directory, "ganesha.log"), errors="replace") as f:
            text = f.read()
    except (OSError, ValueError):
        return None
    served: Set[Tuple[str, str, str]] = set()
    pending: Optional[Tuple[str, str]] = None
    for line in text.splitlines():
        if "nfs-ganesha Starting" in line or "Exports after update" in line:
            served, pending = set(), None  # a new list follows
            continue
        match = _GANESHA_EXPORT.search(line)
        if match:
            pending = (match.group(2), match.group(3)) if int(match.group(1)) != 0 else None
            continue
        client = _GANESHA_CLIENT.search(line)
        if client and pending is not None:
            served.add((pending[0], pending[1], client.group(1)))
            pending = None
    return served


# -- accounting -------------------------------------------------------------------------------


def parse_record(text: str) -> List[Dict[str, str]]:
    """The records of one APEL message (``Key: value`` lines, records split by ``%%``)."""
    lines = text.splitlines()
    records, current = [], {}
    for line in lines[1:]:
        if line.strip() == "%%":
            if current:
                records.append(current)
            current = {}
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key.strip()] = value.strip()
    if current:
        records.append(current)
    return records


def archive_records(state_dir: str, v: Optional[List[str]] = None) -> Dict[str, List[Record]]:
    """uuid -> its archived job records (there must be at most one)."""
    root = os.path.join(state_dir, "apel-archive")
    found: Dict[str, List[Record]] = {}
    for month in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        if not _MONTH.match(month):
            continue
        identities = [os.path.join(root, month, i) for i in sorted(os.listdir(os.path.join(root, month)))]
        unsent = os.path.join(root, month, "not-queued")  # records archived but never queued
        if os.path.isdir(unsent):
            identities = [d for d in identities if d != unsent]
            identities += [os.path.join(unsent, i) for i in sorted(os.listdir(unsent))]
        for directory in identities:
            if os.path.basename(directory).startswith(".") or not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                if name.startswith("."):
                    continue
                path = os.path.join(directory, name)
                with open(path) as f:
                    text = f.read()
                records = parse_record(text) if text.startswith(JOB_HEADER) else []
                if len(records) != 1 or records[0].get("LocalJobId") != name:
                    if v is not None:
                        v.append(f"archive {path}: corrupt: not one job record for {name}")
                    continue
                found.setdefault(name, []).append(Record(path, text, records[0]))
    return found


def queued_records(state_dir: str, v: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """uuid -> bodies of the queued job messages that carry its record."""
    root = os.path.join(state_dir, "apel-outgoing")
    found: Dict[str, List[str]] = {}
    for directory in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        if not _QUEUE_DIR.match(directory):
            continue
        for name in os.listdir(os.path.join(root, directory)):
            if not _QUEUE_FILE.match(name):
                continue
            try:
                with open(os.path.join(root, directory, name)) as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            kind = _queued_kind(text)
            if kind not in (apel.JOB, apel.SYNC):
                if v is not None:
                    v.append(f"queue apel-outgoing/{directory}/{name}: corrupt: neither a job record nor a sync "
                             f"record ({kind})")
                continue
            if kind == apel.SYNC:
                continue
            for record in parse_record(text):
                found.setdefault(record.get("LocalJobId", "?"), []).append(text)
    return found


def _queued_kind(text: str) -> str:
    """The kind of a queued APEL message (job, sync, ...), or why it is not one."""
    try:
        return apel.parse_message(text).kind
    except RecordInvalid as error:
        return f"invalid: {error}"


def _check_accounting(ctx: Context, machines: Mapping[str, Machine], archive: Mapping[str, List[Record]],
                      queue: Mapping[str, List[str]], v: List[str], stats: Dict[str, int]) -> None:
    duplicates_in_queue = 0
    for uuid, records in archive.items():
        if len(records) > 1:
            v.append(f"VM {uuid}: {len(records)} archived APEL records: {[r.path for r in records]}")
        for record in records:
            f = record.fields
            try:
                wall, start, end = int(f["WallDuration"]), int(f["StartTime"]), int(f["EndTime"])
            except (KeyError, ValueError):
                v.append(f"VM {uuid}: record without integer WallDuration/StartTime/EndTime")
                continue
            if wall < 0:
                v.append(f"VM {uuid}: negative WallDuration {wall}")
            if end < start:
                v.append(f"VM {uuid}: EndTime {end} before StartTime {start}")
            bodies = queue.get(uuid, [])
            if bodies and record.text not in bodies:
                v.append(f"VM {uuid}: corrupt queued record: its body differs from the archived one")
            elif not bodies and uuid not in ctx.sent:
                v.append(f"VM {uuid}: archived record is not in the outgoing queue")
            duplicates_in_queue += max(0, len(bodies) - 1)
    for uuid in queue:
        if uuid not in archive:
            v.append(f"VM {uuid}: queued record that is not archived")
    stats["queue_duplicates"] = duplicates_in_queue
    for uuid, m in machines.items():
        if m.finished is None or m.accounted is None:
            continue
        records = archive.get(uuid, [])
        if m.accounted.archive is not None and m.accounted.archive not in [r.path for r in records]:
            v.append(f"{m.name}: VM {uuid} says it is archived in {m.accounted.archive}, which does not exist")
        if m.started is None or m.finished.outcome == "failed":
            if records:
                v.append(f"{m.name}: VM {uuid} never started but has an APEL record")
            continue
        wall = m.finished.end_time - m.started.time
        if wall < 0:
            v.append(f"{m.name}: VM {uuid} ended {-wall:.1f} s before it started")
        due = wall >= m.record.fizzle_seconds
        if due and not records:
            v.append(f"{m.name}: VM {uuid} ran {wall:.1f} s >= fizzle_seconds but has no APEL record")
        if not due and records:
            v.append(f"{m.name}: VM {uuid} ran {wall:.1f} s < fizzle_seconds but has an APEL record")


def _check_truth(ctx: Context, machines: Mapping[str, Machine], archive: Mapping[str, List[Record]],
                 v: List[str]) -> None:
    tol = ctx.tolerance
    slack = tol if ctx.end_slack is None else max(tol, ctx.end_slack)
    # (a start only known from a listing is late: the durations below are then upper bounds
    # too short by that lateness, which only weakens the "record required" test)
    truth = ctx.truth or {}
    for uuid, life in truth.items():
        m = machines.get(uuid)
        records = archive.get(uuid, [])
        if life.stop is None:
            if m is None:
                v.append(f"{life.name}: domain {uuid} runs without a machine directory")
            continue
        true_wall = life.stop - life.start
        fizzle = m.record.fizzle_seconds if m is not None else ctx.default_fizzle
        if m is not None:
            if m.live:
                if not _ended_after_check(ctx, uuid):
                    v.append(f"{m.name}: VM {uuid} stopped at {life.stop:.2f} ({life.how}) but is still recorded "
                             f"live (checked for {ctx.check_time:.2f})")
                continue
            if m.started is not None and not life.approx_start and abs(m.started.time - life.start) > tol:
                v.append(f"{m.name}: VM {uuid} recorded start {m.started.time:.2f}, its domain started "
                         f"{life.start:.2f}")
            if m.started is not None:
                end = m.finished.end_time
                said = (f"{m.name}: VM {uuid} recorded end {end:.2f} ({m.finished.reason}), its domain "
                        f"stopped {life.stop:.2f} ({life.how}), ran {true_wall:.2f} s")
                if end > life.stop + tol:
                    v.append(f"{said}: charged {end - life.stop:.2f} s beyond its end")
                elif end < life.stop - slack:
                    v.append(f"{said}: ends {life.stop - end:.2f} s too early")
                console = _mtime(m.console_log)
                if console is not None and end < min(console, life.stop) - tol:
                    v.append(f"{said}: ends {console - end:.2f} s before its last console output")
        if fizzle is None:
            continue
        if true_wall >= fizzle + slack + tol and len(records) != 1:
            where = "its machine directory is gone" if m is None else f"state {m.state}"
            v.append(f"{life.name}: VM {uuid} ran {true_wall:.2f} s (>= fizzle {fizzle:g} s) but has "
                     f"{len(records)} APEL records ({where})")
        if true_wall < fizzle - tol and records:
            v.append(f"{life.name}: VM {uuid} ran {true_wall:.2f} s (< fizzle {fizzle:g} s) but has an APEL record")
        for record in records:
            try:
                wall = int(record.fields["WallDuration"])
            except (KeyError, ValueError):
                continue
            if not true_wall - slack - 1 <= wall <= true_wall + tol + 1:
                v.append(f"{life.name}: VM {uuid} record says WallDuration {wall}, it ran {true_wall:.2f} s")
    if ctx.truth_complete:
        for uuid in archive:
            if uuid not in truth and uuid not in machines:
                v.append(f"APEL record for {uuid}, a VM nobody saw run")
        for uuid, m in machines.items():
            if m.started is not None and uuid not in truth:
                v.append(f"{m.name}: VM {uuid} recorded as started but its domain was never seen")
