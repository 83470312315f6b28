"""A hard per-VM size limit for joboutputs written over NFS: each VM's own small filesystem.

An NFS VM writes its ``joboutputs`` through the NFS server, behind the HTTP server's caps.
:func:`vmio.joboutputs.enforce_limits` trims what is there every few seconds, but a writer
that keeps a file open goes on filling the disk after the unlink. So each NFS VM's
``joboutputs`` is the root of a filesystem of its own, of ``joboutputs_max_total_bytes``:

- ``ext4`` (default): a sparse file ``machines/<uuid>/joboutputs.img`` formatted ext4 and
  loop-mounted (``mount -o loop``, autoclear: unmounting frees the loop device) on
  ``machines/<uuid>/joboutputs`` with ``nosuid,nodev,noexec``. It costs the state disk only
  what the VM writes, at most its size; ext4's own overhead (journal, reserved clusters) is
  added to the file size so that the VM can write the cap, and not much more (measured after
  mounting, remade once if it is off). Its inode count is ``joboutputs_max_files`` plus a
  margin, so a VM cannot exhaust inodes either.
- ``tmpfs``: ``mount -t tmpfs -o size=CAP,nr_inodes=N``: no loop device, but RAM (and lost
  with a host reboot).
- ``none``: a plain directory, trimmed only (the old behaviour).

Life cycle (each step idempotent, so a kill -9 anywhere is repaired by doing it again):

1. :meth:`JobOutputsFS.create` when the VM is published, before its domain starts.
2. :meth:`JobOutputsFS.remount` at start-up for VMs not yet cleaned: a filesystem still
   mounted (the kernel keeps mounts across a daemon's death) is kept; an image that is not
   mounted (a host reboot) is mounted again, so ``shutdown_message`` can still be read.
3. :meth:`JobOutputsFS.release` when the VM is cleaned, after its exports are withdrawn: the
   accepted files (read as hostile input, through vmio.joboutputs and its caps) are copied
   into ``joboutputs.saving/``, renamed ``joboutputs.saved/`` when complete, the filesystem
   is unmounted and its image deleted, then the saved files are moved into the now plain
   ``joboutputs/`` directory (kept until ``machines_dir_days``, like every VM's).

Only ``release`` and ``remount`` act on what they find on disk, whatever the configured kind
(a VM created with ext4 is released correctly after the site switched to ``none``). If
something still holds a file open in the filesystem at release (its files are saved by then),
it is detached lazily (``umount -l``) and goes, loop device and all, with the last holder.

The image is sparse, not preallocated: VMs cost the state disk what they write, and creation
pauses anyway while the state disk is nearly full; a VM writing while it is completely full
gets I/O errors (``errors=continue`` keeps its filesystem mounted).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Sequence

from vacfactory.atomic import fsync_directory
from vacfactory.errors import ExportError
from vacfactory.vmio import joboutputs
from vacfactory.vmio.joboutputs import JobOutputsLimits

log = logging.getLogger(__name__)

KINDS = ("ext4", "tmpfs", "none")
IMAGE = "joboutputs.img"
SAVING = "joboutputs.saving"
SAVED = "joboutputs.saved"
#: inodes beyond joboutputs_max_files: the root, temporary names of atomic writers
INODE_MARGIN = 64
#: ext4 is remade when the space it offers is off the cap by more than this
SIZE_TOLERANCE = 1 << 20
#: the smallest ext4 image (with its journal) that mkfs.ext4 makes
MIN_EXT4_BYTES = 4 << 20
MOUNT_OPTIONS = "nosuid,nodev,noexec,noatime"
COMMAND_TIMEOUT = 60

Runner = Callable[[Sequence[str]], None]


def run(argv: Sequence[str]) -> None:
    """Run an argument list (never a shell string); ExportError with its output if it fails."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExportError(f"{argv[0]}: {e}") from e
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().replace("\n", " | ")
        raise ExportError(f"{' '.join(argv)} failed ({done.returncode}): {output[-500:]}")


