"""The side-by-side table ``vacfactory simulate --workload`` and ``make bench`` print."""

from __future__ import annotations

from typing import List, Optional, Sequence

from vacfactory.sim.spacesim import Figures


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or base is None:
        return ""
    if base == 0:
        return " (=)" if value == 0 else ""
    return f" ({value / base:.2f}x)"


def _num(value: Optional[float], fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def format_comparison(figures: Sequence[Figures]) -> List[str]:
    """One row per figure, one column per policy; the first is the baseline (Vac's) and the
    others show their ratio to it."""
    base = figures[0]
    names = sorted({n for f in figures for n in f.share_error})
    rows = [("occupancy %", lambda f: f.occupancy * 100, ".2f"),
            ("waste processor-h", lambda f: f.waste_hours, ".1f"),
            ("VMs with no work", lambda f: float(f.nowork_vms), ".0f"),
            ("share error, all with work", lambda f: f.share_error_all_work, ".2f")]
    rows += [(f"share error {n}", (lambda n: lambda f: f.share_error.get(n))(n), ".2f")
             for n in names]
    rows += [("convergence h", lambda f: f.convergence_hours, ".2f"),
             ("error after convergence", lambda f: f.error_after_convergence, ".2f"),
             ("notices given", lambda f: float(f.notices), ".0f"),
             ("payloads killed", lambda f: float(f.payloads_killed), ".0f")]
    width = max(24, *(len(f.policy) + 2 for f in figures))
    lines = [f"{'figure':<28}" + "".join(f"{f.policy:>{width}}" for f in figures)]
    for label, get, fmt in rows:
        cells = []
        for i, f in enumerate(figures):
            missing = "never" if label == "convergence h" and f.share_change_hours is not None else "-"
            text = _num(get(f), fmt, missing) + ("" if i == 0 else _ratio(get(f), get(base)))
            cells.append(f"{text:>{width}}")
        lines.append(f"{label:<28}" + "".join(cells))
    lines.append(f"{'run time s':<28}" + "".join(f"{f.wall_seconds:>{width}.1f}" for f in figures))
    return lines
