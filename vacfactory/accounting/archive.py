"""The APEL archive: every record this factory ever wrote, kept, the source of truth.

ssmsend deletes what it sends, so republishing and the monthly sync counts come from here.
Layout (all times UTC)::

    apel-archive/
        YYYYMM/                         month of the record's EndTime
            <Site>@<SubmitHost>/        percent-encoded (``/`` -> ``%2F``)
                <uuid>                  one APEL-individual-job-message, one VM
        cloud/YYYYMM/<uuid>             APEL-cloud-message records (apel_cloud_records)
        .sync-state.json                when the daemon last wrote sync records

Why this shape:
- the file name is the VM UUID and the directories come from the record itself, so a retry
  after a crash rewrites the same file: exactly one archive record per VM;
- sync records count jobs per (Site, SubmitHost, EndTime month); with that key in the path,
  ``apel sync`` only lists directories and never opens a record (1,000,000 records in a few
  seconds, constant memory);
- if the Site or SubmitHost of a VM changed between an attempt and its retry (the
  configuration was edited in between), writing the new record removes the old one.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote, unquote

from vacfactory.atomic import TEMP_PREFIX, atomic_write_text
from vacfactory.core.apel import is_month, month_of
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)

CLOUD_SUBDIR = "cloud"
SYNC_STATE_FILE = ".sync-state.json"

_UUID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_KEY_SAFE = "-._~"  # quote() keeps [A-Za-z0-9] and these; everything else is %XX
_MAX_NAME = 255


@dataclass(frozen=True)
class ArchivedRecord:
    """Where one archived record lives; its identity comes from the path, not the content."""

    path: str
    month: str
    uuid: str
    site: Optional[str] = None
    submit_host: Optional[str] = None


def check_uuid(uuid: str) -> None:
    """The UUID becomes a file name: refuse anything that could escape the archive."""
    if not _UUID_NAME.match(uuid):
        raise RecordInvalid(f"{uuid!r}: LocalJobId is not usable as a file name")


def identity_key(site: str, submit_host: str) -> str:
    """Directory name of one (Site, SubmitHost): reversible, one path component."""
    name = quote(site, safe=_KEY_SAFE) + "@" + quote(submit_host, safe=_KEY_SAFE)
    if len(name) > _MAX_NAME:
        raise RecordInvalid(f"Site {site!r} with SubmitHost {submit_host!r} is too long for the archive")
    return name


def parse_identity_key(name: str) -> Tuple[str, str]:
    """Inverse of :func:`identity_key`; ValueError for a name it did not make."""
    site, at, host = name.partition("@")
    if not at or not site or name.startswith("."):
        raise ValueError(f"{name!r} is not an archive identity directory")
    return unquote(site), unquote(host)


def job_record_path(archive_dir: str, site: str, submit_host: str, uuid: str, end_time: int) -> str:
    check_uuid(uuid)
    return os.path.join(archive_dir, month_of(end_time), identity_key(site, submit_host), uuid)


def cloud_record_path(archive_dir: str, uuid: str, end_time: int) -> str:
    check_uuid(uuid)
    return os.path.join(archive_dir, CLOUD_SUBDIR, month_of(end_time), uuid)


def write_job_record(archive_dir: str, site: str, submit_host: str, uuid: str, end_time: int, text: str) -> str:
    """Write (or rewrite) one VM's job record atomically and durably; return its path."""
    path = job_record_path(archive_dir, site, submit_host, uuid, end_time)
    _write(path, text)
    _remove_other_identities(path, uuid)
    return path


def write_cloud_record(archive_dir: str, uuid: str, end_time: int, text: str) -> str:
    """Write (or rewrite) one VM's cloud record atomically and durably; return its path."""
    path = cloud_record_path(archive_dir, uuid, end_time)
    _write(path, text)
    return path


def _write(path: str, text: str) -> None:
    try:
        try:
            atomic_write_text(path, text, mode=0o644)
        except FileNotFoundError:  # first record of a month or identity: make its directory
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            atomic_write_text(path, text, mode=0o644)
    except OSError as error:
        raise AccountingError(f"cannot write archive record {path}: {error}") from error


