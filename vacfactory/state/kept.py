"""Disk overlays kept for examination after a VM ended abnormally (``keep_on_abnormal_end``).

Why: when a VM was killed for a stale heartbeat or its wallclock, crashed, or ended with a
5xx/6xx/7xx code, what was on its disks is often the only way to find out what went wrong (or
what an intruder did). Normally the clean step deletes the disks; with the option on, the engine
calls :func:`keep_overlay` just before, and the VM's disk images move (a rename: no copy, same
file system) to::

    <state_dir>/kept/<uuid>/
        kept.json        who, why, when, until when, and the base image the overlay reads
        root.qcow2       0400: the VM's root overlay (and scratch.qcow2 if it had one)

outside the machine directory, so ``machines_dir_days`` and ``keep_days`` are independent.
Files are made read-only (0400; the directory 0500) so nothing opens them for writing by
accident; examine a copy, or the image itself read-only (``qemu-img convert``, ``guestfish
--ro``, ``qemu-nbd --read-only``). A qcow2 overlay is useless without its base image: the
daemon must treat :func:`kept_backing_files` as in use when it prunes the image cache.

Crash safety: the record is written first into ``kept/.new-<uuid>``, the disks are renamed into
it, then the directory is renamed into place; a retry after a crash finishes the same staging
directory, and :func:`keep_overlay` on a VM already kept returns the existing record.
:func:`expire_kept` deletes kept overlays after their ``until`` time, and staging directories
left for more than a day.

Only ``state/`` writes under the state directory (docs/ARCHITECTURE.md): hence this module here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set, Tuple

from vacfactory.atomic import atomic_write_json
from vacfactory.errors import StateError

log = logging.getLogger(__name__)

KEPT_DIR = "kept"
RECORD = "kept.json"
STAGING_PREFIX = ".new-"
#: disk images that are kept; config.iso is rebuilt from user_data, which the machine dir has
DISK_NAMES: Tuple[str, ...] = ("root.qcow2", "scratch.qcow2")
#: kill reasons (core.outcomes.KillReason values) that make an end abnormal
ABNORMAL_KILLS = ("heartbeat_not_created", "heartbeat_not_updated", "wallclock", "paused")
#: a staging directory older than this was abandoned by a crash and is removed
STAGING_MAX_AGE = 86400.0

_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}\Z")


def abnormal_end(reason: str, code: Optional[int]) -> Optional[str]:
    """Why a VM's end is abnormal enough to keep its disks, or None for a normal end.

    Abnormal: killed by the factory for a heartbeat (missing or stale) or its wallclock, found
    paused or crashed, or a shutdown_message code 500-799 (a problem with the VM, the site, or
    the job agent). Not: success codes, "no work" (300/400), a drain or the factory's
    shutdown_time, or a VM that never started.
    """
    if reason in ABNORMAL_KILLS:
        return f"killed: {reason}"
    if code is not None and 500 <= code <= 799:
        return f"shutdown_message {code}"
    return None


@dataclass(frozen=True)
class KeptOverlay:
    """The record of one VM's kept disks (``kept/<uuid>/kept.json``)."""

    uuid: str
    name: str
    machinetype: str
    reason: str
    kept_time: float
    until: float
    #: the base image root.qcow2 reads from (None for VMs without one)
    backing_file: Optional[str]
    disks: Tuple[str, ...]
    path: str = ""

    def disk_paths(self) -> List[str]:
        return [os.path.join(self.path, name) for name in self.disks]

    def as_json(self) -> dict:
        """The record as JSON values, with where it is."""
        return dict(_record_json(self), path=self.path)


def kept_dir(state_dir: str) -> str:
    return os.path.join(state_dir, KEPT_DIR)


def _record_json(kept: KeptOverlay) -> dict:
    return {"uuid": kept.uuid, "name": kept.name, "machinetype": kept.machinetype, "reason": kept.reason,
            "kept_time": kept.kept_time, "until": kept.until, "backing_file": kept.backing_file,
            "disks": list(kept.disks)}


def _from_json(value: object, path: str) -> KeptOverlay:
    if not isinstance(value, dict):
        raise StateError("not a JSON object", path=path)
    try:
        disks = tuple(str(d) for d in value["disks"])
        if any(d not in DISK_NAMES for d in disks):
            raise ValueError(f"unexpected disk names {disks}")
        backing = value.get("backing_file")
        return KeptOverlay(
            uuid=str(value["uuid"]), name=str(value["name"]), machinetype=str(value["machinetype"]),
            reason=str(value["reason"]), kept_time=float(value["kept_time"]), until=float(value["until"]),
            backing_file=str(backing) if backing is not None else None, disks=disks,
            path=os.path.dirname(path),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"bad kept record: {error}", path=path) from None


def load_kept(state_dir: str, uuid: str) -> Optional[KeptOverlay]:
    """The kept overlay of ``uuid``, or None if it has none (StateError if unreadable)."""
    if not _UUID.match(uuid):
        return None
    path = os.path.join(kept_dir(state_dir), uuid, RECORD)
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(65536))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise StateError(f"unreadable: {error}", path=path) from None
    return _from_json(value, path)


