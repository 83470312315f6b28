"""cli/space.py: ``vacfactory machinetypes|factories|machines -a|FACTORY|simulate``, end to end
against responders on loopback, plus Vac's line formats."""

from __future__ import annotations

import json
import socket
from typing import Dict, Iterator, List

import pytest

from vacfactory.cli import space as cli_space
from vacfactory.cli.main import main
from vacfactory.space.protocol import DAEMON_VERSION, Query, QueryType, decode, replies_for
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import (
    FactorySnapshot,
    FactoryStatus,
    MachineStatus,
    MachinetypeStatus,
)
from vacfactory.state.machines import MachineStore

SPACE = "vac01.example.ac.uk"
NOW = 1_700_000_000.0


def snapshot(name: str) -> FactorySnapshot:
    return FactorySnapshot(
        space=SPACE, factory=name,
        machines=(
            MachineStatus(machine=f"{name}-00", state="Running", uuid="u1", machinetype="atlas",
                          machine_model="cernvm3", created_time=NOW - 7300, started_time=NOW - 7200,
                          heartbeat_time=NOW, num_processors=2, cpu_seconds=7200,
                          cpu_percentage=88.0, hs06=20.0),
            MachineStatus(machine=f"{name}-01", state="Shut down", num_processors=1,
                          machine_model="vm-raw", shutdown_message="300 No more work available from task queue"),
        ),
        machinetypes=(
            MachinetypeStatus(machinetype="atlas", running_hs06=20.0, running_machines=1,
                              running_processors=2, shutdown_message="300 No more work",
                              shutdown_time=NOW - 60),
            MachinetypeStatus(machinetype="lhcb"),
        ),
        factory_status=FactoryStatus(running_processors=2, max_processors=8, running_machines=1,
                                     max_machines=8, load_average=1.25,
                                     root_disk_avail_kb=1000, daemon_disk_avail_kb=2000,
                                     mem_used_kb=300, mem_total_kb=4000),
    )


def one_reply(query_type: QueryType, name: str = "f1.example.ac.uk", index: int = 0):
    data = replies_for(Query(query_type, SPACE, "c"), snapshot(name), NOW)[index]
    return decode(data, peer="p")


# -- line formats ----------------------------------------------------------------------------


def test_machine_lines_follow_vac_machines():
    running = cli_space.machine_line(one_reply(QueryType.MACHINES, index=0), NOW)
    assert running.split() == ["f1", "atlas", "Running", "2", "VM", "2.00", "hrs", "50%", "88%"]
    down = cli_space.machine_line(one_reply(QueryType.MACHINES, index=1), NOW)
    assert down.startswith("f1 ")  # short name = up to the first dot
    assert down.endswith('Shut down  1 VM "300 No more work av"')
    assert "----------" in down


def test_machinetype_and_factory_lines():
    line = cli_space.machinetype_line(one_reply(QueryType.MACHINETYPES), NOW)
    assert line.split()[:4] == ["f1", "atlas", "1", "20.0"]
    assert line.endswith('"300 No more work"')
    factory = cli_space.factory_line(one_reply(QueryType.FACTORY), NOW)
    assert factory.split()[:7] == ["f1", "2/8", "1/8", "1.25", "1000", "2000", "300/"]
    assert factory.endswith(f' "{DAEMON_VERSION}"')


def machinetype_reply(efficiency):
    """A machinetype_status reply, through the wire format, with this last-day efficiency."""
    base = snapshot("f1.example.ac.uk")
    status = MachinetypeStatus(machinetype="atlas", running_hs06=20.0, running_machines=1,
                               running_processors=2, cpu_efficiency_1d=efficiency)
    one = FactorySnapshot(space=SPACE, factory=base.factory, machinetypes=(status,),
                          factory_status=base.factory_status)
    return decode(replies_for(Query(QueryType.MACHINETYPES, SPACE, "c"), one, NOW)[0], peer="p")


def test_machinetype_line_shows_the_efficiency_as_a_percentage_or_a_dash():
    assert cli_space.machinetype_line(machinetype_reply(0.875), NOW).split()[4] == "88%"
    assert cli_space.machinetype_line(machinetype_reply(0.0), NOW).split()[4] == "0%"
    assert cli_space.machinetype_line(machinetype_reply(1.0), NOW).split()[4] == "100%"
    unknown = cli_space.machinetype_line(machinetype_reply(None), NOW)
    assert unknown.split()[4] == "-"
    # the column keeps its width, so the columns after it line up with and without a value
    known = cli_space.machinetype_line(machinetype_reply(0.5), NOW)
    assert len(known) == len(unknown)


