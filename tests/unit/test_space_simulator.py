"""space.simulator: a small space on a simulated clock reaches its target shares."""

from __future__ import annotations

import pytest

from vacfactory.space.simulator import SimConfig, SimMachinetype, format_result, simulate

SMALL = dict(factories=12, processors=8, hours=4.0, warmup_hours=1.0)


def test_a_fully_connected_space_holds_its_target_shares():
    result = simulate(SimConfig(**SMALL))
    assert result.max_deviation_points <= 2.0
    assert result.utilisation > 0.99
    assert result.answered_fraction == 1.0
    assert result.decisions > 100  # VMs ended and were replaced many times after warm-up


def test_unreachable_factories_and_loss_cost_little_accuracy():
    result = simulate(SimConfig(unreachable=0.25, loss=0.05, **SMALL))
    assert result.max_deviation_points <= 5.0
    # unreachable factories answer nobody: about 3 of the 11 others are unknown to most
    assert 0.5 < result.answered_fraction < 0.9


def test_lost_datagrams_are_recovered_by_resending():
    clean = simulate(SimConfig(**SMALL))
    lossy = simulate(SimConfig(loss=0.1, **SMALL))
    assert lossy.datagrams > clean.datagrams  # re-sends happened
    assert lossy.answered_fraction > 0.99  # ... and recovered nearly every answer


def test_the_same_seed_gives_the_same_run():
    a = simulate(SimConfig(seed=7, **SMALL))
    b = simulate(SimConfig(seed=7, **SMALL))
    assert (a.achieved, a.decisions, a.datagrams) == (b.achieved, b.decisions, b.datagrams)


def test_shares_are_not_just_the_initial_fill():
    # one machinetype whose VMs live 10x shorter: without space-wide balancing on every
    # replacement its share would collapse after warm-up
    types = (SimMachinetype("long", 1, "exponential", 4 * 3600.0),
             SimMachinetype("short", 1, "exponential", 0.4 * 3600.0))
    result = simulate(SimConfig(machinetypes=types, **SMALL))
    assert result.achieved["short"] == pytest.approx(0.5, abs=0.02)
    lines = format_result(result)
    assert lines[1].split()[0] == "long" and "max deviation" in lines[3]
