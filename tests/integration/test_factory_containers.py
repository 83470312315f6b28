"""Docker machinetypes end to end: a real `vacfactory run` with real Podman containers (its
Docker-compatible API on a private socket, tests/podman_lab.py), and for the mixed factory
real TCG VMs beside them.

A container pilot reads its MJF and writes its heartbeat and shutdown_message through the
bind mounts, and is accounted once with the CPU time of its cgroup; the wallclock and
heartbeat limits stop it (SIGTERM, then a kill after container_stop_seconds); a restarted
daemon adopts the running containers; a zombie container is destroyed; VMs and containers
share one factory's processors by target share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid as uuidlib
from typing import Dict, List, Optional

import pytest

from tests import waiting
from tests.faults.daemons import guest_cmdline, heartbeat_time
from tests.faults.invariants import archive_records
from tests.integration.realfactory import free_udp_port, stop_daemon
from tests.podman_lab import BUSYBOX
from vacfactory.engine import naming
from vacfactory.hypervisor.base import BindSpec, ContainerSpec
from vacfactory.hypervisor.containers import ContainerHypervisor
from vacfactory.state.machines import Machine, MachineStore

pytestmark = pytest.mark.integration

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
IMAGE = f"docker://{BUSYBOX}"

#: a pilot: reads MJF, heartbeats, burns CPU for BURN s, rests, says 200 Success and exits
PILOT = """\
#!/bin/sh
set -u
JO=/var/spool/joboutputs
echo "hs06=$(cat /etc/machinefeatures/hs06) cpus=$(cat /etc/jobfeatures/allocated_cpu) \
job=$(cat /etc/jobfeatures/job_id) host=$(hostname)" > $JO/mjf_seen
ls / > $JO/root_listing
touch $JO/heartbeat
timeout ##user_data_option_burn## sh -c 'while :; do :; done'
touch $JO/heartbeat
sleep ##user_data_option_rest##
echo "200 Success" > $JO/shutdown_message
"""

#: a pilot that never ends by itself: it notes SIGTERM (a graceful stop) and exits on it
SLEEPER = """\
#!/bin/sh
JO=/var/spool/joboutputs
trap 'echo got TERM > $JO/term; exit 0' TERM
touch $JO/heartbeat
while :; do sleep 1; done
"""


class ContainerFactory:
    """One `vacfactory run` subprocess on the podman lab's socket (libvirt's test driver, or
    qemu:///system for a mixed factory)."""

    def __init__(self, workdir: str, tag: str, podman) -> None:
        self.name = f"vfdc{os.getpid()}{tag}.example.org"
        self.dir = os.path.join(workdir, tag)
        os.makedirs(self.dir, mode=0o755)
        os.chmod(self.dir, 0o755)
        self.state_dir = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "vacfactory.conf")
        self.log = os.path.join(self.dir, "daemon.log")
        self.podman = podman
        self.process: Optional[subprocess.Popen] = None
        self.runtime = ContainerHypervisor(podman.socket_path, owner=self.name)
        self.pattern = naming.domain_pattern(self.name)

    def write_config(self, machinetypes: str, settings: str = "", uri: str = "test:///default",
                     domain_type: str = "test", total: int = 2) -> None:
        text = textwrap.dedent(f"""\
            [settings]
            vac_space = space.example.org
            factory_name = {self.name}
            state_dir = {self.state_dir}
            libvirt_uri = {uri}
            domain_type = {domain_type}
            total_processors = {total}
            mb_per_processor = 128
            hs06_per_processor = 10
            overload_per_processor = 50
            cycle_seconds = 2
            nfs_exporter = none
            udp_port = {free_udp_port()}
            container_socket = {self.podman.socket_path}
            container_stop_seconds = 3
            """) + textwrap.dedent(settings) + "\n" + textwrap.dedent(machinetypes)
        with open(self.config + ".new", "w") as f:
            f.write(text)
        os.replace(self.config + ".new", self.config)

    def files(self, machinetype: str) -> str:
        path = os.path.join(self.state_dir, "machinetypes", machinetype, "files")
        os.makedirs(path, exist_ok=True)
        return path

    def write_file(self, machinetype: str, name: str, text: str) -> None:
        with open(os.path.join(self.files(machinetype), name), "w") as f:
            f.write(text)

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([VACFACTORY, "--config", self.config, "run", "--log-level", "DEBUG"],
                                            stdout=log, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_daemon(self.process, sig)
        self.process = None

    def cleanup(self) -> None:
        """Stop the daemon and remove every container of ours, running or exited."""
        self.stop()
        try:
            for container in self.containers():
                self.runtime.destroy(container.uuid)
            for name in self.podman_names():  # exited ones the stopped daemon had not removed yet
                self.podman.podman("rm", "-f", name, check=False)
            waiting.wait_for(lambda: not self.podman_names(), "our containers to be gone", 60)
        finally:
            self.runtime.close()

    def containers(self):
        return [d for d in self.runtime.list_domains() if self.pattern.match(d.name)]

    def podman_names(self) -> List[str]:
        """Our containers on the runtime, also those being stopped (renamed: <slot>-stopping-...)."""
        short = self.name.split(".")[0] + "-"
        return [n for n in self.podman.containers() if n.startswith(short)]

    def machines(self) -> Dict[str, Machine]:
        try:
            return MachineStore(self.state_dir, create=False).load_all()
        except Exception:  # noqa: BLE001 - not made yet
            return {}

    def of_type(self, machinetype: str) -> List[Machine]:
        return sorted((m for m in self.machines().values() if m.record.machinetype == machinetype),
                      key=lambda m: m.record.created)

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        parts = ["--- daemon log (tail)", self.log_text()[-5000:], "--- podman service", self.podman.log_tail()]
        for m in self.machines().values():
            parts.append(f"--- {m.name} {m.uuid} {m.record.machinetype} state={m.state} finished={m.finished}")
        return "\n".join(parts)

    def wait(self, condition, what: str, timeout: float = 60):
        """Wait for ``condition``; a daemon that died meanwhile fails the test at once."""
        def check():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the daemon died (status {self.process.returncode}) while waiting for "
                                     f"{what}\n{self.diagnostics()}")
            return condition()
        return waiting.wait_for(check, what, timeout, 0.3, details=self.diagnostics)


