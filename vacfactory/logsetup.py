"""Where the daemon's log goes (stderr, a file, or syslog with priorities), and a summariser
for errors that repeat every round.

Syslog: RFC 3164 datagrams to the local socket (/dev/log), facility daemon, identifier
``vacfactory[PID]``; the level becomes the syslog priority (ERROR -> err, WARNING ->
warning, ...), which journald keeps as PRIORITY=. Messages are sent whole: never cut.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import time
from collections import OrderedDict
from typing import Callable, Hashable, Optional

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_ADDRESS = "/dev/log"
#: a repeated identical error is logged the first time, then at most once per this interval
REPEAT_INTERVAL_SECONDS = 600.0


def make_handler(log_to: str = "stderr", log_file: Optional[str] = None,
                 syslog_address: str = SYSLOG_ADDRESS) -> logging.Handler:
    """The handler of ``log_to`` (stderr, file, syslog); OSError if it cannot be opened."""
    handler: logging.Handler
    if log_to == "syslog":
        handler = logging.handlers.SysLogHandler(
            address=syslog_address, facility=logging.handlers.SysLogHandler.LOG_DAEMON,
            socktype=socket.SOCK_DGRAM)
        handler.setFormatter(logging.Formatter(f"vacfactory[{os.getpid()}]: %(levelname)s %(name)s: %(message)s"))
        return handler
    if log_to == "file":
        if not log_file:
            raise ValueError("log_to = file needs a log file")
        handler = logging.handlers.WatchedFileHandler(log_file)  # logrotate without copytruncate
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    return handler


def configure_logging(level: str = "INFO", log_file: Optional[str] = None, log_to: Optional[str] = None,
                      syslog_address: str = SYSLOG_ADDRESS) -> None:
    """Send every logger's events of ``level`` and above to one handler. ``log_file`` alone
    means log_to = file (the command line's --log-file)."""
    if log_to is None:
        log_to = "file" if log_file else "stderr"
    handler = make_handler(log_to, log_file, syslog_address)
    root = logging.getLogger()
    for old in root.handlers[:]:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RepeatSummariser:
    """Says whether an event that may repeat every round should be logged now.

    ``due(key)`` is None to stay quiet, else how many times the event was suppressed since it
    was last logged (0 the first time). At most ``max_keys`` events are remembered.
    """

    def __init__(self, interval: float = REPEAT_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 256) -> None:
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._seen: "OrderedDict[Hashable, list]" = OrderedDict()  # key -> [last logged, suppressed]

    def due(self, key: Hashable) -> Optional[int]:
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [now, 0]
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return 0
        self._seen.move_to_end(key)
        if now - entry[0] >= self.interval:
            suppressed = entry[1]
            entry[0], entry[1] = now, 0
            return suppressed
        entry[1] += 1
        return None

    def forget(self, key: Hashable) -> None:
        """The condition is over: the next occurrence is logged at once."""
        self._seen.pop(key, None)

    def suffix(self, suppressed: int) -> str:
        """What to append to the message logged after ``suppressed`` quiet repeats."""
        if not suppressed:
            return ""
        return f" (repeated {suppressed} more times in the last {self.interval / 60:g} minutes)"
