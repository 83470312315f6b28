"""Exactly once, crash-safe: a kill at any point, then a restart, loses no record and leaves
exactly one archive record and at least one identical queued message per VM."""

from __future__ import annotations

import os
import random
from typing import Dict, List

import pytest

from tests.unit.test_apel_support import NOW, archive_files, make_settings, make_usage, read_queue
from vacfactory.accounting import AccountingSettings, VMUsage, account_vm
from vacfactory.accounting.account import STEPS
from vacfactory.core.apel import cloud_message, job_message, parse_message, validate_message


class Killed(Exception):
    """Stands for kill -9 at one step."""


def assert_consistent(settings: AccountingSettings, usages: List[VMUsage], cloud: bool) -> None:
    """One archive record per VM, each queued at least once with an identical body, no junk."""
    expected = {u.uuid: job_message(u, settings.identity, NOW) for u in usages}
    archived = {os.path.basename(p): open(p).read() for p in archive_files(settings.archive_dir)}
    assert len(archive_files(settings.archive_dir)) == len(usages)
    assert archived == expected
    queued = read_queue(settings.outgoing_dir)
    for body in queued.values():
        message = parse_message(body)
        validate_message(message, NOW)
        assert expected[message.records[0]["LocalJobId"]] == body
    per_vm: Dict[str, int] = {}
    for body in queued.values():
        uuid = parse_message(body).records[0]["LocalJobId"]
        per_vm[uuid] = per_vm.get(uuid, 0) + 1
    assert set(per_vm) == set(expected), "a VM has no queued message"
    if cloud:
        cloud_expected = {u.uuid: cloud_message(u, settings.identity, NOW) for u in usages}
        cloud_archived = {os.path.basename(p): open(p).read()
                          for p in archive_files(settings.archive_dir, cloud=True)}
        assert cloud_archived == cloud_expected
        cloud_queued = read_queue(settings.cloud_queue_dir)
        assert {parse_message(b).records[0]["VMUUID"] for b in cloud_queued.values()} == set(cloud_expected)
        assert all(cloud_expected[parse_message(b).records[0]["VMUUID"]] == b for b in cloud_queued.values())


@pytest.mark.parametrize("cloud", [False, True])
def test_a_crash_between_every_two_writes_then_restart_is_consistent(tmp_path, cloud):
    settings = make_settings(str(tmp_path), cloud_records=cloud)
    usages = [make_usage(i) for i in range(1, 151)]
    rng = random.Random(7)
    accounted = set()
    # each VM crashes at one step (every step gets many VMs), some crash twice before success
    for i, usage in enumerate(usages):
        crash_points = [STEPS[i % len(STEPS)]]
        if rng.random() < 0.3:
            crash_points.append(rng.choice(STEPS))
        for point in crash_points:

            def faults(step: str, point: str = point) -> None:
                if step == point:
                    raise Killed(step)

            with pytest.raises(Killed):
                account_vm(usage, settings, NOW, faults=faults)
        if i % 30 == 0:  # the state after a crash is already safe: whatever is queued is complete
            for body in read_queue(settings.outgoing_dir).values():
                parse_message(body)
    # restart: the engine retries every VM it has not marked accounted
    seen_steps = []
    for usage in usages:
        result = account_vm(usage, settings, NOW, faults=seen_steps.append)
        assert result.queue_name and (result.cloud_queue_name or not cloud)
        accounted.add(usage.uuid)
    assert seen_steps[:len(STEPS)] == list(STEPS)
    assert len(accounted) == len(usages)
    assert_consistent(settings, usages, cloud)


def test_a_crash_before_the_first_write_leaves_nothing(tmp_path):
    settings = make_settings(str(tmp_path))

    def faults(step: str) -> None:
        raise Killed(step)

    with pytest.raises(Killed):
        account_vm(make_usage(), settings, NOW, faults=faults)
    assert archive_files(settings.archive_dir) == []
