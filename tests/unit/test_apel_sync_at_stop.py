"""Sync records stay in step with the job records (issue 18): a real daemon (libvirt's test
driver) runs VMs that end in two months, then stops; for every month the last sync message
queued must count exactly the job records queued for that month (by EndTime), including the
VM the final flush at stop accounted."""

from __future__ import annotations

import time
from collections import Counter
from typing import Dict

from tests.unit.engine_harness import HOST, Clock
from vacfactory.engine import naming
from tests.unit.test_apel_support import read_queue
from tests.waiting import wait_for
from tests.unit.test_daemon_accounting import JOB_PAUSE, write_config
from vacfactory.accounting import AccountingSettings
from vacfactory.config.loader import ConfigSources
from vacfactory.core.apel import JOB, SYNC, month_of, parse_message
from vacfactory.daemon import Daemon

APRIL_1_2030 = 1901232000.0


def last_sync_per_month(outgoing: str) -> Dict[str, int]:
    """{YYYYMM: NumberOfJobs of the newest sync message}, in queue (time) order."""
    counts: Dict[str, int] = {}
    for name, body in sorted(read_queue(outgoing).items()):
        message = parse_message(body)
        if message.kind == SYNC:
            r = message.records[0]
            counts[f"{int(r['Year']):04d}{int(r['Month']):02d}"] = int(r["NumberOfJobs"])
    return counts


def jobs_per_month(outgoing: str) -> Counter:
    return Counter(month_of(int(parse_message(b).records[0]["EndTime"]))
                   for b in read_queue(outgoing).values() if parse_message(b).kind == JOB)


def run_vm(daemon: Daemon, clock: Clock, seconds: float, destroy: bool = True) -> None:
    live = [m for m in daemon.factory.machines.values() if m.live]
    if not live:  # the round that finished the last VM may have created the next one
        assert len(daemon.factory.run_round().created) == 1
    (machine,) = [m for m in daemon.factory.machines.values() if m.live]
    clock.advance(seconds)
    daemon.hypervisor.destroy(machine.uuid)
    if destroy:
        daemon.factory.run_round()
        assert daemon.factory.machines[machine.uuid].accounted is not None


def test_the_last_sync_of_every_month_counts_every_job_record_sent(tmp_path):
    clock = Clock()
    daemon = Daemon(ConfigSources.for_main_file(write_config(tmp_path)), host_facts=HOST, clock=clock)
    (job,) = [job for job in daemon.background if job.name == "accounting"]
    job.interval = JOB_PAUSE
    closed = False
    try:
        daemon.start()
        outgoing = AccountingSettings.from_config(daemon.factory.config).outgoing_dir
        wait_for(lambda: last_sync_per_month(outgoing) == {"203003": 0}, "the start-up sync", 10)
        run_vm(daemon, clock, 600)  # ends in March
        clock.now = APRIL_1_2030 + 3600
        wait_for(lambda: len(last_sync_per_month(outgoing)) == 2, "the daily sync after the month ended", 10)
        run_vm(daemon, clock, 600)  # ends in April
        run_vm(daemon, clock, 900, destroy=False)  # ends unseen: the final flush at stop accounts it
        time.sleep(0.1)
        daemon.close()
        closed = True
        assert jobs_per_month(outgoing) == {"203003": 1, "203004": 2}
        assert last_sync_per_month(outgoing) == dict(jobs_per_month(outgoing))
    finally:
        if not closed:
            pattern = naming.domain_pattern(daemon.config.settings.factory_name)
            for domain in daemon.hypervisor.list_domains():
                if pattern.match(domain.name):
                    daemon.hypervisor.destroy(domain.uuid)
            daemon.close()