def is_mounted(path: str) -> bool:
    """True if ``path`` is a mount point (never follows a final symlink)."""
    return not os.path.islink(path) and os.path.ismount(path)


@dataclass(frozen=True)
class JobOutputsFS:
    """Makes, restores and releases the size-limited joboutputs filesystem of NFS VMs."""

    kind: str = "ext4"
    limits: JobOutputsLimits = JobOutputsLimits()
    runner: Runner = run

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"joboutputs filesystem kind must be one of {', '.join(KINDS)}")

    # -- create -------------------------------------------------------------------------

    def create(self, joboutputs_dir: str) -> None:
        """Mount a new, empty limited filesystem on the (empty) ``joboutputs_dir``."""
        if self.kind == "none" or is_mounted(joboutputs_dir):
            return
        label = joboutputs.machine_label(joboutputs_dir)
        if self.kind == "tmpfs":
            self.runner(["mount", "-t", "tmpfs", "-o",
                         f"size={max(self.limits.max_total_bytes, 4096)},"
                         f"nr_inodes={self._inodes()},mode=0755,{MOUNT_OPTIONS}",
                         "tmpfs", joboutputs_dir])
        else:
            self._make_ext4(joboutputs_dir)
        log.info("%s: joboutputs is its own %s filesystem of %d bytes", label, self.kind,
                 self.limits.max_total_bytes)

    def _inodes(self) -> int:
        return self.limits.max_files + INODE_MARGIN

    def _make_ext4(self, joboutputs_dir: str) -> None:
        image = image_path(joboutputs_dir)
        try:
            self._size_ext4(image, joboutputs_dir)
        except BaseException:
            # leave nothing half-made: the creation fails and the VM is not started
            if is_mounted(joboutputs_dir):
                self.runner(["umount", joboutputs_dir])
            if os.path.lexists(image):
                os.unlink(image)
            raise
        try:
            os.rmdir(os.path.join(joboutputs_dir, "lost+found"))  # not the VM's business
        except OSError:
            pass

    def _size_ext4(self, image: str, joboutputs_dir: str) -> None:
        """Format and mount ``image`` so that it offers the cap (and at most a little more)."""
        cap = self.limits.max_total_bytes
        # a first guess at ext4's overhead (journal, reserved clusters), then corrected from
        # what the mounted filesystem offers
        size = cap + min(cap // 50, 16 << 20) + (4 << 20)
        for attempt in range(3):
            self._format(image, size)
            self._mount_image(image, joboutputs_dir)
            offered = available_bytes(joboutputs_dir)
            wanted = max(size + cap - offered + (64 << 10), MIN_EXT4_BYTES)
            if offered >= cap and (offered <= cap + SIZE_TOLERANCE or wanted >= size or attempt == 2):
                return
            self.runner(["umount", joboutputs_dir])
            size = wanted
        raise ExportError(f"{joboutputs_dir}: an ext4 filesystem of {size} bytes offers "
                          f"{offered} bytes, less than the {cap} bytes wanted")

    def _format(self, image: str, size: int) -> None:
        try:
            os.unlink(image)
        except FileNotFoundError:
            pass
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, size)  # sparse: costs only what is written
        finally:
            os.close(fd)
        self.runner(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(self._inodes()),
                     "-O", "^resize_inode", "-e", "continue",
                     "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", image])

    def _mount_image(self, image: str, joboutputs_dir: str) -> None:
        # -o loop attaches a loop device with autoclear: the unmount frees it
        self.runner(["mount", "-t", "ext4", "-o", f"loop,{MOUNT_OPTIONS},errors=continue",
                     image, joboutputs_dir])

    # -- restart ------------------------------------------------------------------------

    def remount(self, joboutputs_dir: str) -> bool:
        """After a restart: mount the VM's image again if it is not mounted. True if mounted."""
        if is_mounted(joboutputs_dir):
            return True
        image = image_path(joboutputs_dir)
        if not os.path.isfile(image) or os.path.isdir(saved_path(joboutputs_dir)):
            return False
        self._mount_image(image, joboutputs_dir)
        log.info("%s: joboutputs filesystem mounted again", joboutputs.machine_label(joboutputs_dir))
        return True

    # -- release ------------------------------------------------------------------------

    def release(self, joboutputs_dir: str) -> None:
        """Keep what the VM left within the caps, unmount, delete the image; idempotent."""
        label = joboutputs.machine_label(joboutputs_dir)
        saved = saved_path(joboutputs_dir)
        image = image_path(joboutputs_dir)
        if not is_mounted(joboutputs_dir) and not os.path.isdir(saved) and os.path.isfile(image):
            try:
                self._mount_image(image, joboutputs_dir)  # a host reboot: read it once more
            except ExportError as error:
                log.error("%s: joboutputs image cannot be mounted, its files are lost: %s",
                          label, error)
        if is_mounted(joboutputs_dir):
            if not os.path.isdir(saved):
                self._save(joboutputs_dir, saved)
            self._unmount(joboutputs_dir, label)
        if is_mounted(joboutputs_dir):  # stacked mounts: never delete under one
            raise ExportError(f"{joboutputs_dir}: still a mount point after umount")
        if os.path.lexists(image):
            os.unlink(image)
        if os.path.isdir(saved):
            for name in os.listdir(saved):
                os.replace(os.path.join(saved, name), os.path.join(joboutputs_dir, name))
            fsync_directory(joboutputs_dir)
            os.rmdir(saved)
        shutil.rmtree(saving_path(joboutputs_dir), ignore_errors=True)

    def _unmount(self, joboutputs_dir: str, label: str) -> None:
        """Unmount; if something still holds a file open in it (the files are saved by now),
        detach it lazily: it goes, with its loop device, when the last holder closes."""
        try:
            self.runner(["umount", joboutputs_dir])
        except ExportError as error:
            if not is_mounted(joboutputs_dir):
                raise
            log.warning("%s: joboutputs filesystem busy (%s); detached lazily", label, error)
            self.runner(["umount", "-l", joboutputs_dir])

    def _save(self, joboutputs_dir: str, saved: str) -> None:
        """Copy the accepted files (hostile input: no links, caps) into ``saved``, atomically."""
        saving = saving_path(joboutputs_dir)
        shutil.rmtree(saving, ignore_errors=True)
        os.mkdir(saving, 0o755)
        copied = copy_accepted(joboutputs_dir, saving, self.limits)
        fsync_directory(saving)
        os.rename(saving, saved)
        fsync_directory(os.path.dirname(saved))
        log.info("%s: %d joboutputs files kept", joboutputs.machine_label(joboutputs_dir), copied)


def image_path(joboutputs_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(joboutputs_dir)), IMAGE)


def saved_path(joboutputs_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(joboutputs_dir)), SAVED)


def saving_path(joboutputs_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(joboutputs_dir)), SAVING)


def available_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def copy_accepted(source_dir: str, dest_dir: str, limits: JobOutputsLimits) -> int:
    """Copy the files :func:`joboutputs.scan` accepts, keeping their mtimes; how many."""
    report = joboutputs.scan(source_dir, limits)
    try:
        dir_fd = joboutputs.open_directory(source_dir)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return 0
        raise
    copied: List[str] = []
    try:
        for name, _ in report.files:
            data = joboutputs.read_regular_prefix(dir_fd, name, limits.max_file_bytes,
                                                  limits.max_file_bytes)
            if data is None:
                continue  # changed under us: it no longer passes the rules
            try:
                mtime = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
            except OSError:
                continue
            _write_synced(os.path.join(dest_dir, name), data, mtime)
            copied.append(name)
    finally:
        os.close(dir_fd)
    return len(copied)


def _write_synced(path: str, data: bytes, mtime: float) -> None:
    """A new file with ``data`` on disk (fsynced: the image it came from is deleted next)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    finally:
        os.close(fd)
