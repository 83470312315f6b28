"""Graceful rebalancing: which running VMs to ask to stop taking new payloads, and when.

Vac moves shares only as VMs end, so after a change of target shares (or when a machinetype's
work comes back) the space takes about one VM lifetime to follow. Here, when a machinetype is
over its share and another waits under its share and has shown it has work (a VM started
after its newest abort outlived the fizzle window), each factory moves the MJF
``shutdowntime`` / ``shutdowntime_job`` of some of its excess VMs to ``now + notice``: their
pilots finish the payload they run and take no new one, nothing is killed, and the freed
processors go to the machinetype that waits.

Every factory sees the same space view and takes its own part of the space's excess (its
fraction of that machinetype's processors, rounded at random so the space total is right on
average), so no coordination is needed. VMs already given notice (current shutdown time
earlier than the one they were created with) count against both the excess and the budget:
at most ``max_fraction`` of the factory's processors are under notice at once. The plan moves
a share down to its target and no further (exactly on average; only the random rounding and
VMs that end meanwhile can take it a processor or two past), so it does not make shares
oscillate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Collection, Dict, List, Mapping, Sequence

from vacfactory.core.views import (
    LocalVM,
    MachinetypePolicy,
    MachinetypeState,
    SpaceView,
)

#: shares within this many points of target are left alone (noise, rounding)
MARGIN_POINTS = 1.0

_EMPTY = MachinetypeState()


@dataclass(frozen=True)
class RebalancePolicy:
    """``notice_seconds``: how far ahead the new shutdown time is (pilots finish the payload
    they run); ``max_fraction``: processors under notice at once, as a fraction of the
    factory's processors."""

    notice_seconds: float = 3600.0
    max_fraction: float = 0.1


@dataclass(frozen=True)
class Rewrite:
    """Move VM ``uuid``'s MJF shutdown time earlier, to ``shutdown_time``."""

    uuid: str
    machinetype: str
    shutdown_time: float


def space_excess(
    machinetypes: Sequence[MachinetypePolicy],
    space: SpaceView,
    shown_work: Collection[str],
) -> Dict[str, float]:
    """Processors each over-share machinetype should give up space-wide (empty: none).

    Shares are of the processors running the configured machinetypes with a share. The total
    given up is at most what the under-share machinetypes in ``shown_work`` (those that have
    shown they have work: core.adaptive_backoff.SpaceMemory.shown_work) lack.
    """
    shared = [mt for mt in machinetypes if mt.target_share > 0]
    total_share = sum(mt.target_share for mt in shared)
    running = {mt.name: space.get(mt.name, _EMPTY).running_processors for mt in shared}
    total = sum(running.values())
    if total <= 0 or total_share <= 0:
        return {}
    margin = total * MARGIN_POINTS / 100.0
    over: Dict[str, float] = {}
    lacking = 0.0
    for mt in shared:
        diff = running[mt.name] - total * mt.target_share / total_share
        if diff > margin:
            over[mt.name] = diff
        elif -diff > margin and mt.startable and mt.name in shown_work:
            lacking += -diff
    surplus = sum(over.values())
    if not over or lacking <= 0:
        return {}
    scale = min(1.0, lacking / surplus)
    return {name: diff * scale for name, diff in over.items()}


def under_notice(vm: LocalVM, original_shutdown: float, now: float) -> bool:
    """A VM whose shutdown time was moved earlier and has not come yet."""
    return now < vm.shutdown_time < original_shutdown


def plan(
    policy: RebalancePolicy,
    factory_processors: int,
    machinetypes: Sequence[MachinetypePolicy],
    local_vms: Sequence[LocalVM],
    original_shutdown: Mapping[str, float],
    space: SpaceView,
    shown_work: Collection[str],
    now: float,
    rng: random.Random,
) -> List[Rewrite]:
    """This factory's part of the space's rebalancing: the shutdown times to move now.

    ``original_shutdown`` maps each VM's uuid to the shutdown time it was created with.
    Among a machinetype's VMs, those that would otherwise run longest are asked first.
    """
    excess = space_excess(machinetypes, space, shown_work)
    if not excess:
        return []
    noticed = [vm for vm in local_vms
               if under_notice(vm, original_shutdown.get(vm.uuid, vm.shutdown_time), now)]
    budget = int(policy.max_fraction * factory_processors) - sum(vm.processors for vm in noticed)
    new_time = now + policy.notice_seconds
    rewrites: List[Rewrite] = []
    for name in sorted(excess):
        if budget <= 0:
            break
        mine = [vm for vm in local_vms if vm.machinetype == name]
        space_processors = space.get(name, _EMPTY).running_processors
        if not mine or space_processors <= 0:
            continue
        share = excess[name] * sum(vm.processors for vm in mine) / space_processors
        wanted = _round_at_random(share, rng)
        wanted -= sum(vm.processors for vm in noticed if vm.machinetype == name)
        candidates = sorted((vm for vm in mine if vm.shutdown_time > new_time),
                            key=lambda vm: (-vm.shutdown_time, vm.uuid))
        for vm in candidates:
            if wanted <= 0 or vm.processors > budget:
                break
            rewrites.append(Rewrite(vm.uuid, name, new_time))
            wanted -= vm.processors
            budget -= vm.processors
    return rewrites


def _round_at_random(value: float, rng: random.Random) -> int:
    """``value`` rounded down or up, up with probability its fraction (exact on average)."""
    whole = math.floor(value)
    return int(whole) + (1 if rng.random() < value - whole else 0)
