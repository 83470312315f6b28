"""A hard per-VM limit on NFS joboutputs (vmio.jobfs), with real mounts and a real nfs-ganesha.

The state directory of every test is a 64 MiB tmpfs of its own, so its free space moves only
with what the test does. A VM's joboutputs is an ext4 image loop-mounted on it (or a tmpfs):

- a writer that keeps its file open after ``enforce_limits`` unlinked it (the bypass of
  issue 13, 3c) gets ENOSPC at the cap, and the state filesystem loses at most the image size;
- ganesha serves the limited filesystem (an NFS GETATTR shows its size, not the state disk's)
  and a writer over NFS (WRITE with the anonymous stateid, from the VM's address) gets
  NFS4ERR_NOSPC at the cap;
- releasing (the VM is cleaned) keeps the files within the caps, unmounts, deletes the image
  and leaves no loop device, also when it is repeated after a kill at any step.

Run under ``flock /tmp/vf-real.lock`` (ganesha, mounts). Needs root, mount, losetup, mkfs.ext4.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import tempfile
import time
from typing import Iterator, List

import pytest

from tests.integration.mounts import mounts_under, unmount_under
from tests.integration.test_exports_ganesha import (
    NFS4_OK,
    NFS4ERR_DQUOT,
    NFS4ERR_NOSPC,
    getattr_space,
    lookup,
    nfs_compound,
    putrootfh,
    read,
    write,
)
from vacfactory.engine.boundary import VMBoundary, export_specs
from vacfactory.errors import ExportError, StateError
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.state.records import Accounted, Cleaned, Finished, VMRecord
from vacfactory.vmio import joboutputs
from vacfactory.vmio.exports import GaneshaExporter, NullExporter
from vacfactory.vmio.jobfs import SAVED, SAVING, SIZE_TOLERANCE, JobOutputsFS, image_path, is_mounted, run
from vacfactory.vmio.joboutputs import JobOutputsLimits

PORT = 20497  # not test_exports_ganesha's: both may be collected in one run
VM_ADDR = "127.0.0.2"
MiB = 1 << 20
CAP = 8 * MiB
LIMITS = JobOutputsLimits(max_file_bytes=4 * MiB, max_total_bytes=CAP, max_files=16)
STATE_FS_BYTES = 64 * MiB
CHUNK = 64 * 1024


def _loops_of(root: str) -> List[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if root in line]


@pytest.fixture
def root() -> Iterator[str]:
    """A temporary directory with a 64 MiB tmpfs ``state`` in it; no mount or loop device may
    be left under it at the end (the leak check), and the fixture removes any it finds."""
    for tool in ("mount", "umount", "losetup", "mkfs.ext4"):
        assert shutil.which(tool), f"{tool} is required"
    top = tempfile.mkdtemp(prefix="vfquota-")
    os.chmod(top, 0o755)
    state = os.path.join(top, "state")
    os.mkdir(state)
    run(["mount", "-t", "tmpfs", "-o", f"size={STATE_FS_BYTES},mode=0755", "tmpfs", state])
    try:
        yield state
        leaked = [p for p in mounts_under(top) if p != state]
        loops = _loops_of(top)
    finally:
        unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)
    assert leaked == [] and loops == [], f"left behind: mounts {leaked}, loop devices {loops}"


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _machine(state: str, slot: int = 0, address: str = VM_ADDR) -> Machine:
    uuid = f"00000000-0000-4000-8000-{slot:012x}"
    record = VMRecord(uuid=uuid, name=f"vf-{slot:02d}.example.com", slot=slot, factory="vf.example.com",
                      space="vac01.example.com", machinetype="nfs", machine_model="cernvm3",
                      processors=1, memory_mb=512, created=1.0, shutdown_time=2.0,
                      mjf_transport="nfs", address=address, token=f"{slot + 10:02x}" * 16)
    machine = MachineStore(state).prepare(record, {"total_cpu": "1"}, {"job_id": uuid})
    return machine


def _fill(fd: int) -> int:
    """Write to ``fd`` until the filesystem is full; the bytes written (ENOSPC expected)."""
    written = 0
    chunk = b"x" * CHUNK
    while True:
        try:
            n = os.write(fd, chunk)
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT), e
            return written
        written += n
        assert written <= STATE_FS_BYTES, "no limit: wrote more than the whole state filesystem"


def _write_file(directory: str, name: str, data: bytes) -> None:
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------------------------
# the limit


def test_a_writer_keeping_its_unlinked_file_open_gets_enospc_at_the_cap(root: str) -> None:
    machine = _machine(root)
    jobfs = JobOutputsFS("ext4", LIMITS)
    free_before = _free(root)
    jobfs.create(machine.joboutputs_dir)
    assert is_mounted(machine.joboutputs_dir)
    assert os.listdir(machine.joboutputs_dir) == []  # no lost+found for the VM to trip on
    image = image_path(machine.joboutputs_dir)
    image_size = os.stat(image).st_size
    assert CAP < image_size <= CAP + 8 * MiB

    fd = os.open(os.path.join(machine.joboutputs_dir, "big"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"y" * (LIMITS.max_file_bytes + CHUNK))
        # the periodic trim unlinks the oversize file ...
        report = joboutputs.enforce_limits(machine.joboutputs_dir, LIMITS)
        assert report.removed == 1 and os.listdir(machine.joboutputs_dir) == []
        # ... and the writer goes on through its open descriptor, until the filesystem is full
        written = LIMITS.max_file_bytes + CHUNK + _fill(fd)
        state_used = free_before - _free(root)
    finally:
        os.close(fd)
    assert CAP - 256 * 1024 <= written <= CAP + SIZE_TOLERANCE
    # the state filesystem paid for the image only: never more than its size
    assert state_used <= image_size
    assert os.stat(image).st_blocks * 512 <= image_size

    jobfs.release(machine.joboutputs_dir)
    assert not is_mounted(machine.joboutputs_dir) and not os.path.exists(image)
    assert os.listdir(machine.joboutputs_dir) == []
    assert free_before - _free(root) < MiB  # all of it back


def test_a_tmpfs_joboutputs_stops_a_writer_at_the_cap_too(root: str) -> None:
    machine = _machine(root)
    jobfs = JobOutputsFS("tmpfs", LIMITS)
    jobfs.create(machine.joboutputs_dir)
    assert is_mounted(machine.joboutputs_dir) and not os.path.exists(image_path(machine.joboutputs_dir))
    with open(os.path.join(machine.joboutputs_dir, "big"), "wb", buffering=0) as f:
        assert _fill(f.fileno()) == CAP
    _write_file(machine.joboutputs_dir, "ignored", b"")  # inodes left, no space: an empty file
    jobfs.release(machine.joboutputs_dir)
    assert not is_mounted(machine.joboutputs_dir)
    # "big" is over joboutputs_max_file_bytes: not kept; the empty file is
    assert os.listdir(machine.joboutputs_dir) == ["ignored"]


def test_inodes_are_capped_with_the_files(root: str) -> None:
    machine = _machine(root)
    jobfs = JobOutputsFS("ext4", LIMITS)
    jobfs.create(machine.joboutputs_dir)
    try:
        created = 0
        with pytest.raises(OSError) as caught:
            for created in range(100000):
                _write_file(machine.joboutputs_dir, f"f{created}", b"")
        assert caught.value.errno == errno.ENOSPC
        assert LIMITS.max_files <= created < 100000
    finally:
        jobfs.release(machine.joboutputs_dir)


# --------------------------------------------------------------------------------------------
# over nfs-ganesha


@pytest.fixture
def ganesha(root: str) -> Iterator[GaneshaExporter]:
    assert shutil.which("ganesha.nfsd"), "nfs-ganesha (ganesha.nfsd + FSAL VFS) is required"
    ganesha_dir = os.path.join(os.path.dirname(root), "ganesha")  # off the measured state fs
    exporter = GaneshaExporter(os.path.join(ganesha_dir, "ganesha.conf"),
                               os.path.join(ganesha_dir, "ganesha.pid"),
                               os.path.join(ganesha_dir, "ganesha.log"),
                               bind_address="127.0.0.1", port=PORT)
    yield exporter
    exporter.stop_server()


def _nfs_fill(machine: Machine, name: str) -> int:
    """Write ``name`` in the VM's joboutputs over NFS (from its address, squashed) until the
    server refuses; the bytes written. The file is made by the host: OPEN needs NFSv4 client
    state, which WRITE with the anonymous stateid does not."""
    path = os.path.join(machine.joboutputs_dir, name)
    _write_file(machine.joboutputs_dir, name, b"")
    os.chown(path, 65534, 65534)
    offset, chunk = 0, b"z" * (256 * 1024)
    while True:
        reply = nfs_compound(machine.record.address, [putrootfh(), lookup(machine.uuid), lookup("joboutputs"),
                                                      lookup(name), write(offset, chunk)], port=PORT)
        if reply.status != NFS4_OK:
            assert reply.status in (NFS4ERR_NOSPC, NFS4ERR_DQUOT), reply
            return offset
        offset += reply.results[-1][2]  # type: ignore[operator]
        assert offset <= STATE_FS_BYTES, "no limit over NFS"


def _nfs_space(machine: Machine, export: str) -> tuple:
    """(space_avail, space_free, space_total) of one of the VM's exports, over NFS."""
    reply = nfs_compound(machine.record.address, [putrootfh(), lookup(machine.uuid), lookup(export),
                                                  getattr_space()], port=PORT)
    assert reply.status == NFS4_OK, reply
    return reply.results[-1][2]  # type: ignore[return-value]


