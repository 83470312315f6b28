"""Operations verbs: ``drain``, ``undrain``, ``check``, ``squid-conf`` and ``man``.

- ``drain`` / ``undrain`` edit the runtime override ``<state_dir>/runtime.conf`` (read after
  the main configuration; the daemon watches it and applies it at its next round). Other
  content of that file, comments included, is kept. ``drain`` alone sets ``draining = yes``
  (no new VMs; running ones finish on their own). ``drain --at TIME`` sets
  ``shutdown_time``: running VMs see the new ``shutdowntime`` in their machine/job features
  and are stopped by then, and only VMs that fit before it are started.
- ``check`` is a Nagios/NRPE plugin (see :mod:`vacfactory.view.monitoring`): one line, exit
  0/1/2/3. It opens libvirt read-only and gives it ``--libvirt-timeout`` seconds.
- ``squid-conf IN OUT`` is Vac's: a copy of IN plus ``acl localnet src IP/32`` for every
  factory of the space and ``cache_peer IP sibling 3128 3130 default`` for every other one;
  OUT is replaced (atomically) only when it changes, so its mtime tells whether squid needs a
  reload.
- ``man`` prints vacfactory(1), generated from this very command line parser.
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import os
import re
import socket
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from vacfactory import __version__
from vacfactory.atomic import atomic_write_text
from vacfactory.cli import common
from vacfactory.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandError,
    add_json_argument,
    config_sources,
    load_config,
    print_json,
    require_state_dir,
)

SETTINGS_SECTION = "settings"


def register(subparsers: argparse._SubParsersAction) -> None:
    drain = subparsers.add_parser(
        "drain", help="start no new VMs (runtime override); with --at, also stop running VMs by TIME")
    drain.add_argument("--at", metavar="TIME",
                       help="set shutdown_time: an epoch, +90m / +3h / +2d, or ISO 8601 "
                            "(e.g. 2031-01-31T18:00, local time unless it has a zone); a TIME that "
                            "is past or within grace_seconds is refused without --now")
    drain.add_argument("--now", action="store_true",
                       help="stop running VMs now (alone: shutdown_time = now), or accept an --at "
                            "TIME that is past or within grace_seconds")
    add_json_argument(drain)
    drain.set_defaults(handler=run_drain)

    undrain = subparsers.add_parser("undrain", help="remove draining and shutdown_time from the runtime override")
    add_json_argument(undrain)
    undrain.set_defaults(handler=run_undrain)

    check = subparsers.add_parser(
        "check", help="Nagios/NRPE check of the daemon: one status line, exit 0/1/2/3 (OK/WARNING/CRITICAL/UNKNOWN)")
    check.add_argument("--max-age", type=float, default=600.0, metavar="S",
                       help="CRITICAL if the factory heartbeat is older than S seconds (default %(default)g)")
    check.add_argument("--libvirt-timeout", type=float, default=5.0, metavar="S",
                       help="CRITICAL if libvirt (opened read-only) does not answer within S seconds "
                            "(default %(default)g; keep it below the NRPE timeout)")
    add_json_argument(check)
    check.set_defaults(handler=run_check)

    squid = subparsers.add_parser(
        "squid-conf", help="write squid.conf OUT: IN plus acl and cache_peer lines for the space's factories")
    squid.add_argument("input", metavar="IN", help="squid.conf template")
    squid.add_argument("output", metavar="OUT", help="file to write (replaced only if it changes)")
    add_json_argument(squid)
    squid.set_defaults(handler=run_squid_conf)

    man = subparsers.add_parser("man", help="print the vacfactory(1) manual page (troff)")
    man.set_defaults(handler=run_man)


# --------------------------------------------------------------------------- drain


def parse_time(text: str, now: float) -> int:
    """An epoch, ``now``, ``+N[smhd]``, or ISO 8601 (local time unless a zone is given)."""
    text = text.strip()
    if text.lower() == "now":
        return int(now)
    if re.fullmatch(r"[0-9]{1,12}", text):
        return int(text)
    match = re.fullmatch(r"\+([0-9]{1,9})([smhd])", text.lower())
    if match:
        factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return int(now) + int(match.group(1)) * factor
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use an epoch, 'now', +90m, +3h, +2d or ISO 8601") from None
    return int(moment.timestamp())  # naive: local time


def _is_settings_header(line: str) -> bool:
    match = configparser.RawConfigParser.SECTCRE.match(line.strip())
    return bool(match) and match.group("header").strip().lower() == SETTINGS_SECTION


def _option_name(line: str) -> Optional[str]:
    match = configparser.RawConfigParser.OPTCRE.match(line.strip())
    return match.group("option").strip().lower() if match else None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def remove_settings_options(text: str, names: Iterable[str]) -> str:
    """``text`` without the named options (and their continuation lines) in every [settings]."""
    drop = {n.lower() for n in names}
    out: List[str] = []
    in_settings = False
    skipping_indent: Optional[int] = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if skipping_indent is not None:
            if stripped and not stripped.startswith(("#", ";")) and _indent(line) > skipping_indent:
                continue  # a continuation line of the dropped option
            skipping_indent = None
        if configparser.RawConfigParser.SECTCRE.match(stripped):
            in_settings = _is_settings_header(line)
        elif in_settings and stripped and not stripped.startswith(("#", ";")) and _option_name(line) in drop:
            skipping_indent = _indent(line)
            continue
        out.append(line)
    return "".join(out)


def set_settings_options(text: str, values: Dict[str, str]) -> str:
    """``text`` with ``values`` set in [settings] (replacing earlier values; rest untouched)."""
    text = remove_settings_options(text, values)
    new_lines = "".join(f"{name} = {value}\n" for name, value in values.items())
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if _is_settings_header(line):
            if not line.endswith("\n"):
                lines[index] = line + "\n"
            lines.insert(index + 1, new_lines)
            return "".join(lines)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text.strip() else "") + f"[{SETTINGS_SECTION}]\n" + new_lines


def _override_path(config: Any) -> str:
    from vacfactory.config import options as table

    return os.path.join(config.settings.state_dir, table.RUNTIME_OVERRIDE_NAME)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _write_override(path: str, text: str) -> None:
    require_state_dir(os.path.dirname(path))  # never create one: a wrong --config would be "applied"
    try:
        atomic_write_text(path, text)
    except OSError as error:  # name the file we write, not its temporary (or none: a failed write())
        error.filename = path
        raise


def _describe_time(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_drain(args: argparse.Namespace) -> int:
    config = load_config(args)
    path = _override_path(config)
    require_state_dir(config.settings.state_dir)
    now = time.time()
    when: Optional[int] = None
    if args.at is not None:
        try:
            when = parse_time(args.at, now)
        except ValueError as error:
            raise CommandError(str(error), EXIT_USAGE) from None
        grace = config.settings.grace_seconds
        if when <= now + grace and not args.now:
            past = "is in the past" if when <= now else f"is within grace_seconds ({grace:g} s)"
            raise CommandError(f"--at {args.at} = {_describe_time(when)} {past}: every running VM would be "
                               "stopped at the next round; give --now if that is what you want", EXIT_USAGE)
    elif args.now:
        when = int(now)
    values = {"draining": "yes"} if when is None else {"shutdown_time": str(when)}
    _write_override(path, set_settings_options(_read_text(path), values))
    if args.json:
        return _report_effect(args, {"written": path, "set": values})
    if when is not None:
        print(f"shutdown_time = {when} ({_describe_time(when)}) written to {path}: running VMs are told in "
              "their machine/job features and stopped by then; only VMs that fit before it are started")
    else:
        print(f"draining = yes written to {path}: no new VMs are started; running VMs finish on their own")
    return _report_effect(args)


def run_undrain(args: argparse.Namespace) -> int:
    config = load_config(args)
    path = _override_path(config)
    require_state_dir(config.settings.state_dir)
    before = _read_text(path)
    after = remove_settings_options(before, ("draining", "shutdown_time"))
    if after != before:
        _write_override(path, after)
    if args.json:
        return _report_effect(args, {"written": path if after != before else None, "removed": after != before})
    if after != before:
        print(f"draining and shutdown_time removed from {path}")
    else:
        print(f"{path} sets neither draining nor shutdown_time: nothing to do")
    return _report_effect(args)


def _report_effect(args: argparse.Namespace, result: Optional[Dict[str, Any]] = None) -> int:
    """Reload the configuration as the daemon will, and say what is now in force (with
    ``result``: print it as JSON with what is in force)."""
    from vacfactory.config import loader
    from vacfactory.errors import ConfigError

    try:
        config = loader.load_config(config_sources(args))
    except ConfigError as error:
        if result is not None:
            print_json(dict(result, in_force=None, error=str(error).splitlines()))
        print(f"the configuration with the override is invalid (the daemon keeps its last good one):\n{error}",
              file=sys.stderr)
        return EXIT_CONFIG
    s = config.settings
    origins = config.origins.get(SETTINGS_SECTION, {})
    if result is not None:
        print_json(dict(result, in_force={
            "draining": bool(s.draining), "draining_from": origins.get("draining"),
            "shutdown_time": s.shutdown_time, "shutdown_time_from": origins.get("shutdown_time")}))
        return EXIT_OK
    parts = []
    if s.draining:
        parts.append(f"draining (from {origins.get('draining', '?')})")
    if s.shutdown_time is not None:
        parts.append(f"shutdown_time {s.shutdown_time} = {_describe_time(s.shutdown_time)} "
                     f"(from {origins.get('shutdown_time', '?')})")
    print("now in force: " + ("; ".join(parts) if parts else "not draining")
          + "; the daemon applies it at its next round")
    return EXIT_OK


# --------------------------------------------------------------------------- check


def _ping_libvirt(uri: str, timeout: float) -> Optional[str]:
    """None if ``uri`` answers a read-only round trip within ``timeout`` seconds, else why not
    (through the hypervisor adapter: only it imports libvirt)."""
    from vacfactory.view.monitoring import answer_within

    try:
        from vacfactory.hypervisor.libvirt_hv import ping_read_only
    except ImportError as error:
        return f"the libvirt Python binding cannot be imported: {error}"
    return answer_within(lambda: ping_read_only(uri), timeout)


def run_check(args: argparse.Namespace) -> int:
    from vacfactory.view import monitoring
    from vacfactory.config import loader
    from vacfactory.errors import ConfigError

    try:
        config = loader.load_config(config_sources(args))
    except ConfigError as error:
        result = monitoring.unknown(f"configuration does not load: {str(error).splitlines()[0]}")
    else:
        settings = monitoring.CheckSettings.from_config(config, max_age=args.max_age)
        if not args.libvirt_timeout > 0:
            print("vacfactory check: --libvirt-timeout must be positive", file=sys.stderr)
            return monitoring.UNKNOWN
        result = monitoring.run_check(settings, time.time(),
                                      lambda: _ping_libvirt(settings.libvirt_uri, args.libvirt_timeout))
    if args.json:
        print_json({"code": result.code, "state": result.state, "line": result.line,
                    "problems": [{"state": monitoring.STATE_NAMES[c], "message": m} for c, m in result.problems],
                    "perfdata": list(result.perfdata)})
    else:
        print(result.line)
    return result.code


# --------------------------------------------------------------------------- squid-conf


def resolve_address(name: str) -> Tuple[str, int]:
    """(address, prefix length) of a factory: IPv4 (/32) as Vac, else IPv6 (/128)."""
    for family, bits in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        try:
            infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        if infos:
            return str(infos[0][4][0]), bits
    raise OSError(f"{name} does not resolve")


def squid_lines(factories: Sequence[str], this_factory: str) -> List[str]:
    """``acl localnet`` for every factory (this one included), ``cache_peer`` for the others."""
    names: List[str] = []
    for name in [this_factory] + [this_factory if f == "." else f for f in factories]:
        if name.lower() not in (n.lower() for n in names):
            names.append(name)
    acl: List[str] = []
    peers: List[str] = []
    own_address, _ = resolve_address(this_factory)
    for name in names:
        address, bits = resolve_address(name)
        line = f"acl localnet src {address}/{bits}"
        if line not in acl:
            acl.append(line)
        if name.lower() != this_factory.lower() and address != own_address:
            peer = f"cache_peer {address} sibling 3128 3130 default"
            if peer not in peers:
                peers.append(peer)
    return acl + peers


def run_squid_conf(args: argparse.Namespace) -> int:
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        print("vacfactory squid-conf: IN and OUT must be different files", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)
    s = config.settings
    try:
        template = _read_existing(args.input)
        lines = squid_lines(s.factories, s.factory_name)
    except OSError as error:
        raise CommandError(f"{_os_text(error)}; {args.output} left unchanged") from None
    if template and not template.endswith("\n"):
        template += "\n"
    text = template + f"# added by vacfactory squid-conf: the factories of space {s.vac_space}\n" + \
        "".join(line + "\n" for line in lines)
    try:
        current: Optional[str] = _read_existing(args.output)
    except OSError:
        current = None
    changed = current != text
    if changed:
        try:
            atomic_write_text(args.output, text)
        except OSError as error:
            error.filename = args.output
            raise
    if args.json:
        print_json({"output": args.output, "changed": changed, "lines": lines})
    elif changed:
        print(f"{args.output} updated: {len(lines)} lines for {len(s.factories) or 1} factories (reload squid)")
    else:
        print(f"{args.output} unchanged")
    return EXIT_OK


def _os_text(error: OSError) -> str:
    return f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)


def _read_existing(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------- man


def _roff(text: str) -> str:
    """Escape text for troff: backslashes, hyphens, and a leading '.' or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _expand_help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    params: Dict[str, Any] = dict(vars(action), prog=prog)
    for name in list(params):
        if params[name] is argparse.SUPPRESS:
            del params[name]
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return action.help % params


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        name = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        name = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        name = action.dest.upper() if action.option_strings else action.dest
    if action.nargs == "*":
        return f"[{name} ...]"
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    if action.nargs == "?":
        return f"[{name}]"
    return name


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=10000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return " ".join(formatter.format_help().split())


