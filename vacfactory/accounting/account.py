"""Account one ended VM: render, validate, archive, enqueue. Exactly once, crash-safe.

Order of writes, and why a kill at any point followed by a retry is safe:

1. ``archive``        the job record, at a path derived from the VM (same file on retry)
2. ``cloud-archive``  the cloud record, likewise (only with apel_cloud_records)
3. ``enqueue``        the job record into the dirq outgoing queue
4. ``cloud-enqueue``  the cloud record into its own queue
then the engine writes ``accounted`` in the machine directory.

Whether the record is queued (Vac's rule, see ``_why_not_queued``) is decided before step 1
and is part of the archive path (``not-queued/`` when it is not), so the sync counts, which
only list the archive, count exactly the records APEL was sent.

A retry (the VM is still not accounted) does everything again: the archive files are
rewritten in place, so there is exactly one archive record; the queue may get a second
element with an identical body, which APEL's REPLACE key (Site, LocalJobId, EndTime)
absorbs. Nothing is written until the record has passed validation, and an invalid record
raises :class:`~vacfactory.errors.RecordInvalid` so the VM stays unaccounted and is retried.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Set, Union

from vacfactory.accounting import archive
from vacfactory.accounting.outgoing import producer
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.core.apel import VMUsage, cloud_message, is_fizzle, job_message
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)

#: the points where ``faults`` is called, in order; "done" comes after the last write
STEPS = ("archive", "cloud-archive", "enqueue", "cloud-enqueue", "done")

Faults = Callable[[str], None]

_logged_reasons: Set[str] = set()


@dataclass(frozen=True)
class AccountResult:
    """What :func:`account_vm` did for one VM."""

    uuid: str
    archive_path: Optional[str] = None
    queue_name: Optional[str] = None
    cloud_archive_path: Optional[str] = None
    cloud_queue_name: Optional[str] = None
    #: why no record was written ("fizzle"), None when one was
    skipped: Optional[str] = None
    #: why the record was archived but not queued, None when it was queued
    not_queued: Optional[str] = None


def account_vm(
    usage: VMUsage,
    settings: AccountingSettings,
    now: float,
    *,
    fizzle_seconds: Optional[float] = None,
    faults: Optional[Faults] = None,
) -> AccountResult:
    """Write the APEL record(s) of one ended VM; idempotent, safe to call again after a crash.

    ``fizzle_seconds``: when given, a VM that ran less than this gets no record (Vac's rule)
    and the result says ``skipped="fizzle"``. ``faults`` is called with each name of STEPS
    just before that step: tests raise from it to simulate a crash at that point.
    """
    step = faults or _no_fault
    if fizzle_seconds is not None and is_fizzle(usage, fizzle_seconds):
        log.info("%s: ran %d s < fizzle_seconds %s: no APEL record", usage.uuid, usage.wall_seconds, fizzle_seconds)
        return AccountResult(uuid=usage.uuid, skipped="fizzle")
    identity = settings.identity
    try:
        archive.check_uuid(usage.uuid)
        text = job_message(usage, identity, now)
        cloud_text = cloud_message(usage, identity, now) if settings.cloud_records else None
        archive.identity_key(identity.site, identity.submit_host)
    except RecordInvalid as error:
        log.error("%s: APEL record invalid, VM kept for retry: %s", usage.uuid, error)
        raise

    reason = _why_not_queued(usage, settings)
    queued = reason is None
    step("archive")
    path = archive.write_job_record(
        settings.archive_dir, identity.site, identity.submit_host, usage.uuid, usage.end_time, text, queued
    )
    cloud_path = None
    step("cloud-archive")
    if cloud_text is not None:
        cloud_path = archive.write_cloud_record(settings.archive_dir, usage.uuid, usage.end_time, cloud_text,
                                                queued)

    name = cloud_name = None
    step("enqueue")
    if reason is None:
        name = producer(settings.outgoing_dir).add(text, link_from=path)
    step("cloud-enqueue")
    if reason is None and cloud_text is not None:
        cloud_name = producer(settings.cloud_queue_dir).add(cloud_text, link_from=cloud_path)
    step("done")

    log.info("%s: APEL record archived %s%s", usage.uuid, path, f", queued {name}" if name else ", not queued")
    return AccountResult(
        uuid=usage.uuid,
        archive_path=path,
        queue_name=name,
        cloud_archive_path=cloud_path,
        cloud_queue_name=cloud_name,
        not_queued=reason,
    )


def account_vms(
    usages: Sequence[VMUsage],
    settings: AccountingSettings,
    now: float,
    *,
    fizzle_seconds: Optional[Mapping[str, float]] = None,
    workers: int = 8,
) -> List[Union[AccountResult, AccountingError]]:
    """Account several ended VMs at once (a cycle that found many ended, a restart).

    Each VM goes through :func:`account_vm` unchanged; they run on a few threads because the
    time goes into fsync, and concurrent fsyncs are committed together by the file system's
    journal. Results come in input order; a VM whose record is invalid or could not be
    written gets its AccountingError instead of a result, and stays unaccounted.
    ``fizzle_seconds`` maps a VM UUID to its machinetype's fizzle_seconds.
    """
    limits = fizzle_seconds or {}

    def one(usage: VMUsage) -> Union[AccountResult, AccountingError]:
        try:
            return account_vm(usage, settings, now, fizzle_seconds=limits.get(usage.uuid))
        except AccountingError as error:
            return error

    if len(usages) <= 1 or workers <= 1:
        return [one(usage) for usage in usages]
    with ThreadPoolExecutor(max_workers=min(workers, len(usages)), thread_name_prefix="apel-account") as pool:
        return list(pool.map(one, usages))


def _why_not_queued(usage: VMUsage, settings: AccountingSettings) -> Optional[str]:
    """Vac's rule, per VM: only records with a real site and a real benchmark are sent."""
    if not settings.queue_enabled:
        reason = settings.queue_disabled_reason or "queueing is disabled"
    elif usage.hs06_per_processor is None:
        reason = "the VM has no hs06_per_processor"
    else:
        return None
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        log.warning("APEL records are archived but not queued for sending: %s", reason)
    return reason


def _no_fault(step: str) -> None:
    """The default ``faults``: no failure injected."""
