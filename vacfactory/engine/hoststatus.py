"""Facts about the host that a factory_status reply (and `vacfactory factories`) reports.

Read from /proc and statvfs; cached for a few seconds because the engine rebuilds its
snapshot after every round and these change slowly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class HostStatus:
    load_average: float = 0.0          # 15-minute, as Vac reports
    kernel_version: str = ""
    os_issue: str = ""
    boot_time: float = 0.0
    mem_total_kb: int = 0
    mem_used_kb: int = 0
    swap_free_kb: int = 0
    swap_used_kb: int = 0
    root_disk_avail_kb: int = 0
    root_disk_avail_inodes: int = 0
    daemon_disk_avail_kb: int = 0
    daemon_disk_avail_inodes: int = 0


class HostStatusReader:
    def __init__(self, state_dir: str, proc: str = "/proc") -> None:
        self.state_dir = state_dir
        self.proc = proc
        self._cached: Optional[HostStatus] = None
        self._when = 0.0

    def read(self) -> HostStatus:
        now = time.monotonic()
        if self._cached is None or now - self._when > CACHE_SECONDS:
            self._cached = self._read()
            self._when = now
        return self._cached

    def _read(self) -> HostStatus:
        meminfo = self._meminfo()
        root_kb, root_inodes = _disk("/tmp")
        daemon_kb, daemon_inodes = _disk(self.state_dir)
        total = meminfo.get("MemTotal", 0)
        swap_total = meminfo.get("SwapTotal", 0)
        swap_free = meminfo.get("SwapFree", 0)
        return HostStatus(
            load_average=_loadavg(self.proc),
            kernel_version=os.uname().release,
            os_issue=_os_issue(),
            boot_time=_boot_time(self.proc),
            mem_total_kb=total,
            mem_used_kb=max(total - meminfo.get("MemAvailable", total), 0),
            swap_free_kb=swap_free,
            swap_used_kb=max(swap_total - swap_free, 0),
            root_disk_avail_kb=root_kb,
            root_disk_avail_inodes=root_inodes,
            daemon_disk_avail_kb=daemon_kb,
            daemon_disk_avail_inodes=daemon_inodes,
        )

    def _meminfo(self) -> Dict[str, int]:
        values: Dict[str, int] = {}
        try:
            with open(os.path.join(self.proc, "meminfo")) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    number = rest.split()
                    if number and number[0].isdigit():
                        values[key] = int(number[0])
        except OSError:
            pass
        return values


def _loadavg(proc: str) -> float:
    try:
        with open(os.path.join(proc, "loadavg")) as f:
            return float(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 0.0


def _boot_time(proc: str) -> float:
    try:
        with open(os.path.join(proc, "stat")) as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def _os_issue() -> str:
    for path in ("/etc/redhat-release", "/etc/debian_version"):
        try:
            with open(path) as f:
                first = f.readline().strip()
        except OSError:
            continue
        if first:
            return first if "release" in path else f"Debian {first}"
    return os.uname().release


def _disk(path: str):
    try:
        st = os.statvfs(path)
    except OSError:
        return 0, 0
    return st.f_bavail * st.f_frsize // 1024, st.f_favail
