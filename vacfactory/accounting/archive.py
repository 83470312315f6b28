"""The APEL archive: every record this factory ever wrote, kept, the source of truth.

ssmsend deletes what it sends, so republishing and the monthly sync counts come from here.
Layout (all times UTC)::

    apel-archive/
        YYYYMM/                         month of the record's EndTime
            <Site>@<SubmitHost>/        percent-encoded (``/`` -> ``%2F``)
                <uuid>                  one APEL-individual-job-message, one VM, queued
            not-queued/<Site>@<SubmitHost>/<uuid>
                                        archived but never queued (no gocdb_sitename or
                                        hs06_per_processor when the VM was accounted)
        cloud/YYYYMM/<uuid>             APEL-cloud-message records (apel_cloud_records)
        cloud/not-queued/YYYYMM/<uuid>  cloud records archived but never queued
        .sync-state.json                when the daemon last wrote sync records

Why this shape:
- the file name is the VM UUID and the directories come from the record itself, so a retry
  after a crash rewrites the same file: exactly one archive record per VM;
- sync records count jobs per (Site, SubmitHost, EndTime month); with that key in the path,
  ``apel sync`` only lists directories and never opens a record (1,000,000 records in a few
  seconds, constant memory);
- whether a record was queued is part of its path, decided before the record is written, so
  the sync counts (only what APEL was sent) still only list directories, and the fact
  survives a crash with the record itself; ``not-queued`` is no identity (no ``@``) and no
  month, so it can never be taken for one;
- if the Site or SubmitHost of a VM, or whether it is queued, changed between an attempt and
  its retry (the configuration was edited in between), writing the new record removes the
  old one.

Archives written before the ``not-queued`` directories existed have every record directly
under its identity: they read as before, every record counted as queued.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote, unquote

from vacfactory.atomic import TEMP_PREFIX, atomic_write_text, fsync_directory
from vacfactory.core.apel import is_month, month_of
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)

CLOUD_SUBDIR = "cloud"
#: records archived but never queued, per month (job) or beside the months (cloud)
NOT_QUEUED_SUBDIR = "not-queued"
SYNC_STATE_FILE = ".sync-state.json"

_UUID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
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
    #: False: archived but never queued (``not-queued``): APEL never got it
    queued: bool = True


def check_uuid(uuid: str) -> None:
    """The UUID becomes a file name: refuse anything that could escape the archive."""
    if not _UUID_NAME.fullmatch(uuid):
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


def _job_month_dir(archive_dir: str, month: str, queued: bool) -> str:
    month_dir = os.path.join(archive_dir, month)
    return month_dir if queued else os.path.join(month_dir, NOT_QUEUED_SUBDIR)


def _cloud_month_dir(archive_dir: str, month: str, queued: bool) -> str:
    top = os.path.join(archive_dir, CLOUD_SUBDIR)
    return os.path.join(top if queued else os.path.join(top, NOT_QUEUED_SUBDIR), month)


def job_record_path(archive_dir: str, site: str, submit_host: str, uuid: str, end_time: int,
                    queued: bool = True) -> str:
    check_uuid(uuid)
    return os.path.join(_job_month_dir(archive_dir, month_of(end_time), queued), identity_key(site, submit_host),
                        uuid)


def cloud_record_path(archive_dir: str, uuid: str, end_time: int, queued: bool = True) -> str:
    check_uuid(uuid)
    return os.path.join(_cloud_month_dir(archive_dir, month_of(end_time), queued), uuid)


def write_job_record(archive_dir: str, site: str, submit_host: str, uuid: str, end_time: int, text: str,
                     queued: bool = True) -> str:
    """Write (or rewrite) one VM's job record atomically and durably; return its path.

    ``queued``: whether the record is (about to be) queued for sending; a record that is not
    goes under ``not-queued`` and is neither counted by sync nor republished.
    """
    path = job_record_path(archive_dir, site, submit_host, uuid, end_time, queued)
    _write(path, text)
    try:
        _remove_other_copies(archive_dir, month_of(end_time), path, uuid)
    except OSError as error:
        raise AccountingError(f"{uuid}: cannot remove its other archive records: {error}") from error
    return path


def write_cloud_record(archive_dir: str, uuid: str, end_time: int, text: str, queued: bool = True) -> str:
    """Write (or rewrite) one VM's cloud record atomically and durably; return its path."""
    path = cloud_record_path(archive_dir, uuid, end_time, queued)
    _write(path, text)
    other = cloud_record_path(archive_dir, uuid, end_time, not queued)
    try:
        os.unlink(other)
        fsync_directory(os.path.dirname(other))
    except (FileNotFoundError, NotADirectoryError):
        return path
    except OSError as error:
        raise AccountingError(f"{uuid}: cannot remove its other cloud archive record: {error}") from error
    log.warning("%s: removed its cloud archive record %s (queued or not changed)", uuid, other)
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


