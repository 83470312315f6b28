"""The real daemon (`vacfactory run` in a subprocess) with real TCG guests on qemu:///system.

- a 2-processor factory runs at least 4 VMs to completion and replaces each one promptly
  (cycle_seconds is 60, so a prompt refill proves the libvirt event drives it);
- after a drain by shutdown_time nothing is left behind: no domain, no disk (each VM has a
  qcow2 overlay on a root_image), no machine directory;
- `vacfactory drain` (``draining = yes`` in the runtime override) lets the running pilots (MJF
  over nfs-ganesha) finish their work and end with their own shutdown_message, creates no VM
  after it, and leaves no domain, disk, NFS export or (after retention) machine directory;
- kill -9 of the daemon while VMs run, then a restart: the same VMs, no duplicates, no zombies.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict

import pytest

from tests.waiting import scaled
from vacfactory.engine import naming
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import Machine, MachineStore
from tests.integration.realfactory import (
    PILOT, RealFactory, domains_named, ganesha_exports, nfs_port_holder, read, wait_for,
)

pytestmark = pytest.mark.integration

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")


class DaemonUnderTest:
    def __init__(self, workdir: str, tiny_guest, lifetime: int, total: int = 2, extra: str = "") -> None:
        # a root_image for every VM (so each has a qcow2 overlay to clean up); qemu runs as
        # libvirt-qemu, so workdir (with the disks) is searchable, unlike pytest's tmp_path
        self.base_image = os.path.join(workdir, "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.base_image, "4M"], check=True)
        os.chmod(self.base_image, 0o644)
        self.name = f"vfit{os.getpid()}x{int(time.time() * 1000) % 100000}.example.org"
        self.state_dir = os.path.join(workdir, "state")
        self.config = os.path.join(workdir, "vacfactory.conf")
        self.log = os.path.join(workdir, "daemon.log")
        with open(self.config, "w") as f:
            f.write(textwrap.dedent(f"""\
                [settings]
                vac_space = space.example.org
                factory_name = {self.name}
                state_dir = {self.state_dir}
                libvirt_uri = qemu:///system
                domain_type = qemu
                total_processors = {total}
                mb_per_processor = 256
                cycle_seconds = 60
                overload_per_processor = 50
                nfs_exporter = none
                {extra}

                [machinetype plain]
                target_share = 1
                machine_model = vm-raw
                root_image = {self.base_image}
                kernel_image = {tiny_guest.kernel}
                initrd_image = {tiny_guest.initrd}
                kernel_cmdline = console=ttyS0 quiet panic=-1 vf_lifetime={lifetime}
                fizzle_seconds = 1
                backoff_seconds = 1
                machines_dir_days = 0.0002
                """))
        self.process = None
        self.hypervisor = LibvirtHypervisor("qemu:///system")
        self.pattern = naming.domain_pattern(self.name)

    def start(self) -> None:
        log = open(self.log, "a")
        self.process = subprocess.Popen(
            [VACFACTORY, "--config", self.config, "run", "--log-level", "INFO"],
            stdout=log, stderr=subprocess.STDOUT,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=scaled(60))
        self.process = None

    def machines(self) -> Dict[str, Machine]:
        try:
            return MachineStore(self.state_dir, create=False).load_all()
        except Exception:  # the daemon has not made the directory yet
            return {}

    def domains(self):
        return [d for d in self.hypervisor.list_domains() if self.pattern.match(d.name)]

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL)
        for domain in self.domains():
            self.hypervisor.destroy(domain.uuid)
        self.hypervisor.close()


@pytest.fixture
def daemon_factory(tiny_guest):
    made = []
    workdir = tempfile.mkdtemp(prefix="vfit-")
    os.chmod(workdir, 0o755)

    def make(**kwargs) -> DaemonUnderTest:
        daemon = DaemonUnderTest(workdir, tiny_guest, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


def drain(daemon: DaemonUnderTest) -> None:
    with open(os.path.join(daemon.state_dir, "runtime.conf"), "w") as f:
        f.write(f"[settings]\nshutdown_time = {int(time.time())}\n")
    daemon.process.send_signal(signal.SIGHUP)  # re-read now rather than at the next event


def test_two_processors_run_vms_to_completion_refill_promptly_and_drain_clean(daemon_factory):
    d = daemon_factory(lifetime=3)
    d.start()
    finished = lambda: [m for m in d.machines().values() if m.finished is not None]  # noqa: E731
    overlays = set()  # VMs seen running with their root.qcow2 overlay

    def five_finished() -> bool:
        for m in d.machines().values():
            if m.finished is None and os.path.exists(os.path.join(m.disks_dir, "root.qcow2")):
                overlays.add(m.uuid)
        return len(finished()) >= 5

    wait_for(five_finished, 240, "5 VMs to finish", interval=0.25)
    assert len(overlays) >= 3, "the VMs ran on qcow2 overlays of the root_image"
    assert len(d.domains()) <= 2

    machines = sorted(d.machines().values(), key=lambda m: m.record.created)
    done = [m for m in machines if m.finished is not None]
    assert all(m.finished.outcome == "neutral" and m.finished.reason == "no_message" for m in done)
    assert all(m.accounted is not None and m.accounted.archive for m in done), "each VM gets an APEL record"
    # CPU time comes from libvirt: read at the guest's power-off when the event thread gets there
    # before qemu exits, else the last round's observation. A VM that lives its whole life between
    # two rounds on a loaded host can miss both (best effort, see libvirt_hv), so: some VM was
    # measured, and no VM's end lost CPU time that a round had seen.
    assert any(m.finished.cpu_seconds > 0 for m in done), "CPU time measured from libvirt"
    for m in done:
        seen = m.heartbeat.cpu_seconds if m.heartbeat else 0.0
        assert m.finished.cpu_seconds >= seen, f"{m.name}: ended with {m.finished.cpu_seconds} CPU-s, seen {seen}"

    # each slot's next VM started soon after the previous one ended (event-driven refill)
    gaps = []
    by_slot: Dict[int, list] = {}
    for m in machines:
        by_slot.setdefault(m.record.slot, []).append(m)
    for slot_machines in by_slot.values():
        for previous, following in zip(slot_machines, slot_machines[1:]):
            if previous.finished and following.started:
                gaps.append(following.started.time - previous.finished.end_time)
    assert len(gaps) >= 3
    median = statistics.median(gaps)
    print(f"refill gaps: median {median:.2f} s, max {max(gaps):.2f} s")
    # generous bounds, stretched on a busy host but capped well below what periodic rounds
    # would give (a median near cycle_seconds / 2 = 30 s), so they still prove that the stop
    # event drives the refill; the real figure (median < 1 s) is measured and printed with its
    # goal by `make bench`
    assert max(gaps) < min(scaled(15), 45), f"refill gaps {gaps} (cycle_seconds is 60: events must drive refills)"
    assert median < min(scaled(5), 20), f"median refill gap {median:.2f} s of {gaps}"

    drain(d)
    wait_for(lambda: not d.domains() and all(m.state == "done" for m in d.machines().values()), 90,
             "the drained factory to end and account every VM")
    time.sleep(1)
    assert d.domains() == []
    for m in d.machines().values():
        assert os.listdir(m.disks_dir) == [], f"{m.name} left disks behind"
    # retention (machines_dir_days = 0.0002, about 17 s) removes the finished directories
    wait_for(lambda: d.machines() == {}, 120, "machine directories to be removed after retention")
    d.stop()
    assert "Traceback" not in d.log_text()


def test_kill_9_and_restart_keeps_the_same_vms_without_duplicates_or_zombies(daemon_factory):
    d = daemon_factory(lifetime=300)
    d.start()
    wait_for(lambda: len([m for m in d.machines().values() if m.started]) == 2, 120, "2 running VMs")
    before = {m.uuid for m in d.machines().values() if m.live}
    d.stop(signal.SIGKILL)
    assert {dom.uuid for dom in d.domains()} == before, "kill -9 of the daemon leaves VMs running"

    d.start()
    # the first daemon's log has "engine started" and a decision too: wait for the second start's
    restarted = lambda: d.log_text().split("engine started")[2:]  # noqa: E731
    wait_for(lambda: restarted() and "decision:" in restarted()[-1], 60, "the restarted daemon to complete a round")
    time.sleep(3)
    assert {m.uuid for m in d.machines().values() if m.live} == before
    assert {dom.uuid for dom in d.domains()} == before
    assert len(d.machines()) == 2, "no VM was created twice"
    after_restart = d.log_text().split("engine started")[-1]
    assert "zombie" not in after_restart and "created plain" not in after_restart

    drain(d)
    wait_for(lambda: not d.domains(), 60, "drain to kill the long-lived VMs")
    wait_for(lambda: all(m.state == "done" for m in d.machines().values()), 30, "the killed VMs to be accounted")
    reasons = {m.finished.reason for m in d.machines().values()}
    assert reasons <= {"shutdown_time", "wallclock"}
    d.stop()


#: the drain test's pilots work this long; the drain comes while they work
DRAIN_PILOT_LIFETIME = 25


def test_draining_yes_lets_running_vms_end_by_themselves_and_leaves_nothing_behind(tiny_guest):
    holder = nfs_port_holder()
    if holder:
        pytest.fail(f"another NFS server holds 169.254.169.254:2049, where the factory's nfs-ganesha must bind: "
                    f"{holder}")
    workdir = tempfile.mkdtemp(prefix="vfit-")
    os.chmod(workdir, 0o755)
    f = RealFactory(workdir, "d")
    f.write_config("total_processors = 2\nnfs_exporter = ganesha\n", textwrap.dedent(f"""\
        [machinetype pilot]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {tiny_guest.kernel}
        initrd_image = {tiny_guest.initrd}
        kernel_cmdline = console=ttyS0 quiet panic=-1
        user_data = {PILOT}
        mjf_transport = nfs
        user_data_option_mjf = nfs
        user_data_option_outcome = 200 Success
        user_data_option_lifetime = {DRAIN_PILOT_LIFETIME}
        user_data_option_heartbeat_interval = 5
        heartbeat_file = heartbeat
        heartbeat_seconds = 60
        fizzle_seconds = 30
        backoff_seconds = 1
        machines_dir_days = 0.0002
        """))
    try:
        f.start()
        # both slots run a pilot that has mounted its NFS exports and reported its MJF
        working = lambda: [m for m in f.machines().values()  # noqa: E731
                           if m.started and m.finished is None
                           and os.path.exists(os.path.join(m.joboutputs_dir, "mjf_report"))]
        wait_for(lambda: len(working()) == 2, 120, "2 pilots at work", factory=f)
        before = {m.uuid: m for m in f.machines().values()}
        assert len(before) == 2
        assert len(ganesha_exports(f.state_dir)) == 6, "3 exports per running NFS VM"

        log_before = len(f.log_text())
        drained_at = time.time()
        done = subprocess.run([VACFACTORY, "--config", f.config, "drain"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "draining = yes" in read(os.path.join(f.state_dir, "runtime.conf"))
        f.sighup()

        wait_for(lambda: all(m.state == "done" for m in f.machines().values()), DRAIN_PILOT_LIFETIME + 90,
                 "the running VMs to end by themselves and be accounted", factory=f)
        # a few more rounds (cycle_seconds = 5) with both processors free: still nothing new
        time.sleep(12)
        after = f.log_text()[log_before:]
        assert "decision: draining" in after, after
        assert ": created pilot " not in after, f"a VM was created after the drain:\n{after}"
        machines = f.machines()
        assert set(machines) == set(before), "no VM was created after the drain"
        for m in machines.values():
            finished = m.finished
            # ended by itself, after the drain, with its own outcome: not killed, not stopped early
            assert (finished.reason, finished.code, finished.text) == ("shutdown_message", 200, "Success"), finished
            assert finished.end_time > drained_at
            console = read(m.console_log)
            assert "PILOT: shutdown_message: 200 Success" in console, console
            assert "stopping early" not in console
            assert f"{m.name}: killing" not in after
            assert m.accounted is not None and m.accounted.archive, f"{m.name} has no APEL record"
            assert os.listdir(m.disks_dir) == [], f"{m.name} left disks behind"

        assert f.domains() == [] and domains_named(f.name) == [], "no domain of the factory is left"
        assert ganesha_exports(f.state_dir) == [], "every NFS export was withdrawn"
        # retention (machines_dir_days = 0.0002, about 17 s; checked every minute)
        wait_for(lambda: f.machines() == {}, 120, "machine directories to be removed after retention", factory=f)
        assert os.listdir(os.path.join(f.state_dir, "machines")) == []
        f.stop()
        f.assert_alone()
        assert "Traceback" not in f.log_text()
    finally:
        f.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
