"""What the built-in sender did last, for ``apel status`` and ``vacfactory check``.

One small JSON file beside the queue (``<state_dir>/apel-send-state.json``), written
atomically after every run that had something to send: when, over which protocol to which
destination, and the last success (a run that left nothing queued) and the last error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

from vacfactory.atomic import atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "apel-send-state.json"


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def read_state(state_dir: str) -> Dict[str, Any]:
    """The recorded state; {} when there is none or it is unreadable (logged)."""
    path = state_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable, ignored: %s", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def record_run(state_dir: str, now: float, *, protocol: str, destination: str, sent: int,
               remaining: int, error: Optional[str]) -> None:
    """Remember one run; a failure to write is logged, never raised (the sending is done)."""
    state = read_state(state_dir)
    state.update(protocol=protocol, destination=destination, last_attempt=now, last_sent=sent,
                 remaining=remaining, last_error=error)
    if sent:
        state["last_sent_time"] = now
    if error is None and remaining == 0:
        state["last_success"] = now
    else:
        state["last_failure"] = now
    try:
        os.makedirs(state_dir, exist_ok=True)
        atomic_write_json(state_path(state_dir), state)
    except OSError as error_:
        log.warning("%s: cannot record the send: %s", state_path(state_dir), error_)
