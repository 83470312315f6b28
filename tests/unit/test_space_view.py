"""space.view: machinetype_status replies -> the scheduler's space view, and what decide()
makes of it (space-wide shares, space-wide backoff, random ties, unknown factories)."""

from __future__ import annotations

import random

import pytest

from vacfactory.core.scheduler import decide
from vacfactory.core.views import FactoryPolicy, MachinetypePolicy, MachinetypeState
from vacfactory.space.client import FactoryReplies, SpaceReplies
from vacfactory.space.protocol import QueryType, Reply, ReplyType
from vacfactory.space.snapshot import MachinetypeStatus
from vacfactory.space.view import SpaceMemory, machinetype_state, space_view

NOW = 1_700_000_000.0
SPACE = "vac01.example.ac.uk"


def reply(factory: str, status: MachinetypeStatus, count: int = 1) -> Reply:
    return Reply(ReplyType.MACHINETYPE, factory, SPACE, "c", count, status)


def replies(answers: dict, unknown=(), query_type=QueryType.MACHINETYPES, incomplete=()
            ) -> SpaceReplies:
    answered = {
        name: FactoryReplies(name, "10.0.0.1",
                             tuple(reply(name, s, len(statuses)) for s in statuses),
                             len(statuses))
        for name, statuses in answers.items()
    }
    return SpaceReplies(query_type, SPACE, tuple(answers) + tuple(unknown), answered,
                        tuple(unknown), tuple(incomplete), 0.1)


def status(name: str, hs06: float = 0.0, processors: int = 0, before_fizzle: int = 0,
           message=None, when=None) -> MachinetypeStatus:
    return MachinetypeStatus(machinetype=name, running_hs06=hs06, running_machines=processors,
                             running_processors=processors, num_before_fizzle=before_fizzle,
                             shutdown_message=message, shutdown_time=when)


def test_running_figures_are_summed_over_answering_factories():
    view, unknown = space_view(replies({
        "f1": [status("atlas", 10.0, 1, 1), status("lhcb", 5.0, 1)],
        "f2": [status("atlas", 30.0, 3, 2)],
    }, unknown=("f3",)), abort_on_700=True, now=NOW)
    assert view["atlas"] == MachinetypeState(40.0, 4, 4, 3, None)
    assert view["lhcb"] == MachinetypeState(5.0, 1, 1, 0, None)
    assert unknown == {"f3"}


def test_the_newest_abort_anywhere_in_the_space_is_the_last_abort():
    view, _ = space_view(replies({
        "f1": [status("atlas", message="300 No more work", when=NOW - 500)],
        "f2": [status("atlas", message="500 Broken contextualization", when=NOW - 100)],
        "f3": [status("atlas", message="200 Success", when=NOW - 10)],
    }), abort_on_700=True, now=NOW)
    assert view["atlas"].last_abort_time == NOW - 100


@pytest.mark.parametrize("message,abort_on_700,is_abort", [
    ("100 Shutdown as requested", True, False),
    ("200 Intended work completed ok", True, False),
    ("300 No more work available from task queue", True, True),
    ("600 Grid-wide problem", True, True),
    ("700 Heartbeat file not updated", True, True),
    ("700 Heartbeat file not updated", False, False),
    ("rubbish without a code", True, False),
    ("", True, False),
    (None, True, False),
])
def test_abort_codes_follow_core_outcomes(message, abort_on_700, is_abort):
    state = machinetype_state(status("x", message=message, when=NOW - 5), abort_on_700, NOW)
    assert (state.last_abort_time == NOW - 5) is is_abort


def test_an_abort_stamped_in_the_future_counts_as_now():
    state = machinetype_state(status("x", message="300 x", when=NOW + 3600), True, NOW)
    assert state.last_abort_time == NOW


def test_only_machinetypes_replies_make_a_view():
    with pytest.raises(ValueError):
        space_view(replies({}, query_type=QueryType.FACTORY), abort_on_700=True, now=NOW)


def test_an_empty_space_is_all_unknown_not_all_empty():
    view, unknown = space_view(replies({}, unknown=("f1", "f2")), abort_on_700=True, now=NOW)
    assert view == {} and unknown == {"f1", "f2"}


# -- what the scheduler does with it ---------------------------------------------------------

POLICY = FactoryPolicy(total_processors=4, host_processors=4)


def mt(name: str, share: float, group: str = None, backoff: float = 600.0) -> MachinetypePolicy:
    return MachinetypePolicy(name=name, target_share=share, machinegroup=group or name,
                             backoff_seconds=backoff, fizzle_seconds=600.0)


def test_the_machinetype_most_starved_across_the_space_is_started():
    # atlas has share 3, lhcb share 1: atlas runs 90 HS06 elsewhere (30/share), lhcb 10 (10)
    view, _ = space_view(replies({
        "f1": [status("atlas", 60.0, 6), status("lhcb", 10.0, 1)],
        "f2": [status("atlas", 30.0, 3), status("lhcb", 0.0)],
    }), abort_on_700=True, now=NOW)
    decision = decide(POLICY, [mt("atlas", 3), mt("lhcb", 1)], [], view, 0.0, NOW,
                      random.Random(1))
    assert decision.creates[0].machinetype == "lhcb"


