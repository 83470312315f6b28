"""Fetch vacuum pipes into their cache; only the daemon calls this.

``refresh_pipes(config, state_dir, now)`` looks at every ``[vacuum_pipe PREFIX]``, and for each
one whose cache is older than the document's ``cache_seconds`` downloads the document (a
conditional GET with the ETag and Last-Modified of the last download), validates it with
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
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Union

import requests
import urllib3

from vacfactory import __version__
from vacfactory.atomic import atomic_write_bytes, atomic_write_json
from vacfactory.config import pipes as pipelib
from vacfactory.config.loader import PIPE_CACHE_DIR, pipe_cache_path, pipe_meta_path
from vacfactory.errors import shorten

log = logging.getLogger(__name__)

#: the grid's CA directory, used when pipe_ca_path is unset and it exists (as Vac did)
GRID_CA_PATH = "/etc/grid-security/certificates"
USER_AGENT = f"vacfactory/{__version__}"
#: after a failed fetch, wait at least this long (or cache_seconds, if shorter) before retrying
RETRY_SECONDS = 300.0
_CHUNK = 64 * 1024
#: how long past the timeout ``fetch`` waits for the request's own deadline checks to answer
_DEADLINE_GRACE = 0.5


class FetchError(Exception):
    """One download failed (network, HTTP status, size, deadline); the message says why."""


def iter_body(response: requests.Response, chunk_size: int) -> Iterator[bytes]:
    """The body in pieces as they arrive (``read1``): a server that trickles bytes cannot hold
    a caller past its deadline the way a full-size ``read`` would. Decoded if the server
    compressed it; urllib3 errors come out as requests' ConnectionError."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.1: whole chunks only
        yield from response.iter_content(chunk_size)
        return
    while True:
        try:
            data = read1(chunk_size, decode_content=True)
        except urllib3.exceptions.HTTPError as error:
            raise requests.exceptions.ConnectionError(f"{type(error).__name__}: {error}") from None
        if not data:
            return
        yield data


def verify_setting(ca_path: Optional[str]) -> Union[str, bool]:
    """What ``requests`` should verify TLS with: the configured CA path, else the grid CA
    directory if present, else the system CAs (True). Verification is never switched off."""
    if ca_path:
        return ca_path
    if os.path.isdir(GRID_CA_PATH):
        return GRID_CA_PATH
    return True


@dataclass(frozen=True)
class FetchSettings:
    """How downloads are made (from [settings] pipe_ca_path and pipe_fetch_timeout_seconds)."""

    ca_path: Optional[str] = None
    timeout: float = 30.0
    max_bytes: int = pipelib.MAX_DOCUMENT_BYTES

    @classmethod
    def from_config(cls, config: Any) -> "FetchSettings":
        s = config.settings
        return cls(ca_path=s.pipe_ca_path, timeout=float(s.pipe_fetch_timeout_seconds))


@dataclass(frozen=True)
class Fetched:
    """The result of one conditional GET: ``body`` None means 304 Not Modified."""

    body: Optional[bytes]
    etag: Optional[str] = None
    last_modified: Optional[str] = None


