"""core.status: a factory's own per-machinetype state, and the sum over a space."""

from __future__ import annotations

from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from vacfactory.core.outcomes import Outcome
from vacfactory.core.status import machinetype_states, merge_states, supersedes
from vacfactory.core.views import FinishedVM, LocalVM, MachinetypePolicy, MachinetypeState

NOW = 1_700_000_000.0


def mt(name: str, fizzle: float = 600.0) -> MachinetypePolicy:
    return MachinetypePolicy(name=name, target_share=1.0, machinegroup=name, fizzle_seconds=fizzle)


def vm(machinetype: str, processors: int = 1, started: Optional[float] = NOW - 3600,
       hs06: float = 10.0) -> LocalVM:
    return LocalVM(
        uuid=f"{machinetype}-{processors}-{started}", machinetype=machinetype,
        processors=processors, created=NOW - 4000, shutdown_time=NOW + 86400,
        memory_mb=2048 * processors, hs06=hs06, started=started,
    )


def finished(machinetype: str, outcome: str, when: float = NOW - 100) -> FinishedVM:
    return FinishedVM(uuid="f", machinetype=machinetype, finished_time=when, code=300,
                      text="No more work", outcome=outcome)


def test_running_vms_are_summed_per_machinetype():
    states = machinetype_states(
        [mt("a"), mt("b")], [vm("a", 2, hs06=20.0), vm("a", 1, hs06=8.5)], {}, NOW
    )
    assert states["a"] == MachinetypeState(
        running_hs06=28.5, running_processors=3, running_machines=2
    )
    assert states["b"] == MachinetypeState()


def test_unstarted_and_young_vms_count_before_fizzle():
    vms = [vm("a", started=None), vm("a", started=NOW - 599), vm("a", started=NOW - 600)]
    assert machinetype_states([mt("a", fizzle=600)], vms, {}, NOW)["a"].num_before_fizzle == 2


def test_abort_and_fizzle_finishes_set_last_abort_time():
    last = {
        "a": finished("a", Outcome.ABORT.value, NOW - 10),
        "b": finished("b", "fizzle", NOW - 20),
        "c": finished("c", Outcome.SUCCESS.value),
        "d": finished("d", Outcome.NEUTRAL),
    }
    states = machinetype_states([mt(n) for n in "abcd"], [], last, NOW)
    assert states["a"].last_abort_time == NOW - 10
    assert states["b"].last_abort_time == NOW - 20
    assert states["c"].last_abort_time is None
    assert states["d"].last_abort_time is None


def test_unconfigured_machinetypes_with_vms_or_finishes_are_kept_with_default_fizzle():
    vms = [vm("gone", started=NOW - 500), vm("gone", started=NOW - 700)]
    last = {"old": finished("old", "abort", NOW - 5)}
    states = machinetype_states([mt("a")], vms, last, NOW)
    assert set(states) == {"a", "gone", "old"}
    assert states["gone"].num_before_fizzle == 1  # 600 s default window
    assert states["gone"].running_machines == 2
    assert states["old"] == MachinetypeState(last_abort_time=NOW - 5)


def test_merge_sums_counts_and_keeps_the_newest_abort():
    one = {"a": MachinetypeState(10.0, 1, 1, 1, NOW - 50), "b": MachinetypeState(1.0, 1, 1, 0)}
    two = {
        "a": MachinetypeState(5.0, 2, 1, 0, NOW - 10),
        "c": MachinetypeState(last_abort_time=3.0),
    }
    three = {"a": MachinetypeState(0.0, 0, 0, 0, None)}
    merged = merge_states([one, two, three])
    assert merged["a"] == MachinetypeState(15.0, 3, 2, 1, NOW - 10)
    assert merged["b"] == one["b"]
    assert merged["c"] == two["c"]


def test_merge_of_nothing_is_empty():
    assert merge_states([]) == {}


_vm = st.builds(
    lambda name, processors, started, hs06: vm(name, processors, started, hs06),
    name=st.sampled_from(["a", "b", "gone"]),
    processors=st.integers(1, 8),
    started=st.none() | st.floats(NOW - 2000, NOW),
    hs06=st.floats(0, 100),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_vm, max_size=12), st.integers(0, 12))
def test_merging_split_factories_equals_counting_them_together(vms, cut):
    types = [mt("a"), mt("b", fizzle=0.0)]
    whole = machinetype_states(types, vms, {}, NOW)
    parts = merge_states(
        [
            machinetype_states(types, vms[:cut], {}, NOW),
            machinetype_states(types, vms[cut:], {}, NOW),
        ]
    )
    assert set(parts) == set(whole)
    for name, state in whole.items():
        got = parts[name]
        assert abs(got.running_hs06 - state.running_hs06) < 1e-6
        assert (got.running_processors, got.running_machines, got.num_before_fizzle) == (
            state.running_processors, state.running_machines, state.num_before_fizzle
        )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.none() | st.floats(0, 2e9), max_size=6))
def test_merged_last_abort_is_the_max_of_the_known_ones(aborts):
    merged = merge_states([{"a": MachinetypeState(last_abort_time=t)} for t in aborts])
    known = [t for t in aborts if t is not None]
    if aborts:
        assert merged["a"].last_abort_time == (max(known) if known else None)
    else:
        assert merged == {}


def _finish(uuid: str, created: Optional[float], ended: float, code: int = 200,
            outcome: str = "success") -> FinishedVM:
    return FinishedVM(uuid=uuid, machinetype="a", finished_time=ended, code=code, text="",
                      outcome=outcome, created=created)


def test_the_newest_created_finish_wins_not_the_last_to_end():
    newer_abort = _finish("new", created=NOW - 100, ended=NOW - 50, code=300, outcome="abort")
    older_success = _finish("old", created=NOW - 5000, ended=NOW - 10)
    assert not supersedes(older_success, newer_abort)
    assert supersedes(newer_abort, older_success)
    assert supersedes(newer_abort, None)


def test_equal_creation_times_go_to_the_later_end_then_the_larger_uuid():
    first = _finish("b", created=NOW - 100, ended=NOW - 50)
    later = _finish("a", created=NOW - 100, ended=NOW - 40)
    assert supersedes(later, first) and not supersedes(first, later)
    same_end = _finish("c", created=NOW - 100, ended=NOW - 40)
    assert supersedes(same_end, later) and not supersedes(later, same_end)


def test_a_record_written_before_created_was_kept_is_compared_by_end_time():
    old_record = _finish("old", created=None, ended=NOW - 50)
    assert supersedes(_finish("x", created=NOW - 9000, ended=NOW - 40), old_record)
    assert not supersedes(_finish("y", created=NOW - 10, ended=NOW - 60), old_record)


_finishes = st.builds(
    _finish, uuid=st.sampled_from("abcdef"), created=st.integers(0, 20).map(float),
    ended=st.integers(20, 40).map(float),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_finishes, min_size=1, max_size=8), st.randoms())
def test_the_latest_finish_does_not_depend_on_the_order_vms_end_in(finishes, rng):
    def fold(order):
        latest = None
        for finish in order:
            if supersedes(finish, latest):
                latest = finish
        return latest

    shuffled = list(finishes)
    rng.shuffle(shuffled)
    expected = max(finishes, key=lambda f: (f.created, f.finished_time, f.uuid))
    assert fold(finishes) == fold(shuffled) == expected
