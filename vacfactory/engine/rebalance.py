"""Graceful rebalancing in the engine: this factory's MJF shutdown time rewrites each round.

The engine calls :func:`shutdown_rewrites` once per round with its live VMs and the space view
and carries out what it returns exactly as it publishes a drain (machinefeatures/shutdowntime
and jobfeatures/shutdowntime_job rewritten, the new time enforced like any shutdown time).
The decision is core.rebalance's; this module only maps the configuration onto it.
"""

from __future__ import annotations

import random
from typing import List, Mapping, Sequence

from vacfactory.core import rebalance as core_rebalance
from vacfactory.core.rebalance import Rewrite
from vacfactory.core.views import LocalVM, SpaceView
from vacfactory.engine import policies


def shutdown_rewrites(
    config,
    local_vms: Sequence[LocalVM],
    original_shutdown: Mapping[str, float],
    space: SpaceView,
    now: float,
    rng: random.Random,
) -> List[Rewrite]:
    """The shutdown times to move earlier now (empty unless ``rebalance`` is on).

    ``local_vms`` carry each VM's current shutdown time, ``original_shutdown`` the one it was
    created with. Nothing is moved while the factory drains (the drain moves them itself).
    """
    s = config.settings
    if not s.rebalance or s.draining or s.shutdown_time is not None:
        return []
    policy = core_rebalance.RebalancePolicy(
        notice_seconds=float(s.rebalance_notice_seconds),
        max_fraction=float(s.rebalance_max_percent) / 100.0,
    )
    return core_rebalance.plan(
        policy, s.total_processors, policies.machinetype_policies(config), local_vms,
        original_shutdown, space, now, rng, policies.adaptive_backoff(config),
    )
