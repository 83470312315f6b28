"""core.adaptive_backoff and the scheduler's hook: Vac's fixed wait unless enabled, then a wait
that doubles with the space's recent aborts, bounded, and never shorter than Vac's."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, strategies as st

from vacfactory.core.adaptive_backoff import (
    MAX_REMEMBERED,
    SpaceMemory,
    backoff_seconds,
    recent_aborts,
)
from vacfactory.core.scheduler import backed_off, backoff_remaining, decide
from vacfactory.core.views import AdaptiveBackoff, FactoryPolicy, MachinetypePolicy, MachinetypeState

NOW = 1_000_000.0
MT = MachinetypePolicy(name="lhcb", target_share=1, machinegroup="lhcb", backoff_seconds=10,
                       fizzle_seconds=600)
ADAPTIVE = AdaptiveBackoff(max_seconds=1800, base_seconds=60)


def aborted(*ages: float, before_fizzle: int = 0) -> MachinetypeState:
    times = tuple(NOW - age for age in ages)
    return MachinetypeState(num_before_fizzle=before_fizzle,
                            last_abort_time=max(times) if times else None, abort_times=times)


def test_without_adaptive_the_wait_is_vacs_backoff_seconds():
    assert backoff_seconds(MT, aborted(5, 50, 500), NOW, None) == 10


def test_each_recent_abort_doubles_the_wait_up_to_the_maximum():
    assert backoff_seconds(MT, aborted(5), NOW, ADAPTIVE) == 60
    assert backoff_seconds(MT, aborted(5, 50, 500), NOW, ADAPTIVE) == 240
    assert backoff_seconds(MT, aborted(*range(1, 20)), NOW, ADAPTIVE) == 1800


def test_aborts_older_than_the_window_no_longer_count():
    window = ADAPTIVE.window_seconds
    assert window == 7200
    assert recent_aborts(aborted(5, window - 1, window + 1), NOW, window) == 2
    assert backoff_seconds(MT, aborted(5, window + 1, window + 100), NOW, ADAPTIVE) == 60


def test_a_larger_backoff_seconds_is_the_base_and_the_floor():
    slow = MachinetypePolicy(name="x", target_share=1, machinegroup="x", backoff_seconds=7200)
    assert backoff_seconds(slow, aborted(5, 6), NOW, ADAPTIVE) == 7200


def test_the_scheduler_holds_a_machinetype_with_many_aborts_that_vac_would_start():
    state = aborted(100, 700, 1300)  # three probes found nothing in the last half hour
    assert not backed_off(MT, state, NOW)
    assert backed_off(MT, state, NOW, ADAPTIVE)
    assert backoff_remaining(MT, state, NOW, ADAPTIVE) == 240 - 100
    policy = FactoryPolicy(total_processors=2, host_processors=2, adaptive_backoff=ADAPTIVE)
    decision = decide(policy, [MT], [], {"lhcb": state}, 0.0, NOW, random.Random(1))
    assert decision.creates == ()
    assert decision.reason.startswith("no eligible machinetype: lhcb backing off until ")
    vac = decide(FactoryPolicy(total_processors=2, host_processors=2), [MT], [],
                 {"lhcb": state}, 0.0, NOW, random.Random(1))
    # Vac starts one, then its fizzle window holds the second back
    assert [c.machinetype for c in vac.creates] == ["lhcb"]


def test_the_fizzle_window_still_lets_one_probe_prove_the_work_is_back():
    state = aborted(300, before_fizzle=1)
    assert backoff_remaining(MT, state, NOW, ADAPTIVE) == 60 + 600 - 300


def test_while_a_probe_proves_the_work_no_second_one_starts_however_old_the_abort():
    probing = replace(aborted(5000, before_fizzle=1), work_shown=False)
    assert not backed_off(MT, replace(probing, work_shown=None), NOW, ADAPTIVE)  # Vac's rule
    assert backed_off(MT, probing, NOW, ADAPTIVE)
    assert backoff_remaining(MT, probing, NOW, ADAPTIVE) == 1.0
    # once it outlived its fizzle window the machinetype fills, young VMs or not
    assert not backed_off(MT, replace(probing, work_shown=True), NOW, ADAPTIVE)
    policy = FactoryPolicy(total_processors=2, host_processors=2, adaptive_backoff=ADAPTIVE)
    decision = decide(policy, [MT], [], {"lhcb": probing}, 0.0, NOW, random.Random(1))
    assert decision.reason == ("no eligible machinetype: lhcb probing: one VM at a time until "
                               "it outlives fizzle_seconds")


def test_a_peer_reporting_a_new_abort_in_every_answer_cannot_grow_the_memory():
    memory = SpaceMemory(horizon_seconds=7200)
    for i in range(2000):  # an answer every 3 s, each with another abort time
        t = NOW + 3 * i
        memory.observe({"lhcb": MachinetypeState(last_abort_time=t, abort_times=(t,))}, t)
    view = memory.remembered({"lhcb": MachinetypeState(last_abort_time=NOW + 5997)},
                             {"lhcb": 600}, NOW + 5997)
    assert len(view["lhcb"].abort_times) == MAX_REMEMBERED
    assert view["lhcb"].abort_times[-1] == NOW + 5997
    # and the wait it causes is bounded by adaptive_backoff_max_seconds
    assert backoff_seconds(MT, view["lhcb"], NOW + 5997, ADAPTIVE) == 1800


ages = st.lists(st.floats(min_value=-100, max_value=20_000, allow_nan=False), max_size=60)


@given(ages=ages, extra=st.floats(min_value=0, max_value=10_000), before=st.integers(0, 3),
       maximum=st.integers(60, 10_000), backoff=st.integers(0, 5_000),
       shown=st.sampled_from([None, False, True]))
def test_adaptive_never_starts_a_machinetype_vac_holds_back(ages, extra, before, maximum, backoff,
                                                            shown):
    mt = MachinetypePolicy(name="m", target_share=1, machinegroup="m", backoff_seconds=backoff)
    adaptive = AdaptiveBackoff(max_seconds=maximum)
    state = replace(aborted(*ages, before_fizzle=before), work_shown=shown)
    wait = backoff_seconds(mt, state, NOW, adaptive)
    assert backoff <= wait <= max(maximum, backoff)
    if backed_off(mt, state, NOW):
        assert backed_off(mt, state, NOW, adaptive)
    # one more abort never shortens the wait
    more = aborted(*(list(ages) + [extra]), before_fizzle=before)
    assert backoff_seconds(mt, more, NOW, adaptive) >= wait


@given(st.lists(st.one_of(st.none(), st.floats(0, 1e9)), max_size=20))
def test_the_space_view_keeps_every_factorys_latest_abort(aborts):
    from vacfactory.core.status import merge_states

    views = [{"lhcb": MachinetypeState(last_abort_time=t,
                                       abort_times=() if t is None else (t,))} for t in aborts]
    merged = merge_states(views).get("lhcb", MachinetypeState())
    assert sorted(merged.abort_times) == sorted(t for t in aborts if t is not None)
    assert merged.last_abort_time == max(merged.abort_times, default=None)
