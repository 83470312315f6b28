"""The daemon's accounting wiring: a real :class:`vacfactory.daemon.Daemon` (libvirt's test
driver, its state in a temporary directory, started as ``vacfactory run`` starts it) runs the
daily APEL sync once a day and the built-in sender on its timer, from its own background job.

Only the wall clock is the test's (the daemon's ``clock``), and the background job's pause
between checks is shortened from minutes to a few milliseconds, so one test sees the job run
many times within one "day" without waiting for it.
"""

from __future__ import annotations

import itertools
import os
import socket
import textwrap
import time
from typing import Iterator, List

import pytest
from dirq.QueueSimple import QueueSimple

from tests.unit.engine_harness import HOST, Clock, close_daemons, kernel_file
from tests.unit.test_apel_support import StompStub, make_pki, make_usage, read_queue
from tests.waiting import wait_for
from vacfactory.accounting import AccountingSettings, account_vm
from vacfactory.config.loader import ConfigSources
from vacfactory.core.apel import SYNC, parse_message
from vacfactory.daemon import Daemon

DAY = 86400.0
#: how long the job is given to (wrongly) do something more: many of its runs at JOB_PAUSE
QUIET_SECONDS = 0.5
JOB_PAUSE = 0.01
_names = itertools.count(1)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def write_config(tmp_path, extra: str = "") -> str:
    # libvirt's test driver is shared by the whole process: a factory name (domain names) of its own
    name = f"d{os.getpid()}acct{next(_names)}.example.org"
    path = tmp_path / "vacfactory.conf"
    path.write_text(textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = {name}
        gocdb_sitename = TEST-SITE
        hs06_per_processor = 10
        state_dir = {tmp_path / 'state'}
        libvirt_uri = test:///default
        domain_type = test
        total_processors = 1
        mb_per_processor = 100
        udp_port = {free_udp_port()}
        overload_per_processor = 100000
        """) + textwrap.dedent(extra) + textwrap.dedent(f"""
        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {kernel_file(str(tmp_path))}
        fizzle_seconds = 60
        """))
    return str(path)


@pytest.fixture
def start_daemon() -> Iterator:
    """start_daemon(config_path) -> (daemon, clock): started, its accounting job pausing
    JOB_PAUSE between runs; stopped and its domains destroyed at the end."""
    started: List[Daemon] = []

    def start(config_path: str):
        clock = Clock()
        daemon = Daemon(ConfigSources.for_main_file(config_path), host_facts=HOST, clock=clock)
        (job,) = [job for job in daemon.background if job.name == "accounting"]
        job.interval = JOB_PAUSE
        started.append(daemon)
        daemon.start()
        return daemon, clock

    yield start
    close_daemons(started)


def queued(outgoing_dir: str) -> int:
    """Elements in the queue, counted without locking them: the daemon's sender may hold a
    lock on one this very moment (read_queue, which locks as ssmsend does, would fail then)."""
    return QueueSimple(outgoing_dir).count()


def sync_records(outgoing_dir: str) -> List[dict]:
    found = []
    for body in read_queue(outgoing_dir).values():
        message = parse_message(body)
        if message.kind == SYNC:
            found.append(dict(message.records[0]))
    return found


def test_the_daemon_syncs_once_a_day_from_its_background_job(tmp_path, start_daemon):
    daemon, clock = start_daemon(write_config(tmp_path))
    settings = AccountingSettings.from_config(daemon.factory.config)
    outgoing = settings.outgoing_dir

    # at start-up: this month's sync record (yesterday was in the same month), with no jobs yet
    wait_for(lambda: len(sync_records(outgoing)) == 1, "the first sync record", 10)
    (first,) = sync_records(outgoing)
    assert first == {"Site": "TEST-SITE", "SubmitHost": settings.submit_host, "NumberOfJobs": "0",
                     "Month": "3", "Year": "2030"}

    # a VM runs ten minutes and ends: the engine accounts it (its record queued beside the sync)
    assert len(daemon.factory.run_round().created) == 1
    (machine,) = [m for m in daemon.factory.machines.values() if m.live]
    clock.advance(600)
    daemon.hypervisor.destroy(machine.uuid)
    daemon.factory.run_round()
    assert daemon.factory.machines[machine.uuid].accounted is not None
    assert len(read_queue(outgoing)) == 2

    # the job keeps running, but not another sync within the day
    clock.advance(DAY - 600 - 1)
    time.sleep(QUIET_SECONDS)
    assert len(sync_records(outgoing)) == 1

    # a day after the first: one new sync record, now counting the VM
    clock.advance(1)
    wait_for(lambda: len(sync_records(outgoing)) == 2, "the next day's sync record", 10)
    time.sleep(QUIET_SECONDS)
    records = sync_records(outgoing)
    assert len(records) == 2
    assert sorted(r["NumberOfJobs"] for r in records) == ["0", "1"]


def test_the_daemon_sends_on_its_timer_when_apel_send_is_on(tmp_path, start_daemon):
    pki = make_pki(str(tmp_path / "pki"))
    with StompStub() as broker:
        config = write_config(tmp_path, f"""\
            apel_send = yes
            apel_broker_host = localhost
            apel_broker_port = {broker.port}
            apel_use_ssl = no
            apel_host_cert = {pki.host_cert}
            apel_host_key = {pki.host_key}
            apel_capath = {pki.ca_cert}
            apel_destination = /queue/test.grid
            apel_send_interval_seconds = 3600
            """)
        daemon, clock = start_daemon(config)
        settings = AccountingSettings.from_config(daemon.factory.config)

        # the first run syncs and then sends: the sync record reaches the broker, signed
        wait_for(lambda: len(broker.messages) == 1, "the first send", 15)
        wait_for(lambda: queued(settings.outgoing_dir) == 0, "the sent element to leave the queue", 5)
        headers, body = broker.messages[0]
        assert headers["destination"] == "/queue/test.grid" and "APEL-sync-message" in body
        assert "application/x-pkcs7-signature" in body

        # something queued in between waits for the interval
        now = clock()
        account_vm(make_usage(1, start_time=int(now) - 3600, end_time=int(now) - 60), settings, now)
        time.sleep(QUIET_SECONDS)
        assert len(read_queue(settings.outgoing_dir)) == 1 and len(broker.messages) == 1

        clock.advance(3600)
        wait_for(lambda: len(broker.messages) == 2, "the send an interval later", 15)
        assert "APEL-individual-job-message" in broker.messages[1][1]
        wait_for(lambda: queued(settings.outgoing_dir) == 0, "the queue to empty", 5)
        time.sleep(QUIET_SECONDS)
        assert len(broker.messages) == 2  # and nothing more until the next interval
