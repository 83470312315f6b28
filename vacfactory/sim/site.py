"""A site's own configuration against a workload file (``vacfactory simulate --workload``).

The machinetypes with a share, their backoff_seconds, fizzle_seconds and max_wallclock_seconds
come from the configuration; the workload file says when each has work. Three policies run on
the same seeded workload: Vac 03.01's, this configuration as it is, and this configuration with
adaptive_backoff and rebalance on (their other options as configured), so a site sees what the
options would do before turning them on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List

from vacfactory.core.rebalance import RebalancePolicy
from vacfactory.core.views import AdaptiveBackoff
from vacfactory.engine import policies
from vacfactory.sim.spacesim import VAC, Figures, SchedulingPolicy, SpaceSetup, compare
from vacfactory.sim.workload import WorkloadError, parse_workload


def configured_policy(config, name: str, force_on: bool = False) -> SchedulingPolicy:
    """The policy ``config`` asks for (or with both options on)."""
    s = config.settings
    adaptive = policies.adaptive_backoff(config)
    if adaptive is None and force_on:
        adaptive = AdaptiveBackoff(max_seconds=float(s.adaptive_backoff_max_seconds))
    rebalance = None
    if s.rebalance or force_on:
        rebalance = RebalancePolicy(float(s.rebalance_notice_seconds),
                                    float(s.rebalance_max_percent) / 100.0)
    return SchedulingPolicy(name, adaptive=adaptive, rebalance=rebalance)


def site_comparison(config, workload_text: str, where: str, factories: int, processors: int,
                    seed: int = 1) -> List[Figures]:
    """Vac's policy, the configuration's, and (unless already on) both options on."""
    machinetypes = [mt for mt in policies.machinetype_policies(config)
                    if mt.target_share > 0 and mt.startable]
    if not machinetypes:
        raise WorkloadError(f"{where}: the configuration has no startable machinetype with a "
                            "target_share above 0")
    shares = {mt.name: mt.target_share for mt in machinetypes}
    workload = parse_workload(workload_text, shares, where)
    by_name = {mt.name: mt for mt in machinetypes}
    workload = replace(workload, types=tuple(
        replace(t, max_wallclock_seconds=by_name[t.name].max_wallclock_seconds,
                backoff_seconds=by_name[t.name].backoff_seconds,
                fizzle_seconds=by_name[t.name].fizzle_seconds)
        for t in workload.types))
    setup = SpaceSetup(factories=factories, processors=processors, seed=seed)
    runs = [VAC, configured_policy(config, "this configuration")]
    if runs[1].adaptive is None or runs[1].rebalance is None:
        runs.append(configured_policy(config, "+ adaptive_backoff + rebalance", force_on=True))
    return compare(workload, setup, runs)
