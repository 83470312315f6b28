"""``vacfactory top``: the status page's facts live in a terminal (curses), for an admin on the
host over ssh. ``q`` quits; an 80x24 terminal shows the summary, the engine's decision and
reasons, every machinetype, the space's factories and as many slots as fit.

It reads the daemon's ``/status.json`` on the admin listener (``metrics_address``:
``metrics_port``), the same document the page draws. Without a terminal on stdout (a pipe,
a script) it prints one frame and exits. Everything from the factory is shown with control
characters replaced: machinetype names and shutdown messages come from VMs and peers, and
must not move the cursor or retitle the terminal.
"""

from __future__ import annotations

import argparse
import curses
import json
import re
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional

from vacfactory.cli.common import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, load_config

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "top", help="this factory live in the terminal: slots, machinetypes, the space, the engine's "
                    "reasons (from the daemon's status page; q quits)")
    parser.add_argument("-n", "--interval", type=float, default=2.0, metavar="SECONDS",
                        help="seconds between refreshes (default 2)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame and exit (the default when stdout is not a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    s = config.settings
    if not s.metrics_port:
        print("vacfactory top: metrics_port is 0, so the daemon serves no status page to read; "
              "set metrics_port in [settings]", file=sys.stderr)
        return EXIT_CONFIG
    url = f"http://{s.metrics_address}:{s.metrics_port}/status.json"
    if args.once or not sys.stdout.isatty():
        try:
            doc = fetch(url)
        except OSError as error:
            print(f"vacfactory top: cannot read {url}: {why(error)} (is the daemon running?)", file=sys.stderr)
            return EXIT_UNAVAILABLE
        for line in frame(doc, 80, 24, time.time()):
            print(line)
        return EXIT_OK
    curses.wrapper(lambda screen: loop(screen, url, max(0.2, args.interval)))
    return EXIT_OK


def why(error: OSError) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    reason = getattr(error, "reason", None)
    return str(reason if reason is not None else error)


def fetch(url: str, timeout: float = 3.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own listener
        value = json.loads(response.read())
    if not isinstance(value, dict):
        raise OSError("not a status document")
    return value


def clean(value: object) -> str:
    return _CONTROL.sub("?", "" if value is None else str(value))


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def dur(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def reasons(engine: dict) -> List[str]:
    out = []
    if engine.get("blind"):
        out.append("BLIND: libvirt cannot be reached")
    if engine.get("creation_paused"):
        out.append(f"PAUSED: {clean(engine['creation_paused'])}")
    if engine.get("draining"):
        out.append("DRAINING")
    for name in sorted(engine.get("backoffs") or {}):
        out.append(f"backoff {clean(name)}")
    for name in sorted(engine.get("creation_failures") or {}):
        out.append(f"creation failed: {clean(name)}")
    return out


def frame(doc: dict, width: int, height: int, now: float) -> List[str]:
    """The screen as lines (at most ``height``, each at most ``width`` characters)."""
    p = doc.get("processors", {})
    lines = [f"vacfactory top - {clean(doc.get('factory'))} - {time.strftime('%H:%M:%S', time.localtime(now))}"
             f" - {p.get('busy', 0)}/{p.get('total', 0)} processors busy, {p.get('free', 0)} free  (q quits)"]
    engine = doc.get("engine") or {}
    lines.append(f"decision: {clean(engine.get('decision') or 'none yet')}")
    lines.append("reasons: " + ("; ".join(reasons(engine)) or "none"))
    lines.append(f"{'MACHINETYPE':<16}{'TARGET':>7}{'HERE':>6}{'SPACE':>6}{'VMS':>5}{'PROCS':>6}"
                 f"{'BACKOFF':>8}{'EFF':>5}{'START':>6} ENDED")
    for mt in doc.get("machinetypes", []):
        ended = ",".join(f"{clean(k)}:{v}" for k, v in sorted((mt.get("outcomes_since_start") or {}).items()))
        backoff = mt.get("backoff_remaining_seconds") or 0
        lines.append(f"{clean(mt['name'])[:15]:<16}{pct(mt.get('target_share')):>7}{pct(mt.get('share')):>6}"
                     f"{pct(mt.get('space_share')):>6}{mt.get('running_vms', 0):>5}{mt.get('running_processors', 0):>6}"
                     f"{dur(backoff) if backoff > 0 else '-':>8}{pct(mt.get('cpu_efficiency')):>5}"
                     f"{mt.get('created_since_start', 0):>6} {ended}")
    space = doc.get("space") or []
    if space:
        lines.append("SPACE: " + "  ".join(
            f"{clean(f['name'])} {'' if f['state'] == 'answered' else '[' + f['state'].upper() + '] '}"
            + ",".join(f"{clean(k)}:{v}" for k, v in sorted((f.get("processors") or {}).items()))
            for f in space))
    lines.append(f"{'SLOT':<5}{'NAME':<16}{'MACHINETYPE':<15}{'STATE':<10}{'AGE':>6}{'CPU':>5}{'HB':>6} ENDED")
    slots = doc.get("slots", [])
    room = height - len(lines)
    shown = slots if len(slots) <= room else slots[:max(0, room - 1)]
    for slot in shown:
        if not slot.get("name"):
            lines.append(f"{slot['slot']:<5}{'-':<16}{'-':<15}free")
            continue
        live = slot["state"] in ("Running", "Starting")
        end = "" if live else clean(slot.get("shutdown_message") or slot.get("failure") or slot.get("outcome"))
        lines.append(f"{slot['slot']:<5}{clean(slot['name']).split('.')[0][:15]:<16}"
                     f"{clean(slot.get('machinetype'))[:14]:<15}{clean(slot['state'])[:9]:<10}"
                     f"{dur(slot.get('age')):>6}{pct(slot.get('cpu_efficiency')):>5}"
                     f"{dur(slot.get('heartbeat_age')) if live else '':>6} {end}")
    if len(shown) < len(slots):
        lines.append(f"... {len(slots) - len(shown)} more slots (a taller terminal shows them)")
    return [line[:width] for line in lines[:height]]


def loop(screen, url: str, interval: float) -> None:
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))
    doc: Optional[dict] = None
    problem = ""
    while True:
        try:
            doc, problem = fetch(url), ""
        except (OSError, ValueError) as error:
            problem = f"cannot read {url}: {why(error) if isinstance(error, OSError) else error}"
        height, width = screen.getmaxyx()
        screen.erase()
        lines = frame(doc, width - 1, height - (1 if problem else 0), time.time()) if doc else []
        if problem:
            lines.append(problem[:width - 1])
        for row, line in enumerate(lines[:height]):
            try:
                screen.addstr(row, 0, line)
            except curses.error:  # the last cell of the screen; a terminal resized under us
                pass
        screen.refresh()
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
