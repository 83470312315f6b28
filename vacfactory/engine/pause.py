"""When creation must wait for space in the state directory (everything else goes on).

Without a floor a full disk made every round fail a creation (found by the fault suite): a
new VM needs room for its machine directory and disk overlays, and every VM that ends needs
room for its records. Kills, finishes and accounting retries never wait for this.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable, Optional, Set, Tuple

log = logging.getLogger(__name__)

#: creation pauses while the state directory has less free space than this
MIN_FREE_STATE_MIB = 64
#: a creation that ran out of space although the floor was met (no inodes left, a quota)
#: pauses creation until the free space grows by the floor again or this long has passed
ENOSPC_PAUSE_SECONDS = 300.0


def free_bytes(path: str) -> int:
    """Space available in the filesystem holding ``path`` (to unprivileged writers)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def out_of_space(error: BaseException) -> bool:
    """Did ``error`` (or what caused it) fail for want of space? qemu-img reports it in text."""
    seen: Set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


class CreationPause:
    """Says why creation waits now, logging each change once (not every round).

    ``free_space(path)`` gives the bytes free (statvfs; tests replace it); ``elapsed()`` is a
    clock a step of the wall clock does not move.
    """

    def __init__(self, state_dir: str, elapsed: Callable[[], float],
                 free_space: Callable[[str], int] = free_bytes) -> None:
        self.state_dir = state_dir
        self.elapsed = elapsed
        self.free_space = free_space
        #: (elapsed(), bytes free) when a creation last ran out of space
        self._out_of_space: Optional[Tuple[float, Optional[int]]] = None
        self._kind: Optional[str] = None  # "floor" or "enospc": logged once per change

    @property
    def ran_out(self) -> bool:
        """A creation ran out of space and creation has not resumed since."""
        return self._out_of_space is not None

    def failed(self, error: BaseException) -> None:
        """A creation failed with ``error``: if for want of space, pause rather than fail again."""
        if not out_of_space(error):
            return
        try:
            free: Optional[int] = self.free_space(self.state_dir)
        except OSError:
            free = None
        self._out_of_space = (self.elapsed(), free)

    def why(self) -> Optional[str]:
        """Why creation must wait now, or None.

        Paused below MIN_FREE_STATE_MIB free, and after a creation ran out of space until the
        free space has grown by that much (or ENOSPC_PAUSE_SECONDS passed, for causes statvfs
        cannot show).
        """
        state_dir = self.state_dir
        floor = MIN_FREE_STATE_MIB << 20
        try:
            free: Optional[int] = self.free_space(state_dir)
        except OSError as error:  # cannot tell: creating shows soon enough
            log.warning("cannot read the free space of %s: %s", state_dir, error)
            free = None
        kind, why = None, None
        if free is not None and free < floor:
            kind = "floor"
            why = (f"creation paused: state dir {state_dir} has {free >> 20} MiB free, "
                   f"needs {MIN_FREE_STATE_MIB}")
        elif self._out_of_space is not None:
            since, free_then = self._out_of_space
            grown = free is not None and free_then is not None and free >= free_then + floor
            if grown or self.elapsed() - since >= ENOSPC_PAUSE_SECONDS:
                self._out_of_space = None
            else:
                kind = "enospc"
                why = (f"creation paused: a creation ran out of space in state dir {state_dir} "
                       f"({(free_then or 0) >> 20} MiB free then); waiting for {MIN_FREE_STATE_MIB} "
                       f"MiB more or {ENOSPC_PAUSE_SECONDS:.0f} s")
        if kind != self._kind:
            if why is not None:
                log.error("%s", why)
            else:
                log.info("creation resumed: state dir %s has %s MiB free", state_dir,
                         "?" if free is None else free >> 20)
            self._kind = kind
        return why
