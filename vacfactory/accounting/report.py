"""The monthly usage report from the APEL archive (``vacfactory apel report --month YYYYMM``).

Why: a site must show what its factories delivered and that VMs use the hardware as well as
batch jobs do. The archive holds every job record this factory wrote, so the report comes from
exactly those records, including any archived but never queued for APEL (``not-queued/``:
no gocdb_sitename or hs06_per_processor when they were written): per machinetype (the
record's ``Queue``), the VMs, wall hours, CPU hours, processor-weighted wall hours,
benchmark-weighted hours and the CPU efficiency of the month whose records end in it
(``EndTime``, UTC, as APEL counts months).

- wall hours      = sum(WallDuration) / 3600
- CPU hours       = sum(CpuDuration) / 3600
- processor hours = sum(WallDuration x Processors) / 3600
- HS06 hours      = sum(WallDuration x Processors x ServiceLevel) / 3600 (ServiceLevel is the
  benchmark per processor: HS06, or HEPscore23 with accounting_benchmark = HEPscore23; the
  report says which ``ServiceLevelType`` it saw)
- efficiency      = CPU hours / processor hours (the ratio of the sums, core.efficiency)

The month directory is streamed one record at a time through the archive's own listing and
``core.apel.parse_message``, so memory stays constant however many VMs a month has. A record
that does not parse is counted in ``invalid`` and logged (the first few), never guessed at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from vacfactory.accounting import archive
from vacfactory.core.apel import JOB, is_month, parse_message
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)

#: invalid records named in the log; the rest are only counted
MAX_LOGGED_INVALID = 10


@dataclass(frozen=True)
class MachinetypeUsage:
    """One machinetype's month (or, as ``Report.total``, every machinetype's)."""

    machinetype: str
    vms: int
    wall_hours: float
    cpu_hours: float
    processor_hours: float
    hs06_hours: float
    efficiency: Optional[float]


@dataclass(frozen=True)
class Report:
    month: str
    machinetypes: Tuple[MachinetypeUsage, ...]
    total: MachinetypeUsage
    #: ServiceLevelType values seen (HEPSPEC, HEPscore23): what "HS06 hours" are in
    benchmark_types: Tuple[str, ...]
    #: archive records that could not be read or parsed (logged)
    invalid: int = 0

    def as_dict(self) -> Dict[str, Any]:
        def row(u: MachinetypeUsage) -> Dict[str, Any]:
            return {"machinetype": u.machinetype, "vms": u.vms, "wall_hours": u.wall_hours,
                    "cpu_hours": u.cpu_hours, "processor_hours": u.processor_hours,
                    "hs06_hours": u.hs06_hours, "efficiency": u.efficiency}

        return {"month": self.month, "machinetypes": [row(u) for u in self.machinetypes],
                "total": row(self.total), "benchmark_types": list(self.benchmark_types),
                "invalid": self.invalid}


class _Sum:
    __slots__ = ("vms", "wall", "cpu", "capacity", "hs06")

    def __init__(self) -> None:
        self.vms = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.capacity = 0.0
        self.hs06 = 0.0

    def add(self, wall: int, cpu: int, processors: int, level: float) -> None:
        self.vms += 1
        self.wall += wall
        self.cpu += cpu
        self.capacity += wall * processors
        self.hs06 += wall * processors * level

    def merge(self, other: "_Sum") -> None:
        self.vms += other.vms
        self.wall += other.wall
        self.cpu += other.cpu
        self.capacity += other.capacity
        self.hs06 += other.hs06

    def usage(self, name: str) -> MachinetypeUsage:
        return MachinetypeUsage(
            machinetype=name, vms=self.vms, wall_hours=self.wall / 3600.0, cpu_hours=self.cpu / 3600.0,
            processor_hours=self.capacity / 3600.0, hs06_hours=self.hs06 / 3600.0,
            efficiency=self.cpu / self.capacity if self.capacity > 0 else None,
        )


def _numbers(fields: Dict[str, str]) -> Tuple[str, int, int, int, float]:
    """(Queue, WallDuration, CpuDuration, Processors, ServiceLevel); ValueError if unusable."""
    wall = int(fields["WallDuration"])
    cpu = int(fields["CpuDuration"])
    processors = int(fields.get("Processors") or 1)
    level = float(fields.get("ServiceLevel") or 1.0)
    if wall < 0 or cpu < 0 or processors < 1 or not level >= 0:
        raise ValueError("negative duration, processors or service level")
    return fields.get("Queue") or "(none)", wall, cpu, processors, level


def monthly_report(archive_dir: str, month: str) -> Report:
    """The report of ``month`` (``YYYYMM``) from the archive under ``archive_dir``."""
    if not is_month(month):
        raise AccountingError(f"{month!r} is not a month (YYYYMM)")
    sums: Dict[str, _Sum] = {}
    benchmarks = set()
    invalid = 0
    for record in archive.iter_job_records(archive_dir, since_month=month):
        if record.month != month:
            break  # months come in order: the rest are later
        try:
            message = parse_message(archive.read_record(record.path))
            if message.kind != JOB or not message.records:
                raise RecordInvalid("not a job record")
            for fields in message.records:
                queue, wall, cpu, processors, level = _numbers(dict(fields))
                if fields.get("ServiceLevelType"):
                    benchmarks.add(fields["ServiceLevelType"])
                sums.setdefault(queue, _Sum()).add(wall, cpu, processors, level)
        except (OSError, UnicodeDecodeError, RecordInvalid, KeyError, ValueError) as error:
            invalid += 1
            if invalid <= MAX_LOGGED_INVALID:
                log.warning("%s: archive record skipped in the %s report: %s", record.path, month, error)
    if invalid > MAX_LOGGED_INVALID:
        log.warning("%d archive records of %s skipped in all", invalid, month)
    total = _Sum()
    for value in sums.values():
        total.merge(value)
    return Report(
        month=month,
        machinetypes=tuple(sums[name].usage(name) for name in sorted(sums)),
        total=total.usage("TOTAL"),
        benchmark_types=tuple(sorted(benchmarks)),
        invalid=invalid,
    )


def report_lines(report: Report) -> List[str]:
    """The report as an aligned table for a terminal."""
    unit = "/".join(report.benchmark_types) or "HS06"
    header = (f"{'machinetype':<24} {'VMs':>7} {'wall h':>11} {'CPU h':>11} {'proc h':>11} "
              f"{unit + ' h':>13} {'efficiency':>10}")
    lines = [f"APEL archive, records ending in {report.month[:4]}-{report.month[4:]} (UTC)", header]
    for usage in report.machinetypes + (report.total,):
        eff = f"{100 * usage.efficiency:.1f}%" if usage.efficiency is not None else "-"
        lines.append(f"{usage.machinetype[:24]:<24} {usage.vms:>7} {usage.wall_hours:>11.1f} "
                     f"{usage.cpu_hours:>11.1f} {usage.processor_hours:>11.1f} {usage.hs06_hours:>13.1f} "
                     f"{eff:>10}")
    if report.invalid:
        lines.append(f"{report.invalid} archive records could not be read (see the log)")
    return lines
