"""Sync records from the archive, by EndTime month per (Site, SubmitHost); daily in the daemon."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace

import pytest

from tests.unit.test_apel_support import NOW, archive_files, make_settings, make_usage, read_queue
from vacfactory.accounting import account_vm, republish, sync_if_due, sync_month, sync_records
from vacfactory.accounting import archive
from vacfactory.core.apel import SYNC, parse_message, validate_message

JAN_1 = 1704067200  # 2024-01-01T00:00:00Z
FEB_1 = 1706745600


def sync_bodies(settings, names):
    bodies = read_queue(settings.outgoing_dir)
    return [parse_message(bodies[name]) for name in names]


def test_counts_by_end_time_month_and_identity(tmp_path):
    settings = make_settings(str(tmp_path))
    other = make_settings(str(tmp_path), factory="factory08.tier2.hep.manchester.ac.uk")
    for i in range(1, 6):
        account_vm(make_usage(i, start_time=JAN_1 - 3600, end_time=JAN_1 + i), settings, FEB_1)
    for i in range(6, 9):
        account_vm(make_usage(i, start_time=JAN_1 - 3600, end_time=JAN_1 + i), other, FEB_1)
    account_vm(make_usage(9, start_time=JAN_1 - 3600, end_time=JAN_1 - 1), settings, FEB_1)  # December
    names = sync_records(settings, "202401", FEB_1)
    records = [m.records[0] for m in sync_bodies(settings, names)]
    assert all(m.kind == SYNC for m in sync_bodies(settings, names))
    counts = {r["SubmitHost"]: int(r["NumberOfJobs"]) for r in records}
    assert counts == {settings.submit_host: 5, other.submit_host: 3}
    assert {(r["Month"], r["Year"], r["Site"]) for r in records} == {("1", "2024", settings.site)}
    for message in sync_bodies(settings, names):
        validate_message(message, FEB_1)
    dec = sync_month(settings, "202312", FEB_1)
    assert dec.counts == ((settings.site, settings.submit_host, 1),)


def test_an_empty_month_still_gets_a_zero_sync_record(tmp_path):
    settings = make_settings(str(tmp_path))
    names = sync_records(settings, "202402", NOW)
    (message,) = sync_bodies(settings, names)
    assert dict(message.records[0]) == {"Site": settings.site, "SubmitHost": settings.submit_host,
                                        "NumberOfJobs": "0", "Month": "2", "Year": "2024"}


def test_default_month_is_yesterdays(tmp_path):
    settings = make_settings(str(tmp_path))
    account_vm(make_usage(1, start_time=JAN_1 - 7200, end_time=JAN_1 - 60), settings, JAN_1 + 3600)
    names = sync_records(settings, None, JAN_1 + 3600)  # 1 January: yesterday was December
    (message,) = sync_bodies(settings, names)
    assert message.records[0]["Month"] == "12" and message.records[0]["NumberOfJobs"] == "1"


def test_temporaries_and_strays_are_not_counted(tmp_path):
    settings = make_settings(str(tmp_path))
    result = account_vm(make_usage(1), settings, NOW)
    key_dir = os.path.dirname(result.archive_path)
    open(os.path.join(key_dir, ".tmp-abc123"), "w").close()
    os.makedirs(os.path.join(settings.archive_dir, "202401", "not-an-identity"))
    assert archive.count_month(settings.archive_dir, "202401") == {(settings.site, settings.submit_host): 1}


def test_no_sync_records_are_queued_when_queueing_is_disabled(tmp_path):
    settings = make_settings(str(tmp_path), queue_enabled=False, queue_disabled_reason="gocdb_sitename is not set")
    account_vm(make_usage(1), settings, NOW)
    result = sync_month(settings, "202401", NOW)
    # the record was archived, not queued: APEL has none of it, and the count says so
    assert result.queue_names == () and result.counts == ((settings.site, settings.submit_host, 0),)
    assert archive.count_month(settings.archive_dir, "202401") == {(settings.site, settings.submit_host): 1}
    assert sync_if_due(settings, NOW) == []


def test_sync_counts_only_records_that_were_queued(tmp_path):
    """Records archived while gocdb_sitename (placeholder Site) or a VM's hs06 was missing never
    reached APEL: NumberOfJobs must not include them, or APEL would see a gap that is not one."""
    unset = make_settings(str(tmp_path), site="tier2.hep.manchester.ac.uk", queue_enabled=False,
                          queue_disabled_reason="gocdb_sitename is not set")
    settings = make_settings(str(tmp_path))
    account_vm(make_usage(1), unset, NOW)                              # before gocdb_sitename was set
    account_vm(make_usage(2, hs06_per_processor=None), settings, NOW)  # a VM created without hs06
    for i in (3, 4, 5):
        account_vm(make_usage(i), settings, NOW)
    assert len(archive_files(settings.archive_dir)) == 5
    assert len(archive_files(settings.archive_dir, queued=False)) == 2

    result = sync_month(settings, "202401", NOW)
    assert result.counts == ((settings.site, settings.submit_host, 3),)  # no placeholder-Site row either
    bodies = read_queue(settings.outgoing_dir)
    jobs = [parse_message(b).records[0]["LocalJobId"] for b in bodies.values()
            if parse_message(b).kind != SYNC]
    syncs = [parse_message(bodies[name]).records[0] for name in result.queue_names]
    assert [int(r["NumberOfJobs"]) for r in syncs] == [len(jobs)] == [3]
    # everything archived is still listed (status, report), each record says whether it was queued
    assert archive.count_month(settings.archive_dir, "202401") == {
        (settings.site, settings.submit_host): 4, (unset.site, unset.submit_host): 1}
    records = list(archive.iter_job_records(settings.archive_dir))
    assert sorted((r.uuid[-1], r.queued) for r in records) == [
        ("1", False), ("2", False), ("3", True), ("4", True), ("5", True)]
    assert {r.uuid for r in archive.iter_job_records(settings.archive_dir, queued_only=True)} == set(jobs)


def test_republish_leaves_out_records_that_were_never_queued(tmp_path):
    settings = make_settings(str(tmp_path), cloud_records=True)
    account_vm(make_usage(1, hs06_per_processor=None), settings, NOW)
    account_vm(make_usage(2), settings, NOW)
    for path in (settings.outgoing_dir, settings.cloud_queue_dir):
        shutil.rmtree(path)
    result = republish(settings, None, NOW)
    assert (result.queued, result.cloud_queued, result.invalid) == (1, 1, 0)
    (body,) = read_queue(settings.outgoing_dir).values()
    assert parse_message(body).records[0]["LocalJobId"] == make_usage(2).uuid
    assert len(archive_files(settings.archive_dir, cloud=True, queued=False)) == 1


@pytest.mark.parametrize("first_queued", [False, True])
def test_a_retry_that_changes_whether_the_record_is_queued_keeps_one_archive_copy(tmp_path, first_queued):
    """Killed after archiving; the configuration changed before the retry (gocdb_sitename set or
    removed): the archive ends with the record once, where the retry put it, and sync agrees."""
    enabled = make_settings(str(tmp_path), cloud_records=True)
    disabled = replace(enabled, queue_enabled=False, queue_disabled_reason="hs06_per_processor is not set")
    first, second = (enabled, disabled) if first_queued else (disabled, enabled)

    def killed_after_archiving(step):
        if step == "enqueue":
            raise RuntimeError("kill -9")

    with pytest.raises(RuntimeError):
        account_vm(make_usage(1), first, NOW, faults=killed_after_archiving)
    assert len(archive_files(enabled.archive_dir, queued=first_queued)) == 1
    result = account_vm(make_usage(1), second, NOW)
    assert archive_files(enabled.archive_dir) == archive_files(enabled.archive_dir, queued=not first_queued) == [
        result.archive_path]
    assert archive_files(enabled.archive_dir, cloud=True) == [result.cloud_archive_path]
    expected = 0 if first_queued else 1
    assert sync_month(enabled, "202401", NOW).counts == ((enabled.site, enabled.submit_host, expected),)


def test_daily_sync_runs_once_a_day_and_catches_up_after_an_outage(tmp_path):
    settings = make_settings(str(tmp_path))
    first = sync_if_due(settings, JAN_1 + 12 * 3600)  # yesterday's (Dec) and today's (Jan) month
    assert [m.records[0]["Month"] for m in sync_bodies(settings, first)] == ["12", "1"]
    assert sync_if_due(settings, JAN_1 + 20 * 3600) == []
    state = json.load(open(os.path.join(settings.archive_dir, archive.SYNC_STATE_FILE)))
    assert state["last_sync"] == JAN_1 + 12 * 3600
    # down until mid-March: every month from the day before the last sync to today again
    later = sync_if_due(settings, JAN_1 + 70 * 86400)
    assert [m.records[0]["Month"] for m in sync_bodies(settings, later)] == ["12", "1", "2", "3"]


def test_daily_sync_removes_stale_temporaries_of_killed_writers(tmp_path):
    settings = make_settings(str(tmp_path))
    result = account_vm(make_usage(1), settings, NOW)
    stale = os.path.join(os.path.dirname(result.archive_path), ".tmp-stale")
    fresh = os.path.join(os.path.dirname(result.archive_path), ".tmp-fresh")
    for path in (stale, fresh):
        open(path, "w").close()
    os.utime(stale, (NOW - 7200, NOW - 7200))
    os.utime(fresh, (NOW, NOW))
    sync_if_due(settings, NOW)
    assert not os.path.exists(stale) and os.path.exists(fresh)


def test_sync_reads_no_record_file(tmp_path):
    # the counts come from directory listings: unreadable record files do not matter
    settings = make_settings(str(tmp_path))
    paths = [account_vm(make_usage(i), settings, NOW).archive_path for i in range(1, 21)]
    for path in paths:
        os.chmod(path, 0)
        with open(path, "w") as f:  # root can still write: make the content garbage too
            f.write("garbage")
    started = time.monotonic()
    assert sync_month(settings, "202401", NOW).counts == ((settings.site, settings.submit_host, 20),)
    assert time.monotonic() - started < 1.0