def test_peer_supplied_text_cannot_reach_the_terminal_raw():
    reply = one_reply(QueryType.MACHINETYPES)
    hostile = reply.status.__class__(machinetype="atlas", shutdown_message="\x1b[2Jowned\n")
    line = cli_space.machinetype_line(reply.__class__(**{**reply.__dict__, "status": hostile}),
                                      NOW)
    assert "\x1b" not in line and "\n" not in line and "?[2Jowned?" in line


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture
def factories() -> Iterator[Dict[str, object]]:
    """Two responders on 127.0.0.2 and .3 named by their addresses (no DNS needed)."""
    responders: List[Responder] = []
    port = 0
    for address in ("127.0.0.2", "127.0.0.3"):
        responder = Responder((address, port), lambda a=address: snapshot(a), SPACE,
                              lambda: {"127.0.0.1"})
        responder.start()
        port = responder.address[1]
        responders.append(responder)
    yield {"port": port, "responders": responders}
    for responder in responders:
        responder.stop()


def write_config(tmp_path, port: int, factories: str, extra: str = "") -> str:
    path = tmp_path / "vacfactory.conf"
    path.write_text(f"""[settings]
vac_space = {SPACE}
factory_name = here.example.ac.uk
factories = {factories}
udp_port = {port}
udp_timeout_seconds = 1.0
{extra}
[machinetype atlas]
target_share = 1
root_image = /tmp/none.img
""")
    return str(path)


