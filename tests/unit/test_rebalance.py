"""core.rebalance: excess VMs of an over-share machinetype get notice (an earlier MJF shutdown
time), bounded by the budget, never past the target, only when another waits with work."""

from __future__ import annotations

import random

from hypothesis import given, strategies as st

from vacfactory.core.adaptive_backoff import SpaceMemory
from vacfactory.core.rebalance import RebalancePolicy, plan, space_excess, under_notice
from vacfactory.core.views import LocalVM, MachinetypePolicy, MachinetypeState

NOW = 1_000_000.0
NOTICE = RebalancePolicy(notice_seconds=3600, max_fraction=0.25)


def mt(name, share, **kw):
    return MachinetypePolicy(name=name, target_share=share, machinegroup=name, **kw)


def vm(uuid, name, ends, processors=1):
    return LocalVM(uuid=uuid, machinetype=name, processors=processors, created=NOW - 3600,
                   shutdown_time=ends, memory_mb=0, hs06=float(processors), started=NOW - 3600)


def running(processors, **kw):
    return MachinetypeState(running_hs06=float(processors), running_processors=processors,
                            running_machines=processors, **kw)


TYPES = [mt("atlas", 2), mt("lhcb", 5)]


def test_a_share_change_gives_notice_to_this_factorys_part_of_the_excess():
    # space: atlas 50 of 70 processors (target 2/7 = 20), lhcb 20 (target 50) and waiting
    space = {"atlas": running(50), "lhcb": running(20)}
    assert space_excess(TYPES, space, {"lhcb"}) == {"atlas": 30.0}
    mine = [vm(f"a{i}", "atlas", NOW + 86400 + i) for i in range(8)]
    rewrites = plan(NOTICE, 16, TYPES, mine, {}, space, {"lhcb"}, NOW, random.Random(3))
    # 30 x 8/50 = 4.8 -> 4 or 5, within a budget of 25% of 16 = 4; latest shutdown times first
    assert [r.uuid for r in rewrites] == ["a7", "a6", "a5", "a4"]
    assert {r.shutdown_time for r in rewrites} == {NOW + 3600}


def test_vms_already_under_notice_count_against_excess_and_budget():
    space = {"atlas": running(50), "lhcb": running(20)}
    mine = [vm(f"a{i}", "atlas", NOW + 86400 + i) for i in range(8)]
    noticed = [vm(v.uuid, "atlas", NOW + 1800) if i < 4 else v for i, v in enumerate(mine)]
    original = {v.uuid: v.shutdown_time for v in mine}
    assert under_notice(noticed[0], original["a0"], NOW)
    assert plan(NOTICE, 16, TYPES, noticed, original, space, {"lhcb"}, NOW,
                random.Random(3)) == []


def test_nothing_moves_when_nobody_under_share_has_shown_work():
    space = {"atlas": running(50), "lhcb": running(20, last_abort_time=NOW - 300)}
    assert space_excess(TYPES, space, set()) == {}
    mine = [vm(f"a{i}", "atlas", NOW + 86400) for i in range(8)]
    assert plan(NOTICE, 16, TYPES, mine, {}, space, set(), NOW, random.Random(3)) == []


def test_a_probe_that_outlives_its_fizzle_window_shows_the_work_is_back():
    memory = SpaceMemory()
    aborted = running(10, last_abort_time=NOW - 100)
    memory.observe({"lhcb": aborted}, NOW)
    assert not memory.shown_work("lhcb", aborted, 600, NOW + 5000)  # no VM seen starting
    probing = running(11, last_abort_time=NOW - 100, num_before_fizzle=1)
    memory.observe({"lhcb": probing}, NOW + 60)
    assert not memory.shown_work("lhcb", probing, 600, NOW + 659)
    assert memory.shown_work("lhcb", probing, 600, NOW + 660)
    # the probe aborted after all: a newer abort, no proof
    again = running(10, last_abort_time=NOW + 300)
    memory.observe({"lhcb": again}, NOW + 700)
    assert not memory.shown_work("lhcb", again, 600, NOW + 700)
    assert memory.shown_work("lhcb", running(5), 600, NOW)  # never aborted


