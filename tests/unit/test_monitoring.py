"""The check logic on real state directories: heartbeat, lock, creation error, libvirt, disk,
accounting backlog; one Nagios line with parseable performance data. Also VacMon, the other
monitoring output, with a real UDP receiver on loopback."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time

import pytest

from tests.waiting import scaled
from vacfactory.view import monitoring
from vacfactory.accounting.outgoing import OutgoingQueue
from vacfactory.view.monitoring import CRITICAL, OK, UNKNOWN, WARNING, CheckSettings, run_check
from vacfactory.space import protocol
from vacfactory.space.snapshot import FactorySnapshot, FactoryStatus, MachineStatus, MachinetypeStatus
from vacfactory.space.vacmon import VacMonSender, cycle_messages, finished_message, send_vacmon
from vacfactory.state.lock import StateLock
from vacfactory.state.status import StatusFiles

NOW = 1_700_000_000.0
PERF = re.compile(r"^'?[a-z_]+'?=[0-9.]+(s|MB)?(;[0-9.]*){0,4}$")


@pytest.fixture
def state_dir(tmp_path):
    directory = str(tmp_path / "vfops-state")
    os.makedirs(directory)
    return directory


@pytest.fixture
def healthy(state_dir):
    """A state directory as a running daemon leaves it; the lock is held for the test."""
    status = StatusFiles(state_dir)
    status.beat(NOW - 5)
    status.write_status({"running_processors": 12, "running_machines": 12, "total_processors": 16})
    lock = StateLock(state_dir)
    lock.acquire()
    yield state_dir
    lock.release()


def settings(state_dir, **changes):
    values = dict(state_dir=state_dir, libvirt_uri="test:///default", total_processors=16, max_age=600,
                  disk_warning_mb=1000, disk_critical_mb=100, apel_age_warning_seconds=86400)
    values.update(changes)
    return CheckSettings(**values)


def check(state_dir, ping=True, free_mb=50_000, now=NOW, **changes):
    return run_check(settings(state_dir, **changes), now, lambda: ping, disk_free_mb=lambda path: free_mb)


def split(line):
    text, _, perf = line.partition(" | ")
    return text, perf.split()


def test_healthy_factory_is_ok_with_one_line_and_perfdata(healthy):
    result = check(healthy)
    assert result.code == OK and result.problems == ()
    text, perf = split(result.line)
    assert text == "VACFACTORY OK - 12/16 processors, 12 VMs"
    assert "\n" not in result.line
    assert all(PERF.match(p) for p in perf), perf
    assert perf[:2] == ["running_processors=12;;;0;16", "running_vms=12;;;0"]
    assert "heartbeat_age=5s;;600;0" in perf and "disk_free=50000MB;1000;100;0" in perf
    assert "apel_queued=0;;;0" in perf


def test_stale_heartbeat_is_critical(healthy):
    result = check(healthy, now=NOW + 2 * 3600)
    assert result.code == CRITICAL
    assert result.line.startswith("VACFACTORY CRITICAL - no factory heartbeat for 2.00 hours (12/16 processors")
    assert check(healthy, now=NOW + 400, max_age=300).code == CRITICAL
    assert check(healthy, now=NOW + 400, max_age=500).code == OK


def test_missing_heartbeat_and_no_daemon_are_critical(state_dir):
    result = check(state_dir)
    assert result.code == CRITICAL
    assert [m for _, m in result.problems] == ["no factory heartbeat", "daemon not running"]
    assert "(no status yet)" in result.line


def test_a_fresh_heartbeat_without_the_daemon_is_critical(healthy):
    # the lock fixture holds the lock; a second state dir shows the unlocked case
    other = os.path.join(os.path.dirname(healthy), "vfops-other")
    os.makedirs(other)
    StatusFiles(other).beat(NOW)
    result = check(other)
    assert result.code == CRITICAL and [m for _, m in result.problems] == ["daemon not running"]


def test_creation_error_is_critical_with_its_first_line_and_no_pipe_characters(healthy):
    StatusFiles(healthy).set_error("wn01-03.example.com: creation of a lhcb VM failed: a | b\nTraceback...")
    result = check(healthy)
    assert result.code == CRITICAL
    assert result.line.startswith(
        "VACFACTORY CRITICAL - creation error: wn01-03.example.com: creation of a lhcb VM failed: a / b (12/16")
    assert result.line.count(" | ") == 1 and "Traceback" not in result.line


def test_paused_creation_is_critical_with_the_engines_reason(healthy):
    StatusFiles(healthy).write_status({
        "running_processors": 3, "running_machines": 3, "total_processors": 16,
        "creation_paused": "creation paused: state dir /var/lib/vacfactory has 12 MiB free, needs 64",
    })
    result = check(healthy)
    assert result.code == CRITICAL
    assert result.line.startswith("VACFACTORY CRITICAL - creation paused: state dir /var/lib/vacfactory "
                                  "has 12 MiB free, needs 64 (3/16 processors, 3 VMs)"), result.line
    # resumed: the engine writes null, and the check is OK again
    StatusFiles(healthy).write_status({"running_processors": 3, "running_machines": 3, "total_processors": 16,
                                       "creation_paused": None})
    assert check(healthy).code == OK


def test_unreachable_libvirt_is_critical(healthy):
    result = check(healthy, ping=False)
    assert result.code == CRITICAL and "libvirt test:///default unreachable" in result.line


def test_why_libvirt_is_unreachable_is_shown_once_without_the_repeated_uri(healthy):
    result = check(healthy, ping="test:///default: cannot connect read-only: permission denied")
    assert result.code == CRITICAL
    assert "libvirt test:///default unreachable: cannot connect read-only: permission denied" in result.line
    assert check(healthy, ping=None).code == OK


def test_answer_within_gives_the_result_the_error_or_the_deadline():
    from vacfactory.errors import HypervisorError

    assert monitoring.answer_within(lambda: 42, 5) is None

    def refuse():
        raise HypervisorError("cannot connect read-only: no", uri="qemu:///system")

    assert monitoring.answer_within(refuse, 5) == "qemu:///system: cannot connect read-only: no"
    hung = threading.Event()
    started = time.monotonic()
    try:
        assert monitoring.answer_within(hung.wait, 0.5) == "no answer within 0.5 s (libvirtd hung or overloaded?)"
        assert time.monotonic() - started < scaled(2)
    finally:
        hung.set()  # let the abandoned thread end


@pytest.mark.parametrize("free,code,word", [(50_000, OK, None), (999, WARNING, "WARNING"), (99, CRITICAL, "CRITICAL")])
def test_disk_space_thresholds(healthy, free, code, word):
    result = check(healthy, free_mb=free)
    assert result.code == code
    if word:
        assert result.line.startswith(f"VACFACTORY {word} - only {free} MiB free in {healthy}")


def test_an_old_accounting_backlog_warns(healthy):
    queue = OutgoingQueue(os.path.join(healthy, "apel-outgoing"))
    queue.add("APEL-individual-job-message: v0.3\n%%\n")
    queue.add("APEL-individual-job-message: v0.3\n%%\n")
    now = time.time()
    StatusFiles(healthy).beat(now)
    assert check(healthy, now=now).code == OK
    later = now + 2 * 86400
    StatusFiles(healthy).beat(later)
    result = check(healthy, now=later)
    assert result.code == WARNING
    assert "2 APEL messages waiting, the oldest for 2.0 days" in result.line
    assert "apel_queued=2;;;0" in result.perfdata


def queued_at(queue_dir: str, stamp: int) -> None:
    """An element as dirq's QueueSimple names it, enqueued at ``stamp`` (epoch seconds)."""
    bucket = os.path.join(queue_dir, "%08x" % (stamp - stamp % 60))
    os.makedirs(bucket, exist_ok=True)
    with open(os.path.join(bucket, "%08x%05x%01x" % (stamp, 0, 7)), "w") as f:
        f.write("APEL-cloud-message: v0.4\n%%\n")


