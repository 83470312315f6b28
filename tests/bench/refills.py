"""How fast a factory refills a slot: from one machine's stop event to the next one's start.

Shared by the VM refill (bench_factory.py) and the container refill (bench_containers.py):
the bench passes ``on_event`` to its hypervisor's event callback, runs the daemon with
``run_daemon`` until enough machines have ended, and reads ``gaps()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")


class Refills:
    """Stop and start times of the machines whose names ``ours`` accepts."""

    def __init__(self, ours: Callable[[str], bool] = lambda name: True) -> None:
        self.ours = ours
        self.stops: List[float] = []
        self.starts: List[float] = []
        self._lock = threading.Lock()

    def on_event(self, event) -> None:
        if not self.ours(event.name):
            return
        with self._lock:
            if event.kind == "stopped":
                self.stops.append(time.time())
            elif event.kind == "started":
                self.starts.append(time.time())

    def run_daemon(self, config: str, log_path: str, refills: int, seconds_each: float) -> None:
        """`vacfactory run` on ``config`` until ``refills`` + 2 machines have stopped (or time
        is up), then SIGTERM."""
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([VACFACTORY, "--config", config, "run"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60 + seconds_each * refills
            while time.time() < deadline:
                with self._lock:
                    if len(self.stops) >= refills + 2:
                        break
                time.sleep(0.2)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)

    def gaps(self) -> List[float]:
        """For each stop, the time until the next start."""
        with self._lock:
            return [min(s for s in self.starts if s >= stop) - stop
                    for stop in self.stops if any(s >= stop for s in self.starts)]
