"""apel republish: re-queue archived records exactly as archived, from a date on."""

from __future__ import annotations

import datetime
import os
import shutil

import pytest

from tests.unit.test_apel_support import NOW, make_settings, make_usage, read_queue
from vacfactory.accounting import account_vm, republish
from vacfactory.core.apel import parse_message
from vacfactory.errors import AccountingError

DAY = 86400
JAN_10 = 1704844800  # 2024-01-10T00:00:00Z


def fill(settings, cloud=False):
    """Ten VMs ending on 1..10 January plus two in December; then the queue is sent (emptied)."""
    results = []
    for i in range(1, 11):
        end = JAN_10 - (10 - i) * DAY + 60  # 1 January 00:01 ... 10 January 00:01
        results.append(account_vm(make_usage(i, start_time=end - 3600, end_time=end), settings, NOW))
    for i in (11, 12):
        results.append(account_vm(make_usage(i, start_time=JAN_10 - 20 * DAY, end_time=JAN_10 - 19 * DAY),
                                  settings, NOW))
    shutil.rmtree(settings.outgoing_dir)
    if cloud:
        shutil.rmtree(settings.cloud_queue_dir)
    return results


def test_republish_all_requeues_every_archived_body(tmp_path):
    settings = make_settings(str(tmp_path))
    results = fill(settings)
    result = republish(settings, None, NOW)
    assert result.queued == 12 and result.invalid == 0
    assert sorted(read_queue(settings.outgoing_dir).values()) == sorted(open(r.archive_path).read() for r in results)


def test_republish_since_a_date_takes_records_that_ended_on_or_after_it(tmp_path):
    settings = make_settings(str(tmp_path))
    fill(settings)
    result = republish(settings, datetime.date(2024, 1, 8), NOW)
    ids = sorted(parse_message(b).records[0]["LocalJobId"] for b in read_queue(settings.outgoing_dir).values())
    assert result.queued == 3
    assert ids == sorted(make_usage(i).uuid for i in (8, 9, 10))


def test_corrupt_archive_records_are_reported_and_not_sent(tmp_path):
    settings = make_settings(str(tmp_path))
    results = fill(settings)
    with open(results[0].archive_path, "w") as f:
        f.write("APEL-individual-job-message: v0.3\nSite: x\n")  # truncated
    with open(results[1].archive_path, "w") as f:
        f.write("APEL-individual-job-message: v0.3\nSite: UKI\nLocalJobId: x\n%%\n")  # fields missing
    result = republish(settings, None, NOW)
    assert result.invalid == 2 and result.queued == 10
    assert all(parse_message(b) for b in read_queue(settings.outgoing_dir).values())


def test_republish_includes_cloud_records_when_enabled(tmp_path):
    settings = make_settings(str(tmp_path), cloud_records=True)
    fill(settings, cloud=True)
    result = republish(settings, datetime.date(2024, 1, 10), NOW)
    assert result.queued == 1 and result.cloud_queued == 1
    (body,) = read_queue(settings.cloud_queue_dir).values()
    assert parse_message(body).records[0]["VMUUID"] == make_usage(10).uuid


def test_republish_refuses_when_records_are_not_queued(tmp_path):
    settings = make_settings(str(tmp_path), queue_enabled=False, queue_disabled_reason="gocdb_sitename is not set")
    with pytest.raises(AccountingError, match="gocdb_sitename"):
        republish(settings, None, NOW)
    assert not os.path.exists(os.path.join(settings.outgoing_dir, "x"))
