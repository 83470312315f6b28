"""What QEMU's user can reach: libvirt chowns images and kernels, never the directories above
them (measured in hypervisor/disks.py), so a 0700 directory fails every domain start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from vacfactory.config.model import Config
from vacfactory.config import options as table
from vacfactory.config.parsers import is_url

from .findings import ERROR, Finding, Locator


@dataclass(frozen=True)
class QemuUser:
    """The user qemu runs as under libvirt's system instance (Debian libvirt-qemu, EL qemu)."""

    name: str
    uid: int
    gids: Tuple[int, ...]


def find_qemu_user(names: Sequence[str] = ("libvirt-qemu", "qemu")) -> Optional[QemuUser]:
    import grp
    import pwd

    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return QemuUser(name, entry.pw_uid, tuple(sorted(groups)))
    return None


def qemu_access(config: Config, locator: Locator, qemu: Optional[QemuUser]) -> List[Finding]:
    """Every directory above the VMs' disks, root images, kernels and initrds must be
    searchable by qemu's user: libvirt chowns the files, never the directories, and
    otherwise refuses to start the domain ("Cannot access storage file ... Permission
    denied"). Only for qemu:///system, where qemu does not run as root."""
    s = config.settings
    if qemu is None or s.domain_type == "test" or not s.libvirt_uri.startswith("qemu:///system"):
        return []
    findings: List[Finding] = []
    why = _unsearchable(s.state_dir, qemu)
    if why:
        findings.append(locator.finding(ERROR, f"{why}: no VM can start (its disks are under {s.state_dir}); "
                                               "mode 0711 is enough", table.SETTINGS, table.STATE_DIR))
    for name, mt in config.machinetypes.items():
        if not (mt.startable and mt.target_share > 0):
            continue
        for option in ("root_image", "kernel_image", "initrd_image"):
            path = getattr(mt, option)
            why = _unsearchable(os.path.dirname(path), qemu) if path and not is_url(path) else None
            if why:
                findings.append(locator.finding(ERROR, f"{why}: qemu cannot open {path}; mode 0711 is enough",
                                                f"{table.MACHINETYPE} {name}", option))
    return findings


def _unsearchable(directory: str, qemu: QemuUser) -> Optional[str]:
    """Why ``qemu`` cannot pass through ``directory`` or one above it; None if it can (or a
    directory does not exist yet: the daemon makes those itself, searchable)."""
    path = os.path.abspath(directory)
    chain = []
    while True:
        chain.append(path)
        if path == os.path.dirname(path):
            break
        path = os.path.dirname(path)
    for path in reversed(chain):
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_uid == qemu.uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in qemu.gids:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return f"{path} (mode {st.st_mode & 0o7777:04o}) is not searchable by {qemu.name}"
    return None
