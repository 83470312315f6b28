"""Named crash points for the fault-injection suite (tests/faults/, `make faults`).

The engine calls :func:`checkpoint` between every two writes of creating, destroying,
finishing, accounting and cleaning a VM: the actions of core/lifecycle.py's table name them,
and engine/transitions.py, which carries the actions out, is the only caller. Normally nothing happens. With the environment
variable ``VACFACTORY_CRASH_AT=NAME[:N]`` the process kills itself with SIGKILL the N-th time
(default 1) it reaches the checkpoint NAME - exactly what a power cut or kill -9 at that
instant does - so tests can prove that a restart loses and duplicates nothing.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, Optional, Tuple

from vacfactory.core import lifecycle

#: every checkpoint name the engine uses, in the order a VM's life reaches them, derived from
#: the lifecycle table (vacfactory/core/lifecycle.py, each action's before/after): create.prepared,
#: create.published, create.domain_started, destroy.before, destroy.after, finish.recorded,
#: account.written, account.marked, clean.withdrawn, clean.disks_removed
POINTS = lifecycle.checkpoints()

_armed: Optional[Tuple[str, int]] = None
_counts: Dict[str, int] = {}


def _parse(value: Optional[str]) -> Optional[Tuple[str, int]]:
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"VACFACTORY_CRASH_AT: unknown checkpoint {name!r} (known: {', '.join(POINTS)})")
    return name, int(count) if count else 1


_armed = _parse(os.environ.get("VACFACTORY_CRASH_AT"))


def checkpoint(name: str) -> None:
    """Die here if the fault suite armed this point (a no-op otherwise)."""
    if _armed is None or _armed[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
