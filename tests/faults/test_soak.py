"""Soak: a simulated day (full profile; an eighth of one in the short profile) of a busy
factory: the engine in this process on libvirt's test driver, its clock accelerated (30 s per
round, as fast as the engine goes).

Guests end every way a VM ends: success, "nothing to do" (the machinetype backs off), a
fizzle, or their wallclock limit (the factory kills them). Every SAMPLE_EVERY lifecycles:
every invariant is checked against the ground truth of the VMs that ended since the last
sample (which is then dropped, so the test's own memory stays flat too), and the process's
open file descriptors, resident memory and threads, the engine's tables (and entries in them
about VMs that have ended), the machine directories and the whole state directory are
sampled; then a consumer takes the outgoing APEL queue as ssmsend would. After a warm-up of
two retention periods they must stay flat: the machine directories bounded by
machines_dir_days and none of them growing, everything else in the state directory (status
files, ``finishes/``, what the consumer leaves of ``apel-outgoing/``) constant in size. Only
the APEL archive grows, by design.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import random
import time
from dataclasses import dataclass
from typing import List

import pytest

from tests.faults import invariants, profile
from tests.faults.engine import Guest, fake_kernel, make_engine
from vacfactory.accounting.outgoing import OutgoingQueue
from vacfactory.engine.factory import RETENTION_SECONDS

DAY = 86400.0
SIMULATED_SECONDS = profile.pick(DAY / 8, DAY)
MIN_LIFECYCLES = profile.pick(1000, 10000)
TOTAL = 96
STEP = 30.0
FIZZLE = 60
RETENTION_DAYS = 0.03  # 43 minutes
SAMPLE_EVERY = profile.pick(150, 500)
#: flatness after warm-up
MAX_FD_SPREAD = 2
MAX_THREAD_SPREAD = 1
MAX_RSS_KIB_PER_1000 = 256
MAX_STALE_ENTRIES = 8
#: outside machines/ and the archive (status files, finishes/, apel-outgoing/ once consumed)
MAX_OTHER_BYTES_SPREAD = 64 * 1024
MAX_OTHER_ENTRIES_SPREAD = 8
#: the mean size of a machine directory must not creep up
MAX_DIR_BYTES_RATIO = 1.5


@dataclass
class Sample:
    lifecycles: int
    simulated: float
    fds: int
    rss_kib: int
    threads: int
    machine_dirs: int
    machines_bytes: int
    #: the whole state directory but the APEL archive (which grows by design)
    state_bytes: int
    #: files and directories outside machines/ and the archive, and their bytes
    other_entries: int
    other_bytes: int
    finishes_entries: int
    #: what is left in apel-outgoing/ once the consumer has taken every element
    outgoing_entries: int
    #: the engine's entries (one VMEntry per VM: its machine, shutdown time, events, ...)
    engine_tables: int
    #: of those, entries about VMs that are no longer live (must not pile up)
    stale_entries: int
    violations: int


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _tree(path: str, skip: tuple = ()) -> tuple:
    """(bytes of the files, files and directories) under ``path``, leaving out ``skip``."""
    total = entries = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        entries += len(dirs) + len(files)
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total, entries


def consume_queue(path: str, sent: set) -> int:
    """Take every element of the outgoing queue as ssmsend does (lock, read, remove, then
    purge); the VM uuids taken go into ``sent``. How many were taken."""
    queue = OutgoingQueue(path)
    taken = 0
    for name in list(queue.names()):
        if queue.lock(name):
            for record in invariants.parse_record(queue.get_locked(name).decode("ascii")):
                sent.add(record.get("LocalJobId"))
            queue.remove_locked(name)
            taken += 1
    queue.purge()
    return taken


def _slope(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def check_isolated(ctx: invariants.Context) -> invariants.Result:
    """The checker in a forked child: it reads every record of the day, and the memory that
    takes would otherwise be this process's resident memory, which must stay flat."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only reads files; it never touches libvirt or logging
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as f:
                f.write(pickle.dumps(invariants.check(ctx)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        return invariants.Result(["the checker process failed"], {})
    return pickle.loads(data)


@pytest.mark.timeout(profile.pick(600, 1800))
def test_a_simulated_day_of_lifecycles_keeps_resources_flat(tmp_path):
    rng = random.Random(11)
    kernel = fake_kernel(str(tmp_path))
    common = {"machine_model": "vm-raw", "kernel_image": kernel, "fizzle_seconds": str(FIZZLE),
              "max_wallclock_seconds": "900", "backoff_seconds": "120",
              "machines_dir_days": str(RETENTION_DAYS)}
    machinetypes = {"alpha": dict(common, target_share="2"), "beta": dict(common, target_share="1")}

    def fate(machine, now) -> Guest:
        born = machine.started.time if machine.started else now
        roll = rng.random()
        if roll < 0.55:
            return Guest(end=born + rng.uniform(120, 900), message="200 Success", heartbeat_every=None)
        if roll < 0.65:
            return Guest(end=born + rng.uniform(60, 300), message="300 Nothing to do", heartbeat_every=None)
        if roll < 0.70:  # powers off at the first chance (30 s): a fizzle
            return Guest(end=born + rng.uniform(5, FIZZLE - 10), message=None, heartbeat_every=None)
        return Guest(end=None, heartbeat_every=None)  # killed at its wallclock limit

    engine = make_engine(str(tmp_path), total=TOTAL, machinetypes=machinetypes, fate=fate)
    factory = engine.factory
    # thousands of log records would be kept by pytest's log capture and count as our memory
    quiet = logging.getLogger("vacfactory")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    samples: List[Sample] = []
    problems: List[str] = []
    outcomes: dict = {}
    began = time.monotonic()
    simulated = 0.0
    sent: set = set()  # VMs whose record the consumer took from the queue

    def check_and_sample() -> Sample:
        """Every invariant for the VMs that ended since the last sample, then the resources."""
        truth = dict(engine.lives)
        result = check_isolated(invariants.Context(
            state_dir=engine.state_dir, factory_name=engine.name, total_processors=TOTAL,
            domains=engine.hypervisor.list_domains(), check_time=engine.clock.now,
            retention_seconds={mt: RETENTION_DAYS * DAY for mt in machinetypes},
            retention_slack=RETENTION_SECONDS + STEP, truth=truth, tolerance=0.5, default_fizzle=FIZZLE,
            sent=sent))
        problems.extend(f"after {engine.ended} lifecycles: {v}" for v in result.violations[:10])
        for uuid, life in truth.items():
            if life.stop is not None:
                machine = factory.machines.get(uuid)
                if machine is not None and machine.finished is not None:
                    outcomes[machine.finished.outcome] = outcomes.get(machine.finished.outcome, 0) + 1
        engine.forget([u for u, life in truth.items() if life.stop is not None])
        gc.collect()
        # one entry per VM (engine.entries): what it holds about a VM that ended is stale
        tables = [factory.machines]
        stale = sum(1 for entry in factory.vms if not entry.live and (
            entry.stop_time is not None or entry.final_cpu is not None or entry.seen_running
            or entry.unrecorded is not None or entry.accounting_failed))
        # after the check (every record was seen in the queue), ssmsend takes the queue
        outgoing = os.path.join(engine.state_dir, "apel-outgoing")
        consume_queue(outgoing, sent)
        machines_dir = os.path.join(engine.state_dir, "machines")
        archive = os.path.join(engine.state_dir, "apel-archive")
        machines_bytes, _ = _tree(machines_dir)
        state_bytes, _ = _tree(engine.state_dir, skip=(archive,))
        other_bytes, other_entries = _tree(engine.state_dir, skip=(archive, machines_dir))
        return Sample(engine.ended, simulated, len(os.listdir("/proc/self/fd")), _status("VmRSS"),
                      _status("Threads"), len(os.listdir(machines_dir)), machines_bytes, state_bytes,
                      other_entries, other_bytes, _tree(os.path.join(engine.state_dir, "finishes"))[1],
                      _tree(outgoing)[1], sum(map(len, tables)), stale, len(result.violations))

    try:
        next_sample = 0
        while simulated < SIMULATED_SECONDS or engine.ended < MIN_LIFECYCLES:
            engine.step(STEP)
            simulated += STEP
            if engine.ended >= next_sample:
                samples.append(check_and_sample())
                next_sample += SAMPLE_EVERY
            if simulated > 2 * DAY:
                problems.append(f"only {engine.ended} lifecycles in two simulated days")
                break
        samples.append(check_and_sample())
        engine_seconds = time.monotonic() - began
    finally:
        quiet.setLevel(level)
        engine.teardown()

    rate = engine.ended / simulated
    retention = RETENTION_DAYS * DAY + RETENTION_SECONDS + STEP
    warm_up = 2 * retention  # the first deletions come one retention period after the first ends
    # the machine directories retention allows at that rate (plus the live ones)
    allowed_dirs = int(1.25 * rate * retention) + TOTAL
    warm = [s for s in samples if s.simulated >= warm_up]
    assert len(warm) >= 5, f"too few samples after warm-up: {samples}"
    fd_spread = max(s.fds for s in warm) - min(s.fds for s in warm)
    thread_spread = max(s.threads for s in warm) - min(s.threads for s in warm)
    rss_per_k = 1000 * _slope([s.lifecycles for s in warm], [s.rss_kib for s in warm])
    tables = [s.engine_tables for s in warm]
    if fd_spread > MAX_FD_SPREAD:
        problems.append(f"open file descriptors not flat: {[s.fds for s in warm]}")
    if thread_spread > MAX_THREAD_SPREAD:
        problems.append(f"threads not flat: {[s.threads for s in warm]}")
    if rss_per_k > MAX_RSS_KIB_PER_1000:
        problems.append(f"resident memory grows {rss_per_k:.0f} KiB per 1000 lifecycles: "
                        f"{[s.rss_kib for s in warm]} KiB")
    if max(s.stale_entries for s in warm) > MAX_STALE_ENTRIES:
        problems.append(f"the engine keeps entries about VMs that ended: {[s.stale_entries for s in warm]}")
    if max(s.machine_dirs for s in warm) > allowed_dirs:
        problems.append(f"machine directories beyond retention: {[s.machine_dirs for s in warm]} "
                        f"(allowed {allowed_dirs})")
    # one entry per machine directory (those are bounded by retention, above), none beyond
    if any(s.engine_tables > s.machine_dirs for s in warm):
        problems.append(f"the engine keeps entries for VMs whose directory is gone: entries {tables}, "
                        f"directories {[s.machine_dirs for s in warm]}")
    # the state directory but the archive: bounded, since machine directories are (above), none
    # of them grows, and nothing else does
    per_dir = [s.machines_bytes / max(1, s.machine_dirs) for s in warm]
    if max(per_dir) > MAX_DIR_BYTES_RATIO * min(per_dir):
        problems.append(f"machine directories grow: mean bytes {[int(b) for b in per_dir]}")
    other_bytes, other_entries = [s.other_bytes for s in warm], [s.other_entries for s in warm]
    if max(other_bytes) - min(other_bytes) > MAX_OTHER_BYTES_SPREAD or \
            max(other_entries) - min(other_entries) > MAX_OTHER_ENTRIES_SPREAD:
        problems.append(f"the state directory outside machines/ and the archive grows: bytes {other_bytes}, "
                        f"entries {other_entries}")
    if max(s.finishes_entries for s in warm) > len(machinetypes):
        problems.append(f"finishes/ holds more than one file per machinetype: {[s.finishes_entries for s in warm]}")
    if max(s.outgoing_entries for s in warm) > 4:
        problems.append(f"apel-outgoing/ keeps files or directories a consumer does not take: "
                        f"{[s.outgoing_entries for s in warm]}")
    print(f"\nsoak: {engine.ended} lifecycles in {simulated / 3600:.1f} simulated hours, {engine_seconds:.0f} s; "
          f"outcomes {outcomes}")
    print(f"{'lifecycles':>10} {'sim h':>6} {'fds':>4} {'RSS MiB':>8} {'threads':>7} {'dirs':>5} "
          f"{'dirs MiB':>8} {'state MiB':>9} {'other KiB':>9} {'other n':>7} {'queue n':>7} {'tables':>6} "
          f"{'stale':>5} {'violations':>10}")
    for s in samples:
        print(f"{s.lifecycles:10} {s.simulated / 3600:6.1f} {s.fds:4} {s.rss_kib / 1024:8.1f} {s.threads:7} "
              f"{s.machine_dirs:5} {s.machines_bytes / 2**20:8.2f} {s.state_bytes / 2**20:9.2f} "
              f"{s.other_bytes / 1024:9.1f} {s.other_entries:7} {s.outgoing_entries:7} {s.engine_tables:6} "
              f"{s.stale_entries:5} {s.violations:10}")
    profile.record(profile.Row(
        fault="soak: a simulated day" if profile.FULL else "soak: 3 simulated hours",
        trials=engine.ended, failures=sum(s.violations for s in samples) + (len(problems) > 0),
        notes=(f"{engine.ended} VM lifecycles in {simulated / 3600:.0f} simulated h ({engine_seconds:.0f} s), "
               f"invariants checked every {SAMPLE_EVERY}; after warm-up: fds spread {fd_spread}, threads spread "
               f"{thread_spread}, RSS {rss_per_k:+.0f} KiB per 1000 VMs, machine dirs <= "
               f"{max(s.machine_dirs for s in warm)} (retention allows {allowed_dirs}), state dir without the "
               f"archive <= {max(s.state_bytes for s in warm) / 2**20:.1f} MiB (outside machines/: spread "
               f"{max(other_bytes) - min(other_bytes)} bytes; apel-outgoing consumed like ssmsend)"),
        problems=problems[:20]))
    assert engine.ended >= MIN_LIFECYCLES
    assert not problems, "\n".join(problems[:30])
