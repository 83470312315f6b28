"""Clock jumps: the wall clock is stepped forward by an hour, then back by an hour, while VMs
run (the engine in this process on the test driver, tests/faults/engine.py; the engine reads
the wall clock and compares it with the monotonic clock, as the daemon does with time.time
and time.monotonic).

What "no mass kill" means here, precisely:

- a VM whose guest keeps writing its heartbeat file on schedule is never killed for its
  heartbeat because of a jump, forward or back (a heartbeat written a minute ago is not an
  hour stale because the clock was stepped);
- a backward jump kills nothing;
- a forward jump kills only VMs whose own shutdown time has now passed: that is an absolute
  time the VM was given in its MJF (shutdowntime_job) and reads against its own clock, so it
  is due by the corrected clock; VMs whose deadline lies beyond the new time are untouched;
- a guest that really stops heartbeating is still killed for it (enforcement is not
  switched off by a jump).

And no negative durations: every record has EndTime >= StartTime and a WallDuration that is
the VM's real (elapsed) run time, also for VMs that were running across a jump.

And housekeeping goes on: retention (machines_dir_days of about a quarter of an hour here)
runs on the monotonic clock, so no directory outlives its retention by more than a retention
interval, not by the hour a backward jump once stopped it for.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List

from tests.faults import invariants, profile
from tests.faults.engine import Guest, fake_kernel, make_engine
from vacfactory.engine.factory import RETENTION_SECONDS

HEARTBEAT_SECONDS = 120
FIZZLE = 300
STEP = 30.0  # seconds between rounds
HOUR = 3600.0
RETENTION_DAYS = 0.01  # 14.4 minutes: directories are deleted during the run, across the jumps
HEARTBEAT_KILLS = {"heartbeat_not_created", "heartbeat_not_updated"}


def test_clock_jumps_forward_and_back_by_an_hour(tmp_path):
    rng = random.Random(3)
    kernel = fake_kernel(str(tmp_path))
    common = {"machine_model": "vm-raw", "kernel_image": kernel, "heartbeat_file": "heartbeat",
              "heartbeat_seconds": str(HEARTBEAT_SECONDS), "fizzle_seconds": str(FIZZLE),
              "backoff_seconds": "0", "machines_dir_days": str(RETENTION_DAYS)}
    machinetypes = {
        # long deadlines: untouched by a forward jump of an hour
        "alpha": dict(common, target_share="3", max_wallclock_seconds="14400"),
        # 50 minute deadlines: some fall inside the skipped hour
        "beta": dict(common, target_share="1", max_wallclock_seconds="3000"),
    }
    dead = set()

    def fate(machine, now) -> Guest:
        roll = rng.random()
        if roll < 0.06:  # a guest that hangs: stops heartbeating after a while
            dead.add(machine.uuid)
            return Guest(end=None, heartbeat_every=60.0, message=None)
        if roll < 0.5:
            return Guest(end=now + rng.uniform(60, 5400), message=rng.choice(["200 Success", "300 Nothing to do"]))
        return Guest(end=None)  # runs until its wallclock limit

    engine = make_engine(str(tmp_path), total=24, machinetypes=machinetypes, fate=fate)
    problems: List[str] = []
    kills_at_jump: Dict[str, int] = {}
    #: every VM that ended, as last seen by the engine (retention deletes directories meanwhile)
    ended: Dict[str, object] = {}
    deleted = 0

    def remember_ended() -> None:
        for uuid, machine in engine.factory.machines.items():
            if machine.finished is not None and machine.started is not None:
                ended[uuid] = machine
    try:
        def run(minutes: float, label: str) -> None:
            for _ in range(int(minutes * 60 / STEP)):
                # hung guests stop writing after 10 minutes of life
                for uuid in dead:
                    guest = engine.guests.get(uuid)
                    marks = engine.elapsed_marks.get(uuid)
                    if guest and marks and engine.monotonic.now - marks[0] > 600:
                        guest.heartbeat_every = None
                report = engine.step(STEP)
                note_kills(report, label)
                remember_ended()

        kill_reasons: Counter = Counter()

        def note_kills(report, label: str) -> None:
            for name in report.killed:
                machine = next(m for m in engine.factory.machines.values() if m.name == name and not m.live
                               and m.finished.time == engine.clock.now)
                reason = machine.finished.reason
                kill_reasons[(label, reason)] += 1
                if reason in HEARTBEAT_KILLS and machine.uuid not in dead:
                    problems.append(f"{label}: {name} killed for its heartbeat ({reason}) although its guest "
                                    f"heartbeats on schedule")
                if reason == "wallclock" and machine.record.shutdown_time >= engine.clock.now:
                    problems.append(f"{label}: {name} killed for wallclock before its shutdown time")

        def jump(seconds: float, label: str) -> None:
            before = engine.clock.now
            engine.jump(seconds)
            after = engine.clock.now
            live = engine.live()
            due = [m for m in live if before < m.record.shutdown_time < after]
            report = engine.round()
            note_kills(report, label)
            remember_ended()
            kills_at_jump[label] = len(report.killed)
            due_names = sorted(m.name for m in due)
            if sorted(report.killed) != due_names:
                problems.append(f"{label}: the jump killed {sorted(report.killed)}; only the VMs whose shutdown "
                                f"time it skipped were due: {due_names}")

        run(30, "before the jumps")
        jump(+HOUR, "forward jump")
        run(20, "after the forward jump")
        jump(-HOUR, "backward jump")
        run(30, "after the backward jump")

        hung_killed = sum(n for (label, reason), n in kill_reasons.items() if reason in HEARTBEAT_KILLS)
        hung = len([u for u in dead if u in engine.lives and engine.lives[u].stop is not None])
        if dead and hung_killed == 0:
            problems.append("no hung guest was killed for its heartbeat: enforcement stopped")

        # durations: recorded wall time = real elapsed time (the truth is in monotonic time)
        records = invariants.archive_records(engine.state_dir)
        finished = list(ended.values())
        deleted = sum(1 for uuid in ended if uuid not in engine.factory.machines)
        if not deleted:
            problems.append("retention deleted no machine directory: the retention check tested nothing")
        for m in finished:
            wall = m.finished.end_time - m.started.time
            if wall < 0:
                problems.append(f"{m.name}: negative wall time {wall:.0f} s")
        for uuid, recs in records.items():
            for record in recs:
                f = record.fields
                if int(f["WallDuration"]) < 0 or int(f["EndTime"]) < int(f["StartTime"]):
                    problems.append(f"{uuid}: record with negative duration: {f}")
        elapsed = engine.elapsed()
        for m in finished:
            if m.finished.outcome == "failed" or m.uuid not in elapsed:
                continue
            true_wall = elapsed[m.uuid]
            wall = m.finished.end_time - m.started.time
            if abs(wall - true_wall) > 1.0:
                problems.append(f"{m.name}: recorded wall {wall:.0f} s, ran {true_wall:.0f} s "
                                f"(started {m.started.time:.0f}, ended {m.finished.end_time:.0f})")
            n = len(records.get(m.uuid, []))
            if true_wall >= FIZZLE and n != 1:
                problems.append(f"{m.name}: ran {true_wall:.0f} s >= fizzle_seconds but has {n} APEL records")
        result = invariants.check(invariants.Context(
            state_dir=engine.state_dir, factory_name=engine.name, total_processors=24,
            domains=engine.hypervisor.list_domains(), check_time=engine.clock.now,
            retention_seconds={mt: RETENTION_DAYS * 86400 for mt in machinetypes},
            retention_slack=RETENTION_SECONDS + STEP))
        problems += result.violations
        straddlers = sum(1 for m in finished if m.uuid in elapsed and engine.straddled(m.uuid))
    finally:
        engine.teardown()
    row = profile.Row(
        fault="clock jumps +1 h / -1 h", trials=2, failures=int(bool(problems)),
        notes=(f"killed by the forward jump: {kills_at_jump.get('forward jump')} (all past their shutdown time), "
               f"by the backward jump: {kills_at_jump.get('backward jump')}; heartbeat kills of hung guests: "
               f"{hung_killed}/{hung}; {len(finished)} VMs ended, {straddlers} across a jump, none with a "
               f"negative or wrong duration; retention deleted {deleted} directories on time"),
        problems=problems)
    profile.record(row)
    assert not problems, "\n".join(problems[:30])

