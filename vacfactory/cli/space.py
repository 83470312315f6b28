"""``vacfactory machinetypes|machinetype NAME|factories [FACTORY...]`` over VacQuery, and
``vacfactory simulate``.

Like Vac's ``vac`` command: ask all factories of the space (or the ones named) and print one
line per reply, or with ``-J``/``--json`` the raw reply objects as a JSON array. ``vacfactory
machinetype NAME`` is Vac's ``vac machinetype NAME``: one line per factory for that
machinetype. ``vacfactory machines -a`` and ``vacfactory machines FACTORY...`` (in
``cli/machines.py``) call :func:`network_machines`.

On a terminal, what is being asked (and for how long at most) is said on stderr first; when a
factory does not answer, stderr names it with the likely causes (daemon not running, UDP port
blocked, this host not in its ``factories`` list, another space or space key); a name that does
not resolve is reported as such.

Exit codes (also in ``vacfactory(1)``): 0 every factory asked answered completely (and, for
``machinetype``, at least one has NAME); 1 some did not answer or answered in part (they are
named on stderr: unknown, not empty), or no factory has machinetype NAME; 68 no factory name
resolves; 69 none answered; 78 a bad configuration.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from vacfactory.config.model import Config
from vacfactory.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_NOINPUT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandError,
    add_json_argument,
    load_config,
    print_json,
)

#: sysexits' EX_NOHOST: none of the factory names resolves
EXIT_NOHOST = 68

NETWORK_EXIT_CODES = (
    "On a terminal, the question, the factories asked and the deadline are shown on stderr "
    "first. Exit status: 0 every factory asked answered completely; 1 some did not answer or "
    "answered in part (named on stderr with the likely causes: daemon not running, UDP port "
    "blocked, this host not in its factories list, another space or space key), or no factory "
    "has machinetype NAME; 68 no factory name resolves; 69 no factory answered; 78 the "
    "configuration is invalid.")
from vacfactory.config.options import VM_MODELS
from vacfactory.errors import ConfigError
from vacfactory.space.auth import load_space_key
from vacfactory.space.client import SpaceReplies, query_space
from vacfactory.space.protocol import DEFAULT_PORT, QueryType, Reply
from vacfactory.space.snapshot import (
    STATE_RUNNING,
    STATE_SHUTDOWN,
    STATE_STARTING,
    FactoryStatus,
    MachineStatus,
    MachinetypeStatus,
)

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def register(subparsers: argparse._SubParsersAction) -> None:
    for verb, help_text, handler in (
        ("machinetypes", "ask factories what each machinetype runs (VacQuery)", run_machinetypes),
        ("machinetype", "ask factories about one machinetype, one line per factory (VacQuery, "
                        "like Vac's `vac machinetype NAME`)", run_machinetype),
        ("factories", "ask factories how busy they are (VacQuery)", run_factories),
    ):
        parser = subparsers.add_parser(verb, help=help_text, description=NETWORK_EXIT_CODES)
        if verb == "machinetype":
            parser.add_argument("machinetype", metavar="NAME", help="the machinetype to show")
        parser.add_argument("factories", nargs="*", metavar="FACTORY",
                            help="factories to ask (default: all in the configuration)")
        add_network_arguments(parser)
        parser.set_defaults(handler=handler)
    simulate = subparsers.add_parser(
        "simulate", help="simulate a space of factories to measure share accuracy, or (with "
                         "--workload) this configuration against a workload, beside Vac's policy")
    simulate.add_argument("--workload", metavar="FILE",
                          help="JSON workload file: run the configuration's machinetypes with "
                               "Vac's policy, as configured, and with adaptive_backoff and "
                               "rebalance on, and print the figures side by side")
    simulate.add_argument("--factories", type=int, default=None,
                          help="number of factories (default 100; with --workload the "
                               "configuration's factories list, at least 1)")
    simulate.add_argument("--processors", type=int, default=None,
                          help="processors per factory (default 32; with --workload "
                               "total_processors)")
    simulate.add_argument("--shares", default="5:3:2", help="target shares, e.g. 5:3:2")
    simulate.add_argument("--hours", type=float, default=4.0, help="simulated hours")
    simulate.add_argument("--warmup-hours", type=float, default=1.0,
                          help="hours before shares are measured")
    simulate.add_argument("--loss", type=float, default=0.0,
                          help="probability that a datagram is lost (0-1)")
    simulate.add_argument("--unreachable", type=float, default=0.0,
                          help="fraction of factories nobody can reach (0-1)")
    simulate.add_argument("--seed", type=int, default=1)
    add_json_argument(simulate)
    simulate.set_defaults(handler=run_simulate)


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every network verb shares (Vac's ``-t``, ``-s`` and ``-J``)."""
    parser.add_argument("-t", "--timeout", type=float,
                        help="overall deadline in seconds (default udp_timeout_seconds)")
    parser.add_argument("-s", "--space", help="space name (default vac_space)")
    add_json_flags(parser)


