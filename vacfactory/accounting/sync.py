"""APEL sync records: how many jobs each (Site, SubmitHost) reported per month.

The APEL server compares these counts with the records it holds and flags gaps. Counts come
from the archive, by the UTC month of EndTime (how APEL derives EndMonth), not by the day a
file was written as Vac does, and only records that were queued for APEL: those archived
under ``not-queued/`` (no gocdb_sitename or hs06_per_processor at the time) never reached it. A month with no records still gets a sync record with
``NumberOfJobs: 0`` for this factory's own Site and SubmitHost (Vac crashes there).

The daemon calls :func:`sync_if_due` every cycle; it does the work once a day and remembers
when in ``apel-archive/.sync-state.json``; and :func:`sync_at_stop` after its final
accounting flush, so the last sync message of every month counts every record sent for it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from vacfactory.accounting import archive
from vacfactory.accounting.outgoing import OutgoingQueue
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.atomic import atomic_write_json
from vacfactory.core.apel import month_of, months_between, parse_month, sync_message
from vacfactory.errors import AccountingError

log = logging.getLogger(__name__)

SYNC_INTERVAL_SECONDS = 86400.0
#: the daemon catches up at most this many months after a long outage
MAX_CATCH_UP_MONTHS = 13


@dataclass(frozen=True)
class SyncResult:
    """One month's sync: the counts found and the queue elements written."""

    month: str
    counts: Tuple[Tuple[str, str, int], ...]
    queue_names: Tuple[str, ...]


def default_month(now: float) -> str:
    """Vac's default: the month of yesterday, so the last day of a month is still synced."""
    return month_of(now - 86400)


def sync_month(settings: AccountingSettings, month: str, now: float) -> SyncResult:
    """Count one month's records per (Site, SubmitHost) and queue one sync message for each."""
    try:
        year, mon = parse_month(month)
    except ValueError as error:
        raise AccountingError(str(error)) from None
    counts: Dict[Tuple[str, str], int] = archive.count_month(settings.archive_dir, month, queued_only=True)
    counts.setdefault((settings.site, settings.submit_host), 0)
    rows = tuple(sorted((site, host, n) for (site, host), n in counts.items()))
    if not settings.queue_enabled:
        log.warning("sync %s: not queued: %s", month, settings.queue_disabled_reason)
        return SyncResult(month=month, counts=rows, queue_names=())
    queue = OutgoingQueue(settings.outgoing_dir)
    names = []
    for site, host, n in rows:
        names.append(queue.add(sync_message(site, host, n, year, mon, now)))
        log.info("sync %s: %s %s NumberOfJobs %d queued %s", month, site, host, n, names[-1])
    return SyncResult(month=month, counts=rows, queue_names=tuple(names))


def sync_records(settings: AccountingSettings, month: Optional[str], now: float) -> List[str]:
    """Queue the sync messages of ``month`` (default: yesterday's month); return the names."""
    return list(sync_month(settings, month or default_month(now), now).queue_names)


def sync_months(settings: AccountingSettings, months: Sequence[str], now: float) -> List[SyncResult]:
    """Several months, in order (``apel sync 202401 202402`` or ``--all``)."""
    return [sync_month(settings, month, now) for month in months]


def sync_if_due(settings: AccountingSettings, now: float, *, force: bool = False) -> List[str]:
    """Once a day (or now, with ``force``): sync every month since the last sync (at least
    yesterday's and today's), the last MAX_CATCH_UP_MONTHS of them at most.

    Returns the queue names written, [] when not due (or queueing is disabled).
    """
    state_path = os.path.join(settings.archive_dir, archive.SYNC_STATE_FILE)
    last = _last_sync(state_path)
    if not force and last is not None and 0 <= now - last < SYNC_INTERVAL_SECONDS:
        return []
    if not settings.queue_enabled:
        return []
    first = month_of((last if last is not None and last < now else now) - 86400)
    months = months_between(first, month_of(now))[-MAX_CATCH_UP_MONTHS:]
    archive.remove_stale_temporaries(settings.archive_dir, months, now)
    names: List[str] = []
    for result in sync_months(settings, months, now):
        names += result.queue_names
    os.makedirs(settings.archive_dir, exist_ok=True)
    atomic_write_json(state_path, {"last_sync": now, "months": months})
    return names


def sync_at_stop(settings: AccountingSettings, now: float) -> List[str]:
    """After the daemon's final accounting flush: fresh sync records counting every record
    written until now, so APEL never holds more jobs for a month than the last sync said
    (a start-up sync alone said 0 for a month whose VMs all ended later)."""
    return sync_if_due(settings, now, force=True)


def last_sync_time(settings: AccountingSettings) -> Optional[float]:
    """When the daemon last synced (``apel status``)."""
    return _last_sync(os.path.join(settings.archive_dir, archive.SYNC_STATE_FILE))


def _last_sync(path: str) -> Optional[float]:
    try:
        with open(path, encoding="utf-8") as f:
            return float(json.load(f)["last_sync"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s: unreadable, syncing now: %s", path, error)
        return None