def machinetype(name: str, user_data: str, extra: str = "", share: int = 1) -> str:
    """A docker machinetype; ``extra`` lines (``key = value``) override the defaults."""
    options = {"target_share": str(share), "machine_model": "docker", "root_image": IMAGE,
               "user_data": user_data, "fizzle_seconds": "1", "backoff_seconds": "0",
               "max_wallclock_seconds": "600"}
    for line in textwrap.dedent(extra).splitlines():
        if line.strip():
            key, _, value = line.partition("=")
            options[key.strip()] = value.strip()
    return f"[machinetype {name}]\n" + "".join(f"{k} = {v}\n" for k, v in options.items())


_TAGS = iter(range(1000))


@pytest.fixture
def factory(tmp_path, podman):
    f = ContainerFactory(str(tmp_path), f"t{next(_TAGS)}", podman)
    try:
        yield f
    finally:
        f.cleanup()


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_a_container_pilot_reads_its_mjf_heartbeats_ends_and_is_accounted_once_with_cpu_time(factory):
    factory.write_config(machinetype("pilots", "pilot.sh", "user_data_option_burn = 3\n"
                                                          "user_data_option_rest = 4\n"), total=1)
    factory.write_file("pilots", "pilot.sh", PILOT)
    factory.start()
    first = factory.wait(lambda: [m for m in factory.of_type("pilots") if m.accounted is not None],
                         "the first container to end and be accounted", 120)[0]
    factory.stop()
    assert first.finished is not None and first.finished.outcome == "success", first.finished
    assert (first.finished.code, first.finished.reason) == (200, "shutdown_message")
    assert first.record.machine_model == "docker" and first.record.address is None
    # it read its MJF from the binds, and only the image's root is there (no host path)
    seen = read(os.path.join(first.joboutputs_dir, "mjf_seen")).split()
    assert seen == ["hs06=10.0", "cpus=1", f"job={first.uuid}", f"host={first.name}"]
    root = set(read(os.path.join(first.joboutputs_dir, "root_listing")).split())
    assert root <= {"bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "user_data", "var"}, root
    # accounted exactly once, with the CPU its cgroup used (3 s of spinning)
    records = archive_records(factory.state_dir)
    assert len(records.get(first.uuid, [])) == 1, records.get(first.uuid)
    cpu = int(records[first.uuid][0].fields["CpuDuration"])
    assert 2 <= cpu <= 10 and first.finished.cpu_seconds >= 2, (cpu, first.finished)
    # the container is gone, its machine directory (joboutputs) is kept
    factory.wait(lambda: first.name not in factory.podman_names() or
                 first.uuid not in {c.uuid for c in factory.containers()}, "the ended container to be removed")
    assert os.path.exists(os.path.join(first.joboutputs_dir, "shutdown_message"))


def test_wallclock_and_heartbeat_limits_stop_containers_gracefully(factory):
    factory.write_config(
        machinetype("walls", "sleeper.sh", "max_wallclock_seconds = 8\n")
        + machinetype("beats", "sleeper.sh", "heartbeat_file = heartbeat\nheartbeat_seconds = 4\n"
                                             "fizzle_seconds = 2\n"))
    for name in ("walls", "beats"):
        factory.write_file(name, "sleeper.sh", SLEEPER)
    factory.start()
    ended = {}
    for name, reason in (("walls", "wallclock"), ("beats", "heartbeat_not_updated")):
        ended[name] = factory.wait(
            lambda: [m for m in factory.of_type(name) if m.finished is not None and m.accounted is not None],
            f"a {name} container to be killed and accounted", 120)[0]
        assert ended[name].finished.reason.startswith(reason), ended[name].finished
    beats = ended["beats"]
    assert (beats.finished.code, beats.finished.text) == (700, "Heartbeat file not updated")
    for machine in ended.values():
        # SIGTERM first: the pilot noted it and exited on its own (container_stop_seconds = 3)
        factory.wait(lambda: os.path.exists(os.path.join(machine.joboutputs_dir, "term")),
                     f"{machine.name} to get SIGTERM")
        factory.wait(lambda: machine.uuid not in {c.uuid for c in factory.containers()},
                     f"{machine.name}'s container to be gone")
    assert "Traceback" not in factory.log_text()


def test_a_restarted_daemon_adopts_running_containers_and_destroys_a_zombie(factory):
    factory.write_config(machinetype("long", "sleeper.sh"))
    factory.write_file("long", "sleeper.sh", SLEEPER)
    factory.start()
    running = factory.wait(lambda: len(factory.containers()) == 2 and factory.containers(), "two containers")
    before = {c.uuid for c in running}
    factory.stop(signal.SIGKILL)  # the containers outlive the daemon, as VMs do
    assert {c.uuid for c in factory.containers()} == before
    # a container that looks like ours (our name pattern and label) but is no live machine:
    # a zombie (of a lost state directory, say); the restarted factory must destroy it
    zombie_dir = os.path.join(factory.dir, "zombie")
    os.makedirs(zombie_dir)
    zombie = ContainerSpec(name=naming.domain_name(factory.name, 7), uuid=str(uuidlib.uuid4()), image=BUSYBOX,
                           command=("sleep", "600"), processors=1, memory_mib=64,
                           binds=(BindSpec(zombie_dir, "/var/spool/joboutputs", readonly=False),))
    factory.runtime.create(zombie)
    restarted = time.time()
    factory.start()
    factory.wait(lambda: zombie.uuid not in {c.uuid for c in factory.containers()}, "the zombie to be destroyed")
    assert f"{zombie.name}: zombie domain" in factory.log_text()
    # the live ones were adopted, not duplicated or replaced
    factory.wait(lambda: (heartbeat_time(factory.state_dir) or 0) > restarted + 1, "a round after the restart")
    assert {c.uuid for c in factory.containers()} == before
    live = [m for m in factory.machines().values() if m.live]
    assert {m.uuid for m in live} == before and all(m.started is not None for m in live)
    # and they are still managed: a drain ends them, each accounted once
    subprocess.run([VACFACTORY, "--config", factory.config, "drain", "--at", "+1s"], check=True,
                   capture_output=True)
    factory.wait(lambda: all(m.accounted is not None for m in factory.machines().values()
                             if m.uuid in before), "the adopted containers to be drained and accounted", 120)
    records = archive_records(factory.state_dir)
    assert all(len(records.get(u, [])) == 1 for u in before), {u: len(records.get(u, [])) for u in before}


def test_vms_and_containers_share_the_processors_by_target_share(tmp_path, podman, tiny_guest):
    factory = ContainerFactory(str(tmp_path), "mix", podman)
    try:
        factory.write_config(
            machinetype("pilots", "sleeper.sh", share=1)
            + textwrap.dedent(f"""\
                [machinetype vms]
                target_share = 1
                machine_model = vm-raw
                kernel_image = {tiny_guest.kernel}
                initrd_image = {tiny_guest.initrd}
                kernel_cmdline = {guest_cmdline(600)}
                fizzle_seconds = 1
                backoff_seconds = 0
                max_wallclock_seconds = 600
                """),
            uri="qemu:///system", domain_type="qemu", total=2)
        factory.write_file("pilots", "sleeper.sh", SLEEPER)
        factory.start()
        # this machine has 2 processors (a qemu factory may not have more): one of each, by share
        live = factory.wait(lambda: (lambda ms: ms if len(ms) == 2 and all(m.started for m in ms) else None)(
            [m for m in factory.machines().values() if m.live]), "two machines running", 180)
        models = sorted(m.record.machine_model for m in live)
        assert models == ["docker", "vm-raw"], models
        assert sorted(m.record.slot for m in live) == [0, 1]
        assert len(factory.containers()) == 1
        out = subprocess.run([VACFACTORY, "--config", factory.config, "machines"], capture_output=True,
                             text=True, check=True).stdout
        assert out.splitlines()[-1] == "1 VM and 1 container on 2 of 2 processors (2 running, 0 starting)", out
    finally:
        factory.cleanup()
        from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor

        libvirt_hv = LibvirtHypervisor("qemu:///system")
        for domain in libvirt_hv.list_domains():
            if factory.pattern.match(domain.name):
                libvirt_hv.destroy(domain.uuid)
        libvirt_hv.close()


def test_config_check_online_asks_the_runtime_for_its_images(tmp_path, podman):
    """`config check --online`: the runtime answers; an image it lacks is a note (the factory
    pulls it), one it has is nothing; a socket nobody serves is an error."""
    factory = ContainerFactory(str(tmp_path), "cc", podman)
    try:
        factory.write_config(machinetype("have", "u") + machinetype("lack", "u").replace(
            IMAGE, "docker://localhost/vf-absent:1"))
        factory.write_file("have", "u", "#!/bin/sh\n")
        factory.write_file("lack", "u", "#!/bin/sh\n")
        done = subprocess.run([VACFACTORY, "--config", factory.config, "config", "check", "--online"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        notes = [line for line in (done.stdout + done.stderr).splitlines() if "root_image" in line]
        assert len(notes) == 1 and "[machinetype lack] root_image" in notes[0] and \
            "does not have localhost/vf-absent:1 yet" in notes[0], notes
        dead = os.path.join(str(tmp_path), "dead.sock")
        import socket as socketlib
        with socketlib.socket(socketlib.AF_UNIX) as unserved:
            unserved.bind(dead)  # a socket file nobody accepts on
            with open(factory.config) as f:
                text = f.read().replace(podman.socket_path, dead)
            with open(factory.config, "w") as f:
                f.write(text)
            done = subprocess.run([VACFACTORY, "--config", factory.config, "config", "check", "--online"],
                                  capture_output=True, text=True)
        assert done.returncode != 0 and "container_socket" in done.stdout + done.stderr, done.stdout + done.stderr
        assert "the container runtime does not answer" in done.stdout + done.stderr
    finally:
        factory.runtime.close()
