"""The fault suite's two profiles and its results file.

``VACFACTORY_FAULTS_PROFILE=full`` (``make faults``) runs the numbers the issue asks for
(>= 500 crash trials on libvirt's test driver, >= 10 with real TCG VMs, a 2-minute libvirtd
outage, a simulated day of >= 10,000 VM lifecycles); unset or ``short`` (``make test``, CI)
runs a representative subset in a few minutes.

Every fault class reports one row (trials, failures, worst recovery) through :func:`record`:
it is printed at the end of the pytest run (``conftest.pytest_terminal_summary``) and, when
``VACFACTORY_FAULTS_RESULTS`` names a file, appended to it as a JSON line for
``tests/faults/run.py``, which prints the table for the README.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, TypeVar

PROFILE = os.environ.get("VACFACTORY_FAULTS_PROFILE", "short") or "short"
if PROFILE not in ("short", "full"):
    raise ValueError(f"VACFACTORY_FAULTS_PROFILE must be short or full, not {PROFILE!r}")
FULL = PROFILE == "full"

T = TypeVar("T")


def pick(short: T, full: T) -> T:
    """The short profile's value, or the full one's."""
    return full if FULL else short


@dataclass
class Row:
    """One line of the summary table."""

    fault: str
    trials: int
    failures: int
    #: the worst time from the fault ending (restart, libvirtd back, space freed) to the end of
    #: the first completed round with every invariant holding; None where it does not apply
    worst_recovery_seconds: Optional[float] = None
    #: the worst recovery counted in decision rounds (1 = the first round after the fault)
    worst_recovery_rounds: Optional[int] = None
    notes: str = ""
    profile: str = PROFILE
    problems: List[str] = field(default_factory=list)
    #: a breakdown (e.g. crash trials by injection point): a header row, then rows
    details: List[List[str]] = field(default_factory=list)
    #: the pytest node id of the test that recorded the row (filled in by :func:`record`)
    test: str = ""


_rows: Dict[str, Row] = {}
_lock = threading.Lock()


def record(row: Row) -> None:
    """Keep ``row`` for the summary (one per fault class; a later row replaces an earlier)."""
    if not row.test:  # pytest names the running test in the environment: "NODEID (call)"
        row.test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    with _lock:
        _rows[row.fault] = row
    path = os.environ.get("VACFACTORY_FAULTS_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(row)) + "\n")


def record_failed_test(nodeid: str, when: str, text: str) -> None:
    """A test of the suite failed: make sure its fault class shows a failure in the table.

    A test that failed before it recorded its row (a fixture, an early assertion, a timeout)
    gets a row of its own, named after the test; one whose row says no failures (an assertion
    after the row) has that row counted as failed.
    """
    problem = f"the test failed in {when}: {text[-1500:]}"
    with _lock:
        own = [row for row in _rows.values() if row.test == nodeid]
    if not own:
        record(Row(fault=f"{nodeid.split('::')[-1]} (no result: the test failed in {when})", trials=0,
                   failures=1, notes="see problems", problems=[problem], test=nodeid))
        return
    for row in own:
        if not row.failures:
            record(Row(**{**asdict(row), "failures": 1, "problems": row.problems + [problem],
                          "worst_recovery_rounds": None}))


def rows() -> List[Row]:
    with _lock:
        return list(_rows.values())


def table(rows_: List[Row]) -> str:
    """The summary as a Markdown table (README-ready)."""
    lines = [
        "| fault class | trials | failures | worst recovery | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows_:
        if row.worst_recovery_seconds is None:
            recovery = "n/a"
        else:
            recovery = f"{row.worst_recovery_seconds:.2f} s"
            if row.worst_recovery_rounds is not None:
                recovery += f" ({row.worst_recovery_rounds} round{'s' if row.worst_recovery_rounds != 1 else ''})"
        lines.append(f"| {row.fault} | {row.trials} | {row.failures} | {recovery} | {row.notes} |")
    for row in rows_:
        if row.details:
            header, *body = row.details
            lines += ["", f"{row.fault}, by injection point:", "",
                      "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            lines += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in body]
    return "\n".join(lines)