def add_json_flags(parser: argparse.ArgumentParser) -> None:
    """``-J`` (Vac's flag) and ``--json``: the replies as a JSON array of their raw objects."""
    parser.add_argument("-J", "--json", action="store_true",
                        help="print the replies as a JSON array of the raw reply objects "
                             "(-J as in Vac's vac command)")


# --------------------------------------------------------------------------------------------
# Settings and the query


@dataclass(frozen=True)
class SpaceSettings:
    """What a network verb needs from the configuration (and the command line)."""

    space: str
    factories: Sequence[str]
    timeout: float
    port: int
    space_key: Optional[bytes]
    local_name: str


def space_settings(args: argparse.Namespace, config: Config) -> SpaceSettings:
    """Map the configuration and the command line onto :class:`SpaceSettings`."""
    settings = config.settings
    factories = list(getattr(args, "factories", None) or getattr(settings, "factories", None)
                     or ["."])
    timeout = getattr(args, "timeout", None) or getattr(settings, "udp_timeout_seconds", 10.0)
    local_name = getattr(settings, "factory_name", None) or socket.getfqdn()
    return SpaceSettings(
        space=getattr(args, "space", None) or settings.vac_space,
        factories=factories,
        timeout=float(timeout),
        port=int(getattr(settings, "udp_port", None) or DEFAULT_PORT),
        space_key=load_space_key(getattr(settings, "space_key", None),
                                 getattr(settings, "space_key_file", None)),
        local_name=local_name,
    )


def ask(settings: SpaceSettings, query_type: QueryType) -> SpaceReplies:
    return query_space(settings.factories, query_type, settings.space, settings.timeout,
                       port=settings.port, space_key=settings.space_key,
                       local_name=settings.local_name)


_NOUN = {QueryType.MACHINES: "machines", QueryType.MACHINETYPES: "machinetypes",
         QueryType.FACTORY: "factory status"}


def _run(args: argparse.Namespace, config: Config, query_type: QueryType,
         line: Callable[[Reply, float], str],
         select: Callable[[List[Reply]], List[Reply]] = lambda replies: replies) -> int:
    try:
        settings = space_settings(args, config)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return EXIT_CONFIG
    if sys.stderr.isatty():
        say_what_we_wait_for(settings, query_type)
    result = ask(settings, query_type)
    replies = select(ordered_replies(result))
    if getattr(args, "json", False):
        print_json([dict(r.fields) for r in replies])
    else:
        now = time.time()
        for reply in replies:
            print(line(reply, now))
    return report_missing(result, settings)


def say_what_we_wait_for(settings: SpaceSettings, query_type: QueryType) -> None:
    """On a terminal: who is asked, for what, and the longest it can take."""
    names = list(settings.factories)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    print(f"asking {len(names)} factor{'y' if len(names) == 1 else 'ies'} of space "
          f"{settings.space} ({shown}) for {_NOUN[query_type]} on UDP port {settings.port}, "
          f"waiting up to {settings.timeout:g} s ...", file=sys.stderr, flush=True)


