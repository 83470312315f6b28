"""Crash anywhere: kill -9 of a real ``vacfactory run`` at random moments and at every named
checkpoint (vacfactory/faults.py), then a restart; after its first round every invariant
(tests/faults/invariants.py) must hold.

Test driver: factories run against a private libvirtd (tests/faults/libvirtd.py), so their
domains outlive the killed process as real VMs do. Simulated guests print to their console
and power off after a random lifetime, some with a shutdown_message, some after their
wallclock limit (then the factory kills them): VMs end while the factory is alive, while it
is dead, and while it is in the middle of destroying, finishing, accounting or cleaning them.
Several factories ("lanes", each its own state directory and name) run trials in parallel.

Real TCG VMs: the same trials on qemu:///system with the tiny guest (integration), with
their MJF exported through nfs-ganesha (``nfs_exporter = ganesha``; one machinetype uses
``mjf_transport = nfs``): ganesha outlives every kill, as in production, and after each
restart it must export exactly the live NFS VMs (no leaked export of a VM that ended).
"""

from __future__ import annotations

import os
import random
import re
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from tests.faults import invariants, profile
from tests.faults.daemons import (
    FactoryUnderTest,
    Machinetype,
    guest_cmdline,
    nfs_port_holder,
    make_fake_kernel,
    make_root_image,
)
from tests.faults.guests import GroundTruth
from vacfactory.faults import POINTS

#: crash trials on the test driver: rounds over every checkpoint, plus random kills
CHECKPOINT_ROUNDS = profile.pick(2, 30)
RANDOM_KILLS = profile.pick(30, 220)
LANES = profile.pick(3, 4)
#: VM timing on the test driver (seconds): short, so every checkpoint comes within seconds
FIZZLE = 2
WALLCLOCK = 6
RETENTION_DAYS = 0.0001  # 8.6 s
#: how far the factory's record of a VM's start and end may be from the truth: the factory
#: stamps a stop event when it reads it, or notices a VM gone at its next round (1 s cycle)
TOLERANCE = 1.5
#: a VM that ends while its factory is dead ends at its last console line: the simulated guests
#: print every 0.2 s, but their thread can lag on a busy 2-core machine
END_SLACK = 2.0
#: how long an armed daemon may take to reach its checkpoint before it is killed anyway
CHECKPOINT_TIMEOUT = 30.0


@dataclass
class Trial:
    kind: str               # "checkpoint" or "random"
    point: str = ""         # NAME:N for checkpoints
    delay: float = 0.0      # random kills: seconds after the spawn
    reached: bool = True    # the armed checkpoint killed the daemon
    recovery: float = 0.0
    violations: List[str] = field(default_factory=list)
    lane: str = ""
    #: NFS exports that the check found live (ganesha trials)
    exports: int = 0

    @property
    def label(self) -> str:
        return self.point.split(":")[0] if self.kind == "checkpoint" else "random kill"


def plan(rng: random.Random, rounds: int, randoms: int, max_delay: float) -> List[Trial]:
    trials = [Trial("checkpoint", f"{point}:{rng.randint(1, 3)}") for _ in range(rounds) for point in POINTS]
    trials += [Trial("random", delay=rng.uniform(0.0, max_delay)) for _ in range(randoms)]
    rng.shuffle(trials)
    return trials


def run_trial(factory: FactoryUnderTest, truth: GroundTruth, trial: Trial, checkpoint_timeout: float,
              tolerance: float, end_slack: Optional[float] = None) -> None:
    """One fault and the restart after it; fills in ``trial``."""
    if trial.kind == "checkpoint":
        process = factory.spawn(crash_at=trial.point)
        try:
            status = process.wait(timeout=checkpoint_timeout)
        except subprocess.TimeoutExpired:  # the workload never got there
            status = None
        if status is None:
            trial.reached = False
            factory.kill()
        else:
            factory.process = None
            if status != -9:
                trial.violations.append(f"the daemon exited with status {status} instead of dying at "
                                        f"{trial.point}:\n{factory.log_tail()}")
    else:
        process = factory.spawn()
        time.sleep(trial.delay)
        if process.poll() is not None:
            trial.violations.append(f"the daemon died on its own (status {process.returncode}):\n"
                                    f"{factory.log_tail()}")
        factory.kill()
    recovery = factory.recover()
    if recovery.error:
        trial.violations.append(f"the restart failed: {recovery.error}\n{factory.log_tail()}")
        return
    trial.recovery = recovery.seconds
    # the listing first, then the truth's catching up: a domain that ends between the two is
    # missing from the listing and has its stop in the lives (the other order lost it)
    domains = truth.hv.list_domains()
    truth.settle(factory.name)
    result = invariants.check(invariants.Context(
        state_dir=factory.state_dir, factory_name=factory.name, total_processors=factory.total_processors,
        domains=domains, check_time=recovery.round_time,
        retention_seconds=factory.retention_seconds(), truth=truth.lives(factory.name),
        truth_complete=True, tolerance=tolerance, end_slack=end_slack, default_fizzle=factory.fizzle_seconds(),
        nfs_exporter=factory.nfs_exporter,
    ))
    trial.violations.extend(result.violations)
    trial.exports = len(invariants.ganesha_configured(factory.state_dir))


