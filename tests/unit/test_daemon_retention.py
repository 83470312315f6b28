"""The daemon's retention job (``Daemon.expire_evidence``): a real :class:`vacfactory.daemon.Daemon`
(libvirt's test driver, its state in a temporary directory, started as ``vacfactory run`` starts
it) deletes VM syslog files older than ``syslog_days`` and kept disk overlays past their
``keep_days``; younger ones, and files that are not syslog files, stay.

The files' ages are set with ``os.utime`` and the kept overlays' times relative to the real wall
clock, which is what the retention job reads (``time.time()``); the daemon's clock starts at the
same instant, so the engine and the job agree on "now".
"""

from __future__ import annotations

import itertools
import os
import socket
import textwrap
import time
from typing import Iterator, List

import pytest

from tests.unit.engine_harness import HOST, Clock, close_daemons, kernel_file
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import RETENTION_SECONDS, Daemon
from vacfactory.state import kept

DAY = 86400.0
_names = itertools.count(1)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def config_text(tmp_path, name: str, syslog_days: float, keep_days: float = 1) -> str:
    return textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = {name}
        state_dir = {tmp_path / 'state'}
        libvirt_uri = test:///default
        domain_type = test
        total_processors = 2
        mb_per_processor = 100
        udp_port = {free_udp_port()}
        overload_per_processor = 100000
        syslog_days = {syslog_days}
        keep_days = {keep_days}

        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {kernel_file(str(tmp_path))}
        fizzle_seconds = 60
        """)


@pytest.fixture
def start_daemon(tmp_path) -> Iterator:
    """start_daemon(syslog_days) -> (daemon, config path): started on a clock at the real
    time, with two VMs running; stopped and its domains destroyed at the end."""
    started: List[Daemon] = []

    def start(syslog_days: float):
        # libvirt's test driver is shared by the whole process: a factory name of its own
        name = f"d{os.getpid()}ret{next(_names)}.example.org"
        path = tmp_path / "vacfactory.conf"
        path.write_text(config_text(tmp_path, name, syslog_days))
        daemon = Daemon(ConfigSources.for_main_file(str(path)), host_facts=HOST,
                        clock=Clock(time.time()))
        started.append(daemon)
        daemon.start()
        assert len(daemon.factory.run_round().created) == 2
        return daemon, path

    yield start
    close_daemons(started)


def write_aged(path: str, age_seconds: float) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("<13>Mar  1 12:00:00 vm test: hello\n")
    when = time.time() - age_seconds
    os.utime(path, (when, when))
    return path


def syslog_files(daemon: Daemon) -> dict:
    """Two VMs' syslog directories: old files (past syslog_days = 2), young ones, and a stray."""
    first, second = sorted((m for m in daemon.factory.machines.values() if m.live),
                           key=lambda m: m.record.slot)
    return {
        "old rotated": write_aged(os.path.join(first.path, "syslog", "messages-20300101"), 3 * DAY),
        "old current": write_aged(os.path.join(second.path, "syslog", "messages"), 3 * DAY),
        "young rotated": write_aged(os.path.join(second.path, "syslog", "messages-20300102.1"),
                                    2 * DAY - 3600),
        "young current": write_aged(os.path.join(first.path, "syslog", "messages"), 60),
        "old stray": write_aged(os.path.join(first.path, "syslog", "notes.txt"), 3 * DAY),
    }


def keep(tmp_path, state_dir: str, uuid: str, kept_ago: float, days: float) -> kept.KeptOverlay:
    """A VM's disks kept ``kept_ago`` seconds ago for ``days`` (as the engine keeps them)."""
    machine = tmp_path / "ended" / uuid
    (machine / "disks").mkdir(parents=True)
    (machine / "disks" / "root.qcow2").write_bytes(b"QFI\xfb overlay")
    record = kept.keep_overlay(state_dir, str(machine), uuid=uuid, name=f"{uuid}.example.org",
                               machinetype="alpha", reason="killed: wallclock",
                               now=time.time() - kept_ago, days=days)
    assert record is not None
    return record


def test_old_syslog_files_and_expired_kept_overlays_go_the_young_stay(tmp_path, start_daemon):
    daemon, _ = start_daemon(syslog_days=2)
    state_dir = daemon.factory.config.settings.state_dir
    keep_days = daemon.factory.config.settings.keep_days
    files = syslog_files(daemon)
    expired = keep(tmp_path, state_dir, "expired-uuid", kept_ago=keep_days * DAY + 3600, days=keep_days)
    fresh = keep(tmp_path, state_dir, "fresh-uuid", kept_ago=keep_days * DAY - 3600, days=keep_days)
    abandoned = os.path.join(kept.kept_dir(state_dir), kept.STAGING_PREFIX + "crashed-uuid")
    write_aged(os.path.join(abandoned, "root.qcow2"), 0)
    os.utime(abandoned, (time.time() - 2 * DAY,) * 2)
    in_progress = os.path.join(kept.kept_dir(state_dir), kept.STAGING_PREFIX + "busy-uuid")
    write_aged(os.path.join(in_progress, "root.qcow2"), 0)

    daemon.expire_evidence()

    gone = {label for label, path in files.items() if not os.path.exists(path)}
    assert gone == {"old rotated", "old current"}
    assert [k.uuid for k in kept.list_kept(state_dir)] == [fresh.uuid]
    assert not os.path.exists(expired.path) and os.path.isfile(fresh.disk_paths()[0])
    assert not os.path.exists(abandoned) and os.path.isdir(in_progress)


def test_the_retention_job_runs_from_the_daemons_periodic_jobs_at_its_interval(tmp_path, start_daemon):
    daemon, _ = start_daemon(syslog_days=2)
    state_dir = daemon.factory.config.settings.state_dir
    files = syslog_files(daemon)
    expired = keep(tmp_path, state_dir, "expired-uuid", kept_ago=2 * DAY, days=1)
    (job,) = [job for job in daemon.periodic if job.name == "retention"]
    assert job.interval == RETENTION_SECONDS

    job.last = time.monotonic()  # it has just run: not due yet
    daemon.run_periodic()
    assert os.path.exists(files["old rotated"]) and os.path.exists(expired.path)

    job.last = time.monotonic() - RETENTION_SECONDS - 1
    daemon.run_periodic()
    assert not os.path.exists(files["old rotated"]) and not os.path.exists(expired.path)
    assert os.path.exists(files["young current"])


def test_syslog_days_zero_keeps_every_file_until_a_reload_sets_it(tmp_path, start_daemon):
    daemon, path = start_daemon(syslog_days=0)
    files = syslog_files(daemon)
    daemon.expire_evidence()
    assert all(os.path.exists(p) for p in files.values())

    path.write_text(path.read_text().replace("syslog_days = 0", "syslog_days = 2"))
    later = time.time() + 5
    os.utime(path, (later, later))
    daemon.factory.run_round()  # the engine picks the edit up
    assert daemon.factory.config.settings.syslog_days == 2
    daemon.expire_evidence()
    assert {label for label, p in files.items() if not os.path.exists(p)} == {"old rotated", "old current"}