def test_an_old_cloud_record_backlog_warns_too(healthy):
    """apel_cloud_records queues into apel-cloud-outgoing, which a second ssmsend (or the
    built-in sender) must empty: a forgotten cloud sender warns like a stuck job queue."""
    now = time.time()
    StatusFiles(healthy).beat(now)
    OutgoingQueue(os.path.join(healthy, "apel-outgoing")).add("APEL-individual-job-message: v0.3\n%%\n")
    assert check(healthy, now=now).code == OK  # a fresh job record alone is fine

    queued_at(os.path.join(healthy, "apel-cloud-outgoing"), int(now) - 3 * 86400)
    result = check(healthy, now=now)
    assert result.code == WARNING
    assert "2 APEL messages waiting (1 of them cloud records), the oldest for 3.0 days" in result.line
    assert "apel_queued=2;;;0" in result.perfdata and "apel_cloud_queued=1;;;0" in result.perfdata
    assert any(re.fullmatch(r"apel_oldest_age=2592\d\ds;86400;;0", p) for p in result.perfdata), result.perfdata


def test_without_cloud_records_the_cloud_backlog_is_zero_and_named_nowhere(healthy):
    result = check(healthy)
    assert result.code == OK and "apel_cloud_queued=0;;;0" in result.perfdata
    assert not os.path.exists(os.path.join(healthy, "apel-cloud-outgoing"))  # the check creates nothing


