"""libvirtd outage: the hypervisor goes away for a while (2 minutes in the full profile) while
VMs run, then comes back. The factory must log it, keep answering VacQuery, create nothing
while blind, and then reconcile in one round without double-counting anything.

Two ways to take libvirtd away, neither touching the shared system daemon:

- test driver: a private libvirtd (tests/faults/libvirtd.py) is really stopped and started.
  Its domains live in that daemon's memory, so every VM ends at the stop: the factory must
  finish each of them exactly once when it can see again, ending them at their last sign of
  life (their console) rather than when it noticed, with exactly one APEL record each.
- real TCG VMs on qemu:///system behind a socket relay that drops every connection and
  refuses new ones for the outage: what a libvirtd restart looks like to the factory, while
  qemu keeps running as it does across a real restart. One VM outlives the outage and must be
  kept (not finished, not duplicated); one powers off during it and must be finished once,
  at its real end.

"Nothing created while blind" is measured from the moment libvirtd stops: the daemon is
frozen (SIGSTOP) for an instant while its machine directories and domains are listed and
libvirtd is taken away, so nothing it does can fall between the listing and the stop. A
creation already under way in the round that was running then fails against the missing
libvirtd (its directory is finished as a failed creation, never started); anything else new
after the stop, a directory or a domain, is a violation.

Recovery time: from libvirtd's return to the end of the first completed round, at which the
daemon is frozen (SIGSTOP, no event can start another round) and every invariant checked.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Set

import pytest

from tests.faults import invariants, profile
from tests.faults.daemons import (
    FactoryUnderTest,
    ask_responder,
    freeze_after_first_round,
    machines,
    Machinetype,
    guest_cmdline,
    heartbeat_time,
    make_fake_kernel,
    make_root_image,
    wait_for,
)
from tests.faults.guests import GroundTruth, SimulatedGuests
from tests.faults.libvirtd import PrivateLibvirtd, SocketRelay

OUTAGE_SECONDS = profile.pick(12.0, 120.0)
TCG_OUTAGE_SECONDS = profile.pick(16.0, 120.0)
BLIND_LOG = "hypervisor unreachable, creating nothing until it is back"


@dataclass
class AtStop:
    """What the factory had when libvirtd stopped."""

    time: float
    directories: Set[str]
    domains: Set[str]
    #: live VMs whose domain was running
    running: Set[str]


def take_libvirtd_away(factory: FactoryUnderTest, domains: Callable[[], Set[str]], stop: Callable[[], None]
                       ) -> AtStop:
    """Freeze the daemon, list what it has, ``stop()`` libvirtd, let the daemon go on."""
    factory.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.1)  # a libvirt call sent just before the freeze completes
        directories = set(os.listdir(os.path.join(factory.state_dir, "machines")))
        listed = domains()
        running = {m.uuid for m in machines(factory) if m.live and m.started is not None and m.uuid in listed}
        t_down = time.time()
        stop()
    finally:
        factory.process.send_signal(signal.SIGCONT)
    return AtStop(t_down, directories, listed, running)


def log_time(text: str, needle: str, after: float) -> Optional[float]:
    """The time of the first log line containing ``needle`` logged at or after ``after``."""
    for line in text.splitlines():
        if needle in line:
            try:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if stamp >= after - 0.001:
                return stamp
    return None


def created_while_blind(factory: FactoryUnderTest, at_stop: AtStop, lives, t_up: float) -> List[str]:
    """Machine directories and domains that appeared after libvirtd stopped, before it was back
    (except a creation under way at the stop: failed, never started, begun before the daemon
    noticed it was blind)."""
    problems = []
    blind_at = log_time(factory.log_text(), BLIND_LOG, at_stop.time)
    new = set(os.listdir(os.path.join(factory.state_dir, "machines"))) - at_stop.directories
    by_uuid = {m.uuid: m for m in machines(factory)}
    for uuid in sorted(new):
        m = by_uuid.get(uuid)
        if m is not None and m.record.created >= t_up:
            continue  # created once libvirtd was back
        if m is None or m.started is not None or uuid in lives or blind_at is None or m.record.created >= blind_at:
            problems.append(f"machine directory created while blind: {uuid} "
                            f"({m.state if m else 'unreadable'}, blind from {blind_at})")
    for uuid, life in lives.items():
        if uuid not in at_stop.domains and at_stop.time <= life.start < t_up:
            problems.append(f"{life.name}: domain {uuid} started at {life.start:.2f}, while blind")
    return problems


def outage_phase(factory: FactoryUnderTest, seconds: float, at_stop: AtStop, problems: List[str],
                 domains: Optional[Callable[[], Set[str]]] = None) -> int:
    """During the outage: the daemon lives, answers VacQuery and creates nothing (``domains``
    lists this factory's domains where the hypervisor itself is still up)."""
    if not at_stop.running:
        problems.append("no VM was running when libvirtd stopped: the outage tested nothing")
    t_down = at_stop.time
    answers = 0
    while time.time() < t_down + seconds:
        ok, text = ask_responder(factory)
        if not ok:
            problems.append(f"VacQuery unanswered during the outage: {text}")
        answers += ok
        if factory.process.poll() is not None:
            problems.append(f"the daemon died during the outage:\n{factory.log_tail()}")
            return answers
        time.sleep(min(3.0, max(0.0, t_down + seconds - time.time())))
    if domains is not None:
        started = domains() - at_stop.domains
        if started:
            problems.append(f"domains started while blind: {sorted(started)}")
    status = json.load(open(os.path.join(factory.state_dir, "status.json")))
    if not status.get("blind"):
        problems.append(f"status.json does not say blind during the outage: {status}")
    return answers


def check_log(factory: FactoryUnderTest, problems: List[str], outages: int = 1) -> None:
    text = factory.log_text()
    if text.count(BLIND_LOG) != outages:
        problems.append(f"expected the outage logged {outages} time(s) ({BLIND_LOG!r}), "
                        f"found {text.count(BLIND_LOG)}")
    if "hypervisor reachable again" not in text:
        problems.append("the return of the hypervisor was not logged")
    if "Traceback" in text:
        problems.append("a traceback in the log:\n" + factory.log_tail(60))
    # nothing finished or accounted twice: one "archived" line per VM (no crash here)
    archived = re.findall(r"([0-9a-f-]{36}): APEL record archived", text)
    twice = sorted({u for u in archived if archived.count(u) > 1})
    if twice:
        problems.append(f"VMs accounted more than once: {twice}")


@pytest.mark.timeout(profile.pick(600, 900))
def test_private_libvirtd_stopped_and_restarted(workdir):
    daemon = PrivateLibvirtd()
    daemon.start()
    sim = SimulatedGuests(daemon.uri)
    kernel = make_fake_kernel(workdir)
    image = make_root_image(workdir)
    factory = FactoryUnderTest(
        base=os.path.join(workdir, "outage"), uri=daemon.uri, domain_type="test", total_processors=4,
        prefix="vfout",
        machinetypes=[Machinetype("alpha", {
            "target_share": "1", "machine_model": "vm-raw", "kernel_image": kernel, "root_image": image,
            "fizzle_seconds": "3", "max_wallclock_seconds": "3600", "backoff_seconds": "0",
            "machines_dir_days": "1"})],
    )
    sim.register(factory.name, factory.state_dir, lifetime=lambda r: r.uniform(2.0, 12.0),
                 message=lambda r: r.choice(["200 Success", None]))
    problems: List[str] = []
    recovery = None
    try:
        factory.spawn()
        assert wait_for(lambda: sum(m.finished is not None for m in machines(factory)) >= 3, 60), \
            "the factory never got going:\n" + factory.log_tail()
        at_stop = take_libvirtd_away(factory, lambda: {d.uuid for d in sim.domains(factory.name)}, daemon.stop)
        t_down = at_stop.time
        sim.mark_all_stopped(factory.name, t_down, "outage")
        victims = at_stop.running
        answers = outage_phase(factory, OUTAGE_SECONDS, at_stop, problems)
        sim.hold.set()  # no guest ends during the recovery round
        t_up = time.time()
        daemon.start()
        sim.step()  # the ground truth reconnects (and watches events) at once
        frozen = freeze_after_first_round(factory, since=t_down + 0.5)
        assert frozen is not None, "no round completed after libvirtd came back:\n" + factory.log_tail()
        round_time, round_end = frozen
        recovery = round_end - t_up
        sim.settle(factory.name)
        result = invariants.check(invariants.Context(
            state_dir=factory.state_dir, factory_name=factory.name, total_processors=4,
            domains=sim.hv.list_domains(), check_time=round_time, retention_seconds=factory.retention_seconds(),
            truth=sim.lives(factory.name), truth_complete=True, tolerance=1.0,
            default_fizzle=factory.fizzle_seconds()))
        problems += [f"after the first round back: {p}" for p in result.violations]
        problems += created_while_blind(factory, at_stop, sim.lives(factory.name), t_up)
        after = {m.uuid: m for m in machines(factory)}
        for uuid in victims:
            m = after[uuid]
            if m.finished is None:
                problems.append(f"{m.name}: ended with libvirtd but not finished by the first round back")
        factory.process.send_signal(signal.SIGCONT)
        sim.hold.clear()
        # it goes on working: new VMs run and end
        done = sum(m.finished is not None for m in after.values())
        if not wait_for(lambda: sum(m.finished is not None for m in machines(factory)) >= done + 3, 60):
            problems.append("no VM finished after the outage:\n" + factory.log_tail())
        sim.hold.set()
        factory.terminate()
        sim.settle(factory.name)
        final = invariants.check(invariants.Context(
            state_dir=factory.state_dir, factory_name=factory.name, total_processors=4,
            domains=sim.hv.list_domains(), check_time=heartbeat_time(factory.state_dir),
            retention_seconds=factory.retention_seconds(),
            truth=sim.lives(factory.name), truth_complete=True, tolerance=1.0,
            default_fizzle=factory.fizzle_seconds()))
        problems += [f"at the end: {p}" for p in final.violations]
        check_log(factory, problems)
    finally:
        factory.cleanup(sim.hv, remove=False)
        sim.close()
        daemon.remove()
    profile.record(profile.Row(
        fault="libvirtd outage: private test-driver libvirtd stopped", trials=1, failures=int(bool(problems)),
        worst_recovery_seconds=recovery, worst_recovery_rounds=1 if recovery is not None and not problems else None,
        notes=f"{OUTAGE_SECONDS:.0f} s down, {len(victims)} VMs ended with it, VacQuery answered {answers}x while blind",
        problems=problems))
    assert not problems, "\n".join(problems)


@pytest.mark.integration
@pytest.mark.timeout(profile.pick(600, 900))
def test_system_libvirtd_unreachable_with_real_tcg_vms(tiny_guest, workdir):
    relay = SocketRelay(os.path.join(workdir, "libvirt-relay.sock"))
    relay.start()
    image = make_root_image(workdir)
    outage = TCG_OUTAGE_SECONDS
    # vf_lifetime: the short VM powers off in the middle of the outage, the long one outlives it
    common = {"machine_model": "vm-raw", "kernel_image": tiny_guest.kernel, "initrd_image": tiny_guest.initrd,
              "root_image": image, "fizzle_seconds": "3", "backoff_seconds": "0", "machines_dir_days": "1",
              "max_wallclock_seconds": "3600", "target_share": "1"}
    factory = FactoryUnderTest(
        base=os.path.join(workdir, "tcg-outage"), uri=relay.uri, domain_type="qemu", total_processors=2,
        prefix="vftout",
        machinetypes=[
            Machinetype("short", dict(common, kernel_cmdline=guest_cmdline(int(outage / 2)))),
            Machinetype("long", dict(common, kernel_cmdline=guest_cmdline(int(outage * 2 + 60)))),
        ],
    )
    truth = GroundTruth("qemu:///system")
    truth.register(factory.name, factory.state_dir)
    problems: List[str] = []
    recovery = None
    answers = 0
    try:
        factory.spawn()
        def booted():
            vms = [m for m in machines(factory) if m.live and m.started is not None
                   and _console_has(m, "plain mode")]
            return vms if len(vms) == 2 else None

        running = wait_for(booted, 120, interval=0.5)
        assert running, "two booted VMs expected:\n" + factory.log_tail()
        by_type = {m.record.machinetype: m for m in running}
        listed = lambda: {d.uuid for d in truth.domains(factory.name)}  # noqa: E731 - the system libvirtd
        at_stop = take_libvirtd_away(factory, listed, relay.cut)
        t_down = at_stop.time
        if at_stop.running != {m.uuid for m in running}:
            problems.append(f"the two booted VMs were not both running at the stop: {sorted(at_stop.running)}")
        answers = outage_phase(factory, outage, at_stop, problems, domains=listed)
        short_life = truth.lives(factory.name).get(by_type["short"].uuid)
        if short_life is None or short_life.stop is None:
            problems.append("the short VM did not power off during the outage (timing)")
        t_up = time.time()
        relay.restore()
        frozen = freeze_after_first_round(factory, since=t_down + 0.5, timeout=120)
        assert frozen is not None, "no round completed after libvirtd came back:\n" + factory.log_tail()
        round_time, round_end = frozen
        recovery = round_end - t_up
        truth.settle(factory.name)
        result = invariants.check(invariants.Context(
            state_dir=factory.state_dir, factory_name=factory.name, total_processors=2,
            domains=truth.hv.list_domains(), check_time=round_time, retention_seconds=factory.retention_seconds(),
            truth=truth.lives(factory.name), truth_complete=True, tolerance=3.0, end_slack=10.0,
            default_fizzle=factory.fizzle_seconds()))
        problems += [f"after the first round back: {p}" for p in result.violations]
        problems += created_while_blind(factory, at_stop, truth.lives(factory.name), t_up)
        after = {m.uuid: m for m in machines(factory)}
        long_vm, short_vm = after[by_type["long"].uuid], after[by_type["short"].uuid]
        if not long_vm.live:
            problems.append(f"{long_vm.name}: the VM that outlived the outage was finished ({long_vm.finished})")
        if short_vm.live:
            problems.append(f"{short_vm.name}: the VM that ended during the outage is still live")
        factory.process.send_signal(signal.SIGCONT)
        factory.terminate()
        check_log(factory, problems)
    finally:
        factory.cleanup(truth.hv, remove=False)
        truth.close()
        relay.cut()
    profile.record(profile.Row(
        fault="libvirtd outage: system libvirtd unreachable, real TCG VMs", trials=1,
        failures=int(bool(problems)), worst_recovery_seconds=recovery,
        worst_recovery_rounds=1 if recovery is not None and not problems else None,
        notes=f"{outage:.0f} s unreachable, 1 VM outlived it, 1 ended in it, VacQuery answered {answers}x "
              f"while blind", problems=problems))
    assert not problems, "\n".join(problems)


def _console_has(machine, text: str) -> bool:
    try:
        with open(machine.console_log, errors="replace") as f:
            return text in f.read()
    except OSError:
        return False
