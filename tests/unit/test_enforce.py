"""core.enforce: which running VM to kill and why, and that clock jumps back never kill."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from vacfactory.core.enforce import (
    HeartbeatPolicy,
    RunningVMFacts,
    check_running_vm,
    drained_shutdown_time,
)
from vacfactory.core.outcomes import KillReason

NOW = 1_700_000_000.0
DAEMON = NOW - 86400  # the daemon has been up a day unless a test says otherwise
HB = HeartbeatPolicy(heartbeat_file="vm-heartbeat", heartbeat_seconds=600, fizzle_seconds=300)


def facts(
    started: float = NOW - 3600,
    shutdown_time: float = NOW + 3600,
    paused: bool = False,
    heartbeat_mtime: Optional[float] = NOW - 60,
) -> RunningVMFacts:
    return RunningVMFacts(
        uuid="u1", name="host-01.example", machinetype="lhcb", started=started,
        shutdown_time=shutdown_time, paused=paused, heartbeat_mtime=heartbeat_mtime,
    )


def check(vm: RunningVMFacts, heartbeat: Optional[HeartbeatPolicy] = HB,
          factory_shutdown: Optional[float] = None, grace: float = 0.0, now: float = NOW,
          daemon_started: float = DAEMON) -> Optional[KillReason]:
    return check_running_vm(vm, heartbeat, factory_shutdown, grace, now, daemon_started)


def test_healthy_vm_is_left_running():
    assert check(facts()) is None


def test_paused_vm_is_killed_first():
    assert check(facts(paused=True, shutdown_time=NOW - 10)) is KillReason.PAUSED


def test_vm_past_its_shutdown_time_plus_grace_is_killed_for_wallclock():
    assert check(facts(shutdown_time=NOW - 1)) is KillReason.WALLCLOCK
    assert check(facts(shutdown_time=NOW - 1), grace=30) is None
    assert check(facts(shutdown_time=NOW - 31), grace=30) is KillReason.WALLCLOCK


def test_vm_past_factory_shutdown_time_plus_grace_is_killed():
    assert check(facts(), factory_shutdown=NOW - 1) is KillReason.SHUTDOWN_TIME
    assert check(facts(), factory_shutdown=NOW - 1, grace=5) is None


def test_own_shutdown_time_wins_over_the_factory_one():
    reason = check(facts(shutdown_time=NOW - 5), factory_shutdown=NOW - 5)
    assert reason is KillReason.WALLCLOCK


def test_absent_heartbeat_after_fizzle_window_kills():
    assert check(facts(heartbeat_mtime=None)) is KillReason.HEARTBEAT_NOT_CREATED


def test_stale_heartbeat_kills():
    assert check(facts(heartbeat_mtime=NOW - 601)) is KillReason.HEARTBEAT_NOT_UPDATED
    assert check(facts(heartbeat_mtime=NOW - 599)) is None


def test_heartbeat_is_not_judged_inside_the_vm_fizzle_window():
    assert check(facts(started=NOW - 299, heartbeat_mtime=None)) is None


def test_heartbeat_is_not_judged_soon_after_a_daemon_restart():
    vm = facts(heartbeat_mtime=NOW - 5000)
    assert check(vm, daemon_started=NOW - 100) is None
    assert check(vm, daemon_started=NOW - 301) is KillReason.HEARTBEAT_NOT_UPDATED


def test_no_heartbeat_file_or_no_fizzle_disables_heartbeat_checks():
    vm = facts(heartbeat_mtime=None)
    assert check(vm, heartbeat=replace(HB, heartbeat_file=None)) is None
    assert check(vm, heartbeat=replace(HB, heartbeat_file="")) is None
    assert check(vm, heartbeat=replace(HB, fizzle_seconds=0)) is None


def test_zero_heartbeat_seconds_only_requires_the_file_to_exist():
    policy = replace(HB, heartbeat_seconds=0)
    assert check(facts(heartbeat_mtime=NOW - 10**6), heartbeat=policy) is None
    assert check(facts(heartbeat_mtime=None), heartbeat=policy) is KillReason.HEARTBEAT_NOT_CREATED


def test_machinetype_gone_from_config_still_enforces_times_but_not_heartbeat():
    assert check(facts(heartbeat_mtime=None), heartbeat=None) is None
    assert check(facts(shutdown_time=NOW - 1), heartbeat=None) is KillReason.WALLCLOCK
    assert check(facts(), heartbeat=None, factory_shutdown=NOW - 1) is KillReason.SHUTDOWN_TIME


def test_heartbeat_in_the_future_counts_as_fresh():
    assert check(facts(heartbeat_mtime=NOW + 10**7)) is None


def test_clock_jumped_back_before_the_vm_started_kills_nothing():
    vm = facts(started=NOW + 5000, heartbeat_mtime=None)  # "started" is in the future now
    assert check(vm) is None


def test_drained_shutdown_time_only_moves_earlier():
    assert drained_shutdown_time(NOW + 1000, NOW + 500) == NOW + 500
    assert drained_shutdown_time(NOW + 1000, NOW + 1000) is None
    assert drained_shutdown_time(NOW + 1000, NOW + 2000) is None
    assert drained_shutdown_time(NOW + 1000, None) is None


_facts = st.builds(
    RunningVMFacts,
    uuid=st.just("u"),
    name=st.just("n"),
    machinetype=st.just("m"),
    started=st.floats(NOW - 10**5, NOW + 10**4),
    shutdown_time=st.floats(NOW - 10**4, NOW + 10**5),
    paused=st.booleans(),
    heartbeat_mtime=st.none() | st.floats(NOW - 10**5, NOW + 10**5),
)
_heartbeats = st.none() | st.builds(
    HeartbeatPolicy,
    heartbeat_file=st.sampled_from([None, "hb"]),
    heartbeat_seconds=st.sampled_from([0.0, 60.0, 600.0]),
    fizzle_seconds=st.sampled_from([0.0, 300.0, 600.0]),
)


@settings(max_examples=200, deadline=None)
@given(
    vm=_facts,
    heartbeat=_heartbeats,
    factory_shutdown=st.none() | st.floats(NOW - 10**4, NOW + 10**5),
    grace=st.sampled_from([0.0, 30.0]),
    daemon_started=st.floats(NOW - 10**5, NOW),
    back=st.floats(0, 10**6),
)
def test_backwards_clock_jump_never_kills_a_vm_that_was_spared(
    vm, heartbeat, factory_shutdown, grace, daemon_started, back
):
    before = check(vm, heartbeat, factory_shutdown, grace, NOW, daemon_started)
    after = check(vm, heartbeat, factory_shutdown, grace, NOW - back, daemon_started)
    if before is None:
        assert after is None
    if after is not None:
        assert before is not None


@settings(max_examples=200, deadline=None)
@given(vm=_facts, heartbeat=_heartbeats, daemon_started=st.floats(NOW - 10**5, NOW))
def test_heartbeat_kill_needs_the_file_policy_and_both_fizzle_windows_over(
    vm, heartbeat, daemon_started
):
    reason = check(replace(vm, paused=False, shutdown_time=NOW + 10**6), heartbeat,
                   daemon_started=daemon_started)
    if reason is not None:
        assert heartbeat is not None and heartbeat.heartbeat_file
        assert NOW > vm.started + heartbeat.fizzle_seconds
        assert NOW > daemon_started + heartbeat.fizzle_seconds
        if reason is KillReason.HEARTBEAT_NOT_UPDATED:
            assert vm.heartbeat_mtime is not None and vm.heartbeat_mtime <= NOW