def test_an_abort_on_another_factory_backs_the_machinetype_off_here():
    view, _ = space_view(replies({
        "f1": [status("atlas"), status("lhcb", 100.0, 10)],
        "f2": [status("atlas", message="300 No more work", when=NOW - 60), status("lhcb")],
    }), abort_on_700=True, now=NOW)
    decision = decide(POLICY, [mt("atlas", 1), mt("lhcb", 1)], [], view, 0.0, NOW,
                      random.Random(1))
    assert {c.machinetype for c in decision.creates} == {"lhcb"}  # though atlas is starved


def test_ties_are_broken_randomly():
    view, _ = space_view(replies({"f1": [status("a"), status("b")]}), True, NOW)
    firsts = {decide(POLICY, [mt("a", 1), mt("b", 1)], [], view, 0.0, NOW,
                     random.Random(seed)).creates[0].machinetype for seed in range(20)}
    assert firsts == {"a", "b"}


# -- a factory that misses a round: its last answer, then unknown -----------------------------

WINDOW = 15.0


def test_a_factory_that_misses_one_round_is_counted_with_its_last_answer_not_as_empty():
    memory = SpaceMemory(WINDOW)
    memory.update(replies({"f1": [status("atlas", 30.0, 3)], "f2": [status("atlas", 50.0, 5)]}),
                  True, NOW)
    state = memory.update(replies({"f1": [status("atlas", 40.0, 4)]}, unknown=("f2",)),
                          True, NOW + 5)
    assert state.view["atlas"] == MachinetypeState(90.0, 9, 9, 0, None)  # 40 now + f2's 50
    assert state.held == {"f2": 5.0} and state.unknown == frozenset()
    assert state.answered == {"f1"}


def test_beyond_the_window_a_silent_factory_is_unknown_and_adds_nothing():
    memory = SpaceMemory(WINDOW)
    memory.update(replies({"f1": [status("atlas", 30.0, 3)], "f2": [status("atlas", 50.0, 5)]}),
                  True, NOW)
    at_edge = memory.update(replies({"f1": [status("atlas", 30.0, 3)]}, unknown=("f2",)),
                            True, NOW + WINDOW)
    assert at_edge.held == {"f2": WINDOW}
    beyond = memory.update(replies({"f1": [status("atlas", 30.0, 3)]}, unknown=("f2",)),
                           True, NOW + WINDOW + 0.1)
    assert beyond.unknown == {"f2"} and beyond.held == {}
    assert beyond.view["atlas"] == MachinetypeState(30.0, 3, 3, 0, None)
    assert memory.age("f2", NOW + WINDOW + 0.1) == pytest.approx(WINDOW + 0.1)


def test_a_factory_never_heard_from_is_unknown_at_once_and_its_answer_counts_when_it_comes():
    memory = SpaceMemory(WINDOW)
    state = memory.update(replies({}, unknown=("f1",)), True, NOW)
    assert state.unknown == {"f1"} and state.view == {}
    state = memory.update(replies({"f1": [status("lhcb", 10.0, 1)]}), True, NOW + 5)
    assert state.unknown == frozenset() and state.view["lhcb"].running_hs06 == 10.0


def test_an_abort_remembered_from_a_silent_factory_still_backs_the_machinetype_off():
    memory = SpaceMemory(WINDOW)
    memory.update(replies({"f1": [status("atlas", message="300 No more work", when=NOW - 60)]}),
                  True, NOW)
    state = memory.update(replies({}, unknown=("f1",)), True, NOW + 5)
    assert state.view["atlas"].last_abort_time == NOW - 60


def test_an_incomplete_answer_keeps_the_machinetypes_it_did_not_repeat():
    memory = SpaceMemory(WINDOW)
    memory.update(replies({"f1": [status("atlas", 30.0, 3), status("lhcb", 20.0, 2)]}), True, NOW)
    state = memory.update(replies({"f1": [status("atlas", 40.0, 4)]}, incomplete=("f1",)),
                          True, NOW + 5)
    assert state.view["atlas"].running_hs06 == 40.0  # the new figure
    assert state.view["lhcb"].running_hs06 == 20.0  # the one the answer lacked, kept
    complete = memory.update(replies({"f1": [status("atlas", 40.0, 4)]}), True, NOW + 10)
    assert "lhcb" not in complete.view  # a complete answer says lhcb is gone there


def test_factories_no_longer_asked_are_forgotten():
    memory = SpaceMemory(WINDOW)
    memory.update(replies({"f1": [status("atlas", 30.0, 3)]}), True, NOW)
    memory.update(replies({"f2": [status("atlas", 10.0, 1)]}), True, NOW + 1)
    state = memory.update(replies({}, unknown=("f1",)), True, NOW + 2)  # asked again
    assert state.unknown == {"f1"}, "f1 was dropped from the configuration in between"


def test_a_held_answer_changes_what_the_scheduler_starts():
    """f2 ran 5 atlas: while its answer is held, lhcb (equally shared) is the starved one;
    once f2 is unknown, the space looks empty of atlas and atlas is started again."""
    memory = SpaceMemory(WINDOW)
    memory.update(replies({"f2": [status("atlas", 50.0, 5), status("lhcb", 0.0)]}), True, NOW)
    types = [mt("atlas", 1), mt("lhcb", 1)]
    held = memory.update(replies({}, unknown=("f2",)), True, NOW + 5).view
    assert {c.machinetype for c in decide(POLICY, types, [], held, 0.0, NOW + 5,
                                          random.Random(1)).creates} == {"lhcb"}
    gone = memory.update(replies({}, unknown=("f2",)), True, NOW + WINDOW + 1).view
    assert gone == {}
