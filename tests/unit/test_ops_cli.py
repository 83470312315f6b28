"""The operations verbs: drain/undrain through the runtime override, check without a daemon,
squid-conf with names that resolve locally, and the generated vacfactory(1)."""

from __future__ import annotations

import logging
import logging.handlers
import json
import os
import re
import shutil
import stat
import subprocess
import time

import pytest

from vacfactory.cli import ops
from vacfactory.cli.main import build_parser, main
from vacfactory.cli.run import DEFAULT_LOGFILE
from vacfactory.config import options as table
from vacfactory.config.loader import ConfigSources, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(path, text: str) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def make_conf(tmp_path, factories: str = "127.0.0.2 127.0.0.3 .") -> str:
    state = tmp_path / "vfops-state"
    return write(tmp_path / "vfops.conf", f"""\
[settings]
vac_space = vac01.example.com
factory_name = 127.0.0.1
factories = {factories}
state_dir = {state}
domain_type = test
libvirt_uri = test:///default
total_processors = 4
""")


@pytest.fixture
def conf(tmp_path):
    (tmp_path / "vfops-state").mkdir()  # drain and undrain never create a state directory
    return make_conf(tmp_path)


def runtime_path(conf_path) -> str:
    return os.path.join(os.path.dirname(conf_path), "vfops-state", "runtime.conf")


def settings_of(conf_path):
    return load_config(ConfigSources.for_main_file(conf_path)).settings


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize("text,expected", [
    ("now", 1000),
    ("1700000000", 1700000000),
    ("+90m", 1000 + 5400),
    ("+3h", 1000 + 10800),
    ("+2d", 1000 + 172800),
    ("+45s", 1045),
    ("2024-01-31T18:00:00Z", 1706724000),
    ("2024-01-31T18:00:00+01:00", 1706720400),
])
def test_parse_time_accepts_epochs_relative_times_and_iso_8601(text, expected):
    assert ops.parse_time(text, 1000.5) == expected


def test_parse_time_naive_iso_is_local_time():
    import datetime

    assert ops.parse_time("2024-06-01T12:00", 0) == int(datetime.datetime(2024, 6, 1, 12, 0).timestamp())


@pytest.mark.parametrize("text", ["tomorrow", "+3w", "-3h", "2024-13-45", ""])
def test_parse_time_rejects_everything_else(text):
    with pytest.raises(ValueError):
        ops.parse_time(text, 1000)


# --------------------------------------------------------------------------- editing the override


OVERRIDE = """\
# kept: a comment before everything
[settings]
; kept comment
draining = no
shutdown_time = 123
   continuation that belongs to shutdown_time
mb_per_processor = 3000

[machinetype lhcb]
shutdown_time = not settings, kept
"""


def test_set_settings_options_replaces_values_and_keeps_everything_else():
    text = ops.set_settings_options(OVERRIDE, {"shutdown_time": "999"})
    assert text == """\
# kept: a comment before everything
[settings]
shutdown_time = 999
; kept comment
draining = no
mb_per_processor = 3000

[machinetype lhcb]
shutdown_time = not settings, kept
"""


def test_set_settings_options_adds_a_settings_section_when_there_is_none():
    assert ops.set_settings_options("", {"draining": "yes"}) == "[settings]\ndraining = yes\n"
    assert ops.set_settings_options("# note", {"draining": "yes"}) == "# note\n\n[settings]\ndraining = yes\n"


def test_remove_settings_options_only_touches_settings():
    text = ops.remove_settings_options(OVERRIDE, ["shutdown_time", "DRAINING"])
    assert "shutdown_time = 123" not in text and "continuation" not in text and "draining" not in text
    assert "shutdown_time = not settings, kept" in text and "; kept comment" in text
    assert "mb_per_processor = 3000" in text


# --------------------------------------------------------------------------- drain / undrain


