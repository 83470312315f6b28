"""evidence + ``vacfactory machine``: one VM's whole story from a real state directory.

The state directory is written by the real writers: MachineStore (records), account_vm (the
APEL archive), the syslog receiver (syslog files), state.kept (kept disks). What the VM wrote
(joboutputs, console) includes traps: a symlink to a secret, a FIFO, terminal escapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from tests.unit.test_apel_support import make_settings
from vacfactory.accounting import account_vm
from vacfactory.cli import evidence as cli
from vacfactory.cli.common import EXIT_FAILURE, EXIT_OK
from vacfactory.cli.main import main
from vacfactory.core.apel import VMUsage
from vacfactory.view.evidence import AmbiguousMachine, UnknownMachine, collect, find_machine, format_evidence
from vacfactory.state.kept import keep_overlay
from vacfactory.state.machines import MachineStore
from vacfactory.state.records import Accounted, Finished, VMRecord
from vacfactory.vmio.syslogd import SyslogReceiver

T0 = 1705413779.0  # 2024-01-16T14:02:59Z
UUID = "5d0c1a3e-7f7b-4c55-9a0e-1f1b6ad7c2e4"
OLDER = "5d0c1a3e-0000-4000-8000-000000000000"
NAME = "factory07-03.tier2.example.ac.uk"
TOKEN = "0123456789abcdef" * 2


def record(uuid: str, created: float, name: str = NAME) -> VMRecord:
    return VMRecord(uuid=uuid, name=name, slot=3, factory="factory07.tier2.example.ac.uk",
                    space="vac01.tier2.example.ac.uk", machinetype="lhcb-prod", machine_model="vm-raw",
                    processors=8, memory_mb=16384, created=created, shutdown_time=created + 172800,
                    hs06_per_processor=10.5, address="169.254.169.4", token=TOKEN,
                    root_image_path="/var/lib/vacfactory/imagecache/base-1.img")


def finish(store: MachineStore, machine, start: float, end: float, cpu: float, reason: str, code, text: str):
    machine = store.mark_started(machine, start)
    machine = store.write_heartbeat(machine, end - 5, cpu - 10)
    return store.mark_finished(machine, Finished(time=end + 1, end_time=end, cpu_seconds=cpu, outcome="abort",
                                                 reason=reason, code=code, text=text))


@pytest.fixture
def state(tmp_path):
    """A state directory holding an older VM and the VM under investigation, both of one name."""
    state_dir = str(tmp_path / "state")
    store = MachineStore(state_dir)
    old = store.prepare(record(OLDER, T0 - 86400), {}, {})
    finish(store, old, T0 - 86300, T0 - 3600, 1000.0, "shutdown_message", 300, "No more work")

    machine = store.prepare(record(UUID, T0), {"total_cpu": "8"}, {"job_id": UUID}, b"#!/bin/sh\n")
    out = machine.joboutputs_dir
    with open(os.path.join(out, "shutdown_message"), "w") as f:
        f.write("700 Heartbeat file not updated\n")
    with open(os.path.join(out, "pilot.log"), "wb") as f:
        f.write(b"pilot output\n" * 100)
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash\n")
    os.symlink(str(secret), os.path.join(out, "evil-link"))
    os.mkfifo(os.path.join(out, "evil-fifo"))
    with open(machine.console_log, "wb") as f:
        f.write(b"".join(b"boot line %d\r\n" % i for i in range(100)) + b"\x1b]0;owned\x07\x1b[2Jlast \xff line\n")
    finished = finish(store, machine, T0 + 60, T0 + 60 + 36000, 0.5 * 36000 * 8, "heartbeat_not_updated", 700,
                      "Heartbeat file not updated")
    settings = make_settings(state_dir)
    usage = VMUsage(uuid=UUID, machinetype="lhcb-prod", hostname=NAME, processors=8, start_time=int(T0 + 60),
                    end_time=int(T0 + 60 + 36000), cpu_seconds=int(0.5 * 36000 * 8), memory_mb=16384,
                    hs06_per_processor=10.5)
    result = account_vm(usage, settings, T0 + 86400)
    store.mark_accounted(finished, Accounted(time=T0 + 36100, archive=result.archive_path, queued=result.queue_name))

    receiver = SyslogReceiver([("127.0.0.1", 0)], {"169.254.169.4": machine.path}.get)
    for i in range(60):
        receiver.handle(b"<30>Jan 16 14:05:%02d vm pilot[42]: step %d\x1b[31m" % (i % 60, i), "169.254.169.4",
                        T0 + 120 + i)
    receiver.stop()

    os.makedirs(os.path.join(machine.path, "disks"), exist_ok=True)
    with open(os.path.join(machine.path, "disks", "root.qcow2"), "wb") as f:
        f.write(b"QFI\xfb" + b"\0" * 4096)
    keep_overlay(state_dir, machine.path, uuid=UUID, name=NAME, machinetype="lhcb-prod",
                 reason="killed: heartbeat_not_updated", now=T0 + 36100, days=7,
                 backing_file="/var/lib/vacfactory/imagecache/base-1.img")
    store.mark_cleaned(store.load(machine.path), T0 + 36100)

    libvirt = tmp_path / "libvirt-qemu"
    libvirt.mkdir()
    (libvirt / f"{NAME}.log").write_text(
        "2024-01-15 14:00:00.000+0000: starting up libvirt version: 9.0.0\n"
        f"/usr/bin/qemu-system-x86_64 -name guest={NAME} -uuid {OLDER}\n"
        "2024-01-16 13:00:00.000+0000: shutting down, reason=shutdown\n"
        "2024-01-16 14:02:59.000+0000: starting up libvirt version: 9.0.0\n"
        f"/usr/bin/qemu-system-x86_64 -name guest={NAME} -uuid {UUID}\n"
        "char device redirected to /dev/pts/3 \x1b[31m\n"
        "2024-01-17 00:03:59.000+0000: shutting down, reason=destroyed\n")
    return state_dir, str(libvirt), str(secret)


def test_collect_links_everything_about_one_vm(state):
    state_dir, libvirt, _ = state
    ev = collect(state_dir, UUID, libvirt_log_dir=libvirt, lines=5)
    assert (ev.uuid, ev.hostname, ev.machinetype, ev.state) == (UUID, NAME, "lhcb-prod", "done")
    assert ev.started == T0 + 60 and ev.end_time == T0 + 60 + 36000 and ev.wall_seconds == 36000
    assert ev.cpu_efficiency == pytest.approx(0.5)
    assert ev.finished["reason"] == "heartbeat_not_updated" and ev.finished["code"] == 700
    assert "token" not in ev.record and ev.record["address"] == "169.254.169.4"
    # the APEL record: the archive file, and the fields that tie it to this VM
    assert ev.apel_record.exists and ev.apel_record.path == ev.accounted["archive"]
    with open(ev.apel_record.path, "rb") as f:
        assert ev.apel_record.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert ev.apel_fields["LocalJobId"] == UUID and ev.apel_fields["Queue"] == "lhcb-prod"
    # libvirt: only this VM's start, not the older VM of the same name
    assert ev.libvirt_log.exists and ev.libvirt_log.path == os.path.join(libvirt, NAME + ".log")
    assert ev.libvirt_log_excerpt[0].endswith("starting up libvirt version: 9.0.0")
    assert any(UUID in line for line in ev.libvirt_log_excerpt)
    assert not any(OLDER in line for line in ev.libvirt_log_excerpt)
    assert "char device redirected to /dev/pts/3 #033[31m" in ev.libvirt_log_excerpt
    # console: the last lines, escaped
    assert ev.console_log.exists and ev.console_log.sha256
    assert ev.console_tail[-1] == "#033]0;owned#007#033[2Jlast \\xff line"
    assert ev.console_tail[0] == "boot line 96"
    # syslog
    assert [os.path.basename(f.path) for f in ev.syslog] == ["messages"] and ev.syslog[0].sha256
    assert len(ev.syslog_tail) == 5 and ev.syslog_tail[-1].endswith("pilot[42]: step 59#033[31m")
    # kept disks
    assert ev.kept_overlay["reason"] == "killed: heartbeat_not_updated"
    assert [os.path.basename(f.path) for f in ev.kept_disks] == ["root.qcow2"] and ev.kept_disks[0].size == 4100


def test_joboutputs_are_hashed_and_traps_are_listed_not_followed(state):
    state_dir, libvirt, secret = state
    ev = collect(state_dir, UUID, libvirt_log_dir=libvirt)
    files = {os.path.basename(f.path): f for f in ev.joboutputs}
    assert set(files) == {"shutdown_message", "pilot.log"}
    assert files["pilot.log"].sha256 == hashlib.sha256(b"pilot output\n" * 100).hexdigest()
    assert files["pilot.log"].size == 1300
    assert dict(ev.joboutputs_rejected) == {"evil-link": "symlink", "evil-fifo": "fifo"}
    with open(secret, "rb") as f:
        secret_hash = hashlib.sha256(f.read()).hexdigest()
    assert secret_hash not in json.dumps(ev.as_dict())


def test_found_by_prefix_and_by_hostname_newest_first(state):
    state_dir, _, _ = state
    assert find_machine(state_dir, UUID[:13])[0].endswith(UUID)
    with pytest.raises(AmbiguousMachine) as caught:
        find_machine(state_dir, "5d0c1a3e")
    assert set(caught.value.candidates) == {UUID, OLDER}
    path, others = find_machine(state_dir, NAME)
    assert path.endswith(UUID) and others == (OLDER,)
    assert find_machine(state_dir, "factory07-03") == (path, others)
    for unknown in ("ffffffff", "no-such-host", "../etc", ""):
        with pytest.raises(UnknownMachine):
            find_machine(state_dir, unknown)


def test_kept_disks_are_named_after_the_machine_directory_is_gone(state):
    state_dir, _, _ = state
    shutil.rmtree(os.path.join(state_dir, "machines", UUID))
    with pytest.raises(UnknownMachine) as caught:
        find_machine(state_dir, UUID)
    assert os.path.join(state_dir, "kept", UUID) in str(caught.value)
    assert "killed: heartbeat_not_updated" in str(caught.value)


def test_running_vm_shows_its_efficiency_so_far(tmp_path):
    state_dir = str(tmp_path / "state")
    store = MachineStore(state_dir)
    machine = store.mark_started(store.prepare(record(UUID, T0), {}, {}), T0)
    store.write_heartbeat(machine, T0 + 1000, 4000.0)
    ev = collect(state_dir, UUID, libvirt_log_dir=str(tmp_path))
    assert ev.state == "running" and ev.end_time is None and ev.finished is None
    assert ev.cpu_efficiency == pytest.approx(0.5) and ev.accounted is None
    assert not ev.console_log.exists and not ev.libvirt_log.exists and ev.syslog == () and ev.kept_overlay is None
    text = "\n".join(format_evidence(ev))
    assert "efficiency 50.0% (so far)" in text and "APEL record: not accounted yet" in text


def test_cli_prints_readably_and_as_json(state, capsys):
    state_dir, libvirt, _ = state
    assert cli.show(state_dir, NAME, as_json=False, lines=3, libvirt_log_dir=libvirt) == EXIT_OK
    text = capsys.readouterr().out
    assert f"uuid (MJF job_id, APEL LocalJobId): {UUID}" in text
    assert "outcome abort (heartbeat_not_updated); shutdown_message: 700 Heartbeat file not updated" in text
    assert "efficiency 50.0%" in text and f"older VMs with this name: {OLDER}" in text
    assert "rejected evil-link: symlink" in text and "kept disks: " in text
    assert "\x1b" not in text and "\x07" not in text
    assert cli.show(state_dir, UUID, as_json=True, libvirt_log_dir=libvirt) == EXIT_OK
    value = json.loads(capsys.readouterr().out)
    assert value["job_id"] == value["apel_local_job_id"] == value["uuid"] == UUID
    assert value["apel_fields"]["LocalJobId"] == UUID and value["cpu_efficiency"] == pytest.approx(0.5)
    assert TOKEN not in json.dumps(value)


def test_cli_exits_1_for_unknown_or_ambiguous(state, capsys):
    state_dir, _, _ = state
    assert cli.show(state_dir, "no-such-vm", as_json=False) == EXIT_FAILURE
    assert "no VM with this UUID" in capsys.readouterr().err
    assert cli.show(state_dir, "5d0c", as_json=True) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "matches 2 machines" in err and UUID in err


def test_the_machine_verb_through_main(state, tmp_path, capsys):
    state_dir, libvirt, _ = state
    conf = tmp_path / "vf.conf"
    conf.write_text(f"[settings]\nvac_space = vac01.example.com\nfactory_name = f.example.com\n"
                    f"state_dir = {state_dir}\ndomain_type = test\ntotal_processors = 4\n")
    assert main(["--config", str(conf), "machine", UUID[:8] + UUID[8:20], "--json", "-n", "2",
                 "--libvirt-log-dir", libvirt]) == EXIT_OK
    value = json.loads(capsys.readouterr().out)
    assert value["uuid"] == UUID and len(value["console_tail"]) == 2
    assert main(["--config", str(conf), "machine", "zzz"]) == EXIT_FAILURE