def _remove_other_copies(archive_dir: str, month: str, path: str, uuid: str) -> None:
    """Keep one archive record per VM even if its Site/SubmitHost, or whether it is queued,
    changed between attempts."""
    for queued in (True, False):
        parent = _job_month_dir(archive_dir, month, queued)
        try:
            names = os.listdir(parent)
        except FileNotFoundError:
            continue
        for name in names:
            other = os.path.join(parent, name, uuid)
            if other == path or not _is_identity_name(name):
                continue
            try:
                os.unlink(other)
            except (FileNotFoundError, NotADirectoryError):
                continue
            fsync_directory(os.path.dirname(other))  # rare; a power cut must not bring it back
            log.warning("%s: removed its archive record %s (identity or queued changed since)", uuid,
                        os.path.relpath(other, archive_dir))
            _remove_if_empty(os.path.dirname(other))


def _remove_if_empty(directory: str) -> None:
    """An identity left without records would still get a sync record (NumberOfJobs 0)."""
    try:
        os.rmdir(directory)
    except OSError:  # not empty (a record or a writer's temporary), or gone already
        return


def _is_identity_name(name: str) -> bool:
    try:
        parse_identity_key(name)
    except ValueError:
        return False
    return True


def months(archive_dir: str, cloud: bool = False) -> List[str]:
    """The ``YYYYMM`` months present in the archive, oldest first (queued or not)."""
    cloud_top = os.path.join(archive_dir, CLOUD_SUBDIR)
    tops = [cloud_top, os.path.join(cloud_top, NOT_QUEUED_SUBDIR)] if cloud else [archive_dir]
    found = set()
    for top in tops:
        try:
            found.update(name for name in os.listdir(top) if is_month(name))
        except FileNotFoundError:
            continue
    return sorted(found)


def identities(archive_dir: str, month: str, queued: bool = True) -> List[Tuple[str, str, str]]:
    """(directory, Site, SubmitHost) of every identity with records in ``month``: those
    queued, or (``queued=False``) those archived but never queued."""
    month_dir = _job_month_dir(archive_dir, month, queued)
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
                if _UUID_NAME.fullmatch(entry.name):
                    yield entry
    except FileNotFoundError:
        return


def count_month(archive_dir: str, month: str, *, queued_only: bool = False) -> Dict[Tuple[str, str], int]:
    """Number of job records per (Site, SubmitHost) whose EndTime is in ``month``; with
    ``queued_only`` only those queued for APEL (what sync records must count).

    Streams directory entries and opens no file, so memory stays constant whatever the size.
    """
    counts: Dict[Tuple[str, str], int] = {}
    for queued in (True,) if queued_only else (True, False):
        for directory, site, host in identities(archive_dir, month, queued):
            n = 0
            for _ in _record_names(directory):
                n += 1
            counts[(site, host)] = counts.get((site, host), 0) + n
    return counts


def iter_job_records(archive_dir: str, since_month: Optional[str] = None, *,
                     queued_only: bool = False) -> Iterator[ArchivedRecord]:
    """Every archived job record (with ``queued_only``, those queued), month by month from
    ``since_month`` (all if None)."""
    for month in months(archive_dir):
        if since_month and month < since_month:
            continue
        for queued in (True,) if queued_only else (True, False):
            for directory, site, host in identities(archive_dir, month, queued):
                for entry in _record_names(directory):
                    yield ArchivedRecord(entry.path, month, entry.name, site, host, queued)


def iter_cloud_records(archive_dir: str, since_month: Optional[str] = None, *,
                       queued_only: bool = False) -> Iterator[ArchivedRecord]:
    """Every archived cloud record (with ``queued_only``, those queued), month by month from
    ``since_month`` (all if None)."""
    for month in months(archive_dir, cloud=True):
        if since_month and month < since_month:
            continue
        for queued in (True,) if queued_only else (True, False):
            for entry in _record_names(_cloud_month_dir(archive_dir, month, queued)):
                yield ArchivedRecord(entry.path, month, entry.name, queued=queued)


def remove_stale_temporaries(archive_dir: str, month_names: List[str], now: float,
                             min_age_seconds: float = 3600.0) -> int:
    """Delete temporaries a killed writer left in these months (older than an hour only, so
    a write in progress is never touched); return how many."""
    removed = 0
    for month in month_names:
        directories = [d for queued in (True, False) for d, _, _ in identities(archive_dir, month, queued)]
        directories += [_cloud_month_dir(archive_dir, month, queued) for queued in (True, False)]
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