def _count(trials: List[Trial], kind: str, noun: str) -> str:
    n = sum(1 for t in trials if t.kind == kind)
    return f"{n} {noun}{'s' if n != 1 else ''}"


def summarize(fault: str, trials: List[Trial], notes: str) -> profile.Row:
    failed = [t for t in trials if t.violations]
    recoveries = [t.recovery for t in trials if not t.violations]
    by_label: Dict[str, List[Trial]] = {}
    for t in trials:
        by_label.setdefault(t.label, []).append(t)
    details = [["injection point", "trials", "reached", "failures", "median recovery s", "worst recovery s"]]
    for label in list(POINTS) + ["random kill"]:
        group = by_label.get(label, [])
        if group:
            times = [t.recovery for t in group if t.recovery]
            details.append([label, str(len(group)), str(sum(t.reached for t in group)),
                            str(sum(bool(t.violations) for t in group)),
                            f"{statistics.median(times):.2f}" if times else "-",
                            f"{max(times):.2f}" if times else "-"])
    row = profile.Row(
        fault=fault, trials=len(trials), failures=len(failed),
        worst_recovery_seconds=max(recoveries) if recoveries else None,
        worst_recovery_rounds=1 if recoveries else None,
        notes=notes,
        problems=[f"[{t.lane} {t.kind} {t.point or f'after {t.delay:.2f} s'}] " + "\n".join(t.violations[:80])
                  for t in failed[:10]],
        details=details,
    )
    profile.record(row)
    print(f"\n{fault}: {len(trials)} trials, {len(failed)} failed")
    for line in details:
        print(f"{line[0]:24} " + " ".join(f"{cell:>8}" for cell in line[1:]))
    return row


@pytest.mark.timeout(profile.pick(600, 3600))
def test_kill_9_at_random_moments_and_every_checkpoint_on_the_test_driver(private_libvirtd, guests, workdir):
    rng = random.Random(int(os.environ.get("VACFACTORY_FAULTS_SEED", "20261122")))
    image = make_root_image(workdir)
    kernel = make_fake_kernel(workdir)
    factories: List[FactoryUnderTest] = []
    for lane in range(LANES):
        common = {"machine_model": "vm-raw", "kernel_image": kernel, "fizzle_seconds": str(FIZZLE),
                  "max_wallclock_seconds": str(WALLCLOCK), "backoff_seconds": "0",
                  "machines_dir_days": str(RETENTION_DAYS)}
        factory = FactoryUnderTest(
            base=os.path.join(workdir, f"lane{lane}"), uri=private_libvirtd.uri, domain_type="test",
            total_processors=4, prefix="vfcrash",
            machinetypes=[
                Machinetype("alpha", dict(common, target_share="2", root_image=image, disk_gb_per_processor="1")),
                Machinetype("beta", dict(common, target_share="1")),
            ],
        )
        guests.register(
            factory.name, factory.state_dir,
            lifetime=lambda r: r.uniform(0.3, WALLCLOCK + 2.0),
            message=lambda r: r.choice(["200 Success", "200 Success", None, "300 Nothing to do", "500 Error"]),
        )
        factories.append(factory)
    trials = plan(rng, CHECKPOINT_ROUNDS, RANDOM_KILLS, max_delay=WALLCLOCK + 1.0)
    queues: List[List[Trial]] = [trials[i::LANES] for i in range(LANES)]
    errors: List[BaseException] = []

    def lane_main(factory: FactoryUnderTest, queue: List[Trial]) -> None:
        try:
            for trial in queue:
                trial.lane = factory.name.split(".")[0]
                run_trial(factory, guests, trial, CHECKPOINT_TIMEOUT, TOLERANCE, END_SLACK)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=lane_main, args=(f, q), daemon=True) for f, q in zip(factories, queues)]
    began = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for factory in factories:
            factory.cleanup(guests.hv, remove=False)
    elapsed = time.monotonic() - began
    assert not errors, errors
    lifecycles = sum(len(guests.lives(f.name)) for f in factories)
    unreached = Counter(t.point.split(":")[0] for t in trials if not t.reached)
    row = summarize(
        "crash: kill -9, test driver", trials,
        f"{len(POINTS)} checkpoints x {CHECKPOINT_ROUNDS} + {RANDOM_KILLS} random kills, "
        f"{lifecycles} VMs, {LANES} factories in parallel, {elapsed:.0f} s",
    )
    never = [p for p in POINTS if unreached[p] == sum(1 for t in trials if t.point.startswith(p + ":"))]
    assert not never, f"checkpoints never reached: {never}"
    assert row.failures == 0, "\n\n".join(row.problems)


