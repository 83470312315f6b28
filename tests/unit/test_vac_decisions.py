"""The engine decides as Vac 03.01 does (issue 12): backoff from the newest-created finished
VM, every code >= 300 an abort, no memory cap unless the admin sets one, the factory named by
uname(2). Real configuration files, state directory and libvirt test driver; only the clock
is moved by hand (tests/unit/engine_harness.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from tests.unit.engine_harness import kernel_file, machinetype_text, make_harness, settings_text
from tests.unit.test_vmbuild import read_iso, ssh_public_key
from vacfactory.config.hostfacts import HostFacts
from vacfactory.engine.hoststatus import HostStatus
from vacfactory.engine.snapshot import build_snapshot

_names = itertools.count(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def engine(tmp_path):
    """engine(total, settings='', mt_extra='', host=HOST) -> a started Harness with one
    machinetype alpha (fizzle_seconds 60, backoff_seconds 300)."""
    made = []

    def build(total=2, settings="", mt_extra="", **kwargs):
        name = f"v{os.getpid()}n{next(_names)}.example.org"
        text = _replacing(settings_text(name, str(tmp_path / "state"), total, ""), settings)
        text += machinetype_text("alpha", kernel_file(str(tmp_path)), 1, mt_extra)
        harness = make_harness(str(tmp_path), text, name=name, **kwargs)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.teardown()


def _replacing(text: str, settings: str) -> str:
    """``text`` with each ``key = value`` line of ``settings`` replacing the line of that key."""
    keys = {line.split("=", 1)[0].strip() for line in settings.splitlines() if "=" in line}
    kept = [line for line in text.splitlines() if line.split("=", 1)[0].strip() not in keys]
    return "\n".join(kept) + "\n" + settings


def _finishes_record(h) -> dict:
    with open(os.path.join(h.state_dir, "finishes", "alpha.json")) as f:
        return json.load(f)


def _machinetype_status(h):
    now = h.clock()
    factory = h.factory
    snapshot = build_snapshot(factory.config, factory.machines, factory.own_states(now),
                              factory.last_finishes, HostStatus(), now, now, False)
    (status,) = snapshot.machinetypes
    return status


# -- 1. root_public_key: no key never means no VM ------------------------------------------

def test_vac_example_root_key_path_missing_creates_vms_without_a_key_and_says_so_once(engine, tmp_path, caplog):
    missing = str(tmp_path / "root" / ".ssh" / "id_rsa.pub")   # example.vac.conf's, on a host without it
    h = engine(total=2, settings=f"root_public_key = {missing}\n", mt_extra="config_drive = true")
    assert len(h.factory.run_round().created) == 2
    h.clock.advance(600)
    h.power_off(h.live()[0], "200 Success")
    assert len(h.factory.run_round().created) == 1
    for vm in h.live():
        on_drive = json.loads(read_iso(os.path.join(vm.disks_dir, "config.iso"), "meta_data.json"))
        assert on_drive["public_keys"] == {}
    said = [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("no ssh access")]
    assert said == [f"no ssh access: cannot read {missing}: no such file "
                    f"(root_public_key from {h.config_path}:{_line_of(h, 'root_public_key')})"]


def test_every_key_of_an_authorized_keys_file_reaches_the_config_drive(engine, tmp_path):
    keys = [ssh_public_key("alice"), 'from="10.0.0.0/8" ' + ssh_public_key("bob")]
    path = tmp_path / "authorized_keys"
    path.write_text(f"# site admins\n{keys[0]}\nnot a key\n\n{keys[1]}\n")
    h = engine(total=1, settings=f"root_public_key = {path}\n", mt_extra="config_drive = true")
    assert len(h.factory.run_round().created) == 1
    (vm,) = h.live()
    on_drive = json.loads(read_iso(os.path.join(vm.disks_dir, "config.iso"), "meta_data.json"))
    assert on_drive["public_keys"] == {"vacfactory": "\n".join(keys)}


def _line_of(h, option: str) -> int:
    with open(h.config_path) as f:
        return next(n for n, line in enumerate(f, 1) if line.startswith(option + " "))


# -- 6. backoff: the newest-created finished VM counts -----------------------------------------

def test_an_older_vm_ending_in_success_does_not_lift_the_backoff_of_a_newer_abort(engine):
    h = engine(total=2)
    h.factory.run_round()
    old, first = sorted(h.live(), key=lambda m: m.name)
    h.clock.advance(100)
    h.power_off(first, "200 Success")
    (new_name,) = h.factory.run_round().created
    (new,) = [m for m in h.live() if m.name == new_name]
    assert new.record.created > old.record.created

    h.clock.advance(600)
    h.power_off(new, "300 No more work")
    assert h.factory.run_round().created == []          # backoff starts
    abort_time = h.factory.machines[new.uuid].finished.end_time
    h.clock.advance(10)
    h.power_off(old, "200 Success")                     # ends last, but was created first
    report = h.factory.run_round()
    assert old.name in report.finished and report.created == []
    assert _finishes_record(h)["uuid"] == new.uuid
    assert _finishes_record(h)["created"] == new.record.created

    # VacQuery machinetype_status keeps Vac's meaning: the newest-created finished VM
    status = _machinetype_status(h)
    assert (status.shutdown_message, status.shutdown_time, status.shutdown_machine) == \
        ("300 No more work", abort_time, new.name)

    # a restart keeps it (finishes/alpha.json), and the backoff runs until abort + 300 s
    h = h.restart()
    h.clock.now = abort_time + 299
    assert h.factory.run_round().created == []
    h.clock.now = abort_time + 301
    assert len(h.factory.run_round().created) >= 1


@pytest.mark.parametrize("message", ["800 Site-specific failure", "999 Whatever"])
def test_codes_800_to_999_are_aborts_even_with_abort_on_700_off(engine, message):
    h = engine(total=1, settings="abort_on_700 = false\n")
    h.factory.run_round()
    (vm,) = h.live()
    h.clock.advance(600)
    h.power_off(vm, message)
    report = h.factory.run_round()
    done = h.factory.machines[vm.uuid].finished
    assert (done.outcome, done.code) == ("abort", int(message[:3]))
    assert report.created == []
    assert _machinetype_status(h).shutdown_message == message


def test_a_crash_between_finished_and_the_finishes_record_is_repaired_at_start_up(engine):
    h = engine(total=2)
    h.factory.run_round()
    a, b = sorted(h.live(), key=lambda m: m.name)
    h.clock.advance(600)
    h.power_off(a, "300 No more work")
    h.factory.run_round()
    record = _finishes_record(h)
    # as if the daemon died before finishes/alpha.json was rewritten for b
    h.power_off(b, "200 Success")
    h.factory.run_round()
    path = os.path.join(h.state_dir, "finishes", "alpha.json")
    expected = _finishes_record(h)
    with open(path, "w") as f:
        json.dump(record, f)
    h = h.restart()
    assert _finishes_record(h) == expected
    assert h.factory.last_finishes["alpha"].uuid == expected["uuid"]


# -- 7. no memory cap unless the admin sets one ---------------------------------------------

BIG_HOST = HostFacts(fqdn="big.example.org", cpu_count=32, mem_total_mb=64 * 1024)


def test_memory_is_overcommitted_as_in_vac_unless_total_memory_mb_is_set(engine):
    h = engine(total=32, settings="mb_per_processor = 4096\n", host=BIG_HOST)
    assert h.factory.config.settings.total_memory_mb is None
    report = h.factory.run_round()
    assert len(report.created) == 32 and len(h.domains()) == 32
    assert {m.record.processors for m in h.live()} == {1}
    assert sum(m.record.memory_mb for m in h.live()) == 32 * 4096  # twice the host's 64 GiB


def test_total_memory_mb_set_by_the_admin_still_caps_creation(engine):
    h = engine(total=32, settings="mb_per_processor = 4096\ntotal_memory_mb = 61440\n", host=BIG_HOST)
    assert len(h.factory.run_round().created) == 15


# -- 5. the factory's name is uname(2)'s ---------------------------------------------------

NODENAME = "wn07.uname-test.example.org"


def _identity_run(tmp_dir: str) -> None:
    """In a private UTS namespace (see the test): set the host name, let an engine with no
    factory_name run one VM to its end, print what carries the name."""
    import socket

    from vacfactory.space import protocol

    socket.sethostname(NODENAME)
    facts = HostFacts.probe()
    text = settings_text("unused.example.org", os.path.join(tmp_dir, "state"), 1, "")
    text = "".join(line + "\n" for line in text.splitlines() if not line.startswith("factory_name"))
    text += machinetype_text("alpha", kernel_file(tmp_dir))
    h = make_harness(tmp_dir, text, name=NODENAME, host=facts)
    try:
        h.factory.run_round()
        (vm,) = h.live()
        h.clock.advance(600)
        h.power_off(vm, "200 Success")
        h.factory.run_round()
        with open(h.factory.machines[vm.uuid].accounted.archive) as f:
            submit_host = [line.split(": ", 1)[1] for line in f.read().splitlines()
                           if line.startswith("SubmitHost: ")]
        now = h.clock()
        snapshot = build_snapshot(h.factory.config, h.factory.machines, h.factory.own_states(now),
                                  h.factory.last_finishes, HostStatus(), now, now, False)
        salt = protocol.make_salt(b"\x01" * 16)
        query = protocol.Query(protocol.QueryType.MACHINETYPES, snapshot.space,
                               protocol.cookie_for(salt, NODENAME))
        (datagram,) = protocol.replies_for(query, snapshot, now)
        reply = protocol.decode(datagram, peer="127.0.0.1")
        print(json.dumps({
            "uname": os.uname().nodename, "facts": facts.fqdn,
            "factory_name": h.factory.config.settings.factory_name,
            "origin": h.factory.config.origins["settings"].get("factory_name"),
            "vm_name": vm.name, "submit_host": submit_host, "reply_factory": reply.factory,
            "cookie_ok": reply.cookie == protocol.cookie_for(salt, NODENAME),
        }))
    finally:
        h.teardown()


def test_factory_name_defaults_to_the_uname_nodename_everywhere(tmp_path):
    # unshare(1) gives the child its own host name; this process's stays as it was
    script = f"from tests.unit.test_vac_decisions import _identity_run; _identity_run({str(tmp_path)!r})"
    done = subprocess.run(["unshare", "--uts", "--", sys.executable, "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["uname"] == seen["facts"] == seen["factory_name"] == NODENAME
    assert seen["origin"] == "default"
    assert seen["vm_name"] == "wn07-00.uname-test.example.org"
    assert seen["submit_host"] == ["space.example.org/vacfactory-" + NODENAME]
    assert seen["reply_factory"] == NODENAME and seen["cookie_ok"]


def test_host_facts_take_the_name_from_uname_not_from_dns():
    assert HostFacts.probe().fqdn == os.uname().nodename


def test_a_uname_without_a_dot_is_refused_with_the_option_to_set(tmp_path):
    from vacfactory.config.loader import load_config_string
    from vacfactory.errors import ConfigError

    text = textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        state_dir = {tmp_path}
        """)
    with pytest.raises(ConfigError) as caught:
        load_config_string(text, HostFacts(fqdn="vm", cpu_count=2, mem_total_mb=1024))
    assert "factory_name: the default (this host's name (os.uname().nodename): 'vm') is not usable" \
        in str(caught.value)
