"""sim.workload: supplies over time and workload files read as untrusted input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from vacfactory.sim.workload import Supply, WorkloadError, parse_workload

SHARES = {"atlas": 5.0, "lhcb": 3.0}


def test_a_bursty_supply_has_work_for_on_hours_then_none_for_off_hours():
    bursty = Supply("bursty", on_hours=6, off_hours=6)
    assert [bursty.has_work(h * 3600) for h in (0, 5.99, 6, 11.99, 12, 18)] == [
        True, True, False, False, True, False]
    shifted = Supply("bursty", on_hours=6, off_hours=6, phase_hours=6)
    assert not shifted.has_work(0) and shifted.has_work(6 * 3600)


def test_a_drained_supply_has_no_work_for_a_day():
    drained = Supply("drained", from_hours=48)
    assert [drained.has_work(h * 3600) for h in (47.9, 48, 71.9, 72)] == [True, False, False, True]
    assert Supply().has_work(1e9)


def test_a_workload_file_names_supplies_lifetimes_and_a_share_change():
    text = json.dumps({"hours": 72, "warmup_hours": 12,
                       "machinetypes": {"lhcb": {"supply": "bursty", "on_hours": 3,
                                                 "mean_hours": 6}},
                       "share_change": {"at_hours": 40, "shares": {"atlas": 1, "lhcb": 4}}})
    workload = parse_workload(text, SHARES, "w.json")
    atlas, lhcb = workload.types
    assert (atlas.name, atlas.share, atlas.supply.kind, atlas.mean_hours) == ("atlas", 5, "steady", 12)
    assert (lhcb.supply.kind, lhcb.supply.on_hours, lhcb.mean_hours) == ("bursty", 3, 6)
    assert (workload.hours, workload.warmup_hours) == (72, 12)
    assert workload.share_change.shares == {"atlas": 1, "lhcb": 4}


@pytest.mark.parametrize("text, says", [
    ("[1", "w.json: not JSON"),
    ("[]", "w.json: the top level must be an object"),
    ('{"hours": "a week"}', "w.json: hours: 'a week' is not a number"),
    ('{"hours": 1e400}', "w.json: hours: inf is not a number"),
    ('{"hours": 10, "warmup_hours": 10}', "w.json: warmup_hours: 10 is not in [0, 9.99]"),
    ('{"machinetypes": {"cms": {}}}', "w.json: machinetypes.cms: not a configured machinetype"),
    ('{"machinetypes": {"lhcb": {"supply": "lots"}}}', "machinetypes.lhcb.supply: 'lots' is not"),
    ('{"machinetypes": {"lhcb": {"sigma": -1}}}', "machinetypes.lhcb.sigma: -1 is not in [0, 3]"),
    ('{"machinetypes": {"lhcb": {"mean_hours": true}}}', "mean_hours: True is not a number"),
    ('{"machinetypes": {"lhcb": {"lifetime": 3}}}', "machinetypes.lhcb: unknown keys lifetime"),
    ('{"share_change": {"at_hours": 1, "shares": {"atlas": 0}}}', "at least one share"),
    ('{"share_change": {"at_hours": 1, "shares": {"cms": 1}}}', "shares.cms: not a configured"),
    ('{"extra": 1}', "w.json: unknown keys extra"),
    ('{"machinetypes": {"lhcb": {"nowork_ends": 300}}}', "nowork_ends: 300 is not 300 or fizzle"),
])
def test_a_bad_workload_file_is_refused_naming_the_file_and_the_entry(text, says):
    with pytest.raises(WorkloadError) as error:
        parse_workload(text, SHARES, "w.json")
    assert says in str(error.value)


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["hours", "machinetypes", "lhcb", "supply",
                                                       "on_hours", "share_change", "shares",
                                                       "at_hours", "atlas"]), inner, max_size=4),
                    max_leaves=12))
def test_any_json_is_a_workload_or_a_workload_error(value):
    try:
        parse_workload(json.dumps(value), SHARES, "w.json")
    except WorkloadError as error:
        assert str(error).startswith("w.json")
