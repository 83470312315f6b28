"""``vacfactory status`` and the daemon's log lines, on a real in-process daemon (libvirt's test
driver, its state in a temporary directory, as ``vacfactory run`` starts it).

Machinetype ``alpha`` starts; ``beta``'s kernel file is removed after the configuration was
loaded, so every creation of a beta VM fails, every round, as on a site whose image vanished.
"""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import os
import signal
import socket
import textwrap
import time
from typing import Iterator, List

import pytest

from tests.unit.engine_harness import HOST, Clock, close_daemons, kernel_file
from tests.waiting import scaled
from vacfactory.cli.main import main
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon
from vacfactory.logsetup import REPEAT_INTERVAL_SECONDS, RepeatSummariser, configure_logging

_names = itertools.count(1)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def config_text(tmp_path, name: str, extra: str = "") -> str:
    good = kernel_file(str(tmp_path))
    doomed = tmp_path / "vfstat-beta-vmlinux"
    doomed.write_bytes(b"removed before the first creation")
    return textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = {name}
        factories = .
        state_dir = {tmp_path / 'state'}
        libvirt_uri = test:///default
        domain_type = test
        total_processors = 4
        mb_per_processor = 100
        udp_port = {free_udp_port()}
        udp_timeout_seconds = 0.5
        overload_per_processor = 100000
        {extra}

        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {good}

        [machinetype beta]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {doomed}
        """)


@pytest.fixture
def daemon(tmp_path) -> Iterator:
    """A started daemon (clock at the real time) whose beta creations fail; its config path."""
    started: List[Daemon] = []
    name = f"d{os.getpid()}st{next(_names)}.example.org"
    path = tmp_path / "vacfactory.conf"
    path.write_text(config_text(tmp_path, name))
    d = Daemon(ConfigSources.for_main_file(str(path)), host_facts=HOST, clock=Clock(time.time()))
    started.append(d)
    os.unlink(tmp_path / "vfstat-beta-vmlinux")
    d.start()
    yield d, str(path)
    close_daemons(started)


def test_status_shows_daemon_config_processors_vms_failures_and_space(daemon, capsys):
    d, conf = daemon
    d.factory.run_round()
    assert main(["status", "-c", conf, "--json"]) == 0
    o = json.loads(capsys.readouterr().out)
    assert o["daemon"]["running"] is True and o["daemon"]["pid"] == os.getpid()
    assert o["daemon"]["started"] == pytest.approx(d.started_at)
    assert o["config"]["files"] == [conf] and o["config"]["accepted"] == pytest.approx(d.config_accepted_at)
    assert o["config"]["rejected"] is None
    alpha, beta = o["machinetypes"]["alpha"], o["machinetypes"]["beta"]
    assert alpha["running"] >= 1 and beta == {"running": 0, "starting": 0, "processors": 0}
    assert o["processors"] == {"total": 4, "busy": alpha["processors"], "free": 4 - alpha["processors"]}
    failure = o["creation_failures"]["beta"]
    assert "vfstat-beta-vmlinux" in failure["reason"] and failure["count"] >= 1
    assert o["drain"] == {"draining": False, "shutdown_time": None, "from": None}
    assert o["accounting"]["job"] == {"queued": 0, "oldest": None}
    assert o["space"] == {"asked": [], "answered": [], "held": [], "unknown": []}  # factories = .

    assert main(["status", "-c", conf]) == 0
    text = capsys.readouterr().out.splitlines()
    labels = [line.split(":")[0] for line in text if not line.startswith(" ")]
    assert labels[:4] == ["daemon", "config", "processors", "VMs"]
    assert text[0].startswith(f"daemon:      running, pid {os.getpid()}, up ")
    assert any(line.startswith("failures:    beta: ") and "vfstat-beta-vmlinux" in line for line in text)
    assert "drain:       no" in text and "space:       this factory alone (factories names no other)" in text


def test_status_shows_a_drain_and_the_daemons_rejected_configuration(daemon, capsys):
    d, conf = daemon
    assert main(["drain", "-c", conf, "--at", "+2h"]) == 0
    d.factory.run_round()
    capsys.readouterr()
    assert main(["status", "-c", conf]) == 0
    drain = [line for line in capsys.readouterr().out.splitlines() if line.startswith("drain:")]
    assert len(drain) == 1 and "shutdown_time 20" in drain[0] and "runtime.conf" in drain[0]
    with open(conf, "a") as f:
        f.write("\n[machinetype gamma]\ntarget_share = lots\n")
    d.factory.run_round()
    rejected = json.load(open(os.path.join(d.config.settings.state_dir, "status.json")))["config"]["rejected"]
    assert any("target_share: 'lots' is not a number" in line for line in rejected)
    with pytest.raises(SystemExit) as exited:  # the CLI reads the same files: it says so, exit 78
        main(["status", "-c", conf])
    assert exited.value.code == 78 and "target_share" in capsys.readouterr().err


def test_a_repeated_creation_failure_is_logged_once_then_summarised(daemon, caplog):
    d, _ = daemon
    clock = d.factory.clock
    caplog.set_level(logging.INFO)
    for _ in range(5):
        d.factory.run_round()
        clock.advance(1)
    failures = [r.getMessage() for r in caplog.records if "creation of a beta VM failed" in r.getMessage()]
    assert len(failures) == 1 and "(repeated " not in failures[0]
    assert d.factory.creation_failures["beta"]["count"] >= 5
    caplog.clear()
    clock.advance(REPEAT_INTERVAL_SECONDS)
    d.factory.run_round()
    failures = [r.getMessage() for r in caplog.records if "creation of a beta VM failed" in r.getMessage()]
    assert len(failures) == 1 and "(repeated " in failures[0] and "more times in the last 10 minutes)" in failures[0]
    # the decision never claims every processor is in use while the failed ones are free
    assert not any("all 4 processors in use" in r.getMessage() for r in caplog.records)


def test_a_rejected_configuration_is_logged_once_and_its_fix_is_acknowledged(daemon, caplog):
    d, conf = daemon
    original = open(conf).read()
    caplog.set_level(logging.DEBUG)
    with open(conf, "a") as f:
        f.write("\n[machinetype gamma]\ntarget_share = lots\n")
    d.factory.run_round()
    d.factory.run_round()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "target_share" in r.getMessage()]
    assert len(errors) == 1 and errors[0].startswith("configuration rejected, keeping the last good one: ")
    caplog.clear()
    with open(conf, "w") as f:
        f.write(original + "\n# fixed\n")
    d.factory.run_round()
    assert any(r.getMessage().startswith("configuration accepted: the rejected edit was fixed")
               for r in caplog.records)


def test_sighup_is_acknowledged_in_the_log(daemon, caplog):
    d, _ = daemon
    caplog.set_level(logging.INFO)
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        d.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGHUP)
        assert d.factory.wake.wait(scaled(10)), "SIGHUP did not wake the engine"
        d.factory.run_round()
        d._after_round()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIGHUP")]
    assert len(lines) == 1 and "configuration re-read" in lines[0] and "accepted at" in lines[0]


def test_syslog_gets_priorities_and_whole_messages_on_a_unix_datagram_socket(tmp_path):
    path = str(tmp_path / "dev-log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(scaled(10))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", log_to="syslog", syslog_address=path)
        long_word = "NameResolutionError(" + "x" * 3000 + ")"
        logging.getLogger("vacfactory.test").error("lookup failed: %s", long_word)
        logging.getLogger("vacfactory.test").warning("a warning")
        logging.getLogger("vacfactory.test").debug("below the level")
        first = receiver.recv(65536).decode()
        second = receiver.recv(65536).decode()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
        receiver.close()
    # facility daemon (3): err = 3*8+3 = <27>, warning = <28>
    assert first.startswith(f"<27>vacfactory[{os.getpid()}]: ERROR vacfactory.test: lookup failed: ")
    assert long_word in first  # never cut mid-word
    assert second.startswith("<28>") and "a warning" in second


def test_repeat_summariser_logs_first_then_once_per_interval_with_a_count():
    now = [0.0]
    repeats = RepeatSummariser(interval=600, clock=lambda: now[0], max_keys=2)
    assert repeats.due("a") == 0
    for _ in range(3):
        now[0] += 10
        assert repeats.due("a") is None
    now[0] += 600
    assert repeats.due("a") == 3 and repeats.suffix(3) == " (repeated 3 more times in the last 10 minutes)"
    repeats.forget("a")
    assert repeats.due("a") == 0  # the condition ended: the next one is news
    assert repeats.due("b") == 0 and repeats.due("c") == 0
    assert repeats.due("a") == 0  # only max_keys remembered: "a" was forgotten first


def test_check_warns_while_draining_and_past_shutdown_time(daemon, capsys):
    d, conf = daemon
    d.factory.run_round()
    assert main(["check", "-c", conf]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("VACFACTORY OK - ")
    assert main(["drain", "-c", conf]) == 0
    capsys.readouterr()
    assert main(["check", "-c", conf]) == 1
    assert capsys.readouterr().out.startswith("VACFACTORY WARNING - draining: no new VMs are started (")
    assert main(["drain", "-c", conf, "--now"]) == 0
    capsys.readouterr()
    assert main(["check", "-c", conf, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"] == [
        {"state": "WARNING", "message": "past shutdown_time: no VMs are started"}]


def test_long_error_texts_are_shortened_between_words_never_inside_one():
    from vacfactory.errors import shorten

    text = ('Max retries exceeded (Caused by NameResolutionError("<urllib3.connection.HTTPSConnection '
            'object at 0x7f>: Failed to resolve pipes.example.org"))')
    short = shorten(text, 80)
    assert len(short) <= 2 * 80 + 6 and short.endswith(" [...]") and "HTTPSConnection [...]" in short
    assert text.startswith(short[:-len(" [...]")]) and text[len(short) - len(" [...]")] == " "
    assert shorten("a\nb  c", 80) == "a b c"  # one line
    assert shorten("x" * 500, 100) == "x" * 100 + " [...]"  # one word longer than twice the limit
