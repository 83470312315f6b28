"""core.scheduler.decide: vetoes, fair shares, backoff, superslots, and never over-committing."""

from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List, Optional, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vacfactory.core.scheduler import backed_off, clock, decide
from vacfactory.core.views import (
    Create,
    Decision,
    FactoryPolicy,
    LocalVM,
    MachinetypePolicy,
    MachinetypeState,
)

NOW = 1_700_000_000.0
DAY = 86400.0


def mt(name: str, share: float = 1.0, **kw) -> MachinetypePolicy:
    kw.setdefault("machinegroup", name)
    return MachinetypePolicy(name=name, target_share=share, **kw)


def vm(
    machinetype: str,
    processors: int = 1,
    created: float = NOW - 3600,
    shutdown_time: float = NOW + DAY,
    memory_mb: Optional[int] = None,
    hs06: Optional[float] = None,
    uuid: str = "u",
) -> LocalVM:
    return LocalVM(
        uuid=uuid,
        machinetype=machinetype,
        processors=processors,
        created=created,
        shutdown_time=shutdown_time,
        memory_mb=2048 * processors if memory_mb is None else memory_mb,
        hs06=float(processors) if hs06 is None else hs06,
        started=created + 10,
    )


def run(
    policy: FactoryPolicy,
    machinetypes: Sequence[MachinetypePolicy],
    local_vms: Sequence[LocalVM] = (),
    space: Optional[Dict[str, MachinetypeState]] = None,
    load: float = 0.0,
    now: float = NOW,
    seed: int = 1,
) -> Decision:
    return decide(
        policy, machinetypes, local_vms, space or {}, load, now, random.Random(seed)
    )


def per_type(decision: Decision) -> Counter:
    counts: Counter = Counter()
    for create in decision.creates:
        counts[create.machinetype] += create.processors
    return counts


# --- vetoes ----------------------------------------------------------------------------------


def test_overload_per_running_processor_vetoes_the_round():
    policy = FactoryPolicy(total_processors=64, host_processors=64)
    vms = [vm("a", uuid=str(i)) for i in range(8)]
    decision = run(policy, [mt("a")], vms, load=10.5)  # > 1.25 x 8
    assert decision.creates == ()
    assert "overloaded" in decision.reason and "8 running processors" in decision.reason


def test_overload_needs_more_than_four_running_processors():
    policy = FactoryPolicy(total_processors=64, host_processors=64)
    vms = [vm("a", uuid=str(i)) for i in range(4)]
    decision = run(policy, [mt("a")], vms, load=10.0)
    assert decision.creates


def test_overload_per_host_processor_vetoes_the_round():
    policy = FactoryPolicy(total_processors=64, host_processors=8)
    decision = run(policy, [mt("a")], load=10.01)
    assert decision.creates == ()
    assert "8 host processors" in decision.reason


def test_factory_shutdown_time_passed_vetoes_the_round():
    policy = FactoryPolicy(total_processors=8, host_processors=8, shutdown_time=NOW - 1)
    decision = run(policy, [mt("a", min_wallclock_seconds=0)])
    assert decision.creates == ()
    assert "shutdown_time" in decision.reason and "has passed" in decision.reason


def test_draining_vetoes_the_round():
    policy = FactoryPolicy(total_processors=8, host_processors=8, draining=True)
    decision = run(policy, [mt("a")])
    assert decision.creates == ()
    assert decision.reason == "draining"


def test_no_free_processors_vetoes_the_round():
    policy = FactoryPolicy(total_processors=2, host_processors=8)
    decision = run(policy, [mt("a")], [vm("a", 1, uuid="1"), vm("a", 1, uuid="2")])
    assert decision.creates == ()
    assert decision.reason == "all 2 processors in use"


def test_overload_veto_wins_over_draining():
    policy = FactoryPolicy(total_processors=8, host_processors=1, draining=True)
    assert "overloaded" in run(policy, [mt("a")], load=2.0).reason


# --- filling fast and stop reasons ------------------------------------------------------------