def test_the_memory_counts_every_abort_it_saw_not_only_each_factorys_latest():
    memory = SpaceMemory(horizon_seconds=3600)
    for age in (3000, 2000, 1000):  # one factory, three probes: the view shows only one
        memory.observe({"lhcb": running(0, last_abort_time=NOW - age,
                                        abort_times=(NOW - age,))}, NOW - age)
    view = memory.remembered({"lhcb": running(0, last_abort_time=NOW - 1000,
                                              abort_times=(NOW - 1000,))}, {"lhcb": 600}, NOW)
    assert view["lhcb"].abort_times == (NOW - 3000, NOW - 2000, NOW - 1000)
    assert view["lhcb"].work_shown is False
    memory.observe({"lhcb": running(0)}, NOW + 700)  # 3000 s old is now beyond the horizon
    assert memory.remembered({"lhcb": running(0)}, {}, NOW + 700)["lhcb"].abort_times == (
        NOW - 2000, NOW - 1000)


def test_vms_ending_within_the_notice_are_left_alone():
    space = {"atlas": running(50), "lhcb": running(20)}
    mine = [vm("soon", "atlas", NOW + 1000), vm("late", "atlas", NOW + 90000)]
    rewrites = plan(RebalancePolicy(3600, 1.0), 8, TYPES, mine, {}, space, {"lhcb"}, NOW,
                    random.Random(1))
    assert [r.uuid for r in rewrites] == ["late"]


def test_only_the_lacking_processors_move_when_the_excess_is_larger():
    types = [mt("atlas", 1), mt("lhcb", 1), mt("gamma", 2)]
    space = {"atlas": running(65), "lhcb": running(20), "gamma": running(15)}
    # gamma (target 50) lacks 35, lhcb (target 25) has not shown work: atlas (target 25)
    # gives 35 of its 40
    assert space_excess(types, space, {"gamma"}) == {"atlas": 35.0}
    assert space_excess(types, space, {"gamma", "lhcb"}) == {"atlas": 40.0}


shares = st.lists(st.integers(0, 10), min_size=1, max_size=4)


@given(shares=shares, data=st.data(), seed=st.integers(0, 1000),
       fraction=st.floats(0, 1), total=st.integers(1, 64))
def test_a_plan_stays_within_budget_and_only_touches_over_share_machinetypes(
        shares, data, seed, fraction, total):
    types = [mt(f"m{i}", s) for i, s in enumerate(shares)]
    space = {t.name: running(data.draw(st.integers(0, 500))) for t in types}
    shown = set(data.draw(st.lists(st.sampled_from([t.name for t in types]))))
    local = [vm(f"v{i}", data.draw(st.sampled_from([t.name for t in types])),
                NOW + data.draw(st.floats(0, 200_000)), data.draw(st.integers(1, 4)))
             for i in range(data.draw(st.integers(0, 20)))]
    policy = RebalancePolicy(3600, fraction)
    rewrites = plan(policy, total, types, local, {}, space, shown, NOW, random.Random(seed))
    excess = space_excess(types, space, shown)
    by_uuid = {v.uuid: v for v in local}
    assert len({r.uuid for r in rewrites}) == len(rewrites)
    assert sum(by_uuid[r.uuid].processors for r in rewrites) <= max(0, int(fraction * total))
    for r in rewrites:
        assert r.machinetype in excess and by_uuid[r.uuid].machinetype == r.machinetype
        assert r.shutdown_time == NOW + 3600 < by_uuid[r.uuid].shutdown_time
    # the space never gives up more than is over target
    shared = [t for t in types if t.target_share > 0]
    all_running = sum(space[t.name].running_processors for t in shared)
    for name, amount in excess.items():
        target = all_running * next(t.target_share for t in shared if t.name == name) / sum(
            t.target_share for t in shared)
        assert 0 < amount <= space[name].running_processors - target + 1e-9
