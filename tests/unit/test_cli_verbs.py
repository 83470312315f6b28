"""The CLI verbs `version`, `machines` (from a real state directory) and `daemon` (a real
detached process on libvirt's test driver: pid file, heartbeat, SIGTERM, kill -9)."""

from __future__ import annotations

import dataclasses

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid as uuidlib

import pytest

from tests.waiting import log_tail, scaled, wait_for
from vacfactory import __version__
from vacfactory.cli.main import main
from vacfactory.cli.run import clear_stale_pidfile, pid_alive
from vacfactory.state.lock import StateLock
from vacfactory.state.machines import MachineStore
from vacfactory.state.records import Accounted, Finished, VMRecord
from vacfactory.state.status import StatusFiles

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")


def write_conf(tmp_path, total: int = 4, extra: str = "") -> str:
    kernel = tmp_path / "vfcli-vmlinux"
    kernel.write_bytes(b"not a kernel: the test driver boots nothing")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        udp_port = s.getsockname()[1]
    path = tmp_path / "vfcli.conf"
    path.write_text(textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = vfcli{os.getpid()}x{uuidlib.uuid4().hex[:6]}.example.org
        factories = .
        state_dir = {tmp_path}/vfcli-state
        libvirt_uri = test:///default
        domain_type = test
        total_processors = {total}
        hs06_per_processor = 10
        udp_port = {udp_port}
        nfs_exporter = none
        cycle_seconds = 1
        overload_per_processor = 100000
        {extra}
        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {kernel}
        """))
    return str(path)


# --------------------------------------------------------------------------- version


def test_version_prints_the_package_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"vacfactory {__version__}\n"
    assert main(["version", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": __version__}


# --------------------------------------------------------------------------- machines


def record(slot: int, created: float, machinetype: str = "alpha") -> VMRecord:
    return VMRecord(
        uuid=str(uuidlib.uuid4()), name=f"vfcli-{slot:02d}.example.org", slot=slot, factory="vfcli.example.org",
        space="space.example.org", machinetype=machinetype, machine_model="vm-raw", processors=1,
        memory_mb=2048, created=created, shutdown_time=created + 86400, hs06_per_processor=10.0,
        address=f"169.254.169.{slot + 1}",
    )


@pytest.fixture
def populated(tmp_path):
    """Slot 0 running for 2 h at 50% CPU; slot 1 ended with a message and accounted; slot 2 an
    old finished VM and a new one still starting; slot 3 never used."""
    conf = write_conf(tmp_path)
    store = MachineStore(str(tmp_path / "vfcli-state"))
    NOW = time.time()  # noqa: N806 - the moment the tests look from
    running = store.prepare(record(0, NOW - 7300), {}, {})
    running = store.mark_started(running, NOW - 7200)
    store.write_heartbeat(running, NOW - 10, 3590.0)
    ended = store.mark_started(store.prepare(record(1, NOW - 5000, "beta"), {}, {}), NOW - 4900)
    ended = store.mark_finished(ended, Finished(time=NOW - 100, end_time=NOW - 110, cpu_seconds=4000.0,
                                                outcome="success", reason="shutdown_message", code=200,
                                                text="Success"))
    store.mark_accounted(ended, Accounted(time=NOW - 90, archive="/x", queued="q"))
    old = store.mark_started(store.prepare(record(2, NOW - 9000), {}, {}), NOW - 8900)
    store.mark_finished(old, Finished(time=NOW - 3000, end_time=NOW - 3000, cpu_seconds=10.0,
                                      outcome="fizzle", reason="no_message"))
    store.prepare(record(2, NOW - 30), {}, {})
    return conf, running.record.uuid, NOW


def test_machines_shows_one_line_per_slot_from_the_state_directory(populated, capsys):
    conf, _, _ = populated
    assert main(["--config", conf, "machines"]) == 0
    header, *lines, totals = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["NAME", "MACHINETYPE", "MODEL", "STATE", "PROCS"]
    assert len(lines) == 4
    assert lines[0].split()[:5] == ["vfcli-00", "alpha", "vm-raw", "Running", "1"]
    assert lines[0].split()[5:7] == ["2.00", "hrs"] and lines[0].endswith(" 50%")
    assert lines[1].split()[:4] == ["vfcli-01", "beta", "vm-raw", "Shut"] and lines[1].endswith('"200 Success"')
    assert lines[2].split()[:4] == ["vfcli-02", "alpha", "vm-raw", "Starting"] and lines[2].endswith(" mins")
    assert lines[3].split() == ["slot", "03", "----------", "Shut", "down"]
    assert totals == "2 VMs on 2 of 4 processors (1 running, 1 starting)"


def test_machines_shows_containers_like_vms_with_their_model(populated, capsys):
    conf, _, now = populated
    store = MachineStore(os.path.join(os.path.dirname(conf), "vfcli-state"))
    container = dataclasses.replace(record(3, now - 60, "pilots"), machine_model="docker", address=None,
                                    mjf_transport="bind")
    store.mark_started(store.prepare(container, {}, {}), now - 50)
    assert main(["machines", "-c", conf]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[4].split()[:5] == ["vfcli-03", "pilots", "docker", "Running", "1"]
    assert out[-1] == "2 VMs and 1 container on 3 of 4 processors (2 running, 1 starting)"


def test_machines_shows_a_failed_creation_with_its_reason_and_counts_it(populated, capsys):
    conf, _, now = populated
    state_dir = os.path.join(os.path.dirname(conf), "vfcli-state")
    store = MachineStore(state_dir)
    failed = store.prepare(record(3, now - 5, "beta"), {}, {})
    store.mark_finished(failed, Finished(time=now - 4, end_time=now - 4, cpu_seconds=0.0, outcome="failed",
                                         reason="create_failed"))
    StatusFiles(state_dir).write_status({"creation_failures": {"beta": {
        "vm": failed.record.name, "reason": "kernel_image /nowhere: no such file", "count": 3, "time": now}}})
    assert main(["machines", "-c", conf]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[4].split()[:5] == ["vfcli-03", "beta", "vm-raw", "Failed", "1"]
    assert out[4].endswith("creation failed: kernel_image /nowhere: no such file")
    assert out[-1] == "2 VMs on 2 of 4 processors (1 running, 1 starting); 1 failed"
    assert main(["machines", "-c", conf, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[3]
    assert row["state"] == "Failed" and row["failure"] == "kernel_image /nowhere: no such file"


def test_machines_json_and_all(populated, capsys):
    conf, running_uuid, now = populated
    assert main(["--config", conf, "machines", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["Running", "Shut down", "Starting", "Shut down"]
    assert rows[0]["uuid"] == running_uuid and rows[0]["cpu_seconds"] == 3590.0
    assert rows[0]["address"] == "169.254.169.1"
    assert rows[1]["shutdown_message"] == "200 Success" and rows[1]["accounted"] is True
    assert rows[1]["outcome"] == "success" and rows[1]["finished"] == pytest.approx(now - 110)
    assert rows[3] == {"slot": 3, "state": "Shut down", "name": None}
    assert main(["--config", conf, "machines", "--include-done", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert [(r["slot"], r["state"]) for r in every] == [(2, "Shut down"), (0, "Running"), (1, "Shut down"),
                                                      (2, "Starting")]  # oldest first
    assert main(["--config", conf, "machines", "--all", "--json"]) == 0  # the old name, deprecated
    captured = capsys.readouterr()
    assert json.loads(captured.out) == every
    assert "--all is deprecated" in captured.err and "--include-done" in captured.err


def test_machines_without_a_state_directory_says_so(tmp_path, capsys):
    conf = write_conf(tmp_path)
    assert main(["--config", conf, "machines"]) == 1
    assert "has the factory ever run here?" in capsys.readouterr().err


# --------------------------------------------------------------------------- stale pid files


def test_a_pid_file_of_a_dead_or_foreign_process_is_stale(tmp_path, capsys):
    pidfile = str(tmp_path / "vfcli.pid")
    dead = subprocess.Popen(["true"])
    dead.wait()
    for content in (f"{dead.pid}\n", "garbage\n", ""):
        with open(pidfile, "w") as f:
            f.write(content)
        assert clear_stale_pidfile(pidfile) is None
        assert not os.path.exists(pidfile)
    assert "removed the stale pid file" in capsys.readouterr().err
    foreign = subprocess.Popen(["sleep", "30"])  # alive, but not vacfactory: the pid was reused
    try:
        with open(pidfile, "w") as f:
            f.write(f"{foreign.pid}\n")
        assert clear_stale_pidfile(pidfile) is None and not os.path.exists(pidfile)
    finally:
        foreign.kill()
        foreign.wait()
    assert clear_stale_pidfile(pidfile) is None  # no file: nothing to do


# --------------------------------------------------------------------------- daemon


def start_daemon(conf: str, pidfile: str, logfile: str) -> subprocess.CompletedProcess:
    """`vacfactory daemon`: the command returns once the daemon has detached."""
    return subprocess.run([VACFACTORY, "--config", conf, "daemon", "--pidfile", pidfile, "--log-file", logfile,
                           "--log-level", "DEBUG"], capture_output=True, text=True, timeout=scaled(60))


def read_pid(pidfile: str):
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def stop(pid: int) -> None:
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), f"pid {pid} to exit after SIGTERM")


@pytest.fixture
def daemon_files(tmp_path):
    conf = write_conf(tmp_path)
    pidfile, logfile = str(tmp_path / "vfcli.pid"), str(tmp_path / "vfcli.log")
    yield conf, pidfile, logfile, str(tmp_path / "vfcli-state")
    for pid in {read_pid(pidfile)} - {None}:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemon_detaches_writes_its_pid_file_and_heartbeat_and_stops_on_sigterm(daemon_files):
    conf, pidfile, logfile, state_dir = daemon_files
    started = time.time()
    result = start_daemon(conf, pidfile, logfile)
    assert result.returncode == 0, result.stderr
    pid = wait_for(lambda: read_pid(pidfile), "the pid file")
    assert pid != os.getpid() and pid_alive(pid)
    status = StatusFiles(state_dir)
    wait_for(lambda: (status.last_beat() or 0) >= started, "the factory heartbeat", details=log_tail(logfile))
    wait_for(lambda: (status.status() or {}).get("running_machines") == 4, "4 running VMs in status.json",
             details=log_tail(logfile))
    assert StateLock(state_dir).holder() is not None
    stop(pid)
    assert not os.path.exists(pidfile)  # released on a clean stop
    assert StateLock(state_dir).holder() is None
    with open(logfile) as f:
        log = f.read()
    assert "vacfactory started" in log and "vacfactory stopped; running VMs were left running" in log


def test_daemon_with_relative_paths_uses_them_from_where_it_was_started(daemon_files):
    conf, pidfile, logfile, state_dir = daemon_files
    here = os.path.dirname(conf)
    result = subprocess.run([VACFACTORY, "daemon", "-c", os.path.basename(conf), "--pidfile",
                             os.path.basename(pidfile), "--log-file", os.path.basename(logfile)],
                            capture_output=True, text=True, timeout=scaled(60), cwd=here)
    assert result.returncode == 0, result.stderr
    pid = wait_for(lambda: read_pid(pidfile), "the pid file next to the configuration")
    wait_for(lambda: StatusFiles(state_dir).last_beat(), "the heartbeat", details=log_tail(logfile))
    stop(pid)
    with open(logfile) as f:
        assert "vacfactory started" in f.read()


def test_daemon_after_kill_9_breaks_the_stale_pid_file_and_refuses_a_second_daemon(daemon_files):
    conf, pidfile, logfile, state_dir = daemon_files
    assert start_daemon(conf, pidfile, logfile).returncode == 0
    first = wait_for(lambda: read_pid(pidfile), "the first pid file")
    status = StatusFiles(state_dir)
    wait_for(lambda: status.last_beat(), "the first heartbeat", details=log_tail(logfile))
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not pid_alive(first), "kill -9 to take effect")
    assert read_pid(pidfile) == first  # left behind

    restarted_at = time.time()
    result = start_daemon(conf, pidfile, logfile)
    assert result.returncode == 0, result.stderr
    assert f"removed the stale pid file {pidfile} (pid {first} is not running)" in result.stderr
    assert "Traceback" not in result.stderr
    second = wait_for(lambda: (read_pid(pidfile) or first) != first and read_pid(pidfile), "the new pid file")
    wait_for(lambda: (status.last_beat() or 0) >= restarted_at, "the restarted daemon's heartbeat",
             details=log_tail(logfile))

    refused = start_daemon(conf, pidfile, logfile)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"vacfactory daemon: already running as pid {second} (pid file {pidfile}); " \
                                     "stop it first"
    assert read_pid(pidfile) == second and pid_alive(second)
    stop(second)


# --------------------------------------------------------------------------- run


def test_run_with_an_invalid_configuration_exits_78_naming_file_line_and_option(tmp_path):
    conf = write_conf(tmp_path, extra="udp_timeout_seconds = forever")
    line = next(n for n, text in enumerate(open(conf).read().splitlines(), 1) if "forever" in text)
    result = subprocess.run([VACFACTORY, "--config", conf, "run"], capture_output=True, text=True, timeout=scaled(60))
    assert result.returncode == 78, result.stderr
    assert f"{conf}:{line}:" in result.stderr and "[settings] udp_timeout_seconds" in result.stderr
    assert "'forever'" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "vfcli-state")  # nothing was started


def test_run_creates_vms_on_the_test_driver_and_stops_cleanly_on_sigterm(tmp_path):
    conf = write_conf(tmp_path)
    state_dir = str(tmp_path / "vfcli-state")
    started = time.time()
    stderr = open(tmp_path / "vfcli-run.err", "w+")  # a file, not a pipe: DEBUG logs would fill a pipe
    proc = subprocess.Popen([VACFACTORY, "--config", conf, "run", "--log-level", "DEBUG"],
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        status = StatusFiles(state_dir)
        wait_for(lambda: (status.status() or {}).get("running_machines") == 4, "4 running VMs in status.json",
                 timeout=60.0, details=log_tail(stderr.name))  # the first round waits for the first space query
        assert (status.last_beat() or 0) >= started
        assert StateLock(state_dir).holder() == proc.pid

        second = subprocess.run([VACFACTORY, "--config", conf, "run", "--seconds", "5"],
                                capture_output=True, text=True, timeout=scaled(60))
        assert second.returncode == 1  # one engine per state directory
        assert f"another vacfactory daemon (pid {proc.pid})" in second.stderr

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.seek(0)
        err = stderr.read()
        stderr.close()
    assert proc.returncode == 0, err
    assert "vacfactory started" in err and "vacfactory stopped; running VMs were left running" in err
    assert "Traceback" not in err
    assert StateLock(state_dir).holder() is None
    machines_dir = os.path.join(state_dir, "machines")
    leftovers = [name for name in os.listdir(machines_dir) if name.startswith(".")]
    leftovers += [name for name in os.listdir(state_dir) if name.startswith(".tmp-")]
    assert leftovers == []  # no interrupted preparation, no temporary
    machines = MachineStore(state_dir, create=False).load_all()
    assert sorted(m.record.slot for m in machines.values()) == [0, 1, 2, 3]
    assert {m.state for m in machines.values()} == {"running"}  # left alone, adopted on the next start
    for machine in machines.values():
        assert started <= machine.started.time <= time.time()
        assert not [name for name in os.listdir(machine.path) if name.startswith(".tmp-")]
