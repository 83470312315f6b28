"""Vacuum pipes: the last failed fetch of a pipe that still has a cached copy."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List

from vacfactory.config.model import Config
from vacfactory.config import options as table

from .findings import WARNING, Finding, Locator


def pipes(config: Config, locator: Locator) -> List[Finding]:
    """The last fetch error of each pipe that still has a cached copy (without one, the loader
    already says the pipe defines nothing yet, and why)."""
    from vacfactory.config.pipeload import pipe_cache_path, pipe_meta_path

    findings: List[Finding] = []
    state = config.settings.state_dir
    for prefix, pipe in config.vacuum_pipes.items():
        meta = read_pipe_meta(pipe_meta_path(state, prefix))
        if not meta.get("error") or not os.path.isfile(pipe_cache_path(state, prefix)):
            continue
        fetched = meta.get("fetched")
        since = f"from {utc(fetched)}" if isinstance(fetched, (int, float)) else "from an earlier download"
        findings.append(locator.finding(
            WARNING, f"the last fetch of {pipe.url} failed {_at(meta.get('attempted'))}: "
                     f"{meta['error']}; the cached copy {since} stays in use",
            f"{table.VACUUM_PIPE} {prefix}", "vacuum_pipe_url"))
    return findings


def read_pipe_meta(path: str) -> Dict[str, Any]:
    """A pipe cache's sidecar ({} if missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _at(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return "at an unknown time"
    return f"at {utc(epoch)}"
