"""Facts about the host that configuration defaults are computed from.

Defaults such as ``factory_name`` (the host name, ``os.uname().nodename`` as in Vac) and
``total_processors`` (the processor count) depend on the machine. The memory total is no
default of anything (``total_memory_mb`` is unset, no cap, unless the admin sets it, as in
Vac); it is there to compare the configured VMs with. Probing happens once, here;
everything else takes a :class:`HostFacts` value, so tests pass made-up facts instead of
reading the real host.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostFacts:
    """The few host properties the configuration depends on.

    ``fqdn`` is the host's name as Vac takes it, ``os.uname().nodename`` (no DNS lookup: an
    ``/etc/hosts`` alias must not rename the factory); like Vac, the configuration insists
    it is fully qualified (contains a dot) before it becomes ``factory_name``.
    """

    fqdn: str
    cpu_count: int
    mem_total_mb: int

    @classmethod
    def probe(cls, proc: str = "/proc") -> "HostFacts":
        """Read the real host: its name from uname(2), processors and memory from /proc."""
        return cls(
            fqdn=os.uname().nodename,
            cpu_count=count_processors(os.path.join(proc, "cpuinfo")),
            mem_total_mb=memory_total_mb(os.path.join(proc, "meminfo")),
        )


def count_processors(cpuinfo_path: str = "/proc/cpuinfo") -> int:
    """Count ``processor`` lines like Vac does; fall back to os.cpu_count(), then 1."""
    count = 0
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == "processor":
                    count += 1
    except OSError as error:
        logger.warning("cannot read %s: %s", cpuinfo_path, error)
    if count:
        return count
    return os.cpu_count() or 1


def memory_total_mb(meminfo_path: str = "/proc/meminfo") -> int:
    """MemTotal in MiB; 0 if /proc/meminfo cannot be read (then nothing can be compared with it)."""
    total_kb: Optional[int] = None
    try:
        with open(meminfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    fields = line.split()
                    if len(fields) >= 2 and fields[1].isdigit():
                        total_kb = int(fields[1])
                    break
    except OSError as error:
        logger.warning("cannot read %s: %s", meminfo_path, error)
    if total_kb is None:
        return 0
    return total_kb // 1024
