"""``vacfactory apel republish|sync|send|status``: accounting by hand, from cron or Nagios.

Exit codes: 0 done, 1 something failed (details on stderr), 69 the broker was unreachable,
78 invalid configuration. Every action accepts --json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from vacfactory.accounting import archive
from vacfactory.accounting.outgoing import age_seconds, backlog_of
from vacfactory.accounting.report import monthly_report, report_lines
from vacfactory.accounting.republish import republish
from vacfactory.accounting.send_state import read_state
from vacfactory.accounting.sender import DEFAULT_TIMEOUT_SECONDS, send_queued
from vacfactory.accounting.sender_cfg import effective_broker
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.accounting.sync import default_month, last_sync_time, sync_months
from vacfactory.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_json_argument,
    load_config,
    print_json,
)
from vacfactory.core.apel import is_month, month_of
from vacfactory.errors import AccountingError

Action = Callable[[argparse.Namespace, AccountingSettings, float], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("apel", help="APEL accounting: republish, sync, send, status, report")
    actions = parser.add_subparsers(dest="apel_action", metavar="ACTION")

    p = actions.add_parser("republish", help="queue archived records again")
    p.add_argument("--since", type=_date, metavar="YYYY-MM-DD",
                   help="only records that ended on or after this day (UTC)")
    add_json_argument(p)
    p.set_defaults(handler=_runner(do_republish))

    p = actions.add_parser("sync", help="queue APEL sync records (default: yesterday's month)")
    p.add_argument("months", nargs="*", type=_month, metavar="YYYYMM")
    p.add_argument("--all", action="store_true", help="every month present in the archive")
    add_json_argument(p)
    p.set_defaults(handler=_runner(do_sync))

    p = actions.add_parser("send", help="sign and send queued records to the broker (built-in ssmsend)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, metavar="S",
                   help=f"give up after S seconds, leaving the rest queued (default {DEFAULT_TIMEOUT_SECONDS:g})")
    add_json_argument(p)
    p.set_defaults(handler=_runner(do_send))

    p = actions.add_parser("status", help="archive count this month, queue backlog, oldest queued, sender: "
                                          "protocol, destination, last successful send")
    add_json_argument(p)
    p.set_defaults(handler=_runner(do_status))

    p = actions.add_parser("report", help="VMs, wall/CPU/HS06 hours and CPU efficiency per machinetype for a month")
    p.add_argument("--month", type=_month, metavar="YYYYMM", help="default: this month (UTC)")
    add_json_argument(p)
    p.set_defaults(handler=_runner(do_report))

    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _runner(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = AccountingSettings.from_config(load_config(args))
        return run_action(action, args, settings, time.time())

    return run


def run_action(action: Action, args: argparse.Namespace, settings: AccountingSettings, now: float) -> int:
    """Run one action with ready settings; accounting errors become a message and exit 1."""
    try:
        return action(args, settings, now)
    except AccountingError as error:
        print(f"vacfactory apel: {error}", file=sys.stderr)
        return EXIT_FAILURE


def _date(text: str) -> datetime.date:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _month(text: str) -> str:
    if not is_month(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month YYYYMM")
    return text


def do_report(args: argparse.Namespace, settings: AccountingSettings, now: float) -> int:
    """The month's archive summarised per machinetype (exit 1 if records did not parse)."""
    report = monthly_report(settings.archive_dir, args.month or month_of(now))
    if args.json:
        print_json(report.as_dict())
    else:
        print("\n".join(report_lines(report)))
    return EXIT_FAILURE if report.invalid else EXIT_OK


def do_republish(args: argparse.Namespace, settings: AccountingSettings, now: float) -> int:
    result = republish(settings, args.since, now)
    if args.json:
        print_json({"queued": result.queued, "cloud_queued": result.cloud_queued, "invalid": result.invalid})
    else:
        print(f"{result.queued} job records queued again" +
              (f", {result.cloud_queued} cloud records" if settings.cloud_records else "") +
              (f"; {result.invalid} invalid archive records skipped (see the log)" if result.invalid else ""))
    return EXIT_FAILURE if result.invalid else EXIT_OK


def do_sync(args: argparse.Namespace, settings: AccountingSettings, now: float) -> int:
    months: List[str] = list(args.months)
    if args.all:
        months = sorted(set(months) | set(archive.months(settings.archive_dir)))
    if not months:
        months = [default_month(now)]
    results = sync_months(settings, months, now)
    rows = [
        {"month": r.month, "site": site, "submit_host": host, "number_of_jobs": n, "queued": bool(r.queue_names)}
        for r in results for site, host, n in r.counts
    ]
    if args.json:
        print_json({"queue_enabled": settings.queue_enabled, "records": rows,
                    "queue_names": [name for r in results for name in r.queue_names]})
    else:
        for row in rows:
            print(f"{row['month']}  {row['site']}  {row['submit_host']}  NumberOfJobs {row['number_of_jobs']}"
                  f"  {'queued' if row['queued'] else 'NOT queued'}")
        if not settings.queue_enabled:
            print(f"sync records not queued: {settings.queue_disabled_reason}", file=sys.stderr)
    return EXIT_OK if settings.queue_enabled else EXIT_FAILURE


