"""Per-machinetype status: this factory's view of its VMs, and the sum over a space.

The same numbers answer VacQuery ``machinetype_status`` queries and feed the scheduler's space
view, so a factory judges itself exactly as its peers judge it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence

from vacfactory.core.outcomes import Outcome
from vacfactory.core.views import FinishedVM, LocalVM, MachinetypePolicy, MachinetypeState

#: fizzle_seconds for a machinetype no longer in the configuration (Vac's default)
DEFAULT_FIZZLE_SECONDS = 600.0

#: outcomes whose end time starts a backoff (a tuple: compared with ==, so a plain "abort"
#: string and Outcome.ABORT both match, which a set would not guarantee for a str enum)
_BACKOFF_OUTCOMES = (Outcome.ABORT, Outcome.FIZZLE)


def machinetype_states(
    machinetypes: Sequence[MachinetypePolicy],
    local_vms: Sequence[LocalVM],
    last_finished: Mapping[str, FinishedVM],
    now: float,
) -> Dict[str, MachinetypeState]:
    """This factory's own state of every machinetype it has configured, runs or has finished.

    A VM counts toward ``num_before_fizzle`` until it has run ``fizzle_seconds`` (or while it
    has not started): until then it has not shown that its VO has work. Machinetypes dropped
    from the configuration still appear while they have VMs or a finish, so the space keeps
    seeing their load and their last abort.
    """
    fizzle = {mt.name: mt.fizzle_seconds for mt in machinetypes}
    tallies: Dict[str, _Tally] = {mt.name: _Tally() for mt in machinetypes}
    for vm in local_vms:
        tally = tallies.setdefault(vm.machinetype, _Tally())
        window = fizzle.get(vm.machinetype, DEFAULT_FIZZLE_SECONDS)
        tally.add(vm, before_fizzle=vm.started is None or now < vm.started + window)
    for name in last_finished:
        tallies.setdefault(name, _Tally())
    return {
        name: tally.state(_abort_time(last_finished.get(name)))
        for name, tally in tallies.items()
    }


@dataclass
class _Tally:
    """Running sums for one machinetype while the VMs are counted."""

    hs06: float = 0.0
    processors: int = 0
    machines: int = 0
    before_fizzle: int = 0

    def add(self, vm: LocalVM, before_fizzle: bool) -> None:
        self.hs06 += vm.hs06
        self.processors += vm.processors
        self.machines += 1
        self.before_fizzle += int(before_fizzle)

    def state(self, last_abort_time: Optional[float]) -> MachinetypeState:
        return MachinetypeState(
            running_hs06=self.hs06,
            running_processors=self.processors,
            running_machines=self.machines,
            num_before_fizzle=self.before_fizzle,
            last_abort_time=last_abort_time,
            abort_times=() if last_abort_time is None else (last_abort_time,),
        )


def _abort_time(finished: Optional[FinishedVM]) -> Optional[float]:
    """The end time of the latest finished VM if its end starts a backoff (abort or fizzle)."""
    if finished is not None and finished.outcome in _BACKOFF_OUTCOMES:
        return finished.finished_time
    return None


def supersedes(candidate: FinishedVM, previous: Optional[FinishedVM]) -> bool:
    """True if ``candidate`` replaces ``previous`` as a machinetype's latest finish.

    Vac's rule: the most recently *created* VM that has finished counts, not the last one to
    end, so an older VM ending "200 Success" after a newer one ended "300 No more work" does
    not lift the backoff. Ties on creation go to the later end, then the larger uuid (one
    answer whatever order the finishes arrive in). A record without ``created`` (written
    before it was kept) is compared by end time, the old rule.
    """
    if previous is None:
        return True
    if candidate.created is None or previous.created is None:
        return candidate.finished_time >= previous.finished_time
    return ((candidate.created, candidate.finished_time, candidate.uuid)
            >= (previous.created, previous.finished_time, previous.uuid))


def merge_states(views: Iterable[Mapping[str, MachinetypeState]]) -> Dict[str, MachinetypeState]:
    """The space's state of each machinetype: counts summed, newest abort kept, abort times
    of every factory collected."""
    merged: Dict[str, MachinetypeState] = {}
    for view in views:
        for name, state in view.items():
            seen = merged.get(name)
            if seen is None:
                merged[name] = state
                continue
            aborts = [t for t in (seen.last_abort_time, state.last_abort_time) if t is not None]
            merged[name] = MachinetypeState(
                running_hs06=seen.running_hs06 + state.running_hs06,
                running_processors=seen.running_processors + state.running_processors,
                running_machines=seen.running_machines + state.running_machines,
                num_before_fizzle=seen.num_before_fizzle + state.num_before_fizzle,
                last_abort_time=max(aborts) if aborts else None,
                abort_times=seen.abort_times + state.abort_times,
            )
    return merged