# -- real TCG VMs ----------------------------------------------------------------------------

TCG_TRIALS = profile.pick(
    [("checkpoint", "account.written:1"), ("random", 7.0)],
    [("checkpoint", f"{p}:1") for p in POINTS] + [("random", d) for d in (2.0, 5.0, 9.0, 13.0)],
)


@pytest.mark.integration
@pytest.mark.timeout(profile.pick(600, 1800))
def test_kill_9_with_real_tcg_vms(tiny_guest, workdir):
    holder = nfs_port_holder()
    assert not holder, (f"another NFS server (not started by this test) holds 169.254.169.254:2049, where the "
                        f"factory's nfs-ganesha must bind: {holder}")
    image = make_root_image(workdir)
    common = {"machine_model": "vm-raw", "kernel_image": tiny_guest.kernel, "initrd_image": tiny_guest.initrd,
              "root_image": image, "fizzle_seconds": "3", "backoff_seconds": "0", "machines_dir_days": "0.0002"}
    factory = FactoryUnderTest(
        base=os.path.join(workdir, "tcg"), uri="qemu:///system", domain_type="qemu", total_processors=2,
        prefix="vftcg", settings={"nfs_exporter": "ganesha"},
        machinetypes=[
            # the guest stays in plain mode (guest_cmdline): it mounts nothing, but its exports
            # are made before its domain starts and must be withdrawn when it has ended
            Machinetype("short", dict(common, target_share="1", max_wallclock_seconds="120",
                                      kernel_cmdline=guest_cmdline(4), mjf_transport="nfs")),
            Machinetype("long", dict(common, target_share="1", max_wallclock_seconds="14",
                                     kernel_cmdline=guest_cmdline(300))),
        ],
    )
    truth = GroundTruth("qemu:///system")
    truth.register(factory.name, factory.state_dir)
    trials = [Trial(kind, point=arg if kind == "checkpoint" else "", delay=arg if kind == "random" else 0.0)
              for kind, arg in TCG_TRIALS]
    began = time.monotonic()
    try:
        for trial in trials:
            trial.lane = "tcg"
            # a guest prints "powering off", syncs (up to 5 s), powers off, and qemu exits 1-2 s
            # later: a VM that ends while the factory is dead ends at that console line
            run_trial(factory, truth, trial, checkpoint_timeout=120.0, tolerance=3.0, end_slack=10.0)
        vms = len(truth.lives(factory.name))
        log = factory.log_text()
    finally:
        factory.cleanup(truth.hv, remove=False)
        truth.close()
    # the export checks must not pass vacuously: NFS VMs were exported, and ended ones withdrawn
    exported = set(re.findall(r"nfs-ganesha: ([0-9a-f-]{36}): set 3 exports", log))
    withdrawn = set(re.findall(r"nfs-ganesha: ([0-9a-f-]{36}): removed exports", log))
    dropped = sum(int(n) for n in re.findall(r"dropping nfs-ganesha exports of (\d+) VMs", log))
    checked = sum(1 for t in trials if t.exports)
    row = summarize("crash: kill -9, real TCG VMs", trials,
                    f"{_count(trials, 'checkpoint', 'checkpoint')} + {_count(trials, 'random', 'random kill')}, "
                    f"{vms} VMs, {time.monotonic() - began:.0f} s; nfs-ganesha: {len(exported)} NFS VMs exported, "
                    f"{len(withdrawn)} withdrawn, {dropped} dropped at a restart, live exports checked "
                    f"after {checked} restarts")
    unreached = [t.point for t in trials if not t.reached]
    assert not unreached, f"checkpoints not reached: {unreached}"
    assert exported and (withdrawn or dropped), f"no NFS VM was exported and withdrawn:\n{log[-3000:]}"
    assert row.failures == 0, "\n\n".join(row.problems)
