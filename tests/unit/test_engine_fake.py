"""The whole engine on the in-memory hypervisor (vacfactory/hypervisor/fake.py), no libvirt.

Real configuration files, state directory, VM boundary and APEL archive; the hypervisor is the
fake, so the tests can make VMs power off with a final CPU time, fail one creation of a round,
or make the hypervisor unreachable, and check what the engine asked of it. Also the seam's
rules: the daemon calls only what the Hypervisor protocol has, and the protocol's module does
not pull in the subprocess-running network module.
"""

from __future__ import annotations

import ast
import inspect
import os
import random
import subprocess
import sys

import pytest

from tests.unit.engine_harness import HOST, Clock, kernel_file, machinetype_text, settings_text
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.engine.accountant import Accountant
from vacfactory.engine.boundary import VMBoundary
from vacfactory.engine.factory import EngineParts, Environment, Factory
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.hypervisor.base import DomainEvent, Hypervisor
from vacfactory.hypervisor.fake import FakeHypervisor
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import MachineStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fake_engine(tmp_path):
    """fake_engine(total, extra) -> (factory, fake hypervisor, clock); VMs boot from an overlay
    on a root image (so every VM has a disk the hypervisor makes and removes)."""

    def build(total: int = 4, extra: str = ""):
        image = tmp_path / "root.img"
        image.write_bytes(b"\0" * 4096)
        text = settings_text("fake.example.org", str(tmp_path / "state"), total, "")
        text += machinetype_text("alpha", kernel_file(str(tmp_path)), 1, f"root_image = {image}\n{extra}")
        config_path = tmp_path / "vacfactory.conf"
        config_path.write_text(text)
        clock = Clock()
        hypervisor = FakeHypervisor(clock)
        return engine_on(str(config_path), hypervisor, clock), hypervisor, clock

    return build


def engine_on(config_path: str, hypervisor: FakeHypervisor, clock: Clock) -> Factory:
    """A started engine on the configuration at ``config_path`` and the fake hypervisor."""
    watcher = ConfigWatcher(ConfigSources.for_main_file(config_path), host_facts=HOST)
    state_dir = watcher.current.settings.state_dir
    factory = Factory(EngineParts(config_source=watcher, hypervisor=hypervisor, store=MachineStore(state_dir),
                                  builder=VMBuilder(state_dir), boundary=VMBoundary(),
                                  accountant=Accountant.for_config(watcher)),
                      Environment(host_processors=64, clock=clock, load_average=lambda: 0.0,
                                  rng=random.Random(3)))
    factory.start()
    return factory


def fake_restart(factory: Factory, hypervisor: FakeHypervisor, clock: Clock) -> Factory:
    """A new engine on the same state directory and hypervisor, as after kill -9 (the fixture
    keeps the configuration beside the state directory)."""
    config_path = os.path.join(os.path.dirname(factory.store.state_dir), "vacfactory.conf")
    return engine_on(config_path, hypervisor, clock)


def archived(factory) -> list:
    found = []
    for root, _dirs, files in os.walk(os.path.join(factory.store.state_dir, "apel-archive")):
        found += [name for name in files if not name.startswith(".")]
    return found


def test_a_round_starts_every_vm_with_the_disks_the_hypervisor_made(fake_engine):
    factory, hv, _clock = fake_engine(total=4)
    report = factory.run_round()
    assert len(report.created) == 4 and sorted(hv.calls) == sorted(f"create {n}" for n in report.created)
    for machine in factory.machines.values():
        assert machine.started is not None
        # the spec described the overlay; the hypervisor made it in the machine directory
        assert os.listdir(machine.disks_dir) == ["root.qcow2"]
        (disk,) = hv.specs[machine.uuid].disks
        assert type(disk.source).__name__ == "Overlay"


def test_a_vm_that_powers_off_is_finished_with_its_final_cpu_accounted_cleaned_and_replaced(fake_engine):
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (vm,) = factory.machines.values()
    clock.advance(600)
    hv.power_off(vm.uuid, cpu_seconds=420.0)
    clock.advance(1)
    report = factory.run_round()
    done = factory.machines[vm.uuid]
    assert done.finished.end_time == vm.started.time + 600  # stamped when the stop event came
    assert done.finished.cpu_seconds == 420.0
    assert done.state == "done" and archived(factory) == [vm.uuid]
    assert os.listdir(done.disks_dir) == []  # removed by the hypervisor
    assert len(report.created) == 1 and report.created[0] == vm.name  # its slot, again
    entry = factory.vms[vm.uuid]
    assert (entry.stop_time, entry.final_cpu, entry.seen_running) == (None, None, False)


