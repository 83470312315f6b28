"""Graceful rebalancing (and adaptive backoff's memory) in the engine, once per round.

The engine keeps one :class:`Rebalancer` and calls :meth:`Rebalancer.decide_view` each round with its
live VMs and the space view. The round returns the view to decide on (with the aborts the
factory has seen in earlier rounds, for adaptive backoff) and the MJF shutdown time rewrites
to carry out, which the engine publishes exactly as it publishes a drain
(machinefeatures/shutdowntime and jobfeatures/shutdowntime_job; the new time is enforced like
any shutdown time). The decisions are the core's; this module maps the configuration onto it.
"""

from __future__ import annotations

import random
from typing import Iterable, List, Mapping, Sequence, Tuple

from vacfactory.core import rebalance as core_rebalance
from vacfactory.core.adaptive_backoff import SpaceMemory
from vacfactory.core.rebalance import Rewrite
from vacfactory.core.views import LocalVM, SpaceView
from vacfactory.engine import policies
from vacfactory.engine.drain import move_shutdown
from vacfactory.engine.entries import VMEntry
from vacfactory.state.machines import MachineStore


class Rebalancer:
    """Remembers what the space showed in earlier rounds; one per engine."""

    def __init__(self) -> None:
        self.memory = SpaceMemory()

    def decide_view(self, store: MachineStore, live: Iterable[VMEntry], config, local_vms: Sequence[LocalVM],
                    space: SpaceView, now: float, rng: random.Random) -> SpaceView:
        """One round: give notice to this factory's excess VMs (their MJF shutdown times moved,
        as a drain moves them) and return the view to decide on."""
        entries = {entry.machine.uuid: entry for entry in live}
        original = {uuid: entry.machine.record.shutdown_time for uuid, entry in entries.items()}
        view, rewrites = self.round(config, local_vms, original, space, now, rng)
        for rewrite in rewrites:
            entry = entries.get(rewrite.uuid)
            if entry is not None:
                move_shutdown(store, entry, rewrite.shutdown_time, config.settings.grace_seconds, "rebalance")
        return view

    def round(
        self,
        config,
        local_vms: Sequence[LocalVM],
        original_shutdown: Mapping[str, float],
        space: SpaceView,
        now: float,
        rng: random.Random,
    ) -> Tuple[SpaceView, List[Rewrite]]:
        """(the view to decide on, the shutdown times to move earlier now).

        With neither ``adaptive_backoff`` nor ``rebalance`` on, the view is returned unchanged
        and nothing is moved. ``local_vms`` carry each VM's current shutdown time,
        ``original_shutdown`` the one it was created with. Nothing is moved while the factory
        drains (the drain moves shutdown times itself).
        """
        s = config.settings
        adaptive = policies.adaptive_backoff(config)
        if adaptive is None and not s.rebalance:
            return space, []
        if adaptive is not None:
            self.memory.horizon_seconds = max(self.memory.horizon_seconds, adaptive.window_seconds)
        self.memory.observe(space, now)
        machinetypes = policies.machinetype_policies(config)
        fizzle = {mt.name: mt.fizzle_seconds for mt in machinetypes}
        view = self.memory.remembered(space, fizzle, now) if adaptive is not None else space
        if not s.rebalance or s.draining or s.shutdown_time is not None:
            return view, []
        shown = {mt.name for mt in machinetypes
                 if mt.name in view
                 and self.memory.shown_work(mt.name, view[mt.name], mt.fizzle_seconds, now)}
        shown.update(mt.name for mt in machinetypes if mt.name not in view)
        policy = core_rebalance.RebalancePolicy(
            notice_seconds=float(s.rebalance_notice_seconds),
            max_fraction=float(s.rebalance_max_percent) / 100.0,
        )
        rewrites = core_rebalance.plan(policy, s.total_processors, machinetypes, local_vms,
                                       original_shutdown, view, shown, now, rng)
        return view, rewrites
