"""CPU cost of one scheduler decision round (``python tests/bench/bench_decision.py``).

Not a pytest test: it prints one line per scenario with the CPU time per ``decide`` call,
measured with ``time.process_time`` over enough calls to last at least half a second, and
exits non-zero if a scenario misses its goal (so ``make bench`` can fail loudly).
"""

from __future__ import annotations

import random
import sys
import time
from typing import Callable, List, Tuple

from vacfactory.core.scheduler import decide
from vacfactory.core.status import machinetype_states, merge_states
from vacfactory.core.views import Decision, FactoryPolicy, LocalVM, MachinetypePolicy

NOW = 1_700_000_000.0
GOAL_MS = 20.0
TYPES = 10


def machinetypes(max_processors: int = 1) -> List[MachinetypePolicy]:
    return [
        MachinetypePolicy(
            name=f"vo{i}",
            target_share=float(1 + i % 4),
            machinegroup=f"group{i % 3}",
            min_processors=1,
            max_processors=max_processors,
            min_wallclock_seconds=3600.0,
            max_wallclock_seconds=86400.0 + 600 * i,
        )
        for i in range(TYPES)
    ]


def running_vms(count: int, sizes: Tuple[int, ...] = (1,)) -> List[LocalVM]:
    rng = random.Random(7)
    vms = []
    for i in range(count):
        processors = sizes[i % len(sizes)]
        created = NOW - rng.uniform(120, 80000)
        vms.append(
            LocalVM(
                uuid=f"vm-{i}",
                machinetype=f"vo{i % TYPES}",
                processors=processors,
                created=created,
                shutdown_time=created + 86400.0,
                memory_mb=2048 * processors,
                hs06=10.0 * processors,
                started=created + 30,
            )
        )
    return vms


def scenario(
    policy: FactoryPolicy, types: List[MachinetypePolicy], vms: List[LocalVM]
) -> Callable[[], Decision]:
    own = machinetype_states(types, vms, {}, NOW)
    peers = [{name: state for name, state in own.items()} for _ in range(3)]
    space = merge_states([own] + peers)
    rng = random.Random(1)
    return lambda: decide(policy, types, vms, space, 0.5, NOW, rng)


def measure(call: Callable[[], Decision]) -> Tuple[float, Decision]:
    """CPU milliseconds per call, and one decision for the line's context."""
    decision = call()
    calls, start = 0, time.process_time()
    while True:
        call()
        calls += 1
        spent = time.process_time() - start
        if spent >= 0.5 and calls >= 5:
            return 1000.0 * spent / calls, decision


def main() -> int:
    scenarios = [
        (
            "decision round, 128 VMs, 10 machinetypes",
            scenario(
                FactoryPolicy(total_processors=256, host_processors=256, hs06_per_processor=10.0),
                machinetypes(),
                running_vms(128),
            ),
        ),
        (
            "64-free-processor fill, 192 VMs, 10 machinetypes",
            scenario(
                FactoryPolicy(total_processors=256, host_processors=256, hs06_per_processor=10.0),
                machinetypes(),
                running_vms(192),
            ),
        ),
        (
            "superslots of 8, 128 VMs of 1-4 processors, 10 machinetypes",
            scenario(
                FactoryPolicy(
                    total_processors=512, host_processors=512, processors_per_superslot=8,
                    hs06_per_processor=10.0, max_starting_processors=256,
                ),
                machinetypes(max_processors=8),
                running_vms(128, sizes=(1, 2, 3, 4)),
            ),
        ),
    ]
    failed = False
    for label, call in scenarios:
        ms, decision = measure(call)
        created = sum(c.processors for c in decision.creates)
        sys.stdout.write(
            f"{label}: {ms:.2f} ms CPU (goal < {GOAL_MS:g} ms); "
            f"{len(decision.creates)} creates, {created} processors; stopped: {decision.reason}\n"
        )
        failed = failed or ms >= GOAL_MS
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
