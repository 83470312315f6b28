"""shutdown_message codes and how a VM's end is classified. The one place for these codes.

A VM ends by writing ``joboutputs/shutdown_message`` whose first line is ``NNN free text``
(Vacuum Platform, HSF-TN-2016-04), or the factory ends it (heartbeat, wallclock, drain).
The class of the end decides backoff: an *abort* makes that machinetype wait
``backoff_seconds`` (space-wide) before another VM of it is started.

Rules (Vac 03.01 semantics, with two of its bugs fixed):
- code 100-299: success; 300-699 and 800-999: abort (Vac: every ``int(message[0:3]) >= 300``);
  700-799: abort unless ``abort_on_700`` is off (Vac counts 7xx as aborts, Vcycle does not:
  we default to Vac).
- no readable message and a run shorter than ``fizzle_seconds``: a *fizzle*, treated as the
  abort ``300 Fizzled after N seconds without a shutdown_message`` (Vac meant to do this but
  a bug prevented it).
- no message after a full run, or a factory kill for wallclock/shutdown time/pause: *neutral*
  (no backoff), as in Vac.
- the factory's heartbeat kills carry ``700 Heartbeat file not created|updated``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional

#: code -> canonical meaning (HSF-TN-2016-04 wording, as used by the DIRAC pilot)
CODES = {
    100: "Shutdown as requested by the VM's host/hypervisor",
    200: "Intended work completed ok",
    300: "No more work available from task queue",
    400: "Site/host/VM is currently banned/disabled from receiving more work",
    500: "Problem detected with environment/VM/contextualization provided by the site",
    600: "Grid-wide problem with job agent or application within VM",
    700: "Error related to job agent or application within VM",
}

HEARTBEAT_NOT_CREATED = "Heartbeat file not created"
HEARTBEAT_NOT_UPDATED = "Heartbeat file not updated"

#: longest message text we keep; the rest of a hostile file is ignored
MAX_TEXT = 200

_MESSAGE = re.compile(r"\A\s*([1-9][0-9][0-9])(?![0-9])[ \t:-]*(.*)\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class ShutdownMessage:
    """A parsed ``NNN text`` line."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def parse_shutdown_message(raw: "str | bytes") -> Optional[ShutdownMessage]:
    """Parse the first line of a shutdown_message; None if it carries no valid code.

    Hostile input is expected: bytes are decoded leniently, only the first line counts,
    unprintable characters become ``?`` and the text is cut to :data:`MAX_TEXT` characters.
    """
    if isinstance(raw, bytes):
        raw = raw[: 4 * MAX_TEXT].decode("utf-8", errors="replace")
    first = raw.split("\n", 1)[0].split("\r", 1)[0][: 4 * MAX_TEXT]
    match = _MESSAGE.match(first)
    if not match:
        return None
    text = _UNPRINTABLE.sub("?", match.group(2).strip())[:MAX_TEXT]
    return ShutdownMessage(int(match.group(1)), text)


class Outcome(str, enum.Enum):
    """How a VM's life ended, as far as scheduling is concerned."""

    SUCCESS = "success"   # code < 300
    ABORT = "abort"       # code >= 300 (7xx configurable, 8xx/9xx always): backoff
    FIZZLE = "fizzle"     # no message and shorter than fizzle_seconds: backoff
    NEUTRAL = "neutral"   # no message after a full run, or killed for time/pause: no backoff
    FAILED = "failed"     # never started (creation failed): no backoff, no accounting


class KillReason(str, enum.Enum):
    """Why the factory ended a VM itself."""

    HEARTBEAT_NOT_CREATED = "heartbeat_not_created"
    HEARTBEAT_NOT_UPDATED = "heartbeat_not_updated"
    WALLCLOCK = "wallclock"            # passed its own shutdown time (max_wallclock_seconds)
    SHUTDOWN_TIME = "shutdown_time"    # passed the factory's shutdown_time (drain)
    PAUSED = "paused"                  # domain paused/crashed instead of shutting down
    DRAINING = "draining"


#: the message the factory records when it kills a VM for a stale heartbeat
KILL_MESSAGES = {
    KillReason.HEARTBEAT_NOT_CREATED: ShutdownMessage(700, HEARTBEAT_NOT_CREATED),
    KillReason.HEARTBEAT_NOT_UPDATED: ShutdownMessage(700, HEARTBEAT_NOT_UPDATED),
}


@dataclass(frozen=True)
class Classified:
    """The outcome of one VM plus the message that explains it (if any)."""

    outcome: Outcome
    message: Optional[ShutdownMessage]

    @property
    def backs_off(self) -> bool:
        return self.outcome in (Outcome.ABORT, Outcome.FIZZLE)


def is_abort_code(code: int, abort_on_700: bool = True) -> bool:
    """True if a VM that ended with ``code`` should make its machinetype back off: every
    code >= 300, as in Vac, except that ``abort_on_700`` off spares 700-799 (Vcycle's rule)."""
    if 700 <= code <= 799:
        return abort_on_700
    return code >= 300


def classify(
    message: Optional[ShutdownMessage],
    wall_seconds: float,
    fizzle_seconds: float,
    kill: Optional[KillReason] = None,
    abort_on_700: bool = True,
) -> Classified:
    """Classify a VM's end from its message, how long it ran and whether the factory killed it.

    A heartbeat kill overrides anything the VM wrote (the VM stopped proving it works). For
    other kills the VM's own message, if it wrote one, still counts.
    """
    if kill in KILL_MESSAGES:
        message = KILL_MESSAGES[kill]
    if message is not None:
        if is_abort_code(message.code, abort_on_700):
            return Classified(Outcome.ABORT, message)
        if message.code < 300:
            return Classified(Outcome.SUCCESS, message)
        # a 7xx with abort_on_700 off: judged like a VM with no message (Vcycle's rule)
    if kill is None and wall_seconds < fizzle_seconds:
        synthesised = ShutdownMessage(
            300, f"Fizzled after {int(max(wall_seconds, 0))} seconds without a shutdown_message"
        )
        return Classified(Outcome.FIZZLE, message or synthesised)
    return Classified(Outcome.NEUTRAL, message)