def ordered_replies(result: SpaceReplies) -> List[Reply]:
    """Factories in the order asked; each factory's replies sorted by name."""
    out: List[Reply] = []
    for name in result.factories:
        if name in result.answered:
            out.extend(sorted(result.answered[name].replies, key=lambda r: r.key))
    return out


def report_missing(result: SpaceReplies, settings: Optional[SpaceSettings] = None) -> int:
    """Name the factories that did not answer (fully) on stderr, with the likely causes; the
    exit code says how many (module doc)."""
    silent = [name for name in result.unknown
              if name not in result.unresolved and name not in result.resolving]
    for name in result.unresolved:
        print(f"{name}: the name does not resolve (check it in `factories` or on the command "
              f"line, and this host's DNS)", file=sys.stderr)
    for name in result.resolving:
        print(f"{name}: the name was still being looked up after {result.elapsed:.1f} s "
              f"(a slow or unreachable DNS server)", file=sys.stderr)
    if silent:
        print(f"no answer within {result.elapsed:.1f} s from: {', '.join(silent)}",
              file=sys.stderr)
        for hint in no_answer_hints(result, silent, settings):
            print(f"  {hint}", file=sys.stderr)
    if result.incomplete:
        print(f"incomplete answer from: {', '.join(result.incomplete)} (datagrams lost; "
              f"asking again usually completes it)", file=sys.stderr)
    if result.factories and not result.answered:
        if result.unresolved and len(result.unresolved) == len(result.factories):
            return EXIT_NOHOST
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE if result.unknown or result.incomplete else EXIT_OK


def no_answer_hints(result: SpaceReplies, silent: Sequence[str],
                    settings: Optional[SpaceSettings]) -> List[str]:
    """The likely causes of silence, most specific first."""
    hints: List[str] = []
    port = settings.port if settings is not None else DEFAULT_PORT
    local = settings.local_name if settings is not None else None
    if result.rejected:
        hints.append(f"{result.rejected} repl{'y was' if result.rejected == 1 else 'ies were'} "
                     f"refused: a factory answering under another name than the one asked "
                     f"(Vac answers as its uname), for another space"
                     + (", or signed with another space key" if settings and settings.space_key
                        else ""))
    if local is not None and local in silent:
        hints.append(f"{local} is this factory: is the vacfactory daemon running here "
                     f"(systemctl status vacfactory; vacfactory check)?")
    hints.append(f"is the daemon (vacfactory or Vac's vacd) running there, and UDP port {port} "
                 f"open in the firewalls between here and there?")
    hints.append("does its `factories` list name this host? A factory answers only the "
                 "factories it lists (and itself)")
    space_key = settings.space_key if settings is not None else None
    hints.append("is its vac_space the same" + (" and its space key the same as this one's?"
                                               if space_key else " (and does it use no space "
                                               "key, as this host does)?"))
    return hints


def network_machines(args: argparse.Namespace, config: Config) -> int:
    """``vacfactory machines -a|FACTORY...``: Vac's ``vac machines`` over the network (every
    factory in ``factories`` unless some are named)."""
    return _run(args, config, QueryType.MACHINES, machine_line)


def run_machinetypes(args: argparse.Namespace) -> int:
    return _run(args, load_config(args), QueryType.MACHINETYPES, machinetype_line)