def do_send(args: argparse.Namespace, settings: AccountingSettings, now: float) -> int:
    result = send_queued(settings, args.timeout, now=now)
    if args.json:
        print_json({"sent": result.sent, "messages": result.messages, "failed": result.failed,
                    "remaining": result.remaining, "invalid": result.invalid, "error": result.error,
                    "unreachable": result.unreachable})
    else:
        print(f"{result.sent} sent" + (f" in {result.messages} messages" if result.messages != result.sent else "")
              + f", {result.remaining} left queued"
              + (f", {result.invalid} invalid queued elements" if result.invalid else ""))
        if result.error:
            print(f"vacfactory apel send: {result.error}", file=sys.stderr)
    if result.unreachable:
        return EXIT_UNAVAILABLE
    return EXIT_OK if result.ok else EXIT_FAILURE


def status(settings: AccountingSettings, now: float) -> Dict[str, Any]:
    """What ``apel status`` reports, as a plain dict."""
    month = month_of(now)
    counts = archive.count_month(settings.archive_dir, month)
    queues = {"job": settings.outgoing_dir}
    if settings.cloud_records:
        queues["cloud"] = settings.cloud_queue_dir
    backlog: Dict[str, Any] = {}
    for kind, path in queues.items():
        b = backlog_of(path)
        backlog[kind] = {"path": path, "queued": b.count, "locked": b.locked, "oldest": b.oldest,
                         "oldest_age_seconds": age_seconds(b.oldest, now)}
    return {
        "site": settings.site,
        "submit_host": settings.submit_host,
        "month": month,
        "archived_this_month": sum(counts.values()),
        "archived_this_month_by_identity": [
            {"site": site, "submit_host": host, "records": n} for (site, host), n in sorted(counts.items())
        ],
        "queue_enabled": settings.queue_enabled,
        "queue_disabled_reason": settings.queue_disabled_reason,
        "backlog": backlog,
        "last_sync": last_sync_time(settings),
        "built_in_sender": settings.broker.send_enabled,
        "sender": sender_status(settings),
    }


def sender_status(settings: AccountingSettings) -> Dict[str, Any]:
    """Where the built-in sender sends (or would), and how its last runs went."""
    report: Dict[str, Any] = {"sender_cfg": settings.broker.sender_cfg, "config_error": None}
    try:
        broker = effective_broker(settings)
    except AccountingError as error:
        broker = settings.broker
        report["config_error"] = str(error)
    state = read_state(os.path.dirname(os.path.abspath(settings.outgoing_dir)))
    report.update(protocol=broker.protocol, host=broker.host, destination=broker.destination,
                  ams_project=broker.ams_project if broker.protocol == "AMS" else None,
                  batch_records=broker.batch_records, last_success=state.get("last_success"),
                  last_attempt=state.get("last_attempt"), last_error=state.get("last_error"),
                  queue_depth=backlog_of(settings.outgoing_dir).count)
    return report


def do_status(args: argparse.Namespace, settings: AccountingSettings, now: float) -> int:
    report = status(settings, now)
    if args.json:
        print_json(report)
        return EXIT_OK
    print(f"site {report['site']}, submit host {report['submit_host']}")
    print(f"archived this month ({report['month']}): {report['archived_this_month']}")
    if not report["queue_enabled"]:
        print(f"records are archived but NOT queued: {report['queue_disabled_reason']}")
    for kind, b in report["backlog"].items():
        oldest = "" if b["oldest"] is None else f", oldest queued {_age(b['oldest_age_seconds'])} ago"
        print(f"{kind} queue {b['path']}: {b['queued']} queued ({b['locked']} locked){oldest}")
    last = report["last_sync"]
    print("last daily sync: " + (_utc(last) if last else "never"))
    sender = report["sender"]
    where = sender["destination"] + (f" (AMS project {sender['ams_project']})" if sender["ams_project"] else "")
    print(f"sender: {sender['protocol']} to {sender['host'] or '(no host)'} {where}"
          + (f", batches of {sender['batch_records']}" if sender["batch_records"] else "")
          + ("" if report["built_in_sender"] else " (built-in sender off: ssmsend sends)"))
    if sender["config_error"]:
        print(f"sender configuration error: {sender['config_error']}")
    success = sender["last_success"]
    print(f"last successful send: {_utc(success) if success else 'never'}; queue depth {sender['queue_depth']}")
    if sender["last_error"]:
        print(f"last send error ({_utc(sender['last_attempt'])}): {sender['last_error']}")
    return EXIT_OK


def _age(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 60}m{seconds % 60}s"


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
