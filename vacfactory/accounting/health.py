"""What ``vacfactory check`` adds when the APEL queue has not drained: why, if the built-in
sender knows (its last success and last error, from :mod:`vacfactory.accounting.send_state`)."""

from __future__ import annotations

import datetime
from typing import Optional

from vacfactory.accounting.send_state import read_state

_MAX_ERROR = 80


def undrained_note(state_dir: str, now: float) -> str:
    """``; last successful send 2026-12-05 10:00Z; last error: ...`` or ``""`` when the
    built-in sender never ran here (ssmsend sends: only its own log knows)."""
    state = read_state(state_dir)
    if not state.get("last_attempt"):
        return ""
    success = _stamp(state.get("last_success"))
    note = f"; last successful {state.get('protocol', '?')} send {success or 'never'}"
    error = state.get("last_error")
    if error:
        # the error may quote what AMS or a broker answered: printable ASCII only, one line
        text = "".join(c if " " <= c <= "~" else " " for c in str(error))
        note += f"; last error: {text[:_MAX_ERROR]}{'...' if len(text) > _MAX_ERROR else ''}"
    return note


def _stamp(epoch: Optional[float]) -> Optional[str]:
    if not isinstance(epoch, (int, float)):
        return None
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%MZ")
