"""``vacfactory machines``: one line per slot, like Vac's ``vac machines``.

Without arguments it reads this factory's state directory (works whether or not the daemon
runs, and without the network), so it shows only this factory. Vac's ``vac machines`` asks
every factory of the space instead: that is ``vacfactory machines -a`` here (VacQuery to every
factory in ``factories``, as ``machinetypes`` and ``factories`` do), or ``vacfactory machines
FACTORY...`` for the named ones (``.`` is this factory); ``-t``/``-s`` as in ``machinetypes``.

The local form has a header and a totals line; a VM whose creation failed is ``Failed`` with
the reason (from status.json). ``--include-done`` lists every machine directory kept; its old
name ``--all`` still works, with a warning, as it was easily taken for ``-a``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

from vacfactory.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    load_config,
    print_json,
)
from vacfactory.core.outcomes import Outcome
from vacfactory.errors import StateError
from vacfactory.state.machines import Machine, MachineStore, latest_by_slot
from vacfactory.state.status import StatusFiles


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "machines", help="list this factory's VMs slot by slot from its local state; with -a, "
                         "ask every factory of the space over VacQuery (like Vac's `vac machines`), "
                         "with FACTORY names only those")
    parser.add_argument("factories", nargs="*", metavar="FACTORY",
                        help="ask these factories over the network (VacQuery) instead of reading "
                             "this factory's local state; `.` is this factory")
    parser.add_argument("-a", "--ask-space", action="store_true",
                        help="ask every factory in `factories` over the network (VacQuery), "
                             "as `machinetypes` and `factories` do")
    parser.add_argument("--include-done", action="store_true",
                        help="list every machine directory kept (ended VMs too), oldest first, "
                             "instead of one line per slot (local state only)")
    # the old name of --include-done: kept for scripts, with a warning (easily taken for -a)
    parser.add_argument("--all", action="store_true", dest="all_deprecated", help=argparse.SUPPRESS)
    parser.add_argument("-t", "--timeout", type=float, help="network query deadline in seconds")
    parser.add_argument("-s", "--space", help="space name for the network query (default vac_space)")
    parser.add_argument("-J", "--json", action="store_true",
                        help="print JSON: the rows, or with -a the raw replies (-J as in Vac)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.all_deprecated:
        print("vacfactory machines: --all is deprecated (it is easily taken for -a, which asks the space): "
              "use --include-done", file=sys.stderr)
        args.include_done = True
    network = bool(args.factories) or args.ask_space
    if not network and (args.space or args.timeout):
        print("vacfactory machines: -s/--space and -t/--timeout are for the network form: use -a "
              "or name the FACTORY(s) to ask (without them it reads this factory's local state)",
              file=sys.stderr)
        return EXIT_USAGE
    if network and args.include_done:
        print("vacfactory machines: --include-done lists this factory's machine directories (local state); "
              "the network form shows one line per slot of each factory asked", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    if network:
        from vacfactory.cli import space

        return space.network_machines(args, config)
    state_dir = config.settings.state_dir
    for directory in (state_dir, os.path.join(state_dir, "machines")):
        if os.path.exists(directory):
            os.listdir(directory)  # PermissionError: "no permission", not "no such directory"
    try:
        machines = MachineStore(state_dir, create=False).load_all()
    except StateError as error:
        print(f"vacfactory machines: {error}", file=sys.stderr)
        return EXIT_FAILURE
    failures = (StatusFiles(state_dir).status() or {}).get("creation_failures")
    rows = machine_rows(machines, config.settings.total_processors, every=args.include_done,
                        failures=failures if isinstance(failures, dict) else {})
    if args.json:
        print_json(rows)
    else:
        now = time.time()
        print(HEADER)
        for row in rows:
            print(format_row(row, now))
        print(totals_line(rows, config.settings.total_processors))
    return EXIT_OK


HEADER = f"{'NAME':<15} {'MACHINETYPE':<14} {'MODEL':<7} {'STATE':<9} {'PROCS':>5} AGE, CPU OR HOW IT ENDED"


def machine_rows(machines: Dict[str, Machine], total_processors: int, every: bool = False,
                 failures: Optional[Dict[str, dict]] = None) -> List[dict]:
    """One row per slot: its live VM, else the most recent VM that used it (Vac's view)."""
    if every:
        chosen = sorted(machines.values(), key=lambda m: (m.record.created, m.record.slot))
        return [machine_row(m, failures) for m in chosen]
    by_slot = latest_by_slot(machines.values())
    rows = []
    for slot in range(max([total_processors] + [s + 1 for s in by_slot])):
        machine = by_slot.get(slot)
        rows.append(machine_row(machine, failures) if machine
                    else {"slot": slot, "state": "Shut down", "name": None})
    return rows


def machine_row(machine: Machine, failures: Optional[Dict[str, dict]] = None) -> dict:
    record = machine.record
    state = {"created": "Starting", "running": "Running"}.get(machine.state, "Shut down")
    row = {
        "slot": record.slot,
        "name": record.name,
        "uuid": record.uuid,
        "machinetype": record.machinetype,
        "machine_model": record.machine_model,
        "state": state,
        "processors": record.processors,
        "created": record.created,
        "started": machine.started.time if machine.started else None,
        "heartbeat": machine.heartbeat.time if machine.heartbeat else None,
        "cpu_seconds": machine.heartbeat.cpu_seconds if machine.heartbeat else None,
        "shutdown_time": record.shutdown_time,
        "address": record.address,
    }
    if machine.finished is not None:
        f = machine.finished
        row.update(
            finished=f.end_time,
            cpu_seconds=f.cpu_seconds,
            outcome=f.outcome,
            reason=f.reason,
            shutdown_message=f.message or None,
            accounted=machine.accounted is not None,
        )
        if f.outcome == Outcome.FAILED.value:  # never ran: creation failed
            row["state"] = "Failed"
            failure = (failures or {}).get(record.machinetype)
            if isinstance(failure, dict) and failure.get("vm") == record.name and failure.get("reason"):
                row["failure"] = str(failure["reason"])
    return row


def format_row(row: dict, now: float) -> str:
    name = (row.get("name") or f"slot {row['slot']:02d}").split(".")[0]
    machinetype = (row.get("machinetype") or "----------")[:14]
    model = (row.get("machine_model") or "")[:7]
    line = f"{name:<15} {machinetype:<14} {model:<7} {row['state']:<9}"
    if row.get("name") is None:
        return line.rstrip()
    line += f" {row['processors']:5d}"
    if row["state"] == "Running" and row.get("started"):
        hours = max(now - row["started"], 0) / 3600
        cpu = row.get("cpu_seconds") or 0.0
        wall = max(now - row["started"], 1e-9) * row["processors"]
        line += f" {hours:5.2f} hrs {100 * cpu / wall:3.0f}%"
    elif row["state"] == "Starting":
        line += f" {max(now - row['created'], 0) / 60:4.2f} mins"
    elif row["state"] == "Failed":
        line += f" creation failed: {row.get('failure') or 'reason in `vacfactory machine ' + name + '`'}"
    else:
        message = row.get("shutdown_message") or row.get("outcome") or ""
        line += f' "{message[:19]}"'
    return line


def totals_line(rows: List[dict], total_processors: int) -> str:
    """``3 VMs on 5 of 8 processors (2 running, 1 starting); 1 failed``; with containers,
    ``2 VMs and 1 container on ...``."""
    live = [r for r in rows if r["state"] in ("Running", "Starting")]
    busy = sum(r["processors"] for r in live)
    running = sum(1 for r in live if r["state"] == "Running")
    failed = sum(1 for r in rows if r["state"] == "Failed")
    containers = sum(1 for r in live if r.get("machine_model") == "docker")
    vms = len(live) - containers
    what = f"{vms} VM{'' if vms == 1 else 's'}"
    if containers:
        what += f" and {containers} container{'' if containers == 1 else 's'}"
    text = (f"{what} on {busy} of {total_processors} processors "
            f"({running} running, {len(live) - running} starting)")
    return text + (f"; {failed} failed" if failed else "")
