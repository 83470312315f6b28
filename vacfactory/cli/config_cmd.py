"""``vacfactory config check`` and ``vacfactory config show``.

``check`` prints the same messages the daemon logs for the same files (every error with file,
line, section and option) and exits 78 (EXIT_CONFIG) when there are errors, so it can run
before a restart or from configuration management. ``show`` prints the effective merged
configuration with the origin of every value, which is what an admin needs when several
drop-in files and an override are involved.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List

from vacfactory.cli.common import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, add_json_argument, load_config, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="check or show the configuration")
    parser.set_defaults(handler=lambda args: _usage(parser))
    verbs = parser.add_subparsers(dest="config_verb", metavar="VERB")
    check = verbs.add_parser("check", help="validate the configuration files (exit 78 if invalid)")
    add_json_argument(check)
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
    from vacfactory.config import loader

    result = loader.check_config(_sources(args))
    if args.json:
        print_json({
            "ok": result.ok,
            "errors": [str(e) for e in result.errors],
            "warnings": list(result.warnings),
            "machinetypes": list(result.config.machinetypes) if result.config else [],
        })
        return EXIT_OK if result.ok else EXIT_CONFIG
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.ok:
        for error in result.errors:
            print(str(error), file=sys.stderr)
        print(f"configuration invalid: {_count(len(result.errors), 'error')}", file=sys.stderr)
        return EXIT_CONFIG
    config = result.config
    assert config is not None
    names = ", ".join(config.machinetypes) or "none"
    pipes = f", {_count(len(config.vacuum_pipes), 'vacuum pipe')}" if config.vacuum_pipes else ""
    print(f"configuration OK: {_count(len(config.machinetypes), 'machinetype')} ({names}){pipes}, "
          f"{_count(config.settings.total_processors, 'processor')}, state dir {config.settings.state_dir}")
    return EXIT_OK


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