def _arguments(parser: argparse.ArgumentParser) -> List[str]:
    lines: List[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        metavar = _metavar(action)
        if action.option_strings:
            label = ", ".join(f"\\fB{_roff(o)}\\fR" + (f" \\fI{_roff(metavar)}\\fR" if metavar else "")
                              for o in action.option_strings)
        else:
            label = f"\\fI{_roff(metavar)}\\fR"
        text = _expand_help(action, parser.prog)
        if not text and action.default not in (None, False, argparse.SUPPRESS):
            text = f"Default: {action.default}."
        lines += [".TP", label, _roff(text) or "\\&"]
    return lines


def _subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, str, argparse.ArgumentParser]]:
    """(full command, help, parser) of every verb, depth first, in --help order."""
    found: List[Tuple[str, str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                if name not in helps:
                    continue  # an alias
                found.append((sub.prog, helps[name], sub))
                found.extend(_subcommands(sub))
    return found


_EXIT_STATUS = (
    (EXIT_OK, "success (check: OK)"),
    (EXIT_FAILURE, "the command ran and found a problem, or an operation failed (check: WARNING)"),
    (EXIT_USAGE, "bad command line (check: CRITICAL)"),
    (3, "check: UNKNOWN (the configuration does not load)"),
    (common.EXIT_NOINPUT, "a file or directory that must exist does not (a state_dir that was never made)"),
    (EXIT_UNAVAILABLE, "a service that is needed (libvirtd, the daemon, a broker) is not reachable"),
    (common.EXIT_SOFTWARE, "an unexpected error, a bug (VACFACTORY_DEBUG=1 shows its traceback)"),
    (common.EXIT_CANTCREAT, "a file or directory cannot be created or written (read-only file system, "
                            "a file where a directory belongs)"),
    (common.EXIT_IOERR, "an I/O error, such as a full disk"),
    (common.EXIT_NOPERM, "no permission (most verbs need root)"),
    (EXIT_CONFIG, "the configuration is invalid"),
    (common.EXIT_SIGPIPE, "standard output was closed early (e.g. piped into head); nothing is printed"),
)


def man_page(parser: argparse.ArgumentParser) -> str:
    """vacfactory(1) in troff, from the argument parser: every verb with its help and options."""
    out: List[str] = [
        '.\\" Generated by `vacfactory man` from the command line parser; do not edit.',
        f'.TH VACFACTORY 1 "" "vacfactory {__version__}" "System Administration"',
        ".SH NAME",
        "vacfactory \\- " + _roff(parser.description or "").rstrip("."),
        ".SH SYNOPSIS",
        ".B vacfactory",
        "[\\fB\\-c\\fR \\fIFILE\\fR] \\fIVERB\\fR [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        _roff("vacfactory runs virtual machines on a hypervisor host (a factory) for the virtual "
              "organisations of a space, with target shares shared among all factories of the "
              "space over UDP, as GridPP's Vac does. `vacfactory run` is the daemon (started by "
              "systemd); the other verbs inspect and operate it. The configuration is described in "
              "vacfactory.conf(5)."),
        ".SH OPTIONS",
    ]
    out += _arguments(parser)
    out.append(".SH COMMANDS")
    for command, help_text, sub in _subcommands(parser):
        out += [f'.SS "{_roff(command)}"', _roff(help_text[:1].upper() + help_text[1:]) + ("." if help_text else "")]
        if sub.description:
            out += [".PP", _roff(sub.description)]
        out += [".PP", "Usage: \\fB" + _roff(_usage(sub)) + "\\fR"]
        out += _arguments(sub)
    out.append(".SH EXIT STATUS")
    for code, text in _EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _roff(text)]
    out += [
        ".SH ENVIRONMENT",
        ".TP", "\\fBVACFACTORY_CONFIG\\fR", _roff("The main configuration file when -c/--config is not given."),
        ".TP", "\\fBVACFACTORY_DEBUG\\fR", _roff("Set to show the traceback of an unexpected error (exit 70)."),
        ".SH FILES",
        ".TP", "\\fI/etc/vacfactory.conf\\fR, \\fI/etc/vacfactory.d/*.conf\\fR", "The configuration.",
        ".TP", "\\fI/var/lib/vacfactory/runtime.conf\\fR",
        _roff("The runtime override (drain, undrain), read after the configuration."),
        ".TP", "\\fI/var/lib/vacfactory/\\fR",
        _roff("The state directory: machines, finishes, accounting, image and pipe caches, "
              "factory-heartbeat, factory-error, status.json."),
        ".SH SEE ALSO",
        "vacfactory.conf(5), virsh(1), ssmsend(1)",
    ]
    return "\n".join(out) + "\n"


def run_man(args: argparse.Namespace) -> int:
    from vacfactory.cli.main import build_parser

    sys.stdout.write(man_page(build_parser()))
    return EXIT_OK
