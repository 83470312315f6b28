"""Accounting as the engine does it, on libvirt's test driver (tests/unit/engine_harness.py):
a VM's record survives its machinetype leaving the configuration, and a VM whose accounting
settings change during its life, or between a failed attempt and the retry, is accounted
exactly once.
"""

from __future__ import annotations

import itertools
import os
import shutil
from typing import Dict, List

import pytest

from tests.unit.engine_harness import kernel_file, machinetype_text, make_harness, settings_text
from tests.unit.test_apel_support import archive_files, read_queue
from vacfactory.accounting import AccountingSettings, sync_month
from vacfactory.core.apel import JOB, month_of, parse_message

_names = itertools.count(1)


@pytest.fixture
def engine(tmp_path):
    """engine(machinetypes=("alpha",), total=2, settings="") -> (harness, config text)."""
    made = []

    def build(machinetypes=("alpha",), total=2, settings="", drop_settings=()):
        name = f"t{os.getpid()}acct{next(_names)}.example.org"
        kernel = kernel_file(str(tmp_path))
        text = settings_text(name, str(tmp_path / "state"), total, settings)
        for line in drop_settings:
            assert line + "\n" in text, line
            text = text.replace(line + "\n", "")
        text += "".join(machinetype_text(mt, kernel, 1) for mt in machinetypes)
        harness = make_harness(str(tmp_path), text, name=name)
        made.append(harness)
        return harness, text

    yield build
    for harness in made:
        harness.teardown()


def job_records(outgoing_dir: str) -> Dict[str, List[dict]]:
    """Queued job records by LocalJobId (a list: a VM queued twice shows twice)."""
    found: Dict[str, List[dict]] = {}
    for body in read_queue(outgoing_dir).values():
        message = parse_message(body)
        if message.kind == JOB:
            record = dict(message.records[0])
            found.setdefault(record["LocalJobId"], []).append(record)
    return found


def archived(state_dir: str, uuid: str) -> List[str]:
    """Every archive file of one VM, queued or not, under any identity."""
    return [p for p in archive_files(os.path.join(state_dir, "apel-archive")) if os.path.basename(p) == uuid]


def settings_of(h) -> AccountingSettings:
    return AccountingSettings.from_config(h.factory.config)


def test_a_vm_whose_machinetype_was_removed_is_still_archived_and_queued(engine):
    h, text = engine(machinetypes=("alpha", "beta"))
    h.factory.run_round()
    by_type = {m.record.machinetype: m for m in h.live()}
    assert set(by_type) == {"alpha", "beta"}
    beta = by_type["beta"]

    h.rewrite_config(text[:text.index("\n[machinetype beta]")] + "\n")
    h.clock.advance(600)
    h.factory.run_round()
    assert "beta" not in h.factory.config.machinetypes
    h.power_off(beta, "200 Success")
    h.factory.run_round()

    done = h.factory.machines[beta.uuid]
    assert done.accounted is not None and done.accounted.skipped is None and done.accounted.queued
    (path,) = archived(h.state_dir, beta.uuid)
    assert path == done.accounted.archive
    record = dict(parse_message(open(path).read()).records[0])
    assert record["Queue"] == "beta" and record["WallDuration"] == "600"
    (queued,) = job_records(settings_of(h).outgoing_dir)[beta.uuid]
    assert queued == record
    assert {m.record.machinetype for m in h.live()} == {"alpha"}  # its processor went to alpha