def test_64_free_processors_are_filled_in_one_call():
    policy = FactoryPolicy(total_processors=64, host_processors=64, max_starting_processors=64)
    decision = run(policy, [mt("a")])
    assert len(decision.creates) == 64
    assert all(c == Create("a", 1, NOW + DAY) for c in decision.creates)
    assert decision.reason == "all 64 processors in use"


def test_max_starting_processors_stops_the_round_with_its_reason():
    policy = FactoryPolicy(total_processors=64, host_processors=64, max_starting_processors=8)
    young = vm("a", 2, created=NOW - 10)
    decision = run(policy, [mt("a")], [young])
    assert sum(c.processors for c in decision.creates) == 6
    assert decision.reason == "max_starting_processors (8) reached: 8 processors starting"


def test_vm_is_not_shrunk_to_fit_the_remaining_starting_allowance():
    policy = FactoryPolicy(
        total_processors=64, host_processors=64, processors_per_superslot=8,
        max_starting_processors=16,
    )
    young = vm("a", 8, created=NOW - 10, shutdown_time=NOW + 5000)
    four = vm("a", 4, created=NOW - 5000, shutdown_time=NOW + 4000, uuid="x")  # a half superslot
    big = mt("a", min_processors=1, max_processors=8, min_wallclock_seconds=0)
    decision = run(policy, [big], [young, four])
    # fills the half superslot with 4, then an 8 would exceed 16 starting: it waits
    assert [c.processors for c in decision.creates] == [4]
    assert "max_starting_processors (16) reached" in decision.reason


def test_max_starting_below_vm_size_caps_the_size_instead_of_blocking_forever():
    policy = FactoryPolicy(
        total_processors=64, host_processors=64, processors_per_superslot=8,
        max_starting_processors=4,
    )
    decision = run(policy, [mt("a", min_processors=1, max_processors=8)])
    assert [c.processors for c in decision.creates] == [4]


def test_no_eligible_reason_names_each_machinetype_and_why():
    policy = FactoryPolicy(total_processors=8, host_processors=8)
    lhcb = mt("lhcb", backoff_seconds=200)
    atlas = mt("atlas", share=0)
    space = {"lhcb": MachinetypeState(last_abort_time=NOW - 100)}
    decision = run(policy, [lhcb, atlas], space=space)
    assert decision.creates == ()
    until = clock(NOW + 100)
    assert decision.reason == (
        f"no eligible machinetype: lhcb backing off until {until}, atlas share 0"
    )


def test_clock_formats_utc_and_survives_absurd_times():
    assert clock(0) == "00:00:00 UTC"
    assert clock(1e300) == f"{1e300:.0f}"


def test_unstartable_and_too_close_to_shutdown_types_are_refused_with_reasons():
    policy = FactoryPolicy(total_processors=8, host_processors=8, shutdown_time=NOW + 100)
    docker = mt("docker", startable=False)
    long = mt("long", min_wallclock_seconds=3600)
    decision = run(policy, [docker, long])
    assert decision.creates == ()
    assert "docker not startable" in decision.reason
    assert "long min_wallclock_seconds reaches shutdown_time" in decision.reason


def test_no_machinetypes_configured_says_so():
    policy = FactoryPolicy(total_processors=8, host_processors=8)
    assert run(policy, []).reason == "no eligible machinetype: none configured"


def test_memory_too_small_for_most_starved_type_picks_the_next():
    policy = FactoryPolicy(
        total_processors=16, host_processors=16, processors_per_superslot=8,
        total_memory_mb=4096, mb_per_processor=1024,
    )
    big = mt("big", min_processors=8, max_processors=8)
    small = mt("small", min_processors=1, max_processors=4)
    space = {"small": MachinetypeState(running_hs06=100.0)}  # big is more starved
    decision = run(policy, [big, small], space=space)
    assert [(c.machinetype, c.processors) for c in decision.creates] == [("small", 4)]
    assert "4096 MB" not in decision.reason and "0 MB free memory" in decision.reason


