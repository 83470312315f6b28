"""A hostile VM against the real daemon: traps in its NFS-mounted joboutputs.

The VM (``hostile_guest.sh``, the tiny guest on TCG) mounts its joboutputs read-write over
NFSv4.1 from the factory's nfs-ganesha and fills it with traps: ``shutdown_message`` as a
symlink to a host file (whose first line is a valid ``600`` message, so following it would
show), a FIFO named like a heartbeat file, a file over the size cap, hard links, bad names, a
40-level tree, 300 files against a cap of 100, a device node; then it writes a file it keeps
open (which the factory unlinks as oversize) until its own 16 MiB joboutputs filesystem
(vmio.jobfs) refuses. Meanwhile a well-behaved VM runs the demo pilot over HTTP with heartbeats.

The factory must stay up and undisturbed: the traps are removed (never followed: the host file
is untouched), the hostile VM ends with no message rather than the host file's, the other VM
runs to its own ``200`` unharmed, and the log names what was rejected.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.integration.realfactory import VACFACTORY, RealFactory, read, wait_for
from tests.integration.test_vm_boundary_qemu import PILOT, nfs_port_holder

pytestmark = pytest.mark.integration

GUEST = str(Path(__file__).resolve().parent / "hostile_guest.sh")
HOST_SECRET = "600 read through a symlink: the factory followed a VM's link\n"
MAX_FILES = 100
MAX_FILE_BYTES = 1048576
#: the VM's own joboutputs filesystem (vmio.jobfs); the guest's open writer tries 4 times this
MAX_TOTAL_BYTES = 16 * 1048576


@pytest.fixture(scope="module")
def hostile_run(tiny_guest):
    holder = nfs_port_holder()
    if holder:
        pytest.fail(f"another NFS server holds 169.254.169.254:2049, where the factory's ganesha must bind: {holder}")
    workdir = tempfile.mkdtemp(prefix="vfhv-")
    os.chmod(workdir, 0o755)
    host_file = os.path.join(workdir, "host-file")
    with open(host_file, "w") as f:
        f.write(HOST_SECRET)
    os.chmod(host_file, 0o644)
    f = RealFactory(workdir, "h")
    f.write_config(
        f"""\
        total_processors = 2
        nfs_exporter = ganesha
        joboutputs_max_files = {MAX_FILES}
        joboutputs_max_file_bytes = {MAX_FILE_BYTES}
        joboutputs_max_total_bytes = {MAX_TOTAL_BYTES}
        """,
        textwrap.dedent(f"""
            [machinetype hostile]
            target_share = 1
            machine_model = vm-raw
            kernel_image = {tiny_guest.kernel}
            initrd_image = {tiny_guest.initrd}
            kernel_cmdline = console=ttyS0 quiet panic=-1
            user_data = {GUEST}
            mjf_transport = nfs
            fizzle_seconds = 20
            max_wallclock_seconds = 600
            user_data_option_host_file = {host_file}

            [machinetype decent]
            target_share = 1
            machine_model = vm-raw
            kernel_image = {tiny_guest.kernel}
            initrd_image = {tiny_guest.initrd}
            kernel_cmdline = console=ttyS0 quiet panic=-1
            user_data = {PILOT}
            heartbeat_file = heartbeat
            heartbeat_seconds = 20
            fizzle_seconds = 20
            max_wallclock_seconds = 600
            user_data_option_mjf = http
            user_data_option_outcome = 200 Success
            user_data_option_lifetime = 60
            user_data_option_heartbeat_interval = 4
            """),
    )
    try:
        f.start()
        wait_for(lambda: f.of_type("hostile") and f.of_type("decent"), 60, "a hostile and a decent VM", factory=f)
        hostile, decent = f.of_type("hostile")[0], f.of_type("decent")[0]
        wait_for(lambda: "HOSTILE: traps set" in read(hostile.console_log), 90, "the traps", factory=f)
        traps = [line.split("made: ", 1)[1] for line in read(hostile.console_log).splitlines() if "HOSTILE: made: " in line]
        entries_when_set = sorted(os.listdir(hostile.joboutputs_dir))
        # no new VMs once these two end
        drained = subprocess.run([VACFACTORY, "--config", f.config, "drain"], capture_output=True, text=True)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        f.sighup()
        wait_for(lambda: all(f.machines()[m.uuid].state == "done" for m in (hostile, decent)), 180,
                 "both VMs to end and be cleaned", factory=f)
        alive = f.process is not None and f.process.poll() is None
        f.stop()
        f.assert_alone()
        machines = f.machines()
        yield dict(factory=f, hostile=machines[hostile.uuid], decent=machines[decent.uuid], traps=traps,
                   entries_when_set=entries_when_set, alive=alive, host_file=host_file, log=f.log_text())
    finally:
        f.cleanup()
        if not os.environ.get("VFVB_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def test_the_vm_laid_its_traps_over_nfs(hostile_run):
    # the traps really were in the factory's directory (over NFS), or the test proves nothing
    assert {"symlink shutdown_message", "fifo heartbeat", "big", "hardlink", "bad names", "deep",
            "300 files"} <= set(hostile_run["traps"]), hostile_run["traps"]
    # ... as the factory itself found them there: it trims NFS joboutputs after every round,
    # so a listing by the test may come too late to see them
    hostile = hostile_run["hostile"]
    seen = set(hostile_run["entries_when_set"])
    log = hostile_run["log"]
    assert "shutdown_message" in seen or \
        f"/{hostile.uuid}: joboutputs/shutdown_message rejected: symlink" in log, log[-3000:]


def test_the_factory_stayed_up_and_removed_every_trap_without_following_it(hostile_run):
    assert hostile_run["alive"], "the daemon died"
    assert "Traceback" not in hostile_run["log"]
    with open(hostile_run["host_file"]) as f:
        assert f.read() == HOST_SECRET  # never written through the link
    hostile = hostile_run["hostile"]
    console = read(hostile.console_log)
    left = int(console.split("HOSTILE: entries left: ", 1)[1].split()[0])
    assert left <= MAX_FILES, console
    directory = hostile.joboutputs_dir
    if os.path.isdir(directory):  # what the VM left behind, as the factory saw it last
        for name in os.listdir(directory):
            st = os.lstat(os.path.join(directory, name))
            assert stat.S_ISREG(st.st_mode), f"{name}: not a regular file"
            assert st.st_nlink == 1 and st.st_size <= MAX_FILE_BYTES, name
            assert name not in ("shutdown_message", "heartbeat", "big", "deep", "dev", "fill")
            assert "\n" not in name and " " not in name and not name.startswith(".")
        assert len(os.listdir(directory)) <= MAX_FILES
        # the factory removes one name of the hard-linked pair (which one: directory order); the
        # other is then a plain file with one link, and may be kept
        assert not {"small", "hardlink"} <= set(os.listdir(directory))
    # the log says what was rejected, naming the VM's machine directory (its UUID)
    log = hostile_run["log"]
    assert f"/{hostile.uuid}: joboutputs/shutdown_message rejected: symlink (removed)" in log, log[-3000:]
    assert re.search(rf"/{hostile.uuid}: joboutputs/(small|hardlink) rejected: hard link \(removed\)", log)


def test_a_writer_keeping_its_file_open_over_nfs_is_stopped_at_the_vms_cap(hostile_run):
    """The factory unlinks the oversize file, the VM goes on writing through its descriptor:
    its joboutputs filesystem of MAX_TOTAL_BYTES refuses, so the host's disk is never filled."""
    hostile = hostile_run["hostile"]
    console = read(hostile.console_log)
    found = re.search(r"HOSTILE: fill: (\d+) bytes written, then (refused|never refused)", console)
    assert found, console[-3000:]
    assert found.group(2) == "refused" and int(found.group(1)) <= MAX_TOTAL_BYTES, found.group(0)
    assert f"/{hostile.uuid}: joboutputs/fill rejected: file too big" in hostile_run["log"]
    assert f"/{hostile.uuid}: joboutputs is its own ext4 filesystem of {MAX_TOTAL_BYTES} bytes" \
        in hostile_run["log"]
    # released when it was cleaned: no image, no mount
    assert not os.path.exists(os.path.join(hostile.path, "joboutputs.img"))
    assert not os.path.ismount(hostile.joboutputs_dir)


def test_the_hostile_vm_ends_without_the_host_files_message(hostile_run):
    finished = hostile_run["hostile"].finished
    assert finished.code is None and finished.reason == "no_message", finished
    assert finished.outcome == "neutral"
    assert hostile_run["hostile"].accounted is not None


def test_the_decent_vm_ran_to_its_own_end_undisturbed(hostile_run):
    finished = hostile_run["decent"].finished
    assert finished.message == "200 Success", (finished, read(hostile_run["decent"].console_log)[-2000:])
    assert hostile_run["decent"].accounted is not None and hostile_run["decent"].accounted.archive
