"""Re-queue archived records: after a broker or APEL-side loss, or a power cut.

The archive is the source of truth: each record is queued again exactly as it was archived
(not re-rendered from today's configuration). Resending is harmless: APEL replaces rows on
(Site, LocalJobId, EndTime). Records that no longer parse or pass validation are reported
and skipped, never sent. Records archived but never queued (``not-queued/``: no
gocdb_sitename or hs06_per_processor when they were written) are not republished: they carry
a placeholder Site or a made-up benchmark, and the sync counts leave them out.
"""

from __future__ import annotations

import calendar
import datetime
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

from vacfactory.accounting import archive
from vacfactory.accounting.outgoing import OutgoingQueue
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.core.apel import CLOUD, JOB, month_of, parse_datetime, parse_message, validate_message
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepublishResult:
    queued: int
    cloud_queued: int
    invalid: int


def republish(settings: AccountingSettings, since: Optional[datetime.date], now: float) -> RepublishResult:
    """Queue again every archived record whose EndTime is on or after ``since`` (UTC midnight)."""
    if not settings.queue_enabled:
        raise AccountingError(f"cannot republish: records are not queued because {settings.queue_disabled_reason}")
    start = calendar.timegm(since.timetuple()) if since else None
    since_month = month_of(start) if start is not None else None
    queued = _requeue(
        archive.iter_job_records(settings.archive_dir, since_month, queued_only=True), JOB, start, now,
        OutgoingQueue(settings.outgoing_dir),
    )
    cloud_queued = (0, 0)
    if settings.cloud_records:
        cloud_queued = _requeue(
            archive.iter_cloud_records(settings.archive_dir, since_month, queued_only=True), CLOUD, start, now,
            OutgoingQueue(settings.cloud_queue_dir),
        )
    result = RepublishResult(queued=queued[0], cloud_queued=cloud_queued[0], invalid=queued[1] + cloud_queued[1])
    log.info("republished %d job and %d cloud records since %s (%d invalid skipped)",
             result.queued, result.cloud_queued, since or "the beginning", result.invalid)
    return result


def _requeue(records: Iterator[archive.ArchivedRecord], kind: str, start: Optional[int], now: float,
             queue: OutgoingQueue) -> Tuple[int, int]:
    queued = invalid = 0
    for record in records:
        try:
            text = archive.read_record(record.path)
            message = parse_message(text)
            if message.kind != kind or len(message.records) != 1:
                raise RecordInvalid(f"expected one {kind} record")
            validate_message(message, now)
            end = parse_datetime("EndTime", message.records[0].get("EndTime", ""))
        except (OSError, UnicodeDecodeError, RecordInvalid) as error:
            log.error("%s: archived record not republished: %s", record.path, error)
            invalid += 1
            continue
        if start is not None and end < start:
            continue
        queue.add(text, link_from=record.path)
        queued += 1
    return queued, invalid