def test_memory_is_never_overcommitted_by_existing_vms():
    policy = FactoryPolicy(total_processors=8, host_processors=8, total_memory_mb=8192)
    decision = run(policy, [mt("a")], [vm("a", 1, memory_mb=7000)])
    assert len(decision.creates) == 0
    assert "1192 MB free memory" in decision.reason


# --- superslots -------------------------------------------------------------------------------


def test_partly_filled_superslot_is_filled_first_with_its_shutdown_time():
    policy = FactoryPolicy(total_processors=8, host_processors=8, processors_per_superslot=4)
    ends = NOW + 50000
    decision = run(
        policy,
        [mt("a", min_processors=1, max_processors=4, min_wallclock_seconds=0)],
        [vm("a", 2, shutdown_time=ends)],
    )
    assert decision.creates[0] == Create("a", 2, ends)
    # the remaining 4 processors open a new superslot of 4
    assert decision.creates[1:] == (Create("a", 4, NOW + DAY),)
    assert decision.reason == "all 8 processors in use"


def test_superslot_filling_respects_the_wallclock_window():
    policy = FactoryPolicy(total_processors=4, host_processors=8, processors_per_superslot=4)
    ends = NOW + 1000  # too short for min_wallclock_seconds of the machinetype
    decision = run(
        policy,
        [mt("a", min_processors=1, max_processors=4, min_wallclock_seconds=3600)],
        [vm("a", 2, shutdown_time=ends)],
    )
    # the two free processors are held for the superslot; nothing else fits
    assert decision.creates == ()
    assert "held for partly filled superslots" in decision.reason


def test_superslot_goes_to_the_first_type_that_fits_it():
    policy = FactoryPolicy(total_processors=4, host_processors=8, processors_per_superslot=4)
    ends = NOW + 7200
    starved = mt("starved", min_processors=1, max_processors=4, min_wallclock_seconds=10000)
    fits = mt("fits", min_processors=1, max_processors=4, min_wallclock_seconds=3600)
    space = {"fits": MachinetypeState(running_hs06=50.0)}
    decision = run(policy, [starved, fits], [vm("starved", 2, shutdown_time=ends)], space)
    assert decision.creates == (Create("fits", 2, ends),)


def test_new_superslot_shutdown_is_capped_at_factory_shutdown_time():
    shutdown = NOW + 20000
    policy = FactoryPolicy(total_processors=2, host_processors=8, shutdown_time=shutdown)
    decision = run(policy, [mt("a", min_wallclock_seconds=3600)])
    assert decision.creates == (Create("a", 1, shutdown), Create("a", 1, shutdown))


def test_vms_created_in_one_round_form_superslots_together():
    policy = FactoryPolicy(total_processors=8, host_processors=8, processors_per_superslot=4)
    decision = run(policy, [mt("a", min_processors=1, max_processors=2)])
    assert [c.processors for c in decision.creates] == [2, 2, 2, 2]
    assert {c.shutdown_time for c in decision.creates} == {NOW + DAY}


# --- shares, backoff and determinism ----------------------------------------------------------


def test_shares_5_3_2_split_an_empty_100_processor_factory_50_30_20():
    policy = FactoryPolicy(total_processors=100, host_processors=100, max_starting_processors=100)
    types = [mt("a", 5), mt("b", 3), mt("c", 2)]
    counts = per_type(run(policy, types))
    assert abs(counts["a"] - 50) <= 1 and abs(counts["b"] - 30) <= 1
    assert abs(counts["c"] - 20) <= 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), hs06=st.sampled_from([1.0, 10.0, 12.5]))
def test_shares_hold_for_any_seed_and_equal_hs06(seed: int, hs06: float):
    policy = FactoryPolicy(
        total_processors=100, host_processors=100, max_starting_processors=100,
        hs06_per_processor=hs06,
    )
    counts = per_type(run(policy, [mt("a", 5), mt("b", 3), mt("c", 2)], seed=seed))
    assert abs(counts["a"] - 50) <= 1
    assert abs(counts["b"] - 30) <= 1
    assert abs(counts["c"] - 20) <= 1


