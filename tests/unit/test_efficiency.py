"""core.efficiency: per-VM and per-machinetype CPU efficiency, the ratio of sums, never negative."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, strategies as st

from vacfactory.core.efficiency import Efficiency, machinetype_efficiency, total_efficiency, vm_efficiency

DAY = 86400.0
NOW = 1705499379.0


def test_vm_efficiency_is_cpu_over_wall_times_processors():
    assert vm_efficiency(7200, 3600, 4) == pytest.approx(0.5)
    assert vm_efficiency(3600, 3600, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("wall,processors", [(0, 8), (-5, 8), (3600, 0), (float("nan"), 1), (float("inf"), 0)])
def test_no_processor_time_gives_none(wall, processors):
    assert vm_efficiency(100, wall, processors) is None


def test_negative_or_nan_cpu_counts_as_zero():
    assert vm_efficiency(-50, 100, 1) == 0.0
    assert vm_efficiency(float("nan"), 100, 1) == 0.0


def test_machinetype_efficiency_only_counts_vms_ended_since():
    rows = [
        ("atlas", 3600, 3600, 1, NOW - 100),       # in
        ("atlas", 0, 3600, 1, NOW - 2 * DAY),      # ended before the window: out
        ("lhcb", 1800, 3600, 2, NOW - DAY),        # exactly at the start: in
    ]
    result = machinetype_efficiency(iter(rows), since=NOW - DAY)
    assert set(result) == {"atlas", "lhcb"}
    assert result["atlas"] == Efficiency(vms=1, cpu_hours=1.0, wall_hours=1.0, processor_hours=1.0,
                                         efficiency=1.0)
    assert result["lhcb"].vms == 1 and result["lhcb"].processor_hours == pytest.approx(2.0)
    assert result["lhcb"].efficiency == pytest.approx(0.25)


def test_aggregate_is_the_ratio_of_sums_not_the_mean_of_ratios():
    # a short idle VM must not weigh as much as a long busy one
    rows = [("cms", 0, 600, 1, NOW), ("cms", 86400 * 8 * 0.9, 86400, 8, NOW)]
    result = machinetype_efficiency(rows, since=0)["cms"]
    assert result.efficiency == pytest.approx((86400 * 8 * 0.9) / (600 + 86400 * 8))
    assert result.efficiency > 0.89  # the mean of ratios would say 0.45


def test_machinetype_with_only_zero_wall_vms_has_no_efficiency_but_counts_them():
    result = machinetype_efficiency([("alice", 10, 0, 4, NOW)], since=0)["alice"]
    assert result.vms == 1 and result.efficiency is None and result.cpu_hours == pytest.approx(10 / 3600)


def test_total_combines_machinetypes_as_one_ratio():
    per = machinetype_efficiency([("a", 3600, 3600, 1, NOW), ("b", 0, 3600, 3, NOW)], since=0)
    total = total_efficiency(per)
    assert total.vms == 2 and total.processor_hours == pytest.approx(4.0)
    assert total.efficiency == pytest.approx(0.25)
    assert total_efficiency({}).efficiency is None


_seconds = st.one_of(st.floats(min_value=-1e7, max_value=1e9),
                     st.sampled_from([float("nan"), float("inf"), float("-inf")]))
_rows = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), _seconds, _seconds,
                           st.integers(min_value=-2, max_value=256),
                           st.floats(min_value=0, max_value=2e9, allow_nan=False)), max_size=40)


@given(cpu=_seconds, wall=_seconds, processors=st.integers(min_value=-4, max_value=1024))
@example(cpu=2.0, wall=1.1125369292536007e-308, processors=1)  # overflowed to inf once
def test_vm_efficiency_is_never_negative_or_nan(cpu, wall, processors):
    value = vm_efficiency(cpu, wall, processors)
    assert value is None or (math.isfinite(value) and value >= 0)


@given(rows=_rows, since=st.floats(min_value=0, max_value=2e9, allow_nan=False))
def test_aggregates_equal_the_ratio_of_the_clean_sums(rows, since):
    result = machinetype_efficiency(rows, since)

    def clean(x: float) -> float:
        return x if math.isfinite(x) and x > 0 else 0.0

    for name, eff in result.items():
        mine = [r for r in rows if r[0] == name and r[4] >= since]
        assert eff.vms == len(mine)
        cpu = sum(clean(r[1]) for r in mine)
        capacity = sum(clean(r[2]) * max(r[3], 0) for r in mine)
        assert eff.cpu_hours == pytest.approx(cpu / 3600, rel=1e-9)
        assert eff.processor_hours == pytest.approx(capacity / 3600, rel=1e-9)
        if capacity > 0 and math.isfinite(cpu / capacity):
            assert eff.efficiency == pytest.approx(cpu / capacity, rel=1e-9)
            assert eff.efficiency >= 0
        else:  # no processor-time, or so little that the ratio overflows: no figure
            assert eff.efficiency is None
    assert set(result) == {r[0] for r in rows if r[4] >= since}
