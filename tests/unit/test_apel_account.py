"""account_vm: archive then dirq queue, idempotent, nothing written for an invalid record."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

import pytest

from tests.unit.test_apel_support import NOW, UUID, archive_files, make_settings, make_usage, read_queue
from vacfactory.accounting import AccountingSettings, VMUsage, account_vm
from vacfactory.accounting import archive
from vacfactory.accounting.outgoing import OutgoingQueue, backlog_of, is_element_name
from vacfactory.core.apel import JOB, parse_message, validate_message
from vacfactory.errors import AccountingError, RecordInvalid


def test_record_is_archived_then_queued_with_an_identical_body(tmp_path):
    settings = make_settings(str(tmp_path))
    result = account_vm(make_usage(), settings, NOW)
    assert result.archive_path == os.path.join(
        settings.archive_dir, "202401",
        "UKI-NORTHGRID-MAN-HEP@vac01.tier2.hep.manchester.ac.uk%2Fvacfactory-factory07.tier2.hep.manchester.ac.uk",
        UUID)
    archived = open(result.archive_path).read()
    queued = read_queue(settings.outgoing_dir)
    assert list(queued) == [result.queue_name]
    assert queued[result.queue_name] == archived
    message = parse_message(archived)
    assert message.kind == JOB and message.records[0]["LocalJobId"] == UUID
    validate_message(message, NOW)
    assert oct(os.stat(result.archive_path).st_mode & 0o777) == "0o644"


def test_queue_names_are_ones_ssmsend_sends(tmp_path):
    settings = make_settings(str(tmp_path))
    names = [account_vm(make_usage(i), settings, NOW).queue_name for i in range(1, 51)]
    assert all(is_element_name(n) for n in names)
    for name in names:
        directory, element = name.split("/")
        assert re.fullmatch(r"[0-9a-f]{8}", directory) and re.fullmatch(r"[0-9a-f]{14}", element)
        assert os.path.isfile(os.path.join(settings.outgoing_dir, name))
    bodies = read_queue(settings.outgoing_dir)
    assert sorted(bodies) == sorted(names)
    assert {parse_message(b).records[0]["LocalJobId"] for b in bodies.values()} == {make_usage(i).uuid
                                                                                   for i in range(1, 51)}
    assert not [f for d in os.listdir(settings.outgoing_dir)
                for f in os.listdir(os.path.join(settings.outgoing_dir, d)) if f.endswith(".tmp")]


def test_retry_rewrites_the_same_archive_file_and_queues_an_identical_body(tmp_path):
    settings = make_settings(str(tmp_path))
    first = account_vm(make_usage(), settings, NOW)
    second = account_vm(make_usage(), settings, NOW + 600)
    assert first.archive_path == second.archive_path
    assert archive_files(settings.archive_dir) == [first.archive_path]
    bodies = read_queue(settings.outgoing_dir)
    assert len(bodies) == 2 and len(set(bodies.values())) == 1


def test_changed_identity_between_attempts_leaves_one_archive_record(tmp_path):
    settings = make_settings(str(tmp_path))
    old = account_vm(make_usage(), settings, NOW)
    new = account_vm(make_usage(), make_settings(str(tmp_path), site="UKI-RENAMED"), NOW)
    assert archive_files(settings.archive_dir) == [new.archive_path]
    assert not os.path.exists(old.archive_path)
    assert "Site: UKI-RENAMED\n" in open(new.archive_path).read()


def test_fizzled_vm_gets_no_record(tmp_path):
    settings = make_settings(str(tmp_path))
    usage = make_usage(start_time=1705499000)  # ran 379 s
    result = account_vm(usage, settings, NOW, fizzle_seconds=600)
    assert result.skipped == "fizzle" and result.archive_path is None
    assert archive_files(settings.archive_dir) == []
    assert account_vm(usage, settings, NOW, fizzle_seconds=300).archive_path


def test_invalid_record_raises_and_writes_nothing(tmp_path, caplog):
    settings = make_settings(str(tmp_path))
    bad = [
        make_usage(end_time=int(NOW) + 7200),          # in the future: clock problem
        make_usage(end_time=1705400000),               # before StartTime
        make_usage(machinetype="caf\u00e9"),           # not ASCII
        make_usage(uuid="../../etc/passwd"),           # would escape the archive
        make_usage(accounting_fqan="atlas"),           # not an FQAN
    ]
    for usage in bad:
        with caplog.at_level(logging.ERROR), pytest.raises(RecordInvalid):
            account_vm(usage, settings, NOW)
    assert archive_files(tmp_path) == []
    assert not os.path.exists(settings.outgoing_dir) or backlog_of(settings.outgoing_dir).count == 0
    assert sum("kept for retry" in r.getMessage() for r in caplog.records) == len(bad)


def test_future_end_time_is_accounted_once_the_clock_catches_up(tmp_path):
    settings = make_settings(str(tmp_path))
    usage = make_usage(end_time=int(NOW) + 7200)
    with pytest.raises(RecordInvalid):
        account_vm(usage, settings, NOW)
    assert account_vm(usage, settings, NOW + 7200).queue_name


def test_machinetype_no_longer_configured_is_still_accounted(tmp_path):
    # Vac skips records of machinetypes that vanished from vac.conf; settings know no machinetypes
    settings = make_settings(str(tmp_path))
    result = account_vm(make_usage(machinetype="removed-yesterday"), settings, NOW)
    assert "Queue: removed-yesterday\n" in open(result.archive_path).read() and result.queue_name


def test_without_gocdb_site_records_are_archived_not_queued_and_logged_once(tmp_path, caplog):
    from vacfactory.accounting import account as account_module

    account_module._logged_reasons.clear()
    settings = make_settings(str(tmp_path), site="tier2.hep.manchester.ac.uk", queue_enabled=False,
                             queue_disabled_reason="gocdb_sitename is not set")
    with caplog.at_level(logging.WARNING):
        results = [account_vm(make_usage(i), settings, NOW) for i in range(1, 4)]
    assert all(r.archive_path and r.queue_name is None for r in results)
    assert results[0].not_queued == "gocdb_sitename is not set"
    assert len(archive_files(settings.archive_dir)) == 3
    assert backlog_of(settings.outgoing_dir).count == 0
    assert sum("gocdb_sitename is not set" in r.getMessage() for r in caplog.records) == 1


def test_vm_without_hs06_is_archived_with_service_level_one_and_not_queued(tmp_path):
    settings = make_settings(str(tmp_path))
    result = account_vm(make_usage(hs06_per_processor=None), settings, NOW)
    assert "ServiceLevel: 1.0\n" in open(result.archive_path).read()
    assert result.queue_name is None and "hs06" in (result.not_queued or "")


def test_cloud_records_go_to_their_own_archive_and_queue(tmp_path):
    settings = make_settings(str(tmp_path), cloud_records=True)
    result = account_vm(make_usage(), settings, NOW)
    assert result.cloud_archive_path == os.path.join(settings.archive_dir, "cloud", "202401", UUID)
    cloud = read_queue(settings.cloud_queue_dir)
    assert list(cloud.values()) == [open(result.cloud_archive_path).read()]
    assert parse_message(cloud[result.cloud_queue_name]).records[0]["VMUUID"] == UUID
    assert len(read_queue(settings.outgoing_dir)) == 1
    # the job archive and the sync counts ignore cloud records
    assert archive_files(settings.archive_dir) == [result.archive_path]
    assert archive.count_month(settings.archive_dir, "202401") == {
        (settings.site, settings.submit_host): 1}


def test_hepscore23_from_settings(tmp_path):
    settings = make_settings(str(tmp_path), benchmark_type="hepscore23")
    assert settings.benchmark_type == "HEPscore23"
    result = account_vm(make_usage(), settings, NOW)
    assert "ServiceLevelType: HEPscore23\n" in open(result.archive_path).read()
    with pytest.raises(AccountingError):
        make_settings(str(tmp_path), benchmark_type="HS06")


def test_records_land_in_the_month_of_their_end_time(tmp_path):
    settings = make_settings(str(tmp_path))
    dec = account_vm(make_usage(1, start_time=1703980000, end_time=1704067199), settings, NOW)  # 2023-12-31
    jan = account_vm(make_usage(2, start_time=1703980000, end_time=1704067200), settings, NOW)  # 2024-01-01
    assert "/202312/" in dec.archive_path and "/202401/" in jan.archive_path
    assert archive.months(settings.archive_dir) == ["202312", "202401"]


def test_unwritable_queue_is_an_error_not_a_hang(tmp_path):
    settings = make_settings(str(tmp_path))
    os.makedirs(os.path.dirname(settings.outgoing_dir), exist_ok=True)
    with open(settings.outgoing_dir, "w") as f:  # a file where the queue directory should be
        f.write("x")
    with pytest.raises(AccountingError):
        account_vm(make_usage(), settings, NOW)
    assert len(archive_files(settings.archive_dir)) == 1  # archived first: a retry will queue it


def test_settings_type_is_frozen(tmp_path):
    settings = make_settings(str(tmp_path))
    assert isinstance(settings, AccountingSettings)
    with pytest.raises(AttributeError):
        settings.site = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        make_usage().uuid = "x"  # type: ignore[misc]
    assert VMUsage is type(make_usage())


def test_queue_wrapper_refuses_non_ascii(tmp_path):
    queue = OutgoingQueue(str(tmp_path / "q"))
    with pytest.raises(AccountingError):
        queue.add("caf\u00e9")
    assert queue.count() == 0


def test_several_vms_at_once_in_order_with_errors_in_place(tmp_path):
    from vacfactory.accounting import account_vms

    settings = make_settings(str(tmp_path))
    usages = [make_usage(i) for i in range(1, 61)]
    usages[10] = make_usage(11, machinetype="caf\u00e9")            # invalid: its error in place
    usages[20] = make_usage(21, start_time=1705499000)               # ran 379 s
    results = account_vms(usages, settings, NOW, fizzle_seconds={usages[20].uuid: 600}, workers=8)
    assert len(results) == 60
    assert isinstance(results[10], RecordInvalid)
    assert results[20].skipped == "fizzle"
    good = [r for i, r in enumerate(results) if i not in (10, 20)]
    assert [r.uuid for r in good] == [u.uuid for i, u in enumerate(usages) if i not in (10, 20)]
    assert len(archive_files(settings.archive_dir)) == 58
    bodies = read_queue(settings.outgoing_dir)
    assert len(bodies) == 58 and {r.queue_name for r in good} == set(bodies)
    assert all(bodies[r.queue_name] == open(r.archive_path).read() for r in good)


def test_queued_record_is_a_hard_link_to_the_archived_one(tmp_path):
    settings = make_settings(str(tmp_path), cloud_records=True)
    result = account_vm(make_usage(), settings, NOW)
    queued = os.stat(os.path.join(settings.outgoing_dir, result.queue_name))
    assert queued.st_ino == os.stat(result.archive_path).st_ino and queued.st_nlink == 2
    cloud = os.stat(os.path.join(settings.cloud_queue_dir, result.cloud_queue_name))
    assert cloud.st_ino == os.stat(result.cloud_archive_path).st_ino
    assert not [n for n in os.listdir(settings.outgoing_dir) if n.startswith(".")]  # temporary gone


def test_queue_on_another_file_system_gets_a_copy(tmp_path):
    shm = "/dev/shm"
    assert os.stat(shm).st_dev != os.stat(str(tmp_path)).st_dev, "need /dev/shm on another file system"
    other = tempfile.mkdtemp(dir=shm)
    try:
        settings = make_settings(str(tmp_path), outgoing_dir=os.path.join(other, "apel-outgoing"))
        result = account_vm(make_usage(), settings, NOW)
        element = os.path.join(settings.outgoing_dir, result.queue_name)
        assert os.stat(element).st_ino != os.stat(result.archive_path).st_ino
        assert open(element).read() == open(result.archive_path).read()
    finally:
        shutil.rmtree(other)
