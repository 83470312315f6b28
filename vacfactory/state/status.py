"""Daemon health files in the state directory, read by `vacfactory check` and the CLI.

``factory-heartbeat`` (epoch of the last completed decision round), ``factory-error`` (the
last creation error; removed after the next successful creation, as in Vac) and
``status.json`` (counts and the last round's decision, for monitoring).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from vacfactory.atomic import atomic_write_json, atomic_write_text


class StatusFiles:
    def __init__(self, state_dir: str) -> None:
        self.heartbeat_path = os.path.join(state_dir, "factory-heartbeat")
        self.error_path = os.path.join(state_dir, "factory-error")
        self.status_path = os.path.join(state_dir, "status.json")

    def beat(self, now: float) -> None:
        atomic_write_text(self.heartbeat_path, f"{now:.3f}\n", sync=False)

    def last_beat(self) -> Optional[float]:
        try:
            with open(self.heartbeat_path) as f:
                return float(f.read(64).strip())
        except (OSError, ValueError):
            return None

    def set_error(self, message: str) -> None:
        atomic_write_text(self.error_path, message.rstrip("\n") + "\n")

    def clear_error(self) -> None:
        try:
            os.unlink(self.error_path)
        except FileNotFoundError:
            pass

    def error(self) -> Optional[str]:
        try:
            with open(self.error_path) as f:
                return f.read(4096).strip() or None
        except OSError:
            return None

    def write_status(self, status: Dict[str, Any]) -> None:
        atomic_write_json(self.status_path, status, sync=False)

    def status(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.status_path) as f:
                value = json.load(f)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None