def test_an_unreadable_cloud_queue_is_unknown(healthy):
    with open(os.path.join(healthy, "apel-cloud-outgoing"), "w") as f:
        f.write("not a directory")
    result = check(healthy)
    assert result.code == UNKNOWN
    assert "cannot read apel-cloud-outgoing" in result.line


def test_critical_outranks_warning_and_unknown_in_code_and_order(healthy):
    StatusFiles(healthy).set_error("boom")
    result = monitoring._result([(WARNING, "w"), (UNKNOWN, "u"), (CRITICAL, "c")], "s", [])
    assert result.code == CRITICAL and result.line == "VACFACTORY CRITICAL - c; u; w (s)"
    assert monitoring._result([(WARNING, "w"), (UNKNOWN, "u")], "s", []).code == UNKNOWN


def test_unknown_result_for_a_check_that_cannot_run():
    result = monitoring.unknown("configuration does not load: x | y\nz")
    assert result.code == UNKNOWN and result.line == "VACFACTORY UNKNOWN - configuration does not load: x / y z"


def test_missing_state_directory_is_critical(tmp_path):
    result = check(str(tmp_path / "vfops-never-ran"))
    assert result.code == CRITICAL and "does not exist" in result.line


def test_settings_come_from_the_configuration():
    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import load_config_string

    config = load_config_string(
        "[settings]\nvac_space = vac01.example.com\nstate_dir = /var/lib/vfops\ncheck_disk_free_warning_mb = 500\n"
        "check_disk_free_critical_mb = 50\ncheck_apel_backlog_warning_seconds = 3600\n",
        HostFacts(fqdn="wn01.example.com", cpu_count=4, mem_total_mb=8192))
    s = CheckSettings.from_config(config, max_age=120)
    assert (s.state_dir, s.libvirt_uri, s.total_processors, s.max_age) == ("/var/lib/vfops", "qemu:///system", 4, 120)
    assert (s.disk_warning_mb, s.disk_critical_mb, s.apel_age_warning_seconds) == (500, 50, 3600.0)


def test_disk_thresholds_must_be_ordered():
    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import load_config_string
    from vacfactory.errors import ConfigErrors

    with pytest.raises(ConfigErrors, match="check_disk_free_critical_mb: must be <= check_disk_free_warning_mb"):
        load_config_string("[settings]\nvac_space = vac01.example.com\ncheck_disk_free_warning_mb = 10\n"
                           "check_disk_free_critical_mb = 50\n",
                           HostFacts(fqdn="wn01.example.com", cpu_count=4, mem_total_mb=8192))


# --------------------------------------------------------------------------- VacMon


