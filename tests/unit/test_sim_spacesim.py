"""sim.spacesim: small seeded spaces with a workload, Vac 03.01's policy against ours."""

from __future__ import annotations

import dataclasses

import pytest

from vacfactory.core.rebalance import RebalancePolicy
from vacfactory.core.views import AdaptiveBackoff
from vacfactory.sim.report import format_comparison
from vacfactory.sim.spacesim import DEFAULTS, VAC, SchedulingPolicy, SpaceSetup, compare, simulate
from vacfactory.sim.workload import ShareChange, Supply, Workload, WorkloadType

OURS = SchedulingPolicy("ours", adaptive=AdaptiveBackoff(max_seconds=1800),
                        rebalance=RebalancePolicy(notice_seconds=3600, max_fraction=0.2))
NEVER = Supply("drained", from_hours=0, for_hours=10_000)


def dry(hours=2.0, **kw):
    """One factory, one processor, one machinetype that never has work."""
    return Workload((WorkloadType("lhcb", 1, NEVER, **kw),), hours=hours, warmup_hours=0.0)


def test_with_work_everywhere_nothing_is_wasted_and_every_processor_is_busy():
    workload = Workload((WorkloadType("atlas", 5, mean_hours=2), WorkloadType("lhcb", 3, mean_hours=2)),
                        hours=8, warmup_hours=2)
    for figures in compare(workload, SpaceSetup(factories=4, processors=4), (VAC, DEFAULTS, OURS)):
        assert (figures.waste_hours, figures.nowork_vms, figures.payloads_killed) == (0.0, 0, 0)
        assert figures.occupancy > 0.98
        assert figures.convergence_hours is None and figures.error_after_convergence is None


def test_vac_probes_a_dry_machinetype_one_vm_at_a_time_after_each_short_backoff():
    setup = SpaceSetup(factories=1, processors=1, backoff_seconds=10, cycle_seconds=60)
    figures = simulate(dry(), setup, VAC)
    # each probe lives 240-360 s, then 10 s of backoff and up to one 60 s cycle
    assert 7200 / 430 <= figures.nowork_vms <= 7200 / 250 + 1
    assert figures.nowork_vms == 21  # this seed
    assert figures.occupancy == 0.0
    # the processor is wasted while a probe runs (300 s +-20 %) and idle in between
    assert figures.waste_hours == pytest.approx(21 * 300 / 3600, rel=0.2)
    assert figures.waste_hours < 2.0


def test_adaptive_backoff_doubles_the_wait_with_every_probe_that_finds_nothing():
    setup = SpaceSetup(factories=1, processors=1, backoff_seconds=10, cycle_seconds=60)
    figures = simulate(dry(), setup, SchedulingPolicy("adaptive", adaptive=AdaptiveBackoff(1800)))
    # waits 60, 120, 240, 480, 960, 1800...: 7 probes of 240-360 s fit in 2 hours
    assert figures.nowork_vms == 7  # this seed
    vac = simulate(dry(), setup, VAC)
    assert figures.waste_hours < 0.4 * vac.waste_hours


def test_a_bursty_machinetype_wastes_less_with_adaptive_backoff_and_others_use_its_slots():
    workload = Workload((WorkloadType("atlas", 5, mean_hours=3), WorkloadType("lhcb", 3, mean_hours=3),
                         WorkloadType("gamma", 2, Supply("bursty", on_hours=3, off_hours=3),
                                      mean_hours=3)),
                        hours=16, warmup_hours=4)
    vac, ours = compare(workload, SpaceSetup(factories=6, processors=8), (VAC, OURS))
    assert ours.nowork_vms < 0.6 * vac.nowork_vms
    assert ours.waste_hours < 0.6 * vac.waste_hours
    assert ours.occupancy >= vac.occupancy
    assert (vac.nowork_vms, ours.nowork_vms) == (67, 22)  # this seed


def share_change(**kw):
    return Workload(tuple(WorkloadType(n, s, mean_hours=12, **kw)
                          for n, s in (("alpha", 5), ("beta", 3), ("gamma", 2))),
                    hours=30, warmup_hours=12,
                    share_change=ShareChange(24, {"alpha": 2, "beta": 3, "gamma": 5}))


def test_rebalancing_follows_a_share_change_in_two_hours_without_killing_a_payload():
    vac, ours = compare(share_change(), SpaceSetup(factories=10, processors=10), (VAC, OURS))
    assert ours.convergence_hours is not None and ours.convergence_hours <= 2.0
    assert vac.convergence_hours is None or vac.convergence_hours > 4.0
    assert ours.payloads_killed == 0 and ours.notices > 0 and vac.notices == 0
    assert ours.error_after_convergence <= 2.5
    lines = format_comparison([vac, ours])
    assert lines[0].split()[0] == "figure" and "Vac 03.01" in lines[0]
    assert any(line.startswith("convergence h") for line in lines)


def test_notice_shorter_than_the_longest_payload_kills_payloads_and_says_so():
    tight = SchedulingPolicy("tight", rebalance=RebalancePolicy(notice_seconds=600, max_fraction=0.2))
    figures = simulate(share_change(payload_max_seconds=3600), SpaceSetup(factories=10, processors=10),
                       tight)
    assert figures.notices > 0
    assert 0 < figures.payloads_killed <= figures.notices


def test_the_same_seed_gives_the_same_figures_and_another_seed_other_ones():
    workload = dataclasses.replace(share_change(), hours=26)
    setup = SpaceSetup(factories=5, processors=6, seed=3)
    a, b = simulate(workload, setup, OURS), simulate(workload, setup, OURS)
    c = simulate(workload, dataclasses.replace(setup, seed=4), OURS)
    assert dataclasses.replace(a, wall_seconds=0) == dataclasses.replace(b, wall_seconds=0)
    assert a.vms != c.vms or a.share_error != c.share_error


def test_vms_that_fizzle_without_a_message_back_off_like_300s():
    setup = SpaceSetup(factories=1, processors=1, backoff_seconds=10, cycle_seconds=60)
    said = simulate(dry(), setup, VAC)
    silent = simulate(dry(nowork_ends="fizzle"), setup, VAC)
    # the fizzle (no message, 240-360 s < fizzle_seconds 600) is an abort too: same pace
    assert silent.nowork_vms == said.nowork_vms == 21


def test_a_space_that_has_not_followed_the_change_yet_says_never():
    workload = dataclasses.replace(share_change(), hours=24.5)  # half an hour after the change
    figures = simulate(workload, SpaceSetup(factories=4, processors=4), VAC)
    assert figures.convergence_hours is None and figures.share_change_hours == 24
    (row,) = [line for line in format_comparison([figures]) if line.startswith("convergence h")]
    assert row.split()[-1] == "never"
