"""A real kill -9 at random moments while a process accounts a stream of VMs: after each
kill every VM marked accounted has its record archived and queued; after the last restart
the archive and the queue are consistent (one archive record per VM, identical queued copies)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from tests.unit.test_apel_crash import assert_consistent
from tests.unit.test_apel_support import NOW, make_settings, make_usage, read_queue
from tests.waiting import scaled
from vacfactory.core.apel import job_message

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


WORKER = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
from tests.unit.test_apel_support import NOW, make_settings, make_usage
from vacfactory.accounting.account import account_vm
from vacfactory.atomic import atomic_write_text
state, count = sys.argv[1], int(sys.argv[3])
settings = make_settings(state, cloud_records=True)
machines = os.path.join(state, "machines")
for i in range(1, count + 1):
    usage = make_usage(i)
    marker = os.path.join(machines, usage.uuid, "accounted")
    if os.path.exists(marker):
        continue
    result = account_vm(usage, settings, NOW)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    atomic_write_text(marker, result.queue_name + "\n")
    print(i, flush=True)
print("done", flush=True)
"""


def test_kill_minus_nine_at_random_moments_loses_nothing(tmp_path):
    count = 150
    state = str(tmp_path / "state")
    settings = make_settings(state, cloud_records=True)
    usages = [make_usage(i) for i in range(1, count + 1)]
    rng = random.Random(42)
    kills = 0
    for attempt in range(400):
        process = subprocess.Popen([sys.executable, "-c", WORKER, state, REPO, str(count)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        # let it account a random number of VMs, then kill it: the kill lands somewhere in the
        # next VM's writes (archive, cloud archive, enqueue, cloud enqueue, marker)
        ahead = rng.randint(1, 25)
        lines = []
        while len(lines) < ahead and not (lines and lines[-1] == b"done"):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        if len(lines) < ahead or lines[-1] == b"done":  # it finished (or died) on its own
            _, err = process.communicate(timeout=scaled(30))
            assert process.returncode == 0 and lines[-1:] == [b"done"], err.decode()
            break
        process.send_signal(signal.SIGKILL)
        process.communicate()
        kills += 1
        # after every kill: each VM marked accounted has its archive record and a queued copy
        queued = set(read_queue(settings.outgoing_dir).values())
        for usage in usages:
            if os.path.exists(os.path.join(state, "machines", usage.uuid, "accounted")):
                body = job_message(usage, settings.identity, NOW)
                assert body in queued, f"{usage.uuid} accounted but not queued"
    else:
        pytest.fail("the worker never finished")
    assert kills >= 3, "the worker was never killed mid-stream: the test proved nothing"
    assert_consistent(settings, usages, cloud=True)
