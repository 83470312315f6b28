"""The engine's view of configuration reloads: the last good configuration, and one log line
per change (a rejected edit is logged once, not every round, and its fix is logged too)."""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


class ConfigPoller:
    """``source.poll()`` gives ``config``, ``changed`` and ``errors`` (config.loader.ConfigWatcher)."""

    def __init__(self, source) -> None:
        self.source = source
        self.config = source.current
        self._errors_logged: Optional[str] = None

    def poll(self):
        """The configuration in force after looking for edits."""
        result = self.source.poll()
        if result.errors is not None:
            text = str(result.errors)
            if text != self._errors_logged:
                for line in text.splitlines():
                    log.error("configuration rejected, keeping the last good one: %s", line)
                self._errors_logged = text
        else:
            if self._errors_logged is not None:
                log.info("configuration accepted: the rejected edit was fixed (%d machinetypes)",
                         len((result.config or self.config).machinetypes))
            self._errors_logged = None
        if result.changed and result.config is not None:
            log.info("configuration reloaded: %d machinetypes", len(result.config.machinetypes))
            for warning in result.config.warnings:  # e.g. vacuum pipe entries that were skipped
                log.warning("configuration: %s", warning)
        if result.config is not None:
            self.config = result.config
        return self.config