def test_accounting_settings_changed_during_a_vms_life_account_it_once(engine):
    """Site and benchmark type edited while the VM runs: it is accounted once, with the
    configuration in force when it ended for the Site and its own (vm.json) benchmark, and
    never again however many rounds and restarts follow."""
    h, text = engine(total=1)
    h.factory.run_round()
    (vm,) = h.live()
    h.rewrite_config(text.replace("gocdb_sitename = TEST-SITE", "gocdb_sitename = NEW-SITE")
                     .replace("hs06_per_processor = 10", "hs06_per_processor = 20"))
    h.clock.advance(600)
    h.power_off(vm, "200 Success")
    h.factory.run_round()
    for _ in range(3):
        h.clock.advance(60)
        h.factory.run_round()
    again = h.restart()  # as after kill -9: the old engine is abandoned
    try:
        again.factory.run_round()
        (path,) = archived(again.state_dir, vm.uuid)
        record = dict(parse_message(open(path).read()).records[0])
        assert record["Site"] == "NEW-SITE" and record["ServiceLevel"] == "10.0"
        assert job_records(settings_of(again).outgoing_dir)[vm.uuid] == [record]
        assert again.factory.machines[vm.uuid].accounted.archive == path
    finally:
        again.hypervisor.close()


def test_a_retry_after_the_settings_changed_leaves_one_record(engine):
    """The first attempt archives the record and then cannot queue it (the queue directory is
    unusable), so the VM stays unaccounted; the Site is edited before the retry. The retry
    writes the record under the new Site and removes the first one: one archive record, one
    queued message, counted once by sync."""
    h, text = engine(total=1)
    h.factory.run_round()
    (vm,) = h.live()
    outgoing = settings_of(h).outgoing_dir
    os.makedirs(outgoing, exist_ok=True)
    shutil.rmtree(outgoing)
    with open(outgoing, "w") as f:  # a file where the queue directory should be
        f.write("not a directory\n")
    h.clock.advance(600)
    h.power_off(vm, "200 Success")
    h.factory.run_round()
    failed = h.factory.machines[vm.uuid]
    assert failed.finished is not None and failed.accounted is None
    (first,) = archived(h.state_dir, vm.uuid)
    assert "TEST-SITE@" in first

    h.rewrite_config(text.replace("gocdb_sitename = TEST-SITE", "gocdb_sitename = NEW-SITE"))
    os.unlink(outgoing)
    h.clock.advance(60)
    h.factory.run_round()
    h.clock.advance(60)
    h.factory.run_round()

    done = h.factory.machines[vm.uuid]
    assert done.accounted is not None and done.accounted.queued
    assert archived(h.state_dir, vm.uuid) == [done.accounted.archive]
    assert "NEW-SITE@" in done.accounted.archive
    (queued,) = job_records(outgoing)[vm.uuid]
    assert queued["Site"] == "NEW-SITE"
    settings = settings_of(h)
    counts = sync_month(settings, month_of(h.clock()), h.clock()).counts
    assert counts == (("NEW-SITE", settings.submit_host, 1),)


def test_a_vm_created_without_hs06_stays_unqueued_after_the_site_sets_it(engine):
    """hs06_per_processor is fixed when a VM is created: one created without it is archived
    but never queued, even if the site sets the benchmark before it ends, and the monthly
    sync does not count it; a VM created afterwards is queued and counted."""
    h, text = engine(total=1, drop_settings=("hs06_per_processor = 10",))
    h.factory.run_round()
    (before,) = h.live()
    h.rewrite_config(text.replace("[settings]\n", "[settings]\nhs06_per_processor = 10\n", 1))
    h.clock.advance(600)
    h.power_off(before, "200 Success")
    h.factory.run_round()
    (after,) = h.live()
    h.clock.advance(600)
    h.power_off(after, "200 Success")
    h.factory.run_round()

    settings = settings_of(h)
    unqueued = h.factory.machines[before.uuid]
    assert unqueued.accounted is not None and unqueued.accounted.queued is None
    (path,) = archived(h.state_dir, before.uuid)
    assert "/not-queued/" in path and "ServiceLevel: 1.0\n" in open(path).read()
    assert h.factory.machines[after.uuid].accounted.queued
    assert set(job_records(settings.outgoing_dir)) == {after.uuid}
    counts = sync_month(settings, month_of(h.clock()), h.clock()).counts
    assert counts == (("TEST-SITE", settings.submit_host, 1),)