def test_ganesha_serves_the_limited_filesystems_and_nfs_writers_get_nospc(
        root: str, ganesha: GaneshaExporter) -> None:
    boundary = VMBoundary(exporter=ganesha, limits=LIMITS, jobfs=JobOutputsFS("ext4", LIMITS))
    first = _machine(root, 1, "127.0.0.2")
    boundary.publish(first)  # starts ganesha
    second = _machine(root, 2, "127.0.0.3")
    boundary.publish(second)  # mounted while ganesha runs: exported by a reload
    for machine in (first, second):
        assert is_mounted(machine.joboutputs_dir)
        image_size = os.stat(image_path(machine.joboutputs_dir)).st_size
        # what the VM sees over NFS is its small filesystem, not the state disk
        avail, _, total = _nfs_space(machine, "joboutputs")
        assert CAP <= avail and total <= image_size
        assert _nfs_space(machine, "machinefeatures")[2] == STATE_FS_BYTES
        # a file the VM writes lands in the mounted filesystem and is read back over NFS
        _write_file(machine.joboutputs_dir, joboutputs.SHUTDOWN_MESSAGE, b"200 Success\n")
        reply = nfs_compound(machine.record.address, [putrootfh(), lookup(machine.uuid), lookup("joboutputs"),
                                                      lookup(joboutputs.SHUTDOWN_MESSAGE), read(4096)], port=PORT)
        assert reply.status == NFS4_OK and reply.results[-1][2] == b"200 Success\n"
        # a writer over NFS fills its file until the server says no
        free_before = _free(root)
        written = _nfs_fill(machine, "payload")
        assert CAP - MiB <= written <= CAP + SIZE_TOLERANCE
        assert free_before - _free(root) <= image_size
    # still one client per export: the second VM cannot write into the first one's
    reply = nfs_compound("127.0.0.3", [putrootfh(), lookup(first.uuid), lookup("joboutputs"),
                                       lookup(joboutputs.SHUTDOWN_MESSAGE), write(0, b"x")], port=PORT)
    assert reply.status != NFS4_OK

    # the VMs end: exports withdrawn, the filesystems released (ganesha holds nothing open)
    for machine in (first, second):
        boundary.withdraw(machine)
        assert machine.uuid not in ganesha.exports
        assert not is_mounted(machine.joboutputs_dir)
        assert not os.path.exists(image_path(machine.joboutputs_dir))
        # what is within the caps is kept on the state disk; the oversize payload is not
        assert sorted(os.listdir(machine.joboutputs_dir)) == [joboutputs.SHUTDOWN_MESSAGE]
        assert joboutputs.read_shutdown_message(machine.joboutputs_dir, LIMITS).code == 200