def test_machinetypes_over_the_network(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    assert main(["--config", config, "machinetypes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["127.0.0.2", "atlas"], ["127.0.0.2", "lhcb"],
        ["127.0.0.3", "atlas"], ["127.0.0.3", "lhcb"]]


def test_factories_json_is_an_array_of_the_raw_replies(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    assert main(["--config", config, "factories", "--json"]) == 0
    replies = json.loads(capsys.readouterr().out)
    assert [r["factory"] for r in replies] == ["127.0.0.2", "127.0.0.3"]
    assert all(r["message_type"] == "factory_status" and r["total_cpus"] == 8 for r in replies)


def test_named_factories_only_and_missing_ones_are_reported(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    code = main(["--config", config, "factories", "-t", "0.5", "127.0.0.3", "127.0.0.9"])
    out = capsys.readouterr()
    assert code == 1
    assert len(out.out.splitlines()) == 1
    assert "127.0.0.9" in out.err and "127.0.0.3" not in out.err
    assert main(["--config", config, "factories", "-t", "0.3", "127.0.0.9"]) == 69


def test_machines_with_factory_names_asks_over_the_network(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2")
    assert main(["--config", config, "machines", "127.0.0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "Running" in lines[0] and "Shut down" in lines[1]


def test_machines_ask_space_asks_every_configured_factory(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    assert main(["--config", config, "machines", "-a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # one line per slot of each factory (Vac's lines name the machine, not the factory)
    assert ["Running" in line for line in lines] == [True, False, True, False]
    assert ["Shut down" in line for line in lines] == [False, True, False, True]
    assert main(["--config", config, "machines", "--ask-space", "--json"]) == 0
    replies = json.loads(capsys.readouterr().out)
    assert [r["factory"] for r in replies] == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]


def test_machines_ask_space_names_the_factories_that_did_not_answer(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.9")
    assert main(["--config", config, "machines", "-a", "-t", "0.5"]) == 1
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 2
    assert "127.0.0.9" in out.err and "127.0.0.2" not in out.err
    assert main(["--config", config, "machines", "-a", "-t", "0.5", "--json"]) == 1
    assert {r["factory"] for r in json.loads(capsys.readouterr().out)} == {"127.0.0.2"}


def test_machines_ask_space_takes_the_space_from_the_command_line(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    text = open(config).read().replace(f"vac_space = {SPACE}", "vac_space = other.example.org")
    open(config, "w").write(text)
    assert main(["--config", config, "machines", "-a", "-t", "0.3"]) == 69
    capsys.readouterr()
    assert main(["--config", config, "machines", "-a", "-s", SPACE]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_machines_factory_json_is_an_array_of_the_raw_machine_status_replies(
        tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2")
    assert main(["--config", config, "machines", "127.0.0.3", "--json"]) == 0
    replies = json.loads(capsys.readouterr().out)
    assert isinstance(replies, list) and len(replies) == 2
    assert all(isinstance(r, dict) for r in replies)
    assert {r["message_type"] for r in replies} == {"machine_status"}
    assert {r["factory"] for r in replies} == {"127.0.0.3"}
    assert {r["space"] for r in replies} == {SPACE}
    assert {r["vacquery_version"] for r in replies} == {"VacQuery 01.03"}
    assert {r["num_machines"] for r in replies} == {2}
    running, down = replies
    assert (running["machine"], running["state"], running["machinetype"]) == (
        "127.0.0.3-00", "Running", "atlas")
    assert (running["uuid"], running["num_processors"], running["cpu_seconds"], running["hs06"]) == (
        "u1", 2, 7200, 20.0)
    assert (running["started_time"], running["heartbeat_time"]) == (NOW - 7200, NOW)
    assert (down["machine"], down["state"]) == ("127.0.0.3-01", "Shut down")
    assert down["shutdown_message"] == "300 No more work available from task queue"


def test_machines_without_a_or_names_stays_local_while_the_space_answers(tmp_path, capsys,
                                                                          factories):
    state = tmp_path / "state"
    MachineStore(str(state))  # an empty state directory, as a factory that has run leaves it
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3",
                          extra=f"state_dir = {state}\ntotal_processors = 2\n")
    assert main(["--config", config, "machines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["slot 00         ----------             Shut down",
                          "slot 01         ----------             Shut down"]
    assert main(["--config", config, "machines", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"slot": 0, "state": "Shut down", "name": None}, {"slot": 1, "state": "Shut down", "name": None}]


def test_machines_all_is_local_only(tmp_path, capsys):
    config = write_config(tmp_path, 995, "127.0.0.2")
    assert main(["--config", config, "machines", "-a", "--all"]) == 2
    assert "--all" in capsys.readouterr().err
    assert main(["--config", config, "machines", "--all", "127.0.0.2"]) == 2


def test_machines_network_form_takes_the_space_from_the_command_line(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2")
    text = open(config).read().replace(f"vac_space = {SPACE}", "vac_space = other.example.org")
    open(config, "w").write(text)
    # the configured space is not theirs: nobody answers ...
    assert main(["--config", config, "machines", "-t", "0.3", "127.0.0.3"]) == 69
    capsys.readouterr()
    # ... until -s names it
    assert main(["--config", config, "machines", "-s", SPACE, "127.0.0.3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_machines_without_factory_names_is_local_and_refuses_network_options(tmp_path, capsys):
    config = write_config(tmp_path, 995, "127.0.0.2")
    assert main(["--config", config, "machines", "-s", SPACE]) == 2
    err = capsys.readouterr().err
    assert "name the FACTORY" in err and "use -a" in err and "local state" in err
    with pytest.raises(SystemExit):
        main(["machines", "--help"])
    assert "local state" in capsys.readouterr().out


def test_a_space_key_in_the_configuration_signs_queries(tmp_path, capsys):
    key_file = tmp_path / "space.key"
    key_file.write_text("s3cret\n")
    keyed = Responder(("127.0.0.4", 0), lambda: snapshot("127.0.0.4"), SPACE,
                      lambda: {"127.0.0.1"}, space_key=b"s3cret")
    keyed.start()
    port = keyed.address[1]
    open_one = Responder(("127.0.0.5", port), lambda: snapshot("127.0.0.5"), SPACE,
                         lambda: {"127.0.0.1"})
    open_one.start()
    try:
        config = write_config(tmp_path, port, "127.0.0.4 127.0.0.5",
                              extra=f"space_key_file = {key_file}\n")
        code = main(["--config", config, "factories", "-t", "0.5"])
    finally:
        keyed.stop()
        open_one.stop()
    out = capsys.readouterr()
    assert code == 1
    assert out.out.startswith("127.0.0.4") and len(out.out.splitlines()) == 1
    assert "127.0.0.5" in out.err  # its unsigned replies do not count


def test_simulate_prints_the_share_table(capsys):
    assert main(["simulate", "--factories", "6", "--processors", "4", "--hours", "2",
                 "--warmup-hours", "0.5", "--shares", "3:1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["machinetype", "share"]
    assert "alpha" in out and "beta" in out and "max deviation" in out


def test_simulate_rejects_nonsense(capsys):
    assert main(["simulate", "--shares", "0:1"]) == 2
    assert main(["simulate", "--loss", "1.5"]) == 2


# -- vac machinetype NAME, -J, and what a user sees when nobody answers ---------------------------


def test_machinetype_name_filters_like_vac_machinetype(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    assert main(["--config", config, "machinetype", "atlas"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # one line per factory, Vac's columns: factory, running, HS06, when, "message"
    assert [line.split()[:3] for line in lines] == [["127.0.0.2", "1", "20.0"],
                                                   ["127.0.0.3", "1", "20.0"]]
    assert all(line.endswith('"300 No more work"') for line in lines)
    # a machinetype with no message prints Vac's "-"; names are matched in lower case
    assert main(["--config", config, "machinetype", "LHCb", "127.0.0.3"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split() == ["127.0.0.3", "0", "0.0", "-", "-"]


def test_machinetype_name_that_no_factory_has_says_so(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2 127.0.0.3")
    assert main(["--config", config, "machinetype", "cms"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert "no machinetype cms at: 127.0.0.2, 127.0.0.3" in out.err


def test_capital_j_is_vacs_json_flag_on_every_network_verb(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2")
    for argv in (["factories", "-J"], ["machinetypes", "-J"], ["machinetype", "atlas", "-J"],
                 ["machines", "-a", "-J"]):
        assert main(["--config", config, *argv]) == 0, argv
        replies = json.loads(capsys.readouterr().out)
        assert replies and all(r["factory"] == "127.0.0.2" for r in replies), argv
    assert [r["machinetype"] for r in replies if "machinetype" in r and r["machinetype"]] == ["atlas"]


def test_no_answer_ends_with_the_likely_causes(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.9")
    assert main(["--config", config, "machinetypes", "-t", "0.3"]) == 69
    err = capsys.readouterr().err
    assert "no answer within 0.3 s from: 127.0.0.9" in err
    assert f"UDP port {factories['port']}" in err and "daemon" in err
    assert "`factories` list name this host" in err and "vac_space" in err


def test_an_unresolvable_name_says_it_does_not_resolve(tmp_path, capsys, factories):
    config = write_config(tmp_path, factories["port"], "127.0.0.2")
    code = main(["--config", config, "factories", "-t", "2", "nosuch.invalid"])
    err = capsys.readouterr().err
    assert code == cli_space.EXIT_NOHOST == 68
    assert "nosuch.invalid: the name does not resolve" in err
    assert "no answer within 0.0 s" not in err
    # with a factory that answers, the unresolvable one is named and the exit code is 1
    assert main(["--config", config, "factories", "-t", "2", "nosuch.invalid", "127.0.0.2"]) == 1
    assert "nosuch.invalid: the name does not resolve" in capsys.readouterr().err


def test_replies_refused_for_another_name_are_hinted(tmp_path, capsys):
    """A factory answering under another name than asked (Vac answers as its uname)."""
    impostor = Responder(("127.0.0.6", 0), lambda: snapshot("other-name.example.ac.uk"), SPACE,
                         lambda: {"127.0.0.1"})
    impostor.start()
    try:
        config = write_config(tmp_path, impostor.address[1], "127.0.0.6")
        assert main(["--config", config, "factories", "-t", "0.4"]) == 69
    finally:
        impostor.stop()
    err = capsys.readouterr().err
    assert "refused: a factory answering under another name" in err


def test_on_a_terminal_it_says_what_it_waits_for(tmp_path, factories):
    """stderr on a pty: the question, the factories and the deadline come first."""
    import os
    import pty
    import subprocess
    import sys

    config = write_config(tmp_path, factories["port"], "127.0.0.9")
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vacfactory.cli.main", "--config", config, "machinetypes",
             "-t", "0.3"], stdout=subprocess.PIPE, stderr=slave, timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        os.close(slave)
        slave = -1
        err = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed and everything was read
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = err.decode()
    assert proc.returncode == 69
    first = text.splitlines()[0]
    assert first.startswith(f"asking 1 factory of space {SPACE} (127.0.0.9) for machinetypes")
    assert "waiting up to 0.3 s" in first
    assert "no answer within" in text and "daemon" in text


def test_no_answer_from_this_factory_asks_whether_its_daemon_runs(tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port nobody serves
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, port, ".")
    assert main(["--config", config, "factories", "-t", "0.3"]) == 69
    err = capsys.readouterr().err
    assert "no answer within 0.3 s from: here.example.ac.uk" in err
    assert "here.example.ac.uk is this factory: is the vacfactory daemon running here" in err
