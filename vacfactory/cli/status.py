"""``vacfactory status``: the factory on one screen (``--json`` for scripts).

Read only, from the state directory (works whether or not the daemon runs): the daemon
(``daemon.lock``; pid, start and the configuration it accepted from ``status.json``), the
last round's processors and decision, this factory's VMs by machinetype and state (machine
directories), creation failures with their reason, backoffs, the drain in force (the
configuration with its runtime override), the APEL queues, and which factories of the space
answered the daemon's last query round.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any, Dict, List, Optional

from vacfactory.config.model import Config
from vacfactory.cli.common import EXIT_OK, CommandError, EXIT_NOINPUT, add_json_argument, load_config, print_json

#: status.json older than this (seconds) is reported as stale: the daemon stopped or hangs
STALE_SECONDS = 600.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="the factory on one screen: daemon, configuration, processors, VMs, failures, "
                       "backoffs, drain, accounting queue, space")
    add_json_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    now = time.time()
    overview = gather(config, now)
    if args.json:
        print_json(overview)
    else:
        for line in format_overview(overview, now):
            print(line)
    return EXIT_OK


def gather(config: Config, now: float) -> Dict[str, Any]:
    """Everything ``status`` shows, as plain values (also the --json output)."""
    from vacfactory.accounting.outgoing import backlog_of
    from vacfactory.view.monitoring import APEL_QUEUES
    from vacfactory.state.lock import StateLock
    from vacfactory.state.machines import MachineStore
    from vacfactory.state.status import StatusFiles

    s = config.settings
    state_dir = s.state_dir
    try:
        os.listdir(state_dir)  # PermissionError: "no permission", not "no such directory"
    except FileNotFoundError:
        raise CommandError(f"state_dir {state_dir} does not exist (wrong --config? has the daemon ever run "
                           "here?)", EXIT_NOINPUT) from None
    except NotADirectoryError:
        raise CommandError(f"state_dir {state_dir} is not a directory", EXIT_NOINPUT) from None
    files = StatusFiles(state_dir)
    holder = StateLock(state_dir).holder()
    status = files.status() or {}
    daemon_info = status.get("daemon") if isinstance(status.get("daemon"), dict) else {}
    same_daemon = holder is not None and daemon_info.get("pid") == holder
    beat = files.last_beat()

    machines = MachineStore(state_dir, create=False).load_all()
    by_type: Dict[str, Dict[str, int]] = {}
    busy = 0
    for machine in machines.values():
        if not machine.live:
            continue
        entry = by_type.setdefault(machine.record.machinetype, {"running": 0, "starting": 0, "processors": 0})
        entry["running" if machine.state == "running" else "starting"] += 1
        entry["processors"] += machine.record.processors
        busy += machine.record.processors

    queues = {}
    for name, kind in APEL_QUEUES:
        backlog = backlog_of(os.path.join(state_dir, name))
        queues[kind] = {"queued": backlog.count, "oldest": backlog.oldest}

    config_info = status.get("config") if isinstance(status.get("config"), dict) else {}
    return {
        "state_dir": state_dir,
        "daemon": {
            "running": holder is not None,
            "pid": holder if holder and holder > 0 else None,
            "started": daemon_info.get("started") if same_daemon else None,
            "last_round": beat,
            "stale": beat is not None and now - beat > STALE_SECONDS,
        },
        "config": {
            "files": config_info.get("files"),
            "accepted": config_info.get("accepted") if same_daemon else None,
            "rejected": config_info.get("rejected") if same_daemon else None,
        },
        "processors": {"total": s.total_processors, "busy": busy, "free": max(s.total_processors - busy, 0)},
        "machinetypes": {name: by_type.get(name, {"running": 0, "starting": 0, "processors": 0})
                         for name in sorted(set(config.machinetypes) | set(by_type))},
        "decision": status.get("decision"),
        "blind": bool(status.get("blind")),
        "creation_paused": status.get("creation_paused"),
        "creation_failures": status.get("creation_failures") or {},
        "factory_error": files.error(),
        "backoffs": status.get("backoffs") or {},
        "drain": {"draining": bool(s.draining), "shutdown_time": s.shutdown_time,
                  "from": config.origins.get("settings", {}).get(
                      "shutdown_time" if s.shutdown_time is not None else "draining")
                  if s.draining or s.shutdown_time is not None else None},
        "accounting": queues,
        "space": status.get("space"),
    }


def _when(epoch: Optional[float]) -> str:
    if epoch is None:
        return "?"
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_overview(o: Dict[str, Any], now: float) -> List[str]:
    """The one screen, one topic per line (continuations indented)."""
    lines: List[str] = []

    def add(label: str, text: str) -> None:
        lines.append(f"{label + ':':<13}{text}")

    d = o["daemon"]
    if d["running"]:
        text = f"running, pid {d['pid'] or '?'}"
        if d["started"]:
            text += f", up {_ago(now - d['started'])} (since {_when(d['started'])})"
    else:
        text = "NOT running"
    if d["last_round"] is not None:
        text += f"; last round {_ago(now - d['last_round'])} ago" + (" (STALE)" if d["stale"] else "")
    add("daemon", text)
    c = o["config"]
    files = ", ".join(c["files"]) if c["files"] else "?"
    add("config", files + (f", accepted {_when(c['accepted'])}" if c["accepted"] else ""))
    for line in c["rejected"] or []:
        add("", f"REJECTED (the last good one stays in force): {line}")
    p = o["processors"]
    add("processors", f"{p['busy']} busy, {p['free']} free of {p['total']}"
        + ("; libvirt UNREACHABLE (blind)" if o["blind"] else ""))
    parts = [f"{name} {v['running']} running, {v['starting']} starting ({v['processors']} processors)"
             for name, v in o["machinetypes"].items()]
    add("VMs", "; ".join(parts) if parts else "no machinetypes")
    if o["decision"]:
        add("last round", str(o["decision"]))
    if o["creation_paused"]:
        add("creation", f"PAUSED: {o['creation_paused']}")
    failures = o["creation_failures"]
    if failures:
        for name, f in sorted(failures.items()):
            if isinstance(f, dict):
                add("failures" if name == min(failures) else "",
                    f"{name}: {f.get('count', 1)} creation failures, the last {_ago(now - float(f.get('time') or now))}"
                    f" ago: {f.get('reason')}")
    elif o["factory_error"]:
        add("failures", o["factory_error"].splitlines()[0])
    else:
        add("failures", "none")
    backoffs = o["backoffs"]
    add("backoffs", "; ".join(f"{name} until {_when(b.get('until'))}" for name, b in sorted(backoffs.items())
                              if isinstance(b, dict)) or "none")
    dr = o["drain"]
    if dr["shutdown_time"] is not None:
        past = dr["shutdown_time"] <= now
        add("drain", f"shutdown_time {_when(dr['shutdown_time'])}{' (PAST: no VMs start)' if past else ''}"
            f" from {dr['from']}")
    elif dr["draining"]:
        add("drain", f"draining: no new VMs (from {dr['from']})")
    else:
        add("drain", "no")
    acc = o["accounting"]
    add("accounting", "; ".join(
        f"{kind} {q['queued']} queued" + (f", the oldest {_ago(now - q['oldest'])} old" if q["oldest"] else "")
        for kind, q in acc.items()))
    space = o["space"]
    if isinstance(space, dict) and not space.get("asked"):
        add("space", "this factory alone (factories names no other)")
    elif isinstance(space, dict):
        answered = space.get("answered") or []
        text = f"{len(answered)} of {len(space['asked'])} factories answered" + (f" ({', '.join(answered)})" if answered else "")
        if space.get("held"):
            text += f"; {len(space['held'])} held from an earlier answer"
        if space.get("unknown"):
            text += f"; no answer from {', '.join(space['unknown'])}"
        add("space", text)
    else:
        add("space", "no query round yet")
    return lines