def run_machinetype(args: argparse.Namespace) -> int:
    """``vac machinetype NAME``: the machinetypes_query answers for NAME only, one line per
    factory that has it; a factory that answered without it is named on stderr."""
    name = args.machinetype.lower()  # machinetype names are lower case (Vac lower-cases them)
    holders: List[str] = []
    answered: List[str] = []

    def select(replies: List[Reply]) -> List[Reply]:
        chosen = [r for r in replies
                  if isinstance(r.status, MachinetypeStatus) and r.status.machinetype == name]
        holders.extend(r.factory for r in chosen)
        answered.extend(dict.fromkeys(r.factory for r in replies))
        return chosen

    code = _run(args, load_config(args), QueryType.MACHINETYPES, one_machinetype_line, select)
    without = [factory for factory in answered if factory not in holders]
    if without:
        print(f"no machinetype {name} at: {', '.join(without)}", file=sys.stderr)
    if answered and not holders:
        return max(code, EXIT_FAILURE)
    return code


def run_factories(args: argparse.Namespace) -> int:
    return _run(args, load_config(args), QueryType.FACTORY, factory_line)


# --------------------------------------------------------------------------------------------
# Vac's line formats (§5 of the Vac study); every peer-supplied string is made printable


def _clean(value: Any) -> str:
    return _UNPRINTABLE.sub("?", "" if value is None else str(value))


def _short(name: str) -> str:
    """Vac prints host names up to the first dot; an address stays whole."""
    name = _clean(name)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.split(".", 1)[0]
    return name


#: Vac's two letters per machine model (``vm`` is what vacfactory sent before it sent the model)
_MODEL_LETTERS = {**{model: "VM" for model in VM_MODELS + ("vm",)}, "docker": "DC",
                  "singularity": "SC"}


def machine_line(reply: Reply, now: float) -> str:
    """``vac machines``: slot, machinetype, state, processors, model, then by state."""
    m = reply.status
    assert isinstance(m, MachineStatus)
    model = _MODEL_LETTERS.get(m.machine_model or "vm", "??")
    line = (f"{_short(m.machine):<15s} {_clean(m.machinetype or '----------')[:14]:<14s} "
            f"{_clean(m.state):<9s} {m.num_processors:2d} {model}")
    if m.state == STATE_RUNNING and m.started_time is not None:
        seen = m.heartbeat_time if m.heartbeat_time is not None else now
        wall = max(seen - m.started_time, 0.0)
        lifetime_cpu = (100.0 * (m.cpu_seconds or 0.0) / (wall * max(m.num_processors, 1))
                        if wall > 0 else 0.0)
        line += f" {wall / 3600.0:5.2f} hrs {lifetime_cpu:3.0f}% {m.cpu_percentage or 0.0:3.0f}%"
    elif m.state == STATE_STARTING and m.created_time is not None:
        line += f" {max(now - m.created_time, 0.0) / 60.0:4.2f} mins"
    elif m.state == STATE_SHUTDOWN and m.shutdown_message:
        line += f' "{_clean(m.shutdown_message)[:19]}"'
    return line


def _when(epoch: Optional[float]) -> str:
    """Vac's ``%d %b %H:%M:%S`` local time, ``-`` when unknown (or absurd)."""
    if not epoch:
        return "-"
    try:
        return time.strftime("%d %b %H:%M:%S", time.localtime(epoch))
    except (OverflowError, OSError, ValueError):
        return "-"


def _message(text: Optional[str]) -> str:
    """A shutdown message in quotes, or Vac's ``-`` when there is none."""
    return f'"{_clean(text)}"' if text else "-"


def machinetype_line(reply: Reply, now: float) -> str:
    """``vacfactory machinetypes``, for every machinetype: factory, machinetype, running
    machines, running HS06, CPU efficiency of the last day (ours; ``-`` from Vac factories),
    when and how the latest VM of the type finished."""
    s = reply.status
    assert isinstance(s, MachinetypeStatus)
    efficiency = f"{100 * s.cpu_efficiency_1d:3.0f}%" if s.cpu_efficiency_1d is not None else "   -"
    return (f"{_short(reply.factory):<15s} {_clean(s.machinetype)[:14]:<14s} "
            f"{s.running_machines:2d} {s.running_hs06:5.1f} {efficiency} {_when(s.shutdown_time)} "
            f"{_message(s.shutdown_message)}")


