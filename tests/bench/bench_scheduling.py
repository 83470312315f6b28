"""Scheduling quality beyond Vac (``python tests/bench/bench_scheduling.py``; ``make bench``).

Runs the issue-16 scenarios (vacfactory.sim.scenarios: 100 factories x 32 processors,
machinetypes 5:3:2, VM lifetimes lognormal with mean 12 h) with Vac 03.01's policy, this
factory's defaults, and adaptive_backoff + rebalance, on the same seeded workloads, and prints
every figure as a ratio against Vac's. Exits non-zero if a goal is missed:

- bursty week (the third machinetype has work 6 h, none 6 h): waste <= 0.5 x Vac's with
  occupancy >= Vac's; share error while all have work <= 2 points;
- share change 5:3:2 -> 2:3:5: within 2 points in <= 2 h with rebalancing, no payload killed,
  and the error stays within 2 points after convergence (no oscillation).
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from vacfactory.sim.report import format_comparison  # noqa: E402
from vacfactory.sim.scenarios import BEYOND_VAC, POLICIES, SPACE, bursty_week, share_change  # noqa: E402
from vacfactory.sim.spacesim import VAC, compare  # noqa: E402


def _points(value) -> str:
    return "never" if value is None else f"{value:.2f}"


def main() -> int:
    failures = []
    began = time.monotonic()
    vac, defaults, ours = compare(bursty_week(), SPACE, POLICIES)
    print("bursty week (100 x 32 processors, 5:3:2, the third has work 6 h / none 6 h):")
    for line in format_comparison([vac, defaults, ours]):
        print("  " + line)
    waste_ratio = ours.waste_hours / vac.waste_hours if vac.waste_hours else 0.0
    print(f"scheduling waste: {waste_ratio:.2f} x Vac's (goal <= 0.5); occupancy "
          f"{ours.occupancy / vac.occupancy:.4f} x Vac's (goal >= 1); share error while all have "
          f"work {ours.share_error_all_work:.2f} points (Vac {vac.share_error_all_work:.2f}; "
          f"goal <= 2)", flush=True)
    if not (waste_ratio <= 0.5 and ours.occupancy >= vac.occupancy
            and ours.share_error_all_work is not None and ours.share_error_all_work <= 2.0):
        failures.append("bursty week")
    vac, ours = compare(share_change(), SPACE, (VAC, BEYOND_VAC))
    print("share change 5:3:2 -> 2:3:5 at hour 36 (all have work):")
    for line in format_comparison([vac, ours]):
        print("  " + line)
    converged = ours.convergence_hours
    ratio = (converged / vac.convergence_hours
             if converged is not None and vac.convergence_hours else float("nan"))
    print(f"scheduling share change: within 2 points after {_points(converged)} h with "
          f"rebalancing ({ratio:.2f} x Vac's {_points(vac.convergence_hours)} h; goal <= 2 h), "
          f"{ours.payloads_killed} "
          f"payloads killed (goal 0), largest error after convergence "
          f"{_points(ours.error_after_convergence)} points (goal <= 2)", flush=True)
    if not (converged is not None and converged <= 2.0 and ours.payloads_killed == 0
            and ours.error_after_convergence is not None
            and ours.error_after_convergence <= 2.0):
        failures.append("share change")
    print(f"scheduling bench: {time.monotonic() - began:.0f} s; policy compared: {BEYOND_VAC.name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