def test_machinegroup_score_sums_its_machinetypes():
    policy = FactoryPolicy(total_processors=1, host_processors=8)
    # group g: x and y together run 10/1 + 0/1 = 10 > z's 5/1, so z goes first although y is 0
    types = [mt("x", machinegroup="g"), mt("y", machinegroup="g"), mt("z", machinegroup="h")]
    space = {"x": MachinetypeState(running_hs06=10.0), "z": MachinetypeState(running_hs06=5.0)}
    assert run(policy, types, space=space).creates[0].machinetype == "z"


def test_backoff_gives_one_vm_a_fizzle_window_within_a_round():
    policy = FactoryPolicy(total_processors=16, host_processors=16)
    lhcb = mt("lhcb", backoff_seconds=100, fizzle_seconds=600)
    space = {"lhcb": MachinetypeState(last_abort_time=NOW - 200)}  # backoff over, no VM yet
    decision = run(policy, [lhcb], space=space)
    assert len(decision.creates) == 1
    assert "lhcb backing off until" in decision.reason


def test_backoff_and_fizzle_window_over_allows_filling():
    policy = FactoryPolicy(total_processors=16, host_processors=16)
    lhcb = mt("lhcb", backoff_seconds=100, fizzle_seconds=600)
    space = {"lhcb": MachinetypeState(last_abort_time=NOW - 701)}
    assert len(run(policy, [lhcb], space=space).creates) == 16


def test_machinetype_missing_from_the_space_view_counts_as_empty():
    policy = FactoryPolicy(total_processors=1, host_processors=8)
    space = {"a": MachinetypeState(running_hs06=1.0)}
    assert run(policy, [mt("a"), mt("b")], space=space).creates[0].machinetype == "b"


def test_backed_off_helper_matches_the_rule():
    lhcb = mt("lhcb", backoff_seconds=100, fizzle_seconds=600)
    assert backed_off(lhcb, MachinetypeState(last_abort_time=NOW - 50), NOW)
    assert not backed_off(lhcb, MachinetypeState(last_abort_time=NOW - 150), NOW)
    assert backed_off(lhcb, MachinetypeState(last_abort_time=NOW - 150, num_before_fizzle=1), NOW)
    assert not backed_off(lhcb, MachinetypeState(), NOW)


# --- property tests ---------------------------------------------------------------------------

NAMES = ["alice", "atlas", "cms", "lhcb", "dune"]

# Strategies are built once at import: building them inside @composite draws costs more than
# running the scheduler, and the whole suite must stay fast.
_NAME_LISTS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True)
_MT_FIELDS = st.fixed_dictionaries(
    {
        "low": st.sampled_from([1, 1, 1, 2, 4]),
        "spread": st.integers(0, 4),
        "min_wall": st.sampled_from([0.0, 600.0, 3600.0, 40000.0]),
        "wall_spread": st.sampled_from([0.0, 3600.0, DAY]),
        "share": st.sampled_from([1.0, 2.0, 0.5, 5.0, 0.0]),
        "group": st.sampled_from([None, "g1", "g2"]),
        "backoff": st.sampled_from([0.0, 10.0, 600.0]),
        "fizzle": st.sampled_from([0.0, 600.0]),
        "startable": st.sampled_from([True] * 7 + [False]),
    }
)


@st.composite
def machinetype_lists(draw) -> List[MachinetypePolicy]:
    types = []
    for name in draw(_NAME_LISTS):
        f = draw(_MT_FIELDS)
        types.append(
            MachinetypePolicy(
                name=name,
                target_share=f["share"],
                machinegroup=f["group"] or name,
                min_processors=f["low"],
                max_processors=f["low"] + f["spread"],
                min_wallclock_seconds=f["min_wall"],
                max_wallclock_seconds=f["min_wall"] + f["wall_spread"],
                backoff_seconds=f["backoff"],
                fizzle_seconds=f["fizzle"],
                startable=f["startable"],
            )
        )
    return types