def list_kept(state_dir: str) -> List[KeptOverlay]:
    """Every kept overlay, oldest first (unreadable ones are logged and skipped)."""
    found = []
    try:
        names = sorted(os.listdir(kept_dir(state_dir)))
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("."):
            continue
        try:
            kept = load_kept(state_dir, name)
        except StateError as error:
            log.error("%s", error)
            continue
        if kept is not None:
            found.append(kept)
    return sorted(found, key=lambda k: k.kept_time)


def kept_backing_files(state_dir: str) -> Set[str]:
    """Base images that kept overlays read: the image cache must not prune these."""
    return {k.backing_file for k in list_kept(state_dir) if k.backing_file}


def keep_overlay(
    state_dir: str,
    machine_path: str,
    *,
    uuid: str,
    name: str,
    machinetype: str,
    reason: str,
    now: float,
    days: float,
    backing_file: Optional[str] = None,
    max_kept: Optional[int] = None,
    disk_names: Sequence[str] = DISK_NAMES,
) -> Optional[KeptOverlay]:
    """Move the VM's disk images out of ``<machine_path>/disks`` into ``kept/<uuid>/``.

    Call it before the disks are removed, once the domain is gone. Returns the record, or
    None when nothing was kept: the VM had no disk images, or ``max_kept`` overlays are kept
    already (new evidence is not allowed to push out older evidence: an admin decides).
    Raises StateError if the move fails (the disks are then still where they were).
    """
    if not _UUID.match(uuid):
        raise StateError("bad uuid for a kept overlay", machine=name)
    existing = load_kept(state_dir, uuid)
    if existing is not None:
        return existing
    top = kept_dir(state_dir)
    staging = os.path.join(top, STAGING_PREFIX + uuid)
    disks_dir = os.path.join(machine_path, "disks")
    present = [d for d in disk_names if d in DISK_NAMES and _is_file(os.path.join(disks_dir, d))]
    staged = [d for d in disk_names if _is_file(os.path.join(staging, d))]
    if not present and not staged:
        return None
    if not os.path.isdir(staging) and max_kept is not None and len(list_kept(state_dir)) >= max_kept:
        log.warning("%s: not keeping its disks (%s): %d overlays are kept already (keep_max_overlays)",
                    name, reason, max_kept)
        return None
    kept = KeptOverlay(uuid=uuid, name=name, machinetype=machinetype, reason=reason, kept_time=now,
                       until=now + days * 86400, backing_file=backing_file,
                       disks=tuple(d for d in DISK_NAMES if d in present or d in staged),
                       path=os.path.join(top, uuid))
    try:
        os.makedirs(staging, mode=0o700, exist_ok=True)
        os.chmod(staging, 0o700)  # a retry finds it read-only
        record_path = os.path.join(staging, RECORD)
        if os.path.exists(record_path):
            with open(record_path, "rb") as f:  # an earlier attempt's record: keep its times
                kept = _from_json(json.loads(f.read(65536)), os.path.join(top, uuid, RECORD))
        else:
            atomic_write_json(record_path, _record_json(kept), mode=0o400)
        for disk in present:
            target = os.path.join(staging, disk)
            os.rename(os.path.join(disks_dir, disk), target)
            os.chmod(target, 0o400)
        os.chmod(staging, 0o500)
        os.rename(staging, os.path.join(top, uuid))
    except (OSError, ValueError) as error:
        raise StateError(f"cannot keep its disks: {error}", machine=name) from None
    log.warning("%s: disks kept in %s until %s (%s)", name, kept.path, _utc(kept.until), reason)
    return kept


def expire_kept(state_dir: str, now: float) -> List[str]:
    """Delete kept overlays past their ``until`` and abandoned staging; returns the uuids."""
    removed: List[str] = []
    top = kept_dir(state_dir)
    try:
        names = sorted(os.listdir(top))
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(top, name)
        if name.startswith(STAGING_PREFIX):
            try:
                if now - os.lstat(path).st_mtime > STAGING_MAX_AGE:
                    _remove(path)
                    removed.append(name[len(STAGING_PREFIX):])
            except OSError as error:
                log.error("cannot remove abandoned %s: %s", path, error)
            continue
        try:
            kept = load_kept(state_dir, name)
        except StateError as error:
            log.error("%s", error)
            continue
        if kept is None or kept.until > now:
            continue
        try:
            _remove(path)
        except OSError as error:
            log.error("%s: cannot remove kept disks %s: %s", kept.name, path, error)
            continue
        log.info("%s: kept disks removed after keep_days (%s)", kept.name, path)
        removed.append(kept.uuid)
    return removed


def _remove(path: str) -> None:
    """Remove a kept directory (its read-only modes do not stop root, but restore them first
    so that a non-root test or tool can remove it too)."""
    for root, dirs, _files in os.walk(path):
        os.chmod(root, 0o700)
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path)


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))
