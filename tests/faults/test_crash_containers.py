"""Crash anywhere, with containers: kill -9 of a real ``vacfactory run`` whose machinetypes are
``machine_model = docker``, at every named checkpoint and at random moments, then a restart;
after its first round every invariant (tests/faults/invariants.py) must hold against the
ground truth the container runtime's own event stream gives.

The containers are real (Podman's Docker-compatible API, tests/podman_lab.py) and outlive
the killed daemon, as in production. Each one sleeps a random time and ends, with or without
a shutdown_message; some pass their wallclock limit and are killed by the factory; so they
end while the factory is alive, while it is dead, and in the middle of its destroying,
finishing, accounting or cleaning them. Several factories ("lanes") run in parallel, each on
its own state directory with its own owner label.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from typing import List

import pytest

from tests.faults import profile
from tests.faults.daemons import FactoryUnderTest, Machinetype
from tests.faults.guests import GroundTruth
from tests.faults.test_crash import CHECKPOINT_TIMEOUT, Trial, plan, run_trial, summarize
from tests.podman_lab import BUSYBOX, running_lab
from vacfactory.faults import POINTS
from vacfactory.hypervisor.containers import ContainerHypervisor

#: rounds over every checkpoint, plus random kills: at least 50 trials in either profile
CHECKPOINT_ROUNDS = profile.pick(2, 6)
RANDOM_KILLS = profile.pick(32, 120)
LANES = profile.pick(3, 4)
FIZZLE = 2
WALLCLOCK = 6
RETENTION_DAYS = 0.0001  # 8.6 s
#: a container's start and stop, as the runtime's events report them, against the factory's
#: record: the create call returns before the start event, a stop is stamped when it is read
TOLERANCE = 1.5
#: a container that ended while its factory was dead ends at its exit time (the runtime keeps
#: it until the factory's hypervisor removes it), read at the restart
END_SLACK = 2.0
#: each container's life: sleep a random time (at least 1 s, so the truth's listings, every
#: 0.2 s, see every container run even if its events lag), then end with a random outcome
COMMAND = ("/bin/sh -c 'touch /var/spool/joboutputs/heartbeat; sleep $((RANDOM % 8 + 1)).$((RANDOM % 10)); "
           "case $((RANDOM % 4)) in 0|1) echo \"200 Success\" > /var/spool/joboutputs/shutdown_message;; "
           "2) echo \"300 Nothing to do\" > /var/spool/joboutputs/shutdown_message;; esac'")


@pytest.fixture(scope="module")
def podman():
    with running_lab() as service:
        yield service


def explain(factory: FactoryUnderTest, truth: GroundTruth, trial: Trial) -> None:
    """A failed trial: every log line about the machines it names, and their true lives."""
    names = set(re.findall(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", " ".join(trial.violations)))
    if not names:
        return
    lives = truth.lives(factory.name)
    for uuid in sorted(names):
        life = lives.get(uuid)
        trial.violations.append(f"--- {uuid}: truth {life}")
        slot = life.name if life is not None else uuid
        trial.violations += [line for line in factory.log_text().splitlines() if uuid in line or slot in line
                             or line.startswith("====")][-60:]


@pytest.mark.timeout(profile.pick(900, 3600))
def test_kill_9_with_containers_at_random_moments_and_every_checkpoint(private_libvirtd, podman, workdir):
    rng = random.Random(int(os.environ.get("VACFACTORY_FAULTS_SEED", "20261207")))
    factories: List[FactoryUnderTest] = []
    truths: List[GroundTruth] = []
    for lane in range(LANES):
        common = {"machine_model": "docker", "root_image": f"docker://{BUSYBOX}", "container_command": COMMAND,
                  "fizzle_seconds": str(FIZZLE), "max_wallclock_seconds": str(WALLCLOCK),
                  "backoff_seconds": "0", "machines_dir_days": str(RETENTION_DAYS)}
        factory = FactoryUnderTest(
            base=os.path.join(workdir, f"dlane{lane}"), uri=private_libvirtd.uri, domain_type="test",
            total_processors=3, prefix="vfdcrash",
            settings={"container_socket": podman.socket_path, "container_stop_seconds": "0"},
            machinetypes=[Machinetype("alpha", dict(common, target_share="2")),
                          Machinetype("beta", dict(common, target_share="1"))],
        )
        # the truth watches the runtime, never removing what it sees end (the factory must find
        # what ended while it was dead, as in production)
        truth = GroundTruth(private_libvirtd.uri, poll_seconds=0.2,
                            hv=ContainerHypervisor(podman.socket_path, owner=factory.name, remove_exited=False))
        truth.register(factory.name, factory.state_dir)
        factories.append(factory)
        truths.append(truth)
    trials = plan(rng, CHECKPOINT_ROUNDS, RANDOM_KILLS, max_delay=WALLCLOCK + 1.0)
    queues: List[List[Trial]] = [trials[i::LANES] for i in range(LANES)]
    errors: List[BaseException] = []

    def lane_main(factory: FactoryUnderTest, truth: GroundTruth, queue: List[Trial]) -> None:
        try:
            for trial in queue:
                trial.lane = factory.name.split(".")[0]
                run_trial(factory, truth, trial, CHECKPOINT_TIMEOUT, TOLERANCE, END_SLACK)
                explain(factory, truth, trial)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=lane_main, args=(f, t, q), daemon=True)
               for f, t, q in zip(factories, truths, queues)]
    began = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for factory, truth in zip(factories, truths):
            factory.cleanup(truth.hv, remove=False)
            truth.close()
    elapsed = time.monotonic() - began
    assert not errors, errors
    lifecycles = sum(len(t.lives(f.name)) for f, t in zip(factories, truths))
    unreached = Counter(t.point.split(":")[0] for t in trials if not t.reached)
    row = summarize(
        "crash: kill -9, containers (Podman)", trials,
        f"{len(POINTS)} checkpoints x {CHECKPOINT_ROUNDS} + {RANDOM_KILLS} random kills, "
        f"{lifecycles} containers, {LANES} factories in parallel, {elapsed:.0f} s",
    )
    assert len(trials) >= 50
    assert lifecycles >= len(trials), f"only {lifecycles} containers ran in {len(trials)} trials"
    never = [p for p in POINTS if unreached[p] == sum(1 for t in trials if t.point.startswith(p + ":"))]
    assert not never, f"checkpoints never reached: {never}"
    assert row.failures == 0, "\n\n".join(row.problems)