SPACE_SNAPSHOT = FactorySnapshot(
    space="vac01.example.com", factory="wn01.example.com",
    machines=(MachineStatus("wn01-00.example.com", state="Running", uuid="u-1", machinetype="lhcb",
                            created_time=NOW - 100, started_time=NOW - 90, heartbeat_time=NOW - 5, num_processors=2,
                            shutdown_message=None),),
    machinetypes=(MachinetypeStatus("lhcb", running_hs06=20.0, running_machines=1, running_processors=2),
                  MachinetypeStatus("atlas", shutdown_message="300 No more work", shutdown_time=NOW - 50)),
    factory_status=FactoryStatus(running_processors=2, running_machines=1, max_processors=16, max_machines=16),
)


@pytest.fixture
def receiver():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def receive_all(sock, count):
    return [sock.recvfrom(65536)[0] for _ in range(count)]


def test_cycle_messages_reach_a_real_udp_receiver_as_vac_sends_them(receiver):
    port = receiver.getsockname()[1]
    sender = VacMonSender([f"127.0.0.1:{port}"])
    try:
        assert sender.send(cycle_messages(SPACE_SNAPSHOT, NOW)) == 3
        datagrams = receive_all(receiver, 3)
    finally:
        sender.close()
    replies = [protocol.decode(d, peer="test") for d in datagrams]
    assert [r.reply_type.value for r in replies] == ["factory_status", "machinetype_status", "machinetype_status"]
    assert {r.cookie for r in replies} == {"0"}
    assert replies[0].status.max_processors == 16
    assert [r.status.machinetype for r in replies[1:]] == ["lhcb", "atlas"]
    first = json.loads(datagrams[0])
    assert first["time_sent"] == int(NOW) and first["daemon_version"].endswith(" factory")


def test_the_finished_machine_message_carries_the_finished_state(receiver):
    port = receiver.getsockname()[1]
    machine = MachineStatus("wn01-00.example.com", state="Running", uuid="u-1", machinetype="lhcb",
                            shutdown_message="200 Success", shutdown_time=NOW - 1, num_processors=2)
    assert send_vacmon([f"127.0.0.1:{port}"], [finished_message(SPACE_SNAPSHOT, machine, NOW)]) == 1
    reply = protocol.decode(receive_all(receiver, 1)[0], peer="test")
    assert reply.reply_type.value == "machine_status"
    assert reply.status.state == "Shut down"  # Vac sent "Running" here
    assert reply.status.shutdown_message == "200 Success"


def test_an_unresolvable_collector_is_logged_once_and_never_blocks(caplog, receiver):
    port = receiver.getsockname()[1]
    calls = []

    def failing(host, *args):
        calls.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    sender = VacMonSender([f"vfops-nowhere.invalid:{port}", f"127.0.0.1:{port}"], resolver=failing,
                          refresh_seconds=0)
    try:
        with caplog.at_level(logging.WARNING, logger="vacfactory.space.vacmon"):
            for _ in range(3):
                sender.send([{"message_type": "factory_status"}])
    finally:
        sender.close()
    warnings = [r for r in caplog.records if "cannot resolve" in r.getMessage()]
    assert len(warnings) == 2  # once per collector, not once per send
    assert sender.dropped == 6


def test_a_slow_resolver_does_not_hold_the_sender(receiver):
    port = receiver.getsockname()[1]

    def slow(host, port_, *args):
        time.sleep(1.5)
        return socket.getaddrinfo("127.0.0.1", port_, socket.AF_INET, socket.SOCK_DGRAM)

    sender = VacMonSender([f"slow.example.com:{port}"], resolver=slow, resolve_wait=0.1)
    try:
        started = time.monotonic()
        assert sender.send([{"n": 1}]) == 0
        assert time.monotonic() - started < min(scaled(1.0), 1.4)  # the lookup takes 1.5 s
        time.sleep(1.5 + scaled(0.3))  # the lookup finishes in the background
        assert sender.send([{"n": 2}]) == 1
        assert json.loads(receive_all(receiver, 1)[0]) == {"n": 2}
    finally:
        sender.close()
