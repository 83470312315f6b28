"""accounting.report: the monthly report, from an archive written by account_vm itself."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest

from tests.unit.test_apel_support import NOW, make_settings, make_usage
from vacfactory.accounting import account_vm
from vacfactory.accounting.report import monthly_report, report_lines
from vacfactory.errors import AccountingError

JAN_START = 1704067200  # 2024-01-01T00:00:00Z
DEC_END = 1701388800    # 2023-12-01T00:00:00Z


def vm(i: int, machinetype: str, processors: int, wall: int, cpu: int, hs06: float = 10.0, end: int = 1705400000):
    return make_usage(i, machinetype=machinetype, processors=processors, start_time=end - wall, end_time=end,
                      cpu_seconds=cpu, hs06_per_processor=hs06)


def test_report_per_machinetype_with_hours_hs06_and_efficiency(tmp_path):
    settings = make_settings(str(tmp_path))
    usages = [
        vm(1, "lhcb-prod", 8, 36000, 8 * 36000 * 3 // 4),     # 10 h on 8 processors, 75 % busy
        vm(2, "lhcb-prod", 4, 7200, 4 * 7200 // 4),           # 2 h on 4 processors, 25 % busy
        vm(3, "atlas", 1, 3600, 3600, hs06=12.5),             # 1 h, fully busy
        vm(4, "atlas", 2, 1800, 0, end=JAN_START),            # ends exactly at the month's start: January
        vm(5, "atlas", 1, 3600, 3600, end=DEC_END),           # December: not in January's report
    ]
    for usage in usages:
        account_vm(usage, settings, NOW)
    report = monthly_report(settings.archive_dir, "202401")
    rows = {r.machinetype: r for r in report.machinetypes}
    assert list(rows) == ["atlas", "lhcb-prod"]
    lhcb = rows["lhcb-prod"]
    assert lhcb.vms == 2
    assert lhcb.wall_hours == pytest.approx(12.0)
    assert lhcb.processor_hours == pytest.approx(8 * 10 + 4 * 2)
    assert lhcb.cpu_hours == pytest.approx(8 * 10 * 0.75 + 4 * 2 * 0.25)
    assert lhcb.hs06_hours == pytest.approx(88 * 10.0)
    assert lhcb.efficiency == pytest.approx((60 + 2) / 88)
    atlas = rows["atlas"]
    assert atlas.vms == 2 and atlas.wall_hours == pytest.approx(1.5) and atlas.processor_hours == pytest.approx(2.0)
    assert atlas.hs06_hours == pytest.approx(1 * 12.5 + 1 * 10.0) and atlas.efficiency == pytest.approx(0.5)
    total = report.total
    assert total.vms == 4 and total.processor_hours == pytest.approx(90.0)
    assert total.efficiency == pytest.approx(63 / 90) and report.benchmark_types == ("HEPSPEC",)
    december = monthly_report(settings.archive_dir, "202312")
    assert [(r.machinetype, r.vms) for r in december.machinetypes] == [("atlas", 1)]


def test_empty_month_and_a_bad_month(tmp_path):
    settings = make_settings(str(tmp_path))
    report = monthly_report(settings.archive_dir, "202402")
    assert report.machinetypes == () and report.total.vms == 0 and report.total.efficiency is None
    assert "TOTAL" in report_lines(report)[-1]
    for bad in ("2024-01", "202413", "24"):
        with pytest.raises(AccountingError):
            monthly_report(settings.archive_dir, bad)


def test_unreadable_records_are_counted_not_guessed(tmp_path):
    settings = make_settings(str(tmp_path))
    result = account_vm(vm(1, "lhcb-prod", 1, 3600, 1800), settings, NOW)
    identity_dir = os.path.dirname(result.archive_path)
    with open(os.path.join(identity_dir, "11111111-2222-4333-8444-555555555555"), "w") as f:
        f.write("APEL-individual-job-message: v0.3\nQueue: x\nWallDuration: lots\n%%\n")
    with open(os.path.join(identity_dir, "11111111-2222-4333-8444-666666666666"), "wb") as f:
        f.write(b"\xff\xfe not even ascii")
    report = monthly_report(settings.archive_dir, "202401")
    assert report.invalid == 2 and [r.vms for r in report.machinetypes] == [1]
    assert report_lines(report)[-1] == "2 archive records could not be read (see the log)"


def test_hepscore_archives_say_so_and_json_and_table_agree(tmp_path):
    settings = make_settings(str(tmp_path), benchmark_type="HEPscore23")
    account_vm(vm(1, "cms", 4, 3600, 7200, hs06=20.0), settings, NOW)
    report = monthly_report(settings.archive_dir, "202401")
    assert report.benchmark_types == ("HEPscore23",)
    value = json.loads(json.dumps(report.as_dict()))
    assert value["machinetypes"][0] == {"machinetype": "cms", "vms": 1, "wall_hours": 1.0, "cpu_hours": 2.0,
                                        "processor_hours": 4.0, "hs06_hours": 80.0, "efficiency": 0.5}
    lines = report_lines(report)
    assert "HEPscore23 h" in lines[1]
    assert lines[2].split() == ["cms", "1", "1.0", "2.0", "4.0", "80.0", "50.0%"]


def _peak(archive_dir: str) -> int:
    tracemalloc.start()
    try:
        monthly_report(archive_dir, "202401")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_records(tmp_path):
    settings = make_settings(str(tmp_path))
    for i in range(1, 201):
        account_vm(vm(i, f"mt{i % 3}", 1, 3600, 1800), settings, NOW)
    _peak(settings.archive_dir)  # the first run warms caches (regexes, imports)
    small = _peak(settings.archive_dir)
    for i in range(201, 1201):
        account_vm(vm(i, f"mt{i % 3}", 1, 3600, 1800), settings, NOW)
    large = _peak(settings.archive_dir)
    assert monthly_report(settings.archive_dir, "202401").total.vms == 1200
    assert large < small * 1.5 + 16384, (small, large)  # 6x the records, about the same memory