def _remove_other_identities(path: str, uuid: str) -> None:
    """Keep one archive record per VM even if its Site/SubmitHost changed between attempts."""
    key_dir = os.path.dirname(path)
    month_dir = os.path.dirname(key_dir)
    mine = os.path.basename(key_dir)
    for name in os.listdir(month_dir):
        if name == mine or name.startswith("."):
            continue
        try:
            os.unlink(os.path.join(month_dir, name, uuid))
        except (FileNotFoundError, NotADirectoryError):
            continue
        log.warning("%s: removed its archive record under the old identity %s", uuid, name)


def months(archive_dir: str, cloud: bool = False) -> List[str]:
    """The ``YYYYMM`` months present in the archive, oldest first."""
    top = os.path.join(archive_dir, CLOUD_SUBDIR) if cloud else archive_dir
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if is_month(name))


def identities(archive_dir: str, month: str) -> List[Tuple[str, str, str]]:
    """(directory, Site, SubmitHost) of every identity with records in ``month``."""
    month_dir = os.path.join(archive_dir, month)
    try:
        names = sorted(os.listdir(month_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            site, host = parse_identity_key(name)
        except ValueError:
            continue
        found.append((os.path.join(month_dir, name), site, host))
    return found


def _record_names(directory: str) -> Iterator[os.DirEntry]:
    """Record files of one directory, streamed: temporaries and strays are skipped."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.startswith(TEMP_PREFIX):
                    continue
                if _UUID_NAME.match(entry.name):
                    yield entry
    except FileNotFoundError:
        return


def count_month(archive_dir: str, month: str) -> Dict[Tuple[str, str], int]:
    """Number of job records per (Site, SubmitHost) whose EndTime is in ``month``.

    Streams directory entries and opens no file, so memory stays constant whatever the size.
    """
    counts: Dict[Tuple[str, str], int] = {}
    for directory, site, host in identities(archive_dir, month):
        n = 0
        for _ in _record_names(directory):
            n += 1
        counts[(site, host)] = counts.get((site, host), 0) + n
    return counts


def iter_job_records(archive_dir: str, since_month: Optional[str] = None) -> Iterator[ArchivedRecord]:
    """Every archived job record, month by month from ``since_month`` (all if None)."""
    for month in months(archive_dir):
        if since_month and month < since_month:
            continue
        for directory, site, host in identities(archive_dir, month):
            for entry in _record_names(directory):
                yield ArchivedRecord(entry.path, month, entry.name, site, host)


def iter_cloud_records(archive_dir: str, since_month: Optional[str] = None) -> Iterator[ArchivedRecord]:
    """Every archived cloud record, month by month from ``since_month`` (all if None)."""
    for month in months(archive_dir, cloud=True):
        if since_month and month < since_month:
            continue
        for entry in _record_names(os.path.join(archive_dir, CLOUD_SUBDIR, month)):
            yield ArchivedRecord(entry.path, month, entry.name)


def remove_stale_temporaries(archive_dir: str, month_names: List[str], now: float,
                             min_age_seconds: float = 3600.0) -> int:
    """Delete temporaries a killed writer left in these months (older than an hour only, so
    a write in progress is never touched); return how many."""
    removed = 0
    for month in month_names:
        directories = [d for d, _, _ in identities(archive_dir, month)]
        directories.append(os.path.join(archive_dir, CLOUD_SUBDIR, month))
        for directory in directories:
            try:
                with os.scandir(directory) as scan:
                    entries = [e for e in scan if e.name.startswith(TEMP_PREFIX)]
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if now - entry.stat().st_mtime >= min_age_seconds:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
    if removed:
        log.info("removed %d stale temporary files from the APEL archive", removed)
    return removed


def read_record(path: str) -> str:
    """The text of one archived record (ASCII by construction)."""
    with open(path, "r", encoding="ascii") as f:
        return f.read()
