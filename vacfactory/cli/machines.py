"""``vacfactory machines``: one line per slot, like Vac's ``vac machines``.

Without arguments it reads this factory's state directory (works whether or not the daemon
runs, and without the network), so it shows only this factory. Vac's ``vac machines`` asks
every factory of the space instead: that is ``vacfactory machines -a`` here (VacQuery to every
factory in ``factories``, as ``machinetypes`` and ``factories`` do), or ``vacfactory machines
FACTORY...`` for the named ones (``.`` is this factory); ``-t``/``-s`` as in ``machinetypes``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

from vacfactory.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    load_config,
    print_json,
)
from vacfactory.errors import StateError
from vacfactory.state.machines import Machine, MachineStore, latest_by_slot


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
    parser.add_argument("--all", action="store_true", help="list every machine directory kept, not one per slot")
    parser.add_argument("-t", "--timeout", type=float, help="network query deadline in seconds")
    parser.add_argument("-s", "--space", help="space name for the network query (default vac_space)")
    parser.add_argument("-J", "--json", action="store_true",
                        help="print JSON: the rows, or with -a the raw replies (-J as in Vac)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    network = bool(args.factories) or args.ask_space
    if not network and (args.space or args.timeout):
        print("vacfactory machines: -s/--space and -t/--timeout are for the network form: use -a "
              "or name the FACTORY(s) to ask (without them it reads this factory's local state)",
              file=sys.stderr)
        return EXIT_USAGE
    if network and args.all:
        print("vacfactory machines: --all lists this factory's machine directories (local state); "
              "the network form shows one line per slot of each factory asked", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    if network:
        from vacfactory.cli import space

        return space.network_machines(args, config)
    try:
        machines = MachineStore(config.settings.state_dir, create=False).load_all()
    except StateError as error:
        print(f"vacfactory machines: {error}", file=sys.stderr)
        return EXIT_FAILURE
    rows = machine_rows(machines, config.settings.total_processors, every=args.all)
    if args.json:
        print_json(rows)
    else:
        now = time.time()
        for row in rows:
            print(format_row(row, now))
    return EXIT_OK


def machine_rows(machines: Dict[str, Machine], total_processors: int, every: bool = False) -> List[dict]:
    """One row per slot: its live VM, else the most recent VM that used it (Vac's view)."""
    if every:
        chosen = sorted(machines.values(), key=lambda m: (m.record.created, m.record.slot))
        return [machine_row(m) for m in chosen]
    by_slot = latest_by_slot(machines.values())
    rows = []
    for slot in range(max([total_processors] + [s + 1 for s in by_slot])):
        machine = by_slot.get(slot)
        rows.append(machine_row(machine) if machine else {"slot": slot, "state": "Shut down", "name": None})
    return rows


def machine_row(machine: Machine) -> dict:
    record = machine.record
    state = {"created": "Starting", "running": "Running"}.get(machine.state, "Shut down")
    row = {
        "slot": record.slot,
        "name": record.name,
        "uuid": record.uuid,
        "machinetype": record.machinetype,
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
    return row


def format_row(row: dict, now: float) -> str:
    name = (row.get("name") or f"slot {row['slot']:02d}").split(".")[0]
    machinetype = (row.get("machinetype") or "----------")[:14]
    line = f"{name:<15} {machinetype:<14} {row['state']:<9}"
    if row.get("name") is None:
        return line.rstrip()
    line += f" {row['processors']:2d} VM"
    if row["state"] == "Running" and row.get("started"):
        hours = max(now - row["started"], 0) / 3600
        cpu = row.get("cpu_seconds") or 0.0
        wall = max(now - row["started"], 1e-9) * row["processors"]
        line += f" {hours:5.2f} hrs {100 * cpu / wall:3.0f}%"
    elif row["state"] == "Starting":
        line += f" {max(now - row['created'], 0) / 60:4.2f} mins"
    else:
        message = row.get("shutdown_message") or row.get("outcome") or ""
        line += f' "{message[:19]}"'
    return line
