"""The issue-16 scenarios ``make bench`` measures and the policies it compares.

100 factories x 32 processors, machinetypes 5:3:2 whose VMs live lognormal with mean 12 h;
``bursty_week``: the third has work for 6 h, then none for 6 h, for a simulated week;
``share_change``: all have work, and the shares change from 5:3:2 to 2:3:5 at hour 36.
"""

from __future__ import annotations

from vacfactory.core.rebalance import RebalancePolicy
from vacfactory.core.views import AdaptiveBackoff
from vacfactory.sim.spacesim import DEFAULTS, VAC, SchedulingPolicy, SpaceSetup
from vacfactory.sim.workload import ShareChange, Supply, Workload, WorkloadType

#: this factory with adaptive_backoff and rebalance on, every other option at its default
BEYOND_VAC = SchedulingPolicy("vacfactory + adaptive_backoff + rebalance",
                              adaptive=AdaptiveBackoff(max_seconds=1800.0),
                              rebalance=RebalancePolicy(notice_seconds=3600.0, max_fraction=0.1))

POLICIES = (VAC, DEFAULTS, BEYOND_VAC)

SPACE = SpaceSetup(factories=100, processors=32)


def bursty_week(hours: float = 168.0) -> Workload:
    return Workload((WorkloadType("alpha", 5), WorkloadType("beta", 3),
                     WorkloadType("gamma", 2, Supply("bursty", on_hours=6, off_hours=6))),
                    hours=hours, warmup_hours=24.0)


def share_change(hours: float = 72.0, at_hours: float = 36.0) -> Workload:
    return Workload((WorkloadType("alpha", 5), WorkloadType("beta", 3), WorkloadType("gamma", 2)),
                    hours=hours, warmup_hours=24.0,
                    share_change=ShareChange(at_hours, {"alpha": 2, "beta": 3, "gamma": 5}))
