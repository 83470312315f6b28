"""Mounts a test left under its directory (NFS VMs' joboutputs filesystems, vmio.jobfs).

A factory stopped while NFS VMs still run keeps their joboutputs filesystems mounted, as it
must in production (the next start adopts them). A test that then removes its directory must
unmount them first, or ``rmtree`` empties them and leaves the mounts and their loop devices.
"""

from __future__ import annotations

import subprocess
from typing import List


def mounts_under(root: str) -> List[str]:
    """Mount points strictly below ``root``, from /proc/self/mounts (octal escapes decoded)."""
    prefix = root.rstrip("/") + "/"
    with open("/proc/self/mounts", encoding="utf-8") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p.startswith(prefix)]


def unmount_under(root: str) -> List[str]:
    """Unmount (lazily, deepest first) everything below ``root``; what was unmounted.
    A loop-mounted image's loop device goes with its mount (autoclear)."""
    points = sorted(mounts_under(root), key=len, reverse=True)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points