def test_a_missed_final_cpu_read_falls_back_to_the_last_round_not_the_older_heartbeat(fake_engine):
    # on a starved host the read at power-off can come after qemu has exited (no CPU time);
    # the heartbeat file is written at most every 10 s, but every round's listing counts
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (vm,) = factory.machines.values()
    clock.advance(20)
    hv.set_cpu(vm.uuid, 7.0)
    factory.run_round()
    assert factory.machines[vm.uuid].heartbeat.cpu_seconds == 7.0
    clock.advance(3)  # a round within HEARTBEAT_WRITE_SECONDS: listed, no heartbeat written
    hv.set_cpu(vm.uuid, 9.5)
    factory.run_round()
    assert factory.machines[vm.uuid].heartbeat.cpu_seconds == 7.0
    clock.advance(2)
    hv.power_off(vm.uuid, cpu_seconds=None)
    factory.run_round()
    assert factory.machines[vm.uuid].finished.cpu_seconds == 9.5
    assert factory.vms[vm.uuid].seen_cpu is None  # forgotten once the end is recorded


def test_one_failed_start_in_a_parallel_round_fails_only_that_vm(fake_engine):
    factory, hv, _clock = fake_engine(total=4)
    hv.fail_creates["-02."] = "no room for qemu"
    report = factory.run_round()
    assert len(report.created) == 3 and report.failed == ["alpha"]
    failed = [m for m in factory.machines.values() if m.finished is not None]
    (vm,) = failed
    assert "-02." in vm.name and vm.finished.outcome == "failed" and vm.state == "done"
    assert len(hv.domains) == 3 and archived(factory) == []
    hv.fail_creates.clear()
    assert len(factory.run_round().created) == 1  # the engine goes on


def test_while_the_hypervisor_is_unreachable_nothing_is_finished_or_created(fake_engine):
    factory, hv, clock = fake_engine(total=2)
    factory.run_round()
    first = sorted(factory.machines.values(), key=lambda m: m.name)[0]
    hv.reachable = False
    clock.advance(300)
    report = factory.run_round()
    assert report.blind and not report.created and not report.finished
    hv.reachable = True
    hv.domains.pop(first.uuid)  # it died with the hypervisor, silently
    clock.advance(300)
    report = factory.run_round()
    assert report.finished == [first.name]
    # unobserved: it ended at its last sign of life, not when the engine could see again
    assert factory.machines[first.uuid].finished.end_time <= first.started.time + 300


def test_an_event_for_a_vm_that_is_not_live_leaves_nothing_behind(fake_engine):
    factory, hv, clock = fake_engine(total=1, extra="max_wallclock_seconds = 100\n")
    factory.run_round()
    (vm,) = factory.machines.values()
    clock.advance(200)
    report = factory.run_round()  # killed at its wallclock limit; the destroy's event comes after
    assert report.killed == [vm.name]
    entry = factory.vms[vm.uuid]
    assert not entry.live and entry.stop_time is None and entry.final_cpu is None
    factory.on_event(DomainEvent(uuid="4f0c0c52-0000-4000-8000-000000000001", name="other-00.example.org",
                                 kind="stopped", time=clock(), cpu_seconds=5.0))  # another factory's VM
    assert "4f0c0c52-0000-4000-8000-000000000001" not in factory.vms


# -- the seam ----------------------------------------------------------------------------------


def protocol_methods():
    return {name for name, _ in inspect.getmembers(Hypervisor, inspect.isfunction) if not name.startswith("_")}


@pytest.mark.parametrize("implementation", [FakeHypervisor, LibvirtHypervisor])
def test_every_hypervisor_implements_the_whole_protocol(implementation):
    assert {"create", "destroy", "list_domains", "remove_disks", "describe", "close"} <= protocol_methods()
    missing = {name for name in protocol_methods() if not callable(getattr(implementation, name, None))}
    assert missing == set()


def test_the_daemon_and_the_engine_call_only_what_the_protocol_has():
    used = set()
    for path in ("vacfactory/daemon.py", *(os.path.join("vacfactory/engine", f)
                                           for f in os.listdir(os.path.join(REPO, "vacfactory/engine")))):
        if not path.endswith(".py"):
            continue
        with open(os.path.join(REPO, path)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "hypervisor"):
                used.add(node.attr)
    assert used and used <= protocol_methods(), used - protocol_methods()


