"""``vacfactory apel ...``: output, --json and exit codes, over a real state directory."""

from __future__ import annotations

import argparse
import json
import socket
import time

import pytest

from tests.unit.test_apel_support import NOW, broker_settings, make_pki, make_settings, make_usage, read_queue
from vacfactory.accounting import account_vm
from vacfactory.cli import apel as cli
from vacfactory.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from vacfactory.cli.main import build_parser, main


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["apel", *argv])


def run(settings, *argv: str, now: float = NOW) -> int:
    args = parse(*argv)
    action = {"republish": cli.do_republish, "sync": cli.do_sync, "send": cli.do_send,
              "status": cli.do_status, "report": cli.do_report}[args.apel_action]
    return cli.run_action(action, args, settings, now)


def test_status_reports_archive_backlog_and_oldest(tmp_path, capsys):
    settings = make_settings(str(tmp_path))
    for i in range(1, 4):
        account_vm(make_usage(i), settings, NOW)
    capsys.readouterr()
    assert run(settings, "status", "--json") == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["month"] == "202401" and report["archived_this_month"] == 3
    assert report["backlog"]["job"]["queued"] == 3 and report["backlog"]["job"]["oldest"] is not None
    assert report["queue_enabled"] is True and report["last_sync"] is None
    assert run(settings, "status") == EXIT_OK
    text = capsys.readouterr().out
    assert "archived this month (202401): 3" in text and "3 queued" in text


def test_sync_months_and_all(tmp_path, capsys):
    settings = make_settings(str(tmp_path))
    account_vm(make_usage(1), settings, NOW)
    account_vm(make_usage(2, start_time=1701000000, end_time=1701388800), settings, NOW)  # 2023-12-01
    capsys.readouterr()
    assert run(settings, "sync", "202401", "202402", "--json") == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert [(r["month"], r["number_of_jobs"]) for r in out["records"]] == [("202401", 1), ("202402", 0)]
    assert len(out["queue_names"]) == 2
    assert run(settings, "sync", "--all") == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["202312", "202401"]
    assert all("NumberOfJobs 1" in line and "queued" in line for line in lines)
    assert len(read_queue(settings.outgoing_dir)) == 2 + 2 + 2


def test_sync_without_gocdb_site_exits_1_and_says_why(tmp_path, capsys):
    settings = make_settings(str(tmp_path), queue_enabled=False, queue_disabled_reason="gocdb_sitename is not set")
    assert run(settings, "sync", "202401") == EXIT_FAILURE
    assert "gocdb_sitename is not set" in capsys.readouterr().err


def test_republish_since(tmp_path, capsys):
    settings = make_settings(str(tmp_path))
    account_vm(make_usage(1), settings, NOW)
    capsys.readouterr()
    assert run(settings, "republish", "--since", "2024-01-17", "--json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["queued"] == 1
    assert run(settings, "republish", "--since", "2024-01-18") == EXIT_OK
    assert capsys.readouterr().out.startswith("0 job records")


def test_republish_when_queueing_is_disabled_exits_1(tmp_path, capsys):
    settings = make_settings(str(tmp_path), queue_enabled=False, queue_disabled_reason="hs06_per_processor is not set")
    assert run(settings, "republish") == EXIT_FAILURE
    assert "hs06_per_processor" in capsys.readouterr().err


def test_send_exit_codes(tmp_path, capsys):
    pki = make_pki(str(tmp_path / "pki"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", port, False))
    assert run(settings, "send", "--timeout", "5", "--json") == EXIT_OK  # nothing queued
    assert json.loads(capsys.readouterr().out)["sent"] == 0
    account_vm(make_usage(1), settings, NOW)
    assert run(settings, "send", "--timeout", "5", "--json", now=time.time()) == EXIT_UNAVAILABLE
    out = json.loads(capsys.readouterr().out)
    assert out["unreachable"] is True and out["remaining"] == 1


@pytest.mark.parametrize("argv", [["apel", "sync", "2024"], ["apel", "republish", "--since", "17/01/2024"],
                                  ["apel", "send", "--timeout", "soon"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def test_apel_without_an_action_prints_help(capsys):
    assert main(["apel"]) == 2
    assert "republish" in capsys.readouterr().err


def test_report_summarises_the_month_per_machinetype(tmp_path, capsys):
    settings = make_settings(str(tmp_path))
    for i in range(1, 3):
        account_vm(make_usage(i), settings, NOW)
    capsys.readouterr()
    assert run(settings, "report", "--month", "202401", "--json") == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["month"] == "202401" and report["total"]["vms"] == 2
    assert run(settings, "report", "--month", "202401") == EXIT_OK
    assert "records ending in 2024-01" in capsys.readouterr().out