# --------------------------------------------------------------------------------------------
# crash safety: every step of release, repeated after a kill, ends in the same state


def _end_state_is_clean(machine: Machine) -> None:
    parent = machine.path
    assert not is_mounted(machine.joboutputs_dir)
    assert not os.path.exists(image_path(machine.joboutputs_dir))
    assert not os.path.exists(os.path.join(parent, SAVED))
    assert not os.path.exists(os.path.join(parent, SAVING))
    assert sorted(os.listdir(machine.joboutputs_dir)) == ["heartbeat", "shutdown_message"]
    with open(os.path.join(machine.joboutputs_dir, "shutdown_message"), "rb") as f:
        assert f.read() == b"300 No more work\n"


def _interrupted_release(jobfs: JobOutputsFS, machine: Machine, kill_at: str) -> None:
    """The on-disk state a kill -9 at ``kill_at`` leaves: release()'s steps up to that point."""
    directory, parent = machine.joboutputs_dir, machine.path
    if kill_at == "reboot":  # the host went down after the VM ended: nothing is mounted
        run(["umount", directory])
        return
    if kill_at == "copy":  # a half-made copy
        os.mkdir(os.path.join(parent, SAVING))
        _write_file(os.path.join(parent, SAVING), "shutdown_message", b"30")
        return
    jobfs._save(directory, os.path.join(parent, SAVED))
    if kill_at == "before umount":
        return
    run(["umount", directory])
    if kill_at == "after umount":
        return
    os.unlink(image_path(directory))
    if kill_at == "after image deleted":
        return
    assert kill_at == "mid move"
    os.replace(os.path.join(parent, SAVED, "heartbeat"), os.path.join(directory, "heartbeat"))