def test_the_protocol_module_does_not_import_the_network_module():
    code = ("import sys, vacfactory.hypervisor.base, vacfactory.engine.vmbuild; "
            "print('vacfactory.hypervisor.network' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_a_stop_event_racing_with_the_end_of_a_vm_leaves_no_fact_behind(fake_engine):
    """The event thread and the engine meet only in VMTable: facts noted while the VM is live
    go with its end; facts noted after it are dropped (the soak once found them piling up)."""
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (vm,) = factory.machines.values()
    entry = factory.vms[vm.uuid]
    factory.vms.note_stop(vm.uuid, clock(), 12.0)  # arrives while the VM is still live
    assert (entry.stop_time, entry.final_cpu) == (clock(), 12.0)
    ended = factory.store.mark_finished(entry.machine, factory.finisher.ending(entry, clock(), None, None))
    factory.vms.note_stop(vm.uuid, clock(), 13.0)  # a late duplicate, before the engine took the end in
    factory.vms.ended(entry, ended)
    assert (entry.stop_time, entry.final_cpu, entry.seen_running) == (None, None, False)
    factory.vms.note_stop(vm.uuid, clock() + 1, 14.0)  # and after
    assert (entry.stop_time, entry.final_cpu) == (None, None) and not entry.live


def test_a_stop_found_late_ends_the_vm_when_the_runtime_says_it_stopped(fake_engine):
    """A container that exited while the daemon was down: the listing that finds it gives a
    stopped event with the runtime's exit time (``at``); the VM ends then, not at its last
    sign of life or when the engine saw it gone. An ``at`` in the future is the engine's now."""
    factory, hv, clock = fake_engine(total=2)
    factory.run_round()
    first, second = sorted(factory.machines.values(), key=lambda m: m.name)
    clock.advance(120)
    factory.run_round()
    exited = clock() - 50
    for vm, at in ((first, exited), (second, clock() + 3600)):
        hv.domains.pop(vm.uuid)  # gone, and no event while nobody listened
        factory.on_event(DomainEvent(uuid=vm.uuid, name=vm.name, kind="stopped", time=clock(), at=at))
    clock.advance(5)
    report = factory.run_round()
    assert sorted(report.finished) == sorted([first.name, second.name])
    assert factory.machines[first.uuid].finished.end_time == exited
    assert factory.machines[second.uuid].finished.end_time == clock() - 5  # not in the future


@pytest.mark.parametrize("evidence", ["console log", "stop event"])
def test_a_vm_that_started_unrecorded_and_ended_while_the_daemon_was_down_is_accounted(fake_engine, evidence):
    """Killed between the domain's start and its `started` record, the daemon came back after
    the VM had ended (a loaded host, a short-lived container): its domain is gone, but it ran.
    It must be adopted, finished and accounted like any VM, not cleaned as an interrupted
    creation. The signs: qemu's console log, or the runtime's stop event with its exit time."""
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (vm,) = factory.machines.values()
    os.unlink(os.path.join(vm.path, "started"))  # the crash: started, not recorded
    factory.stop()
    clock.advance(300)
    hv.domains.pop(vm.uuid)  # it powered off while nobody listened
    exited = clock() - 20
    if evidence == "console log":
        with open(vm.console_log, "w") as f:
            f.write("booted\n")
        os.utime(vm.console_log, (exited, exited))
    again = fake_restart(factory, hv, clock)
    if evidence == "stop event":  # what the container runtime's first listing delivers
        again.on_event(DomainEvent(uuid=vm.uuid, name=vm.name, kind="stopped", time=clock(), at=exited))
    clock.advance(1)
    report = again.run_round()
    assert report.adopted == [vm.name] and vm.name in report.finished
    done = again.machines[vm.uuid]
    assert done.started.time == vm.record.created and done.finished.end_time == exited
    assert done.finished.outcome != "failed" and done.accounted.archive is not None
    assert archived(again) == [vm.uuid]


def test_a_vm_with_no_sign_that_it_ran_is_an_interrupted_creation(fake_engine):
    factory, hv, clock = fake_engine(total=1)
    factory.run_round()
    (vm,) = factory.machines.values()
    os.unlink(os.path.join(vm.path, "started"))
    factory.stop()
    hv.domains.pop(vm.uuid)  # the crash came before the domain started: no console log
    again = fake_restart(factory, hv, clock)
    clock.advance(1)
    report = again.run_round()
    assert report.adopted == [] and archived(again) == []
    done = again.machines[vm.uuid]
    assert done.finished.outcome == "failed" and done.accounted.skipped == "never started"