def one_machinetype_line(reply: Reply, now: float) -> str:
    """``vac machinetype NAME``: factory, running machines, running HS06, when and how the
    latest VM of the type finished (``-`` for no message), exactly Vac's columns."""
    s = reply.status
    assert isinstance(s, MachinetypeStatus)
    return (f"{_short(reply.factory):<15s} {s.running_machines:2d} {s.running_hs06:5.1f} "
            f"{_when(s.shutdown_time)} {_message(s.shutdown_message)}")


def factory_line(reply: Reply, now: float) -> str:
    """``vac factories``: processors, machines, load, disks, memory, version."""
    f = reply.status
    assert isinstance(f, FactoryStatus)
    return (f"{_short(reply.factory):<15s} {f.running_processors:2d}/{f.max_processors} "
            f"{f.running_machines:2d}/{f.max_machines} {f.load_average:6.2f} "
            f"{f.root_disk_avail_kb:9d} {f.daemon_disk_avail_kb:9d} "
            f"{f.mem_used_kb:8d}/{f.mem_total_kb:8d} \"{_clean(reply.daemon_version)}\"")


# --------------------------------------------------------------------------------------------
# simulate


def run_simulate(args: argparse.Namespace) -> int:
    if args.workload:
        return run_simulate_workload(args)
    from vacfactory.space.simulator import SimConfig, format_result, parse_shares, simulate

    args.factories = 100 if args.factories is None else args.factories
    args.processors = 32 if args.processors is None else args.processors

    try:
        machinetypes = parse_shares(args.shares)
    except ValueError as error:
        print(f"vacfactory simulate: {error}", file=sys.stderr)
        return 2
    if not (0.0 <= args.loss < 1.0 and 0.0 <= args.unreachable < 1.0):
        print("vacfactory simulate: --loss and --unreachable must be in [0, 1)", file=sys.stderr)
        return 2
    if args.factories < 1 or args.processors < 1 or args.hours <= args.warmup_hours:
        print("vacfactory simulate: need factories, processors and hours > warmup-hours",
              file=sys.stderr)
        return 2
    result = simulate(SimConfig(
        factories=args.factories, processors=args.processors, machinetypes=machinetypes,
        hours=args.hours, warmup_hours=args.warmup_hours, loss=args.loss,
        unreachable=args.unreachable, seed=args.seed))
    if args.json:
        print_json({
            "target": result.target,
            "achieved": result.achieved,
            "max_deviation_points": result.max_deviation_points,
            "utilisation": result.utilisation,
            "decisions": result.decisions,
            "datagrams": result.datagrams,
            "answered_fraction": result.answered_fraction,
            "wall_seconds": result.wall_seconds,
        })
    else:
        for line in format_result(result):
            print(line)
    return EXIT_OK


def run_simulate_workload(args: argparse.Namespace) -> int:
    """``simulate --workload FILE``: the site's configuration, three policies side by side."""
    from dataclasses import asdict

    from vacfactory.sim.report import format_comparison
    from vacfactory.sim.site import site_comparison
    from vacfactory.sim.workload import WorkloadError

    config = load_config(args)
    try:
        with open(args.workload, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except OSError as error:
        raise CommandError(f"cannot read the workload file {args.workload}: "
                           f"{error.strerror or error}", EXIT_NOINPUT) from None
    factories = args.factories
    if factories is None:
        factories = max(1, len([f for f in config.settings.factories if f != "."]))
    processors = args.processors or config.settings.total_processors
    if factories < 1 or processors < 1:
        raise CommandError("--factories and --processors must be at least 1", EXIT_USAGE)
    try:
        figures = site_comparison(config, text, args.workload, factories, processors, args.seed)
    except WorkloadError as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    if args.json:
        print_json([asdict(f) for f in figures])
    else:
        print(f"{factories} factories x {processors} processors; figures after the warm-up, "
              f"ratios against Vac 03.01's policy")
        for line in format_comparison(figures):
            print(line)
    return EXIT_OK