@pytest.mark.parametrize("kill_at", [
    "copy", "before umount", "after umount", "after image deleted", "mid move", "reboot",
])
def test_release_repeated_after_a_kill_at_any_step_ends_clean(root: str, kill_at: str) -> None:
    machine = _machine(root)
    jobfs = JobOutputsFS("ext4", LIMITS)
    jobfs.create(machine.joboutputs_dir)
    _write_file(machine.joboutputs_dir, "shutdown_message", b"300 No more work\n")
    _write_file(machine.joboutputs_dir, "heartbeat", b"")
    os.symlink("/etc/shadow", os.path.join(machine.joboutputs_dir, "trap"))  # never copied
    _interrupted_release(jobfs, machine, kill_at)

    # the restarted daemon: start-up remounts what is not yet released, cleaning releases
    jobfs.remount(machine.joboutputs_dir)
    jobfs.release(machine.joboutputs_dir)
    _end_state_is_clean(machine)
    jobfs.release(machine.joboutputs_dir)  # and once more: nothing changes
    _end_state_is_clean(machine)


def test_a_file_still_open_at_release_does_not_block_it_nor_leak_the_loop_device(root: str) -> None:
    machine = _machine(root)
    jobfs = JobOutputsFS("ext4", LIMITS)
    jobfs.create(machine.joboutputs_dir)
    _write_file(machine.joboutputs_dir, "shutdown_message", b"200 Success\n")
    holder = os.open(os.path.join(machine.joboutputs_dir, "held"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        jobfs.release(machine.joboutputs_dir)  # umount: busy; detached lazily
        assert not is_mounted(machine.joboutputs_dir)
        assert sorted(os.listdir(machine.joboutputs_dir)) == ["held", "shutdown_message"]
        assert not os.path.exists(image_path(machine.joboutputs_dir))
        assert _loops_of(root) != []  # the holder keeps the filesystem, as it must
    finally:
        os.close(holder)
    deadline = time.monotonic() + 10
    while _loops_of(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _loops_of(root) == []  # freed with the last holder (autoclear)


def test_a_restart_keeps_a_live_vms_mount_and_remounts_one_a_reboot_lost(root: str) -> None:
    machine = _machine(root)
    jobfs = JobOutputsFS("ext4", LIMITS)
    boundary = VMBoundary(exporter=NullExporter(), limits=LIMITS, jobfs=jobfs)
    boundary.publish(machine)
    _write_file(machine.joboutputs_dir, "heartbeat", b"1")
    restarted = VMBoundary(exporter=NullExporter(), limits=LIMITS, jobfs=jobfs)
    restarted.start(None, [machine])
    assert is_mounted(machine.joboutputs_dir)
    assert mounts_under(machine.path) == [machine.joboutputs_dir]  # kept, not stacked
    run(["umount", machine.joboutputs_dir])  # what a host reboot does
    assert os.listdir(machine.joboutputs_dir) == []
    restarted.start(None, [machine])
    assert os.listdir(machine.joboutputs_dir) == ["heartbeat"]
    restarted.withdraw(machine)
    assert os.listdir(machine.joboutputs_dir) == ["heartbeat"] and not is_mounted(machine.joboutputs_dir)


def test_a_failed_mkfs_leaves_no_image_and_no_mount(root: str) -> None:
    machine = _machine(root)

    def runner(argv):
        run(["mkfs.ext4", "-q", "-F", "/nonexistent/x"] if argv[0] == "mkfs.ext4" else argv)

    with pytest.raises(ExportError, match="mkfs.ext4"):
        JobOutputsFS("ext4", LIMITS, runner=runner).create(machine.joboutputs_dir)
    assert not is_mounted(machine.joboutputs_dir)
    assert not os.path.exists(image_path(machine.joboutputs_dir))


def test_a_machine_directory_is_never_deleted_under_a_mount(root: str) -> None:
    machine = _machine(root)
    store = MachineStore(root)
    jobfs = JobOutputsFS("ext4", LIMITS)
    jobfs.create(machine.joboutputs_dir)
    _write_file(machine.joboutputs_dir, "heartbeat", b"")
    done = dataclasses.replace(
        machine, finished=Finished(time=3.0, end_time=3.0, cpu_seconds=0.0, outcome="success",
                                   reason="shutdown_message"),
        accounted=Accounted(time=3.0), cleaned=Cleaned(time=3.0))
    try:
        with pytest.raises(StateError, match="mount point"):
            store.delete(done)
        assert os.listdir(machine.joboutputs_dir) == ["heartbeat"]
    finally:
        jobfs.release(machine.joboutputs_dir)
    store.delete(done)
    assert not os.path.exists(machine.path)


def test_http_vms_and_nfs_exporter_none_get_no_filesystem(root: str) -> None:
    machine = _machine(root)
    http_vm = dataclasses.replace(machine, record=dataclasses.replace(machine.record, mjf_transport="http"))
    VMBoundary(exporter=NullExporter(), limits=LIMITS, jobfs=JobOutputsFS("ext4", LIMITS)).publish(http_vm)
    assert not is_mounted(machine.joboutputs_dir) and export_specs(http_vm) == []
    VMBoundary(exporter=NullExporter(), limits=LIMITS, jobfs=JobOutputsFS("none", LIMITS)).publish(machine)
    assert not is_mounted(machine.joboutputs_dir)