def fetch(url: str, settings: FetchSettings, etag: Optional[str] = None, last_modified: Optional[str] = None,
          session: Optional[requests.Session] = None) -> Fetched:
    """GET ``url`` within ``settings.timeout`` seconds in total and ``max_bytes`` of body.

    ``file://`` URLs (allowed for vacuum_pipe_url) are read from the local disk. The request
    runs in a helper thread that is abandoned at the deadline: requests' timeout bounds each
    socket read, not the whole, so a server trickling its headers a byte at a time (or a
    stalled name lookup or TLS handshake) would otherwise hold the caller for as long as it
    likes. An abandoned helper ends when the server gives up; its result is dropped.
    """
    if url.lower().startswith("file://"):
        return _fetch_file(url, settings.max_bytes)
    outcome: List[Union[Fetched, Exception]] = []

    def work() -> None:
        try:
            outcome.append(_get(url, settings, etag, last_modified, session))
        except Exception as error:  # noqa: BLE001 - handed to the caller's thread as it is
            outcome.append(error)

    helper = threading.Thread(target=work, name="pipe fetch", daemon=True)
    helper.start()
    helper.join(settings.timeout + _DEADLINE_GRACE)
    if not outcome:
        raise FetchError(f"took more than {settings.timeout:g} s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _get(url: str, settings: FetchSettings, etag: Optional[str], last_modified: Optional[str],
         session: Optional[requests.Session]) -> Fetched:
    """The HTTP(S) GET itself (in ``fetch``'s helper thread)."""
    headers = {"User-Agent": USER_AGENT}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    deadline = time.monotonic() + settings.timeout
    http = session or requests
    try:
        with http.get(url, headers=headers, timeout=settings.timeout, stream=True,
                      verify=verify_setting(settings.ca_path)) as response:
            if response.status_code == 304:
                return Fetched(None, etag, last_modified)
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code} {response.reason or ''}".strip())
            body = bytearray()
            for chunk in iter_body(response, _CHUNK):
                body += chunk
                if len(body) > settings.max_bytes:
                    raise FetchError(f"more than {settings.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"took more than {settings.timeout:g} s")
            return Fetched(bytes(body), response.headers.get("ETag"), response.headers.get("Last-Modified"))
    except requests.RequestException as error:
        raise FetchError(_describe(error)) from None


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


def _describe(error: requests.RequestException) -> str:
    """One short line for a requests exception (their str() can be a page of nested reprs)."""
    kinds = ((requests.exceptions.SSLError, "TLS verification failed"),
             (requests.exceptions.ConnectTimeout, "connection timed out"),
             (requests.exceptions.ReadTimeout, "no data before the timeout"),
             (requests.exceptions.ConnectionError, "cannot connect"),
             (requests.exceptions.TooManyRedirects, "too many redirects"))
    for kind, text in kinds:
        if isinstance(error, kind):
            detail = str(error.args[0]) if error.args else str(error)
            return f"{text} ({shorten(detail, 160)})"
    return f"{type(error).__name__}: {shorten(str(error), 160)}"


# --------------------------------------------------------------------------- the cache


def read_meta(state_dir: str, prefix: str) -> Dict[str, Any]:
    """The sidecar of a pipe cache ({} if missing or unreadable)."""
    try:
        with open(pipe_meta_path(state_dir, prefix), encoding="utf-8") as f:
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


def refresh_pipe(state_dir: str, prefix: str, url: str, share: float, now: float, settings: FetchSettings,
                 session: Optional[requests.Session] = None, force: bool = False) -> List[str]:
    """Refresh one pipe's cache if it is due; return the problems to report (empty if none)."""
    where = pipelib.label(prefix, url)
    cache = pipe_cache_path(state_dir, prefix)
    meta = read_meta(state_dir, prefix)
    cache_exists = os.path.isfile(cache)
    if not force and not is_due(meta, url, cache_exists, now):
        return []
    os.makedirs(os.path.join(state_dir, PIPE_CACHE_DIR), mode=0o755, exist_ok=True)
    same_url = cache_exists and meta.get("url") == url
    try:
        fetched = fetch(url, settings, meta.get("etag") if same_url else None,
                        meta.get("last_modified") if same_url else None, session)
    except FetchError as error:
        return [_failed(state_dir, prefix, meta, now, where, f"cannot fetch: {error}", cache_exists)]
    if fetched.body is None:
        meta.update(url=url, fetched=now, attempted=now, error=None)
        atomic_write_json(pipe_meta_path(state_dir, prefix), meta)
        log.debug("%s: not modified", where)
        return []
    try:
        document = pipelib.parse_document(fetched.body)
    except pipelib.PipeError as error:
        return [_failed(state_dir, prefix, meta, now, where, f"bad document: {error}", cache_exists)]
    expansion = pipelib.expand(prefix, url, share, document)
    if not pipelib.usable(expansion, document):
        problems = list(expansion.problems)
        problems.append(_failed(state_dir, prefix, meta, now, where,
                                "bad document: none of its machinetypes is valid", cache_exists))
        return problems
    if not same_url or _read(cache) != fetched.body:
        atomic_write_bytes(cache, fetched.body)
        log.info("%s: cached %d machinetypes (%s)", where, expansion.entry_count,
                 ", ".join(m.name for m in expansion.machinetypes) or "none")
    meta = {"url": url, "fetched": now, "attempted": now, "error": None, "cache_seconds": document.cache_seconds,
            "etag": fetched.etag, "last_modified": fetched.last_modified}
    atomic_write_json(pipe_meta_path(state_dir, prefix), meta)
    return list(expansion.problems)


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read(pipelib.MAX_DOCUMENT_BYTES + 1)
    except OSError:
        return None


def _failed(state_dir: str, prefix: str, meta: Dict[str, Any], now: float, where: str, why: str,
            cache_exists: bool) -> str:
    """Record a failed attempt (for the retry spacing) and say what stays in use."""
    meta = dict(meta, attempted=now, error=why)
    try:
        atomic_write_json(pipe_meta_path(state_dir, prefix), meta)
    except OSError as error:
        log.error("%s: cannot record the failed fetch: %s", where, error)
    if cache_exists:
        fetched = meta.get("fetched")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(fetched)) if isinstance(fetched, (int, float)) \
            else "an earlier download"
        return f"{where}: {why}; keeping the cached copy from {since}"
    return f"{where}: {why}; no cached copy: its machinetypes are not defined yet"


def refresh_pipes(config: Any, state_dir: Optional[str] = None, now: Optional[float] = None,
                  session: Optional[requests.Session] = None, force: bool = False) -> List[str]:
    """Refresh every due vacuum pipe of ``config``; return every problem, one line each.

    The daemon calls this periodically (it blocks for up to pipe_fetch_timeout_seconds per
    pipe that is due, so run it off the engine's thread) and logs the problems as warnings.
    """
    state_dir = state_dir or config.settings.state_dir
    now = time.time() if now is None else now
    settings = FetchSettings.from_config(config)
    problems: List[str] = []
    for prefix, pipe in config.vacuum_pipes.items():
        try:
            problems.extend(refresh_pipe(state_dir, prefix, pipe.vacuum_pipe_url, float(pipe.target_share), now,
                                         settings, session, force))
        except OSError as error:  # the cache directory itself is unwritable: report, go on
            problems.append(f"{pipelib.label(prefix, pipe.vacuum_pipe_url)}: cannot write the cache: {error}")
    return problems