policies = st.builds(
    FactoryPolicy,
    total_processors=st.integers(1, 96),
    processors_per_superslot=st.sampled_from([1, 1, 2, 4, 8]),
    hs06_per_processor=st.sampled_from([1.0, 10.0, 17.3]),
    mb_per_processor=st.sampled_from([1024, 2048]),
    total_memory_mb=st.none() | st.integers(0, 200_000),
    host_processors=st.integers(1, 128),
    shutdown_time=st.none() | st.floats(NOW - 100, NOW + 2 * DAY),
    draining=st.sampled_from([False] * 9 + [True]),
    max_starting_processors=st.integers(1, 128),
    starting_seconds=st.sampled_from([0.0, 60.0, 600.0]),
)

_local_vm = st.builds(
    lambda machinetype, processors, age, ends, mb: LocalVM(
        uuid="vm",
        machinetype=machinetype,
        processors=processors,
        created=NOW - age,
        shutdown_time=NOW + ends,
        memory_mb=processors * mb,
        hs06=processors * 10.0,
    ),
    machinetype=st.sampled_from(NAMES + ["gone"]),
    processors=st.integers(1, 8),
    age=st.floats(0, 5000),
    ends=st.floats(-100, 2 * DAY),
    mb=st.sampled_from([1024, 2048]),
)
local_vm_lists = st.lists(_local_vm, max_size=12)

_state = st.builds(
    MachinetypeState,
    running_hs06=st.floats(0, 1000),
    running_processors=st.integers(0, 100),
    running_machines=st.integers(0, 100),
    num_before_fizzle=st.integers(0, 3),
    last_abort_time=st.none() | st.none() | st.floats(NOW - 3000, NOW),
)
space_views = st.dictionaries(st.sampled_from(NAMES), _state, max_size=5)

scenarios = st.fixed_dictionaries(
    {
        "policy": policies,
        "machinetypes": machinetype_lists(),
        "local_vms": local_vm_lists,
        "space": space_views,
        "load_average": st.sampled_from([0.0] * 8 + [1.0, 5.0, 50.0, 500.0]),
        "now": st.just(NOW),
        "seed": st.integers(0, 1000),
    }
)


def decide_scenario(s) -> Decision:
    return decide(
        s["policy"], s["machinetypes"], s["local_vms"], s["space"], s["load_average"], s["now"],
        random.Random(s["seed"]),
    )


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios)
def test_never_overcommits_processors_memory_or_starting(s):
    decision = decide_scenario(s)
    policy, vms = s["policy"], s["local_vms"]
    created = sum(c.processors for c in decision.creates)
    assert created <= max(0, policy.total_processors - sum(v.processors for v in vms))
    if policy.total_memory_mb is not None:
        used = sum(v.memory_mb for v in vms)
        assert created * policy.mb_per_processor <= max(0, policy.total_memory_mb - used)
    starting = sum(v.processors for v in vms if v.created > NOW - policy.starting_seconds)
    assert created <= max(0, policy.max_starting_processors - starting)


@PROPERTY
@given(scenarios)
def test_every_create_respects_processor_limits_and_superslot_size(s):
    types = {t.name: t for t in s["machinetypes"]}
    for create in decide_scenario(s).creates:
        t = types[create.machinetype]
        assert t.min_processors <= create.processors <= t.max_processors
        assert create.processors <= s["policy"].processors_per_superslot


@PROPERTY
@given(scenarios)
def test_shutdown_time_is_never_past_nor_after_the_factory_shutdown(s):
    factory_shutdown = s["policy"].shutdown_time
    for create in decide_scenario(s).creates:
        assert create.shutdown_time > NOW
        if factory_shutdown is not None:
            assert create.shutdown_time <= factory_shutdown


@PROPERTY
@given(scenarios)
def test_no_creates_while_draining_overloaded_or_after_shutdown(s):
    policy, vms, load = s["policy"], s["local_vms"], s["load_average"]
    running = sum(v.processors for v in vms)
    opp = policy.overload_per_processor
    vetoed = (
        policy.draining
        or (running > 4 and load > opp * running)
        or load > opp * policy.host_processors
        or (policy.shutdown_time is not None and NOW >= policy.shutdown_time)
    )
    decision = decide_scenario(s)
    if vetoed:
        assert decision.creates == ()
        assert decision.reason


