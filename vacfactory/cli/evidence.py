"""``vacfactory machine UUID``: everything the factory kept about one VM, for an investigation.

UUID may be the full UUID (the MJF ``job_id`` and APEL ``LocalJobId`` experiments record), a
unique prefix of it, or the VM's hostname (its first label is enough; the newest VM of that
name is shown and older ones are named). Works whether or not the daemon runs: it only reads.

Exit codes: 0 shown, 1 unknown or ambiguous (candidates on stderr), 78 invalid configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

from vacfactory.cli.common import EXIT_FAILURE, EXIT_OK, add_json_argument, load_config, print_json
from vacfactory.errors import StateError
from vacfactory.view.evidence import DEFAULT_LINES, LIBVIRT_LOG_DIR, collect, format_evidence
from vacfactory.vmio.joboutputs import JobOutputsLimits


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "machine", help="everything kept about one VM: record, APEL, logs, joboutputs, syslog, kept disks")
    parser.add_argument("uuid", metavar="UUID", help="the VM's UUID (job_id), a unique prefix, or its hostname")
    parser.add_argument("-n", "--lines", type=int, default=DEFAULT_LINES, metavar="N",
                        help=f"last lines of the console and syslog to show (default {DEFAULT_LINES})")
    parser.add_argument("--libvirt-log-dir", default=LIBVIRT_LOG_DIR, metavar="DIR",
                        help=f"where libvirt writes domain logs (default {LIBVIRT_LOG_DIR})")
    add_json_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    s = config.settings
    for directory in (s.state_dir, os.path.join(s.state_dir, "machines")):
        if os.path.isdir(directory):
            os.listdir(directory)  # PermissionError: "no permission", not "no machines directory"
    limits = JobOutputsLimits(
        max_file_bytes=s.joboutputs_max_file_bytes,
        max_total_bytes=s.joboutputs_max_total_bytes,
        max_files=s.joboutputs_max_files,
    )
    return show(s.state_dir, args.uuid, args.json, max(0, args.lines), args.libvirt_log_dir, limits)


def show(state_dir: str, ident: str, as_json: bool, lines: int = DEFAULT_LINES,
         libvirt_log_dir: str = LIBVIRT_LOG_DIR, limits: JobOutputsLimits = JobOutputsLimits()) -> int:
    """Print the evidence of one VM (the verb without configuration loading: tests call it)."""
    try:
        evidence = collect(state_dir, ident, lines=lines, libvirt_log_dir=libvirt_log_dir, limits=limits)
    except StateError as error:
        print(f"vacfactory machine: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        print_json(evidence.as_dict())
    else:
        for line in format_evidence(evidence):
            print(line)
    return EXIT_OK
