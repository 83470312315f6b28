"""Disk full on the state directory: a real ``vacfactory run`` whose state_dir is on a small
filesystem mounted for the test (ext4 on a loop device; tmpfs too in the full profile) that
a filler thread then keeps full (it takes every block the factory frees) while VMs run, end
and are killed.

While full: nothing is ever damaged (state files, APEL archive and outgoing queue scanned
twice a second), the daemon keeps running, creation is paused (said once in the log, not a
failed creation every round; nothing half-made is left), VMs are still ended on time. When
space returns: creation resumes, and the first round catches up with every invariant holding:
each VM ended at its real end, one APEL record each, archived and queued, nothing leaked;
among them VMs that ended while the disk was full, accounted only once space returned (so
"accounting resumes" cannot pass with nothing to resume).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from typing import List, Optional

import pytest

from tests.faults import invariants, profile
from tests.waiting import scaled
from tests.faults.daemons import (
    FactoryUnderTest,
    Machinetype,
    freeze_after_first_round,
    heartbeat_time,
    make_fake_kernel,
    machines,
    make_root_image,
    wait_for,
)
from vacfactory.engine.factory import MIN_FREE_STATE_MIB

FULL_SECONDS = profile.pick(12.0, 40.0)
#: room for the factory's working set above the floor below which it pauses creation
FS_MB = MIN_FREE_STATE_MIB + 32
TOTAL = 4
PAUSED = re.compile(r" ERROR .*creation paused: state dir (\S+) has (\d+) MiB free, needs (\d+)")


class SmallFilesystem:
    """A FS_MB filesystem mounted for the test and unmounted by ``remove()``: ext4 on a loop
    device without reserved blocks (root gets no extra room; a new directory needs a block, so
    mkdir fails too), or tmpfs (directories are free, so only writes fail)."""

    def __init__(self, mountpoint: str, kind: str) -> None:
        self.mountpoint = mountpoint
        self.image = mountpoint + ".img"
        self.kind = kind
        os.makedirs(mountpoint)
        if kind == "ext4":
            with open(self.image, "wb") as f:
                f.truncate(FS_MB << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", self.image], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", self.image, mountpoint], check=True, capture_output=True)
        else:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MB}m", "tmpfs", mountpoint], check=True)
        os.chmod(mountpoint, 0o755)

    def remove(self) -> None:
        for _ in range(20):
            if subprocess.run(["umount", self.mountpoint], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass


#: VMs that must end while the disk is full before space returns
MIN_ENDED_WHILE_FULL = 2


def ended_since(lives, since: float) -> int:
    return sum(1 for life in lives.values() if life.stop is not None and life.stop > since)


class Filler(threading.Thread):
    """Keeps the filesystem full: takes every block the factory frees, until stopped."""

    def __init__(self, path: str) -> None:
        super().__init__(name="filler", daemon=True)
        self.path = path
        self.stopping = threading.Event()
        self.full = threading.Event()
        self.full_at: Optional[float] = None

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self.stopping.is_set():
                wrote = False
                for size in (1 << 20, 65536, 4096, 512):
                    try:
                        os.write(fd, b"\0" * size)
                        wrote = True
                        break
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                if not wrote:
                    if self.full_at is None:
                        self.full_at = time.time()
                    self.full.set()
                    self.stopping.wait(0.002)
        finally:
            os.close(fd)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        os.unlink(self.path)


# ext4: a new directory needs a block, so mkdir fails too; tmpfs: directories are free, only
# writes fail (that found half-made machine directories). The short profile runs ext4 only.
@pytest.mark.parametrize("kind", profile.pick(["ext4"], ["ext4", "tmpfs"]))
def test_state_directory_fills_up_and_space_returns(private_libvirtd, guests, workdir, kind):
    fs = SmallFilesystem(os.path.join(workdir, "fs"), kind)
    kernel = make_fake_kernel(workdir)
    image = make_root_image(workdir)
    factory = FactoryUnderTest(
        base=os.path.join(workdir, "diskfull"), uri=private_libvirtd.uri, domain_type="test",
        total_processors=TOTAL, prefix="vffull", state_dir=os.path.join(fs.mountpoint, "state"),
        machinetypes=[Machinetype("alpha", {
            "target_share": "1", "machine_model": "vm-raw", "kernel_image": kernel, "root_image": image,
            "disk_gb_per_processor": "1", "fizzle_seconds": "2", "max_wallclock_seconds": "6",
            "backoff_seconds": "0", "machines_dir_days": "0.0001"})],
    )
    # every life outlasts fizzle_seconds (2), so each VM that ends while full is due a record:
    # a fizzle gets none, and a test whose only such VM fizzled would test no accounting
    guests.register(factory.name, factory.state_dir, lifetime=lambda r: r.uniform(3.0, 9.0),
                    message=lambda r: r.choice(["200 Success", None]))
    problems: List[str] = []
    recovery: Optional[float] = None
    filler = Filler(os.path.join(fs.mountpoint, "filler"))
    corrupt_checks = enospc = creation_errors = pauses = 0
    ended_while_full: List[str] = []
    caught_up: List[str] = []
    try:
        factory.spawn()
        assert wait_for(lambda: sum(m.finished is not None for m in machines(factory)) >= 4, 60), \
            "the factory never got going:\n" + factory.log_tail()
        # every slot running when the disk fills, and no guest ending before it is full: on a
        # busy machine filling takes a while, and VMs that all end meanwhile leave the full
        # period with nothing to account (creation is paused, so no slot is refilled)
        guests.hold.set()
        assert wait_for(lambda: len(guests.domains(factory.name)) >= TOTAL, scaled(60)), \
            "the factory never ran all its slots:\n" + factory.log_tail()
        log_mark = len(factory.log_text())
        t_full = time.time()
        filler.start()
        assert filler.full.wait(scaled(30)), "could not fill the filesystem"
        t_filled = filler.full_at
        guests.hold.clear()  # guests past their lifetime now end, with the disk full
        # two more processors (the main configuration is not on the full disk): the factory
        # must try to create, fail with a clear error, and leave nothing half-made
        factory.total_processors = TOTAL + 2
        factory.write_config()
        factory.process.send_signal(signal.SIGHUP)
        # full for FULL_SECONDS and until at least MIN_ENDED_WHILE_FULL VMs have ended meanwhile
        # (the guests' own account), so a slow machine cannot leave accounting nothing to resume
        deadline = t_full + FULL_SECONDS + 90.0
        while time.time() < t_full + FULL_SECONDS or (
                time.time() < deadline and ended_since(guests.lives(factory.name), t_filled) < MIN_ENDED_WHILE_FULL):
            if factory.process.poll() is not None:
                problems.append(f"the daemon died with the disk full:\n{factory.log_tail()}")
                break
            # state files, the APEL archive and the outgoing queue: nothing is ever damaged
            result = invariants.check(invariants.Context(
                state_dir=factory.state_dir, factory_name=factory.name, total_processors=factory.total_processors,
                domains=guests.hv.list_domains(), check_time=time.time(), settled=False))
            corrupt_checks += 1
            problems += [f"while full: {p}" for p in invariants.damage(result)]
            time.sleep(0.5)
        t_end_full = time.time()
        full_log = factory.log_text()[log_mark:]
        enospc = len(re.findall(r" ERROR .*No space left on device", full_log))
        creation_errors = len(re.findall(r"creation of a alpha VM failed", full_log))
        paused = PAUSED.findall(full_log)
        pauses = len(re.findall(r"creation paused", full_log))
        # paused, said once (twice if a creation under way when the disk filled ran out of
        # space first); not a failed creation every round
        if not paused or paused[-1][0] != factory.state_dir or int(paused[-1][2]) != MIN_FREE_STATE_MIB:
            problems.append("no 'creation paused' naming the state dir and its free space was logged:\n"
                            + full_log[-3000:])
        # a round's creations run in parallel: those under way when the disk filled may all
        # fail, in that one round; none may fail after the pause was logged
        first_pause = full_log.find("creation paused")
        failed_after_pause = len(re.findall(r"creation of a alpha VM failed", full_log[first_pause:])) \
            if first_pause >= 0 else creation_errors
        if pauses > 2 or failed_after_pause or creation_errors > TOTAL + 2:
            problems.append(f"creation was not paused: {pauses} pauses and {creation_errors} failed creations "
                            f"logged while full:\n" + full_log[-3000:])
        started_while_full = [m.name for m in machines(factory) if m.started is not None
                              and t_full + 1.0 < m.started.time < t_end_full]
        if started_while_full:
            problems.append(f"VMs created while the disk was full: {started_while_full}")
        if "Traceback" in full_log:
            problems.append("a traceback while the disk was full:\n" + full_log[-3000:])
        overdue = [m.name for m in machines(factory) if m.live and m.started is not None
                   and time.time() > m.record.shutdown_time + 3 and m.uuid in {d.uuid for d in guests.domains(factory.name)}]
        if overdue:
            problems.append(f"VMs kept running past their wallclock limit while the disk was full: {overdue}")

        guests.hold.set()  # no guest ends during the catching-up round
        t_free = time.time()
        filler.stop()
        frozen = freeze_after_first_round(factory, since=t_free + 0.01)
        assert frozen is not None, "no round completed after space returned:\n" + factory.log_tail()
        round_time, round_end = frozen
        recovery = round_end - t_free
        guests.settle(factory.name)
        after_log = factory.log_text()[log_mark + len(full_log):]
        if "creation resumed" not in after_log:
            problems.append("the end of the pause was not logged ('creation resumed')")
        status = json.load(open(os.path.join(factory.state_dir, "status.json")))
        if status.get("creation_paused") is not None or not status.get("created"):
            problems.append(f"creation did not resume in the first round with space: {status}")
        result = invariants.check(invariants.Context(
            state_dir=factory.state_dir, factory_name=factory.name, total_processors=factory.total_processors,
            domains=guests.hv.list_domains(), check_time=round_time,
            retention_seconds=factory.retention_seconds(), retention_slack=61.0,
            truth=guests.lives(factory.name), truth_complete=True, tolerance=1.0,
            default_fizzle=factory.fizzle_seconds()))
        problems += [f"after the first round with space: {p}" for p in result.violations]
        # VMs that ended while the disk was full: accounted by that round, and not before
        lives = guests.lives(factory.name)
        by_uuid = {m.uuid: m for m in machines(factory)}
        ended_while_full = [u for u, life in lives.items()
                            if life.stop is not None and t_filled < life.stop < t_free]
        caught_up = [u for u in ended_while_full if u in by_uuid and by_uuid[u].accounted is not None
                     and by_uuid[u].accounted.archive is not None and by_uuid[u].accounted.time >= t_free]
        if not caught_up:
            shown = {u[:8]: (round(lives[u].stop - t_filled, 1), by_uuid[u].accounted if u in by_uuid else "no dir")
                     for u in ended_while_full}
            problems.append(f"no VM that ended while the disk was full was accounted after space returned "
                            f"({len(ended_while_full)} ended while full: uuid -> (seconds after filling, "
                            f"accounted) {shown}): nothing tested accounting resuming\n" + factory.log_tail())
        factory.process.send_signal(signal.SIGCONT)
        guests.hold.clear()
        done = sum(m.finished is not None for m in machines(factory))
        if not wait_for(lambda: sum(m.finished is not None for m in machines(factory)) >= done + 3, 60):
            problems.append("no VM finished after space returned:\n" + factory.log_tail())
        guests.hold.set()
        factory.terminate()
        guests.settle(factory.name)
        final = invariants.check(invariants.Context(
            state_dir=factory.state_dir, factory_name=factory.name, total_processors=factory.total_processors,
            domains=guests.hv.list_domains(), check_time=heartbeat_time(factory.state_dir),
            retention_seconds=factory.retention_seconds(), retention_slack=61.0,
            truth=guests.lives(factory.name), truth_complete=True, tolerance=1.0,
            default_fizzle=factory.fizzle_seconds()))
        problems += [f"at the end: {p}" for p in final.violations]
        if "Traceback" in factory.log_text():
            problems.append("a traceback in the log")
    finally:
        guests.hold.clear()
        if filler.is_alive():
            filler.stop()
        factory.cleanup(guests.hv, remove=False)
        fs.remove()
    profile.record(profile.Row(
        fault=f"disk full on the state directory ({kind})", trials=1, failures=int(bool(problems)),
        worst_recovery_seconds=recovery, worst_recovery_rounds=1 if recovery is not None and not problems else None,
        notes=f"{FS_MB} MB, kept full {FULL_SECONDS:.0f} s: {corrupt_checks} scans of state files, archive and "
              f"queue, nothing damaged; creation paused ({pauses}x logged, {creation_errors} failed creations), "
              f"nothing created; {enospc} ENOSPC errors logged; {len(ended_while_full)} VMs ended while full, "
              f"{len(caught_up)} of them accounted in the first round with space",
        problems=problems))
    assert not problems, "\n".join(problems)
