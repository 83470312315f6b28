"""CPU efficiency of VMs: how much of the processors they held they actually kept busy.

Sites must show that VMs use the hardware as well as batch jobs do; the batch world's figure
is CPU efficiency = CPU seconds / (wall seconds x processors), and so is ours: 1.0 means every
processor of the VM was busy for its whole life. Pure: the engine, the CLI, /metrics and the
monthly APEL report all feed plain numbers in.

An aggregate is the ratio of the sums (total CPU over total processor-time), never the mean
of per-VM ratios: a 10-minute VM must not weigh as much as a 2-day one, and this is how APEL
and batch systems compute it.

Hostile or broken inputs (a clock that stepped back, a NaN from a bad reading) never produce
a negative or non-finite efficiency: negative CPU or wall time counts as zero, non-finite
values make the VM count with zero time, and no time at all gives None, not a division error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

#: (machinetype, cpu_seconds, wall_seconds, processors, end_time)
UsageRow = Tuple[str, float, float, int, float]


def _non_negative(value: float) -> float:
    """A usable amount of seconds: non-finite and negative values count as nothing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    if not math.isfinite(number) or number < 0:
        return 0.0
    return number


def vm_efficiency(cpu_seconds: float, wall_seconds: float, processors: int) -> Optional[float]:
    """CPU seconds / (wall seconds x processors); None when the VM held no processor-time."""
    capacity = _non_negative(wall_seconds) * _non_negative(processors)
    return _ratio(_non_negative(cpu_seconds), capacity)


def _ratio(cpu: float, capacity: float) -> Optional[float]:
    """cpu / capacity; None for no capacity, or a capacity so small the ratio overflows
    (a wall time of 1e-308 s is a broken reading, not a VM)."""
    if capacity <= 0:
        return None
    value = cpu / capacity
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Efficiency:
    """Usage of one machinetype over a period, and its CPU efficiency (None: no time at all)."""

    vms: int
    cpu_hours: float
    wall_hours: float
    #: wall hours x processors: the capacity the VMs held
    processor_hours: float
    efficiency: Optional[float]


class _Sum:
    """Running totals of one machinetype (seconds; converted to hours once at the end)."""

    __slots__ = ("vms", "cpu", "wall", "capacity")

    def __init__(self) -> None:
        self.vms = 0
        self.cpu = 0.0
        self.wall = 0.0
        self.capacity = 0.0

    def add(self, cpu_seconds: float, wall_seconds: float, processors: int) -> None:
        wall = _non_negative(wall_seconds)
        self.vms += 1
        self.cpu += _non_negative(cpu_seconds)
        self.wall += wall
        self.capacity += wall * _non_negative(processors)

    def result(self) -> Efficiency:
        return Efficiency(
            vms=self.vms,
            cpu_hours=self.cpu / 3600.0,
            wall_hours=self.wall / 3600.0,
            processor_hours=self.capacity / 3600.0,
            efficiency=_ratio(self.cpu, self.capacity),
        )


def machinetype_efficiency(records: Iterable[UsageRow], since: float) -> Dict[str, Efficiency]:
    """Per machinetype, the VMs that ended at or after ``since`` (e.g. now - 86400).

    ``records`` are ``(machinetype, cpu_seconds, wall_seconds, processors, end_time)``; it is
    consumed once, so a generator over thousands of machine directories costs no memory. A
    caller that wants running VMs counted too passes them with ``end_time = now`` and their
    latest CPU reading. Machinetypes without a VM in the period are absent.
    """
    sums: Dict[str, _Sum] = {}
    for machinetype, cpu_seconds, wall_seconds, processors, end_time in records:
        try:
            ended = float(end_time)
        except (TypeError, ValueError):
            continue
        if not ended >= since:  # also drops NaN
            continue
        total = sums.get(machinetype)
        if total is None:
            total = sums[machinetype] = _Sum()
        total.add(cpu_seconds, wall_seconds, processors)
    return {name: total.result() for name, total in sorted(sums.items())}


def total_efficiency(per_machinetype: Dict[str, Efficiency]) -> Efficiency:
    """All machinetypes together (the ratio of the sums, like each machinetype's own)."""
    vms = sum(e.vms for e in per_machinetype.values())
    cpu = sum(e.cpu_hours for e in per_machinetype.values())
    wall = sum(e.wall_hours for e in per_machinetype.values())
    capacity = sum(e.processor_hours for e in per_machinetype.values())
    return Efficiency(vms, cpu, wall, capacity, cpu / capacity if capacity > 0 else None)
