"""Fetch vacuum pipes into their cache; only the daemon calls this.

``refresh_pipes(config, state_dir, now)`` looks at every ``[vacuum_pipe PREFIX]``, and for each
one whose cache is older than the document's ``cache_seconds`` downloads the document (a
conditional GET with the ETag and Last-Modified of the last download,
:mod:`vacfactory.fetch.conditional`), validates it with
:mod:`vacfactory.config.pipes`, and replaces ``<state_dir>/pipescache/<prefix>.pipe``
atomically. The configuration loader expands pipes from that cache only, and the config
watcher notices the new file, so `vacfactory config check`, the CLI and the daemon always
agree, and nothing but the daemon ever touches the network for a pipe.

Failures never make machinetypes vanish (Vac dropped them, and with them the accounting of
their running VMs): an unreachable server, an HTTP error, a document that is not JSON, too
large, or whose every entry is broken, leaves the previous cache in place and is reported.

Beside the cache, ``<prefix>.meta.json`` records the URL, when it was last fetched and last
tried, and the validators; it spaces out retries after a failure (at most every
``RETRY_SECONDS``) without any state in memory, so a restarted daemon behaves the same.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from vacfactory.atomic import atomic_write_bytes, atomic_write_json
from vacfactory.config import pipes as pipelib
from vacfactory.config.pipeload import PIPE_CACHE_SUFFIX, PIPE_META_SUFFIX, pipe_cache_path, pipe_meta_path
from vacfactory.fetch.conditional import Validators, conditional_get
from vacfactory.fetch.safefetch import FetchError
from vacfactory.fetch.urlpolicy import UrlPolicy

log = logging.getLogger(__name__)

#: after a failed fetch, wait at least this long (or cache_seconds, if shorter) before retrying
RETRY_SECONDS = 300.0
_CHUNK = 64 * 1024

__all__ = ["FetchError", "FetchSettings", "Fetched", "fetch", "refresh_pipe", "refresh_pipes", "read_meta",
           "is_due", "RETRY_SECONDS"]


@dataclass(frozen=True)
class FetchSettings:
    """How downloads are made (from [settings] pipe_ca_path, pipe_fetch_timeout_seconds and
    internal_url_hosts)."""

    ca_path: Optional[str] = None
    timeout: float = 30.0
    max_bytes: int = pipelib.MAX_DOCUMENT_BYTES
    #: redirects from the pipe's URL are checked against it (the URL itself is the admin's)
    policy: UrlPolicy = field(default_factory=UrlPolicy)

    @classmethod
    def from_config(cls, config: Any) -> "FetchSettings":
        s = config.settings
        return cls(ca_path=s.pipe_ca_path, timeout=float(s.pipe_fetch_timeout_seconds),
                   policy=UrlPolicy.from_words(s.internal_url_hosts))


@dataclass(frozen=True)
class Fetched:
    """The result of one conditional GET: ``body`` None means 304 Not Modified."""

    body: Optional[bytes]
    validators: Validators = Validators()


def fetch(url: str, settings: FetchSettings, held: Optional[Validators] = None) -> Fetched:
    """GET ``url`` within ``settings.timeout`` seconds in total (headers included) and
    ``max_bytes`` of body, in the caller's thread: :mod:`vacfactory.fetch.safefetch` bounds every
    socket call by the time left, so nothing is left running after the deadline. With
    ``held`` (the validators of the cached copy) the GET is conditional.

    ``file://`` URLs (allowed for vacuum_pipe_url) are read from the local disk. The pipe's
    URL is the admin's (its host is trusted); every redirect must pass ``settings.policy``.
    """
    if url.lower().startswith("file://"):
        return _fetch_file(url, settings.max_bytes)
    with conditional_get(url, held, settings.policy, settings.timeout, settings.ca_path, checked=False) as response:
        if response is None:
            return Fetched(None, held or Validators())
        body = bytearray()
        for chunk in response.iter_body(_CHUNK):
            body += chunk
            if len(body) > settings.max_bytes:
                raise FetchError(f"more than {settings.max_bytes} bytes")
        return Fetched(bytes(body), Validators.of(response))


def _fetch_file(url: str, max_bytes: int) -> Fetched:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as error:
        raise FetchError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise FetchError(f"more than {max_bytes} bytes")
    return Fetched(data)


# --------------------------------------------------------------------------- the cache


def read_meta(state_dir: str, prefix: str, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """The sidecar of a pipe cache ({} if missing or unreadable); ``cache_dir`` replaces
    ``<state_dir>/pipescache`` (the pipes_cache_dir option)."""
    try:
        with open(_meta_path(state_dir, prefix, cache_dir), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _number(meta: Dict[str, Any], key: str, default: float) -> float:
    value = meta.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def is_due(meta: Dict[str, Any], url: str, cache_exists: bool, now: float) -> bool:
    """Fetch now? When there is no usable cache for this URL, or it is older than its
    cache_seconds; but never sooner than RETRY_SECONDS (or cache_seconds) after a failure."""
    cache_seconds = _number(meta, "cache_seconds", pipelib.DEFAULT_CACHE_SECONDS)
    attempted = _number(meta, "attempted", 0.0)
    if meta.get("error") and now - attempted < min(RETRY_SECONDS, cache_seconds):
        return False
    if not cache_exists or meta.get("url") != url:
        return True
    return now >= _number(meta, "fetched", 0.0) + cache_seconds


def _cache_path(state_dir: str, prefix: str, cache_dir: Optional[str]) -> str:
    return os.path.join(cache_dir, prefix + PIPE_CACHE_SUFFIX) if cache_dir else pipe_cache_path(state_dir, prefix)


def _meta_path(state_dir: str, prefix: str, cache_dir: Optional[str]) -> str:
    return os.path.join(cache_dir, prefix + PIPE_META_SUFFIX) if cache_dir else pipe_meta_path(state_dir, prefix)


def refresh_pipe(state_dir: str, prefix: str, url: str, share: float, now: float, settings: FetchSettings,
                 force: bool = False, cache_dir: Optional[str] = None) -> List[str]:
    """Refresh one pipe's cache if it is due; return the problems to report (empty if none).

    The cache is ``<state_dir>/pipescache/<prefix>.pipe``, or ``<cache_dir>/<prefix>.pipe``."""
    where = pipelib.label(prefix, url)
    cache = _cache_path(state_dir, prefix, cache_dir)
    meta_path = _meta_path(state_dir, prefix, cache_dir)
    meta = read_meta(state_dir, prefix, cache_dir)
    cache_exists = os.path.isfile(cache)
    if not force and not is_due(meta, url, cache_exists, now):
        return []
    os.makedirs(os.path.dirname(cache), mode=0o755, exist_ok=True)
    same_url = cache_exists and meta.get("url") == url
    try:
        fetched = fetch(url, settings, Validators(meta.get("etag"), meta.get("last_modified")) if same_url else None)
    except FetchError as error:
        return [_failed(meta_path, meta, now, where, f"cannot fetch: {error}", cache_exists)]
    if fetched.body is None:
        meta.update(url=url, fetched=now, attempted=now, error=None)
        atomic_write_json(meta_path, meta)
        log.debug("%s: not modified", where)
        return []
    try:
        document = pipelib.parse_document(fetched.body)
    except pipelib.PipeError as error:
        return [_failed(meta_path, meta, now, where, f"bad document: {error}", cache_exists)]
    expansion = pipelib.expand(prefix, url, share, document)
    if not pipelib.usable(expansion, document):
        problems = list(expansion.problems)
        problems.append(_failed(meta_path, meta, now, where,
                                "bad document: none of its machinetypes is valid", cache_exists))
        return problems
    if not same_url or _read(cache) != fetched.body:
        atomic_write_bytes(cache, fetched.body)
        log.info("%s: cached %d machinetypes (%s)", where, expansion.entry_count,
                 ", ".join(m.name for m in expansion.machinetypes) or "none")
    meta = {"url": url, "fetched": now, "attempted": now, "error": None, "cache_seconds": document.cache_seconds,
            "etag": fetched.validators.etag, "last_modified": fetched.validators.last_modified}
    atomic_write_json(meta_path, meta)
    return list(expansion.problems)


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read(pipelib.MAX_DOCUMENT_BYTES + 1)
    except OSError:
        return None


def _failed(meta_path: str, meta: Dict[str, Any], now: float, where: str, why: str,
            cache_exists: bool) -> str:
    """Record a failed attempt (for the retry spacing) and say what stays in use."""
    meta = dict(meta, attempted=now, error=why)
    try:
        atomic_write_json(meta_path, meta)
    except OSError as error:
        log.error("%s: cannot record the failed fetch: %s", where, error)
    if cache_exists:
        fetched = meta.get("fetched")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(fetched)) if isinstance(fetched, (int, float)) \
            else "an earlier download"
        return f"{where}: {why}; keeping the cached copy from {since}"
    return f"{where}: {why}; no cached copy: its machinetypes are not defined yet"


def refresh_pipes(config: Any, state_dir: Optional[str] = None, now: Optional[float] = None,
                  force: bool = False) -> List[str]:
    """Refresh every due vacuum pipe of ``config``; return every problem, one line each.

    The daemon calls this periodically (it blocks for up to pipe_fetch_timeout_seconds per
    pipe that is due, so run it off the engine's thread) and logs the problems as warnings.
    """
    # an explicit state_dir (tests, tools) means its pipescache/; else the configured directory
    cache_dir = None if state_dir else config.settings.pipes_cache_dir
    state_dir = state_dir or config.settings.state_dir
    now = time.time() if now is None else now
    settings = FetchSettings.from_config(config)
    problems: List[str] = []
    for prefix, pipe in config.vacuum_pipes.items():
        try:
            problems.extend(refresh_pipe(state_dir, prefix, pipe.vacuum_pipe_url, float(pipe.target_share), now,
                                         settings, force, cache_dir))
        except OSError as error:  # the cache directory itself is unwritable: report, go on
            problems.append(f"{pipelib.label(prefix, pipe.vacuum_pipe_url)}: cannot write the cache: {error}")
    return problems
