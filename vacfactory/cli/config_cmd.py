"""``vacfactory config check`` and ``vacfactory config show``.

``check`` prints the same messages the daemon logs for the same files (every error with file,
line, section and option), then predicts what a valid configuration will break at run time
(:mod:`vacfactory.config.predict`: files, state directory, processors, memory; with
``--online`` also libvirt, ports and host names). It exits 78 (EXIT_CONFIG) when there are
errors and 0 when there are only warnings, so it can run before a restart or from
configuration management. ``show`` prints the effective merged configuration with the origin
of every value, which is what an admin needs when several drop-in files and an override are
involved.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

from vacfactory.cli.common import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, add_json_argument, load_config, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="check or show the configuration")
    parser.set_defaults(handler=lambda args: _usage(parser))
    verbs = parser.add_subparsers(dest="config_verb", metavar="VERB")
    check = verbs.add_parser(
        "check", help="validate the configuration and predict runtime failures (exit 78 on errors)",
        description="Validate the configuration files, then predict what will fail at run time: "
                    "missing or unreadable root_image, kernel and user_data files, an unusable "
                    "state_dir, processors and memory no VM can use, every share 0, ' #' inside a "
                    "value, the last failed fetch of each vacuum pipe; online also whether libvirt "
                    "answers at libvirt_uri, the daemon's ports are free and host names resolve. "
                    "Every finding names the file and line of the option.",
        epilog=f"exit status: {EXIT_OK} when there are no errors (warnings alone exit {EXIT_OK}), "
               f"{EXIT_CONFIG} when there are errors, {EXIT_USAGE} on a bad command line.")
    add_json_argument(check)
    mode = check.add_mutually_exclusive_group()
    mode.add_argument("--online", dest="online", action="store_true", default=None,
                      help="also ask libvirt, test the ports and resolve host names (the default "
                           "when run as root)")
    mode.add_argument("--offline", dest="online", action="store_false",
                      help="only look at files: no libvirt, sockets or DNS")
    check.set_defaults(handler=run_check)
    show = verbs.add_parser("show", help="print every option's effective value and where it came from")
    add_json_argument(show)
    show.set_defaults(handler=run_show)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _sources(args: argparse.Namespace) -> Any:
    from vacfactory.config import loader

    return loader.ConfigSources.for_main_file(args.config) if args.config else loader.ConfigSources.default()


def run_check(args: argparse.Namespace) -> int:
    from vacfactory.config import loader, predict

    sources = _sources(args)
    result = loader.check_config(sources)
    config = result.config
    online = config is not None and (args.online if args.online is not None else os.geteuid() == 0)
    findings = _findings(config, sources, online)
    errors = predict.count(findings, predict.ERROR)
    failed = not result.ok or errors > 0
    if args.json:
        print_json({
            "ok": not failed,
            "online": online,
            "errors": [str(e) for e in result.errors] + [str(f) for f in findings if f.severity == predict.ERROR],
            "warnings": list(result.warnings) + [str(f) for f in findings if f.severity == predict.WARNING],
            "findings": predict.as_mapping(findings),
            "machinetypes": list(config.machinetypes) if config else [],
        })
        return EXIT_CONFIG if failed else EXIT_OK
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for finding in findings:
        print(f"{finding.severity}: {finding}", file=sys.stderr)
    for error in result.errors:
        print(str(error), file=sys.stderr)
    if not result.ok:
        print(f"configuration invalid: {_count(len(result.errors), 'error')}", file=sys.stderr)
    elif errors:
        untested = "" if online else " (offline check: libvirt, ports and host names not tested)"
        print(f"configuration valid, but {_count(errors, 'error')} will make the factory fail at run time"
              f"{untested}", file=sys.stderr)
    else:
        warned = predict.count(findings, predict.WARNING) + len(result.warnings)
        print(_summary(config, warned, online))
    return EXIT_CONFIG if failed else EXIT_OK


def _findings(config: Any, sources: Any, online: bool) -> List[Any]:
    """The predictions, in reading order: the `` #`` scan always (it also explains values
    that failed to parse), the others only for a configuration that loads."""
    from vacfactory.config import predict

    files = [s.path for s in config.sources if s.exists] if config else sources.base_files()
    findings = predict.inline_comments(files)
    if config is not None:
        findings += predict.predict(config, files)
        if online:
            from vacfactory.config.predict.online import predict_online

            findings += predict_online(config, predict.Locator(config, files))
    return predict.ordered(findings, files)


def _summary(config: Any, warnings: int, online: bool) -> str:
    names = ", ".join(config.machinetypes) or "none"
    pipes = f", {_count(len(config.vacuum_pipes), 'vacuum pipe')}" if config.vacuum_pipes else ""
    tail = (f"; {_count(warnings, 'warning')}" if warnings else "") + ("" if online else "; offline check")
    return (f"configuration OK: {_count(len(config.machinetypes), 'machinetype')} ({names}){pipes}, "
            f"{_count(config.settings.total_processors, 'processor')}, state dir {config.settings.state_dir}{tail}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_show(args: argparse.Namespace) -> int:
    from vacfactory.config.model import effective_options

    config = load_config(args)
    sections = effective_options(config)
    if args.json:
        document: Dict[str, Any] = {
            "sources": [s.path for s in config.sources if s.exists],
            "sections": {
                title: {o.name: {"value": o.value if o.is_set else None, "origin": o.origin} for o in options}
                for title, options in sections
            },
            "warnings": list(config.warnings),
        }
        print_json(document)
        return EXIT_OK
    lines: List[str] = ["# effective configuration, read from:"]
    lines += [f"#   {s.path}" for s in config.sources if s.exists]
    for title, options in sections:
        lines += ["", f"[{title}]"]
        rows = []
        for option in options:
            text = option.text if option.is_set else "(unset)"
            first, *rest = text.split("\n")
            rows.append((f"{option.name} = {first}", option.origin, rest))
        width = min(max((len(r[0]) for r in rows), default=0), 70)
        for first, origin, rest in rows:
            lines.append(f"{first:<{width}}  ; {origin}")
            lines += [f"    {more}" for more in rest]
    print("\n".join(lines))
    return EXIT_OK
