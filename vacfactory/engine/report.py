"""What one round did (:class:`RoundReport`), and status.json written from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

from vacfactory.core.views import Decision
from vacfactory.errors import VacFactoryError
from vacfactory.state.machines import Machine
from vacfactory.state.status import StatusFiles

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one round did; kept for status.json, logs and tests."""

    time: float
    blind: bool = False
    adopted: List[str] = field(default_factory=list)
    finished: List[str] = field(default_factory=list)
    killed: List[str] = field(default_factory=list)
    zombies: List[str] = field(default_factory=list)
    created: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    #: machinetypes not startable this round (their image is still downloading): no failure
    waiting: List[str] = field(default_factory=list)
    #: why creation is paused (the state directory is full), None if it is not
    paused: Optional[str] = None
    decision: Optional[Decision] = None


def write_status(status_files: StatusFiles, report: RoundReport, machines: Iterable[Machine],
                 total_processors: int, creation_failures: Dict[str, Dict[str, object]],
                 extra: Optional[Callable[[], Dict[str, object]]] = None) -> None:
    """status.json from the round (plus the daemon's ``extra``), and the factory heartbeat."""
    live = [m for m in machines if m.live]
    per_type: Dict[str, int] = {}
    for m in live:
        per_type[m.record.machinetype] = per_type.get(m.record.machinetype, 0) + m.record.processors
    status = {
        "time": report.time,
        "blind": report.blind,
        "running_machines": len(live),
        "running_processors": sum(m.record.processors for m in live),
        "total_processors": total_processors,
        "processors_by_machinetype": per_type,
        "decision": report.decision.reason if report.decision else None,
        "created": report.created,
        "failed": report.failed,
        "waiting_for_images": report.waiting,
        "creation_paused": report.paused,
        "creation_failures": creation_failures,
    }
    if extra is not None:
        try:
            status.update(extra())
        except (VacFactoryError, OSError) as error:
            log.error("cannot gather the daemon's status: %s", error)
    try:
        status_files.write_status(status)
        if not report.blind:
            status_files.beat(report.time)
    except OSError as error:
        log.error("cannot write status files: %s", error)


class DecisionLog:
    """Says why the factory stopped creating, once per change (not every round)."""

    def __init__(self) -> None:
        self._last: Optional[str] = None

    def say(self, report: RoundReport, busy_processors: int, total_processors: int) -> None:
        if report.decision is None:
            return
        reason = report.decision.reason
        if report.failed and reason.startswith("all "):
            # the plan filled every processor but creations failed: that is not "in use"
            reason = (f"{busy_processors} of {total_processors} processors in use; "
                      f"{len(report.failed)} creations failed this round")
        # the numbers in a reason change constantly; compare its words before the first digit
        key = "failed" if report.failed else reason.split(":")[0].split(";")[0].rstrip("0123456789 ")
        if key != self._last:
            log.info("decision: %s", reason)
            self._last = key