@PROPERTY
@given(scenarios)
def test_backed_off_machinetype_is_never_chosen(s):
    blocked = {
        t.name
        for t in s["machinetypes"]
        if backed_off(t, s["space"].get(t.name, MachinetypeState()), NOW)
    }
    chosen = {c.machinetype for c in decide_scenario(s).creates}
    assert not (chosen & blocked)


@PROPERTY
@given(scenarios)
def test_only_startable_types_with_a_share_are_chosen(s):
    ok = {t.name for t in s["machinetypes"] if t.startable and t.target_share > 0}
    assert {c.machinetype for c in decide_scenario(s).creates} <= ok


@PROPERTY
@given(scenarios)
def test_a_type_just_out_of_backoff_gets_one_vm_per_round(s):
    decision = decide_scenario(s)
    counts = Counter(c.machinetype for c in decision.creates)
    for t in s["machinetypes"]:
        state = s["space"].get(t.name, MachinetypeState())
        if state.last_abort_time is None or t.fizzle_seconds <= 0:
            continue
        if NOW - t.backoff_seconds - t.fizzle_seconds <= state.last_abort_time:
            assert counts[t.name] <= 1


@PROPERTY
@given(scenarios)
def test_same_seed_same_decision(s):
    assert decide_scenario(s) == decide_scenario(s)


@PROPERTY
@given(scenarios)
def test_every_decision_says_why_it_stopped(s):
    assert decide_scenario(s).reason.strip()


def _simplified(types: List[MachinetypePolicy]) -> List[MachinetypePolicy]:
    """1-processor VMs without time limits: everything fits, so only the order matters."""
    return [
        MachinetypePolicy(
            name=t.name, target_share=t.target_share, machinegroup=t.machinegroup,
            backoff_seconds=t.backoff_seconds, fizzle_seconds=t.fizzle_seconds,
            startable=t.startable,
        )
        for t in types
    ]


simple_scenarios = st.fixed_dictionaries(
    {
        "policy": st.builds(
            FactoryPolicy, total_processors=st.integers(1, 32), host_processors=st.just(32)
        ),
        "machinetypes": machinetype_lists().map(_simplified),
        "local_vms": st.just([]),
        "space": space_views,
        "load_average": st.just(0.0),
        "now": st.just(NOW),
        "seed": st.integers(0, 1000),
    }
)


@PROPERTY
@given(simple_scenarios)
def test_most_starved_type_is_chosen_first(s):
    decision = decide_scenario(s)
    space = s["space"]
    shares = [t for t in s["machinetypes"] if t.target_share > 0]

    def score(name: str) -> float:
        t = next(t for t in shares if t.name == name)
        return space.get(name, MachinetypeState()).running_hs06 / t.target_share

    def group(name: str) -> float:
        g = next(t for t in shares if t.name == name).machinegroup
        return sum(score(t.name) for t in shares if t.machinegroup == g)

    eligible = [
        t.name for t in shares
        if t.startable and not backed_off(t, space.get(t.name, MachinetypeState()), NOW)
    ]
    if not eligible:
        assert decision.creates == ()
        return
    first = decision.creates[0].machinetype
    assert all((group(first), score(first)) <= (group(n), score(n)) for n in eligible)


@PROPERTY
@given(simple_scenarios)
def test_round_fills_every_free_processor_when_an_unthrottled_type_is_eligible(s):
    space = s["space"]
    unthrottled = [
        t
        for t in s["machinetypes"]
        if t.startable
        and t.target_share > 0
        and space.get(t.name, MachinetypeState()).last_abort_time is None
    ]
    decision = decide_scenario(s)
    if unthrottled:
        policy = s["policy"]
        assert len(decision.creates) == min(policy.total_processors, policy.max_starting_processors)