def test_drain_at_time_sets_shutdown_time_that_the_loader_reads(conf, capsys):
    write(runtime_path(conf), "# site note\n[settings]\nmb_per_processor = 3072\n")
    assert main(["--config", conf, "drain", "--at", "2030-01-01T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "shutdown_time = 1893456000 (2030-01-01 00:00:00 UTC) written to" in out
    assert "now in force: shutdown_time 1893456000" in out
    s = settings_of(conf)
    assert s.shutdown_time == 1893456000 and s.mb_per_processor == 3072 and s.draining is False
    assert open(runtime_path(conf)).read().startswith("# site note\n[settings]\n")


def test_drain_without_time_stops_creating_and_undrain_reverts_both(conf, capsys):
    before = time.time()
    assert main(["--config", conf, "drain"]) == 0
    assert main(["--config", conf, "drain", "--at", "+1h"]) == 0
    s = settings_of(conf)
    assert s.draining is True and before + 3600 - 1 <= s.shutdown_time <= time.time() + 3600 + 1
    capsys.readouterr()
    assert main(["--config", conf, "undrain"]) == 0
    out = capsys.readouterr().out
    assert "draining and shutdown_time removed" in out and "now in force: not draining" in out
    s = settings_of(conf)
    assert s.draining is False and s.shutdown_time is None
    assert main(["--config", conf, "undrain"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_undrain_reports_a_drain_set_in_the_main_file(conf, capsys):
    with open(conf, "a") as f:
        f.write("draining = yes\n")
    assert main(["--config", conf, "undrain"]) == 0
    assert f"now in force: draining (from {conf}:9)" in capsys.readouterr().out


def test_drain_rejects_a_bad_time_and_writes_nothing(conf, capsys):
    assert main(["--config", conf, "drain", "--at", "soonish"]) == 2
    assert "is not a time" in capsys.readouterr().err
    assert not os.path.exists(runtime_path(conf))


# --------------------------------------------------------------------------- check


def test_check_without_a_daemon_is_critical(conf, capsys):
    code = main(["--config", conf, "check"])
    out = capsys.readouterr().out
    assert code == 2
    assert out.count("\n") == 1 and out.startswith("VACFACTORY CRITICAL - ")
    assert "no factory heartbeat" in out and "daemon not running" in out


def test_check_with_a_configuration_that_does_not_load_is_unknown(tmp_path, capsys):
    bad = write(tmp_path / "vfops-bad.conf", "[settings]\nvac_space = vac01.example.com\ntotal_processors = x\n")
    assert main(["--config", bad, "check"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("VACFACTORY UNKNOWN - configuration does not load: ") and out.count("\n") == 1


def test_check_json(conf, capsys):
    import json

    assert main(["--config", conf, "check", "--json", "--max-age", "60"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "CRITICAL" and document["line"].startswith("VACFACTORY CRITICAL")
    assert {"state": "CRITICAL", "message": "daemon not running"} in document["problems"]


def test_check_reports_an_unreachable_libvirt(tmp_path, capsys):
    bad_uri = write(tmp_path / "vfops-uri.conf", f"""\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
state_dir = {tmp_path / 'vfops-state'}
domain_type = test
libvirt_uri = test:///{tmp_path}/vfops-no-such-driver-file.xml
""")
    assert main(["--config", bad_uri, "check"]) == 2
    assert "unreachable" in capsys.readouterr().out


def test_check_opens_the_test_driver_and_finds_libvirt_reachable(conf, capsys):
    import json

    main(["--config", conf, "check", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert "daemon not running" in document["line"]  # it did run every check
    assert not [p for p in document["problems"] if "libvirt" in p["message"]]


def test_check_with_a_hung_libvirtd_answers_within_its_deadline(tmp_path):
    """A socket that accepts connections and never answers is a hung libvirtd: the plugin must
    still print its one line (CRITICAL) and exit well inside the NRPE timeout."""
    import socket
    import subprocess
    import sys

    path = str(tmp_path / "vfops-hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)  # the kernel completes connections; nobody ever reads or answers
    hung = write(tmp_path / "vfops-hung.conf", f"""\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
state_dir = {tmp_path / 'vfops-state'}
domain_type = test
libvirt_uri = qemu+unix:///system?socket={path}
""")
    command = [os.path.join(os.path.dirname(sys.executable), "vacfactory"), "--config", hung, "check",
               "--libvirt-timeout", "1.5"]
    try:
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert result.returncode == 2
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("VACFACTORY CRITICAL - ")
    assert f"libvirt qemu+unix:///system?socket={path} unreachable: no answer within 1.5 s" in result.stdout
    assert elapsed < 8, f"the check took {elapsed:.1f} s"


def test_check_refuses_a_non_positive_libvirt_timeout(conf, capsys):
    assert main(["--config", conf, "check", "--libvirt-timeout", "0"]) == 3
    assert "--libvirt-timeout must be positive" in capsys.readouterr().err


# --------------------------------------------------------------------------- squid-conf


def test_squid_conf_adds_acls_and_peers_and_rewrites_only_on_change(conf, tmp_path, capsys):
    template = write(tmp_path / "vfops-squid.in", "http_port 3128\nhttp_access allow localnet")
    out_path = str(tmp_path / "vfops-squid.conf")
    assert main(["--config", conf, "squid-conf", template, out_path]) == 0
    assert open(out_path).read() == """\
http_port 3128
http_access allow localnet
# added by vacfactory squid-conf: the factories of space vac01.example.com
acl localnet src 127.0.0.1/32
acl localnet src 127.0.0.2/32
acl localnet src 127.0.0.3/32
cache_peer 127.0.0.2 sibling 3128 3130 default
cache_peer 127.0.0.3 sibling 3128 3130 default
"""
    assert "updated" in capsys.readouterr().out
    stat_before = os.stat(out_path)
    time.sleep(0.01)
    assert main(["--config", conf, "squid-conf", template, out_path]) == 0
    assert "unchanged" in capsys.readouterr().out
    stat_after = os.stat(out_path)
    assert (stat_after.st_mtime_ns, stat_after.st_ino) == (stat_before.st_mtime_ns, stat_before.st_ino)


def test_squid_conf_drain_and_undrain_print_json(conf, tmp_path, capsys):
    template = write(tmp_path / "vfops-squid.in", "http_port 3128\n")
    out_path = str(tmp_path / "vfops-squid.conf")
    assert main(["squid-conf", template, out_path, "--json", "-c", conf]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["changed"] is True and result["output"] == out_path
    assert result["lines"][-1] == "cache_peer 127.0.0.3 sibling 3128 3130 default"
    assert main(["squid-conf", template, out_path, "--json", "-c", conf]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False

    assert main(["drain", "--at", "+1h", "--json", "-c", conf]) == 0
    drained = json.loads(capsys.readouterr().out)
    assert drained["written"] == runtime_path(conf) and drained["in_force"]["draining"] is False
    assert drained["in_force"]["shutdown_time"] == int(drained["set"]["shutdown_time"])
    assert drained["in_force"]["shutdown_time_from"].startswith(runtime_path(conf))
    assert main(["undrain", "--json", "-c", conf]) == 0
    undrained = json.loads(capsys.readouterr().out)
    assert undrained["removed"] is True and undrained["in_force"]["shutdown_time"] is None


def test_squid_conf_resolves_names():
    lines = ops.squid_lines(["localhost", "127.0.0.2"], "127.0.0.1")
    assert lines[0] == "acl localnet src 127.0.0.1/32"
    # localhost resolves to this factory's own address: an acl, but no peer
    assert "cache_peer 127.0.0.1 sibling 3128 3130 default" not in lines
    assert lines[-1] == "cache_peer 127.0.0.2 sibling 3128 3130 default"


def test_squid_conf_with_an_unresolvable_factory_leaves_out_alone(tmp_path, capsys):
    conf = make_conf(tmp_path, factories="vfops-nowhere.invalid .")
    template = write(tmp_path / "vfops-squid.in", "http_port 3128\n")
    out_path = write(tmp_path / "vfops-squid.conf", "previous\n")
    assert main(["--config", conf, "squid-conf", template, out_path]) == 1
    assert "vfops-nowhere.invalid does not resolve" in capsys.readouterr().err
    assert open(out_path).read() == "previous\n"


def test_squid_conf_refuses_to_overwrite_its_input(conf, tmp_path):
    template = write(tmp_path / "vfops-squid.in", "http_port 3128\n")
    assert main(["--config", conf, "squid-conf", template, template]) == 2


# --------------------------------------------------------------------------- man


def test_committed_man_page_equals_generated_output():
    with open(os.path.join(REPO, "docs", "vacfactory.1"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == ops.man_page(build_parser()), (
        "docs/vacfactory.1 is stale: run `.venv/bin/python -m vacfactory.cli.main man > docs/vacfactory.1`")


def test_man_page_documents_every_verb_and_option(capsys):
    assert main(["man"]) == 0
    text = capsys.readouterr().out
    assert text.startswith('.\\" Generated') and "\n.TH VACFACTORY 1 " in text
    for verb in ("run", "drain", "undrain", "check", "squid\\-conf", "man", "config check", "config show"):
        assert f'\n.SS "vacfactory {verb}"\n' in text, verb
    assert "\\fB\\-\\-max\\-age\\fR \\fIS\\fR\nCRITICAL if the factory heartbeat is older than S seconds (default 600)" \
        in text
    assert "\\fB\\-\\-at\\fR \\fITIME\\fR" in text
    body = [line for line in text.splitlines() if not line.startswith((".", "'", "\\fB", "\\fI", "\\&"))]
    assert not any(line.lstrip().startswith((".", "'")) for line in body)
    assert ".SH EXIT STATUS" in text and "\\fB78\\fR" in text


# --------------------------------------------------------------------------- shipped files


def test_the_example_site_configuration_loads():
    from vacfactory.config.hostfacts import HostFacts

    host = HostFacts(fqdn="vac01-wn01.example.ac.uk", cpu_count=64, mem_total_mb=256000)
    config = load_config(ConfigSources.for_main_file(os.path.join(REPO, "conf", "example-site.conf")), host_facts=host)
    assert list(config.machinetypes)[:2] == ["lhcb", "atlas"]
    assert config.settings.metrics_port == 9105 and config.settings.factory_name == "vac01-wn01.example.ac.uk"
    assert config.machinetypes["lhcb"].root_image_sha256.startswith("3b7c1d5b")
    assert list(config.vacuum_pipes) == ["gridpp"]


def test_the_systemd_unit_is_type_notify_and_never_kills_vms():
    import configparser

    unit = configparser.RawConfigParser(strict=False)
    unit.optionxform = str
    unit.read(os.path.join(REPO, "conf", "vacfactory.service"))
    service = dict(unit.items("Service"))
    assert service["Type"] == "notify" and service["ExecStart"] == "/usr/bin/vacfactory run"
    assert service["Restart"] == "on-failure" and service["KillMode"] == "process"
    # WATCHDOG=1 comes after every round, at least every cycle_seconds (image downloads are in
    # the background): the watchdog leaves room for many missed rounds at the default
    cycle_seconds = table.accepted_options(table.SETTINGS)["cycle_seconds"].default
    assert int(service["WatchdogSec"]) >= 10 * cycle_seconds
    assert int(service["TimeoutStopSec"]) > 0
    assert unit.get("Install", "WantedBy") == "multi-user.target"


# --------------------------------------------------------------------------- logrotate

LOGROTATE_CONF = os.path.join(REPO, "conf", "vacfactory.logrotate")


def logrotate() -> str:
    """logrotate is a test dependency (tools/setup-machine.sh installs it); it lives in sbin."""
    path = shutil.which("logrotate", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        pytest.fail("logrotate is not installed: run tools/setup-machine.sh (or apt-get install logrotate)")
    return path


def documented_log_path() -> str:
    with open(os.path.join(REPO, "docs", "admin-guide.md"), encoding="utf-8") as f:
        guide = f.read()
    paths = set(re.findall(r"`(/var/log/[^`]+)`", guide))
    assert len(paths) == 1, paths
    return paths.pop()


def run_logrotate(tmp_path, conf_path: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([logrotate(), *flags, "--state", str(tmp_path / "logrotate.state"), conf_path],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))


def test_the_logrotate_file_parses_and_rotates_the_documented_log(tmp_path):
    result = run_logrotate(tmp_path, LOGROTATE_CONF, "-d")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # logrotate exits 0 even when it ignores a line it cannot parse: it says "error:" instead
    assert "error:" not in output, output
    assert documented_log_path() == DEFAULT_LOGFILE
    assert f"rotating pattern: {DEFAULT_LOGFILE} " in output
    assert f"considering log {DEFAULT_LOGFILE}" in output


def test_after_logrotate_the_log_handler_writes_the_new_file_without_a_signal(tmp_path):
    """The shipped rules on a log in a temporary directory, rotated for real (-f): the old
    lines move to .1 (delaycompress), a new file is created with the promised mode, and the
    daemon's WatchedFileHandler writes on into the new file with no copytruncate or signal."""
    assert os.geteuid() == 0, "`create 0640 root root` needs root (make test runs as root)"
    log_path = str(tmp_path / "vacfactory.log")
    with open(LOGROTATE_CONF, encoding="utf-8") as f:
        rules = f.read()
    assert DEFAULT_LOGFILE + " {" in rules
    conf_path = write(tmp_path / "vacfactory.logrotate", rules.replace(DEFAULT_LOGFILE + " {", log_path + " {"))
    os.chmod(conf_path, 0o644)
    handler = logging.handlers.WatchedFileHandler(log_path)
    logger = logging.getLogger("vacfactory.test_logrotate")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.error("before the rotation")
        result = run_logrotate(tmp_path, conf_path, "-f")
        assert result.returncode == 0 and "error:" not in result.stdout + result.stderr, result.stderr
        assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o640
        logger.error("after the rotation")
    finally:
        logger.removeHandler(handler)
        handler.close()
    with open(log_path + ".1", encoding="utf-8") as f:
        assert f.read() == "before the rotation\n"  # delaycompress: the newest old log stays plain
    with open(log_path, encoding="utf-8") as f:
        assert f.read() == "after the rotation\n"


def test_drain_with_a_relative_state_dir_works_from_any_directory(tmp_path, monkeypatch, capsys):
    conf = write(tmp_path / "etc" / "vfops.conf",
                 "[settings]\nvac_space = vac01.example.com\nfactory_name = wn01.example.com\n"
                 "state_dir = ../vfops-state\ndomain_type = test\ntotal_processors = 2\n")
    elsewhere = tmp_path / "vfops-x" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # "../vfops-state" from here is another directory
    (tmp_path / "vfops-state").mkdir()
    assert main(["--config", conf, "drain", "--at", "1893456000"]) == 0
    assert os.path.exists(tmp_path / "vfops-state" / "runtime.conf")
    assert not os.path.exists(tmp_path / "vfops-x" / "vfops-state")
    assert settings_of(conf).shutdown_time == 1893456000
