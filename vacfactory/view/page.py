"""The status page: its own thread turns the engine's facts into JSON and time-series points,
and answers the page's paths on the admin listener (the one /metrics uses).

Paths (GET or HEAD; every answer is read-only and carries a Content-Security-Policy that lets
the page load only its own files and talk only to this listener):

- ``/`` (and ``/status``): the page (static HTML, shipped in the package);
- ``/status.js``, ``/status.css``, ``/favicon.svg``: its one script, its style sheet, its icon;
- ``/status.json``: the live document (vacfactory/view/document.py; docs/status-page.md);
- ``/history.json``: the last 24 h of per-machinetype points (vacfactory/view/history.py);
- ``/machine/UUID``: what ``vacfactory machine UUID`` prints (full UUIDs only), as text.

The engine hands over :class:`~vacfactory.view.feed.EngineFacts` with :meth:`StatusPage.feed`
(a reference swap); the documents are built here and served as ready bytes, so a request
never waits for the engine and the engine never waits for a request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from importlib import resources
from typing import Callable, Dict, Optional, Tuple

from vacfactory.errors import StateError
from vacfactory.state.status import StatusFiles
from vacfactory.view import document
from vacfactory.view.evidence import collect, format_evidence
from vacfactory.view.feed import EngineFacts
from vacfactory.view.history import PAGE_HOURS, POINT_SECONDS, HistoryStore

log = logging.getLogger(__name__)

#: the page refreshes itself every 3 s, top every 2 s: more often than this the documents are
#: not rebuilt (a fill can end many rounds a second; the builds must not compete with them)
MIN_BUILD_SECONDS = 1.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
           ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer"))
_UUID_RE = re.compile(r"/machine/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\Z")
STATIC = {"/": ("status.html", "text/html; charset=utf-8"),
          "/status": ("status.html", "text/html; charset=utf-8"),
          "/status.js": ("status.js", "text/javascript; charset=utf-8"),
          "/status.css": ("status.css", "text/css; charset=utf-8"),
          "/favicon.svg": ("favicon.svg", "image/svg+xml")}
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

#: (HTTP status, body, content type, extra headers)
Answer = Tuple[int, bytes, str, Tuple[Tuple[str, str], ...]]


def static_file(name: str) -> bytes:
    """One of the page's files, from the installed package (package data)."""
    return resources.files("vacfactory.view").joinpath("static", name).read_bytes()


class StatusPage:
    """Builds and serves the page's documents; ``start()`` its thread, ``feed()`` each round."""

    def __init__(self, state_dir: str, clock: Callable[[], float] = time.time, sync: bool = True) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.min_build_seconds = MIN_BUILD_SECONDS
        self.sync = sync
        #: read at start(): the daemon holds the state directory's lock by then
        self.history: Optional[HistoryStore] = None
        self.status_bytes: Optional[bytes] = None
        self.history_bytes: bytes = self._encode_history()
        self._facts: Optional[EngineFacts] = None
        self._fed = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_minute: Optional[int] = None
        self._started: Dict[str, int] = {}
        self._outcomes: Dict[str, Dict[str, int]] = {}
        self._static = {path: static_file(name) for path, (name, _) in STATIC.items()}

    # -- the engine's side ------------------------------------------------------------

    def feed(self, facts: EngineFacts) -> None:
        """Hand over one round's facts (engine thread: a reference swap and an event)."""
        self._facts = facts
        self._fed.set()

    # -- the page's thread ------------------------------------------------------------

    def start(self) -> None:
        """Read the history (kept over restarts) and start the page's thread."""
        self.history = HistoryStore(os.path.join(self.state_dir, "history"), sync=self.sync, now=self.clock())
        self.history_bytes = self._encode_history()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="status-page", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._fed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._fed.wait(timeout=POINT_SECONDS / 4)
            self._fed.clear()
            if self._stopping.is_set():
                return
            try:
                self.build()
            except Exception:  # noqa: BLE001 - the page must outlive a bug in one build
                log.exception("status page: build failed; the last documents stay served")
            self._stopping.wait(self.min_build_seconds)

    def build(self) -> None:
        """Rebuild /status.json from the last facts; add the minute's point when it is due."""
        facts = self._facts
        if facts is None or self.history is None:
            return
        now = self.clock()
        try:
            status = StatusFiles(self.state_dir).status()
        except (OSError, ValueError, StateError) as error:
            log.warning("status page: cannot read status.json: %s", error)
            status = None
        doc = document.status_document(facts, status, now)
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
        minute = int(now) - int(now) % POINT_SECONDS
        if minute != self._last_minute:
            self._add_point(doc, now, minute)
        self.status_bytes = body  # after the point: a client that sees this round sees its point

    def _add_point(self, doc: dict, now: float, minute: int) -> None:
        samples = document.history_samples(doc, self._started, self._outcomes)
        assert self.history is not None
        try:
            self.history.add(now, samples)
        except OSError as error:
            log.error("status page: cannot write the history point: %s", error)
            return
        self._last_minute = minute
        self._started = {mt["name"]: mt["created_since_start"] for mt in doc["machinetypes"]}
        self._outcomes = {mt["name"]: dict(mt["outcomes_since_start"]) for mt in doc["machinetypes"]}
        self.history_bytes = self._encode_history()

    def _encode_history(self) -> bytes:
        now = self.clock()
        series = self.history.series(now - PAGE_HOURS * 3600) if self.history is not None else {}
        return json.dumps({"format": document.FORMAT, "time": now, "point_seconds": POINT_SECONDS,
                           "machinetypes": series},
                          separators=(",", ":"), allow_nan=False).encode("utf-8")

    # -- serving (the listener's thread) ----------------------------------------------

    def answer(self, path: str) -> Optional[Answer]:
        """The answer for ``path``; None: not one of the page's paths."""
        if path in self._static:
            return 200, self._static[path], STATIC[path][1], HEADERS
        if path == "/status.json":
            body = self.status_bytes
            if body is None:
                return 503, b'{"error":"no round has ended yet"}', JSON_TYPE, HEADERS
            return 200, body, JSON_TYPE, HEADERS
        if path == "/history.json":
            return 200, self.history_bytes, JSON_TYPE, HEADERS
        if path.startswith("/machine/"):
            return self._machine(path)
        return None

    def _machine(self, path: str) -> Answer:
        match = _UUID_RE.match(path)
        if not match:
            return 404, b"not found: /machine/ takes a VM's full UUID\n", TEXT_TYPE, HEADERS
        try:
            evidence = collect(self.state_dir, match.group(1))
        except StateError as error:
            return 404, f"{error}\n".encode("utf-8", "replace"), TEXT_TYPE, HEADERS
        return 200, ("\n".join(format_evidence(evidence)) + "\n").encode("utf-8", "replace"), TEXT_TYPE, HEADERS
