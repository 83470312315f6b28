"""A mixed space: a vacfactory factory and a Vac 03.01 factory, each in its network namespace.

Issue 12 item 8: Vac's own client got 12 of 14 machinetypes and 18 of 24 slots of a vacfactory
factory (the responder cut answers to 10x the query's size). Here:

=====  ============================  ==========================================================
host   name                          runs
=====  ============================  ==========================================================
h1     vf.<space>                    ``vacfactory run`` (test:///default libvirt): 128 slots,
                                     40 machinetypes (x, y, z with share 1, the rest share 0)
h2     vac.<space>                   a Vac responder (tests/system/vacpeer.py) with 40
                                     machinetypes, and Vac's client when a test runs it
=====  ============================  ==========================================================

Both list each other in ``factories``; names resolve through per-namespace ``/etc/hosts``.
What is shown:

- Vac's client (1024-byte reads, 6 re-sends with one cookie, its acceptance rules) gets all 128
  slots and all 40 machinetypes of the vacfactory factory for one query, every datagram whole;
- the vacfactory factory reads all 40 replies of the Vac factory and counts them in its
  decisions: Vac's replies for x (a huge running HS06) and y (an abort just now, with
  ``backoff_seconds`` of an hour) come *last* of the 40, where a cut or partial read would
  miss them, and the factory starts only z VMs; ``vacfactory machinetypes`` and ``machines``
  list every reply of the Vac factory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.system.netns import NetnsLab, ready_lab
from tests.waiting import scaled

pytestmark = pytest.mark.system

PREFIX = "vfmix"
SUBNET = "10.199.54"
SPACE = "vfmix.example.org"
PORT = 19997
VF = f"vf.{SPACE}"
VAC = f"vac.{SPACE}"
VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
SLOTS = 128
VAC_SLOTS = 24
OTHER_MACHINETYPES = tuple(f"mt{i:02d}" for i in range(37))  # + x, y, z = 40


def vac_machinetypes(now: float) -> list:
    """The Vac factory's 40 machinetype_status bodies: 38 idle ones first, x and y last."""
    idle = [{"machinetype": f"idle{i:02d}"} for i in range(38)]
    return idle + [
        {"machinetype": "x", "running_hs06": 100000.0, "running_machines": 100,
         "running_cpus": 10000.0, "running_processors": 10000.0},
        {"machinetype": "y", "shutdown_message": "300 No more work", "shutdown_time": int(now),
         "shutdown_machine": f"vac-00.{SPACE}"},
    ]


class Mixed:
    """The lab, the vacfactory daemon on h1 and the Vac responder on h2."""

    def __init__(self, lab: NetnsLab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.daemon: Optional[subprocess.Popen] = None
        self.vac: Optional[subprocess.Popen] = None

    @property
    def config(self) -> Path:
        return self.root / "vacfactory.conf"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def write_config(self) -> None:
        kernel = self.root / "vmlinux"
        kernel.write_bytes(b"not a kernel: the test driver boots nothing")
        lines = [
            "[settings]", f"vac_space = {SPACE}", f"factory_name = {VF}",
            f"factories = {VF} {VAC}", f"state_dir = {self.state}",
            "libvirt_uri = test:///default", "domain_type = test",
            f"total_processors = {SLOTS}", "hs06_per_processor = 10", "mb_per_processor = 16",
            "overload_per_processor = 1000",  # this shared machine's load must not veto
            "cycle_seconds = 1", f"udp_port = {PORT}", "udp_timeout_seconds = 3",
            "max_starting_processors = 8", "starting_seconds = 1", "version_logger = 0",
        ]
        for name, share in [("x", 1), ("y", 1), ("z", 1)] + [(n, 0) for n in OTHER_MACHINETYPES]:
            lines += ["", f"[machinetype {name}]", f"target_share = {share}",
                      "machine_model = vm-raw", f"kernel_image = {kernel}",
                      "max_wallclock_seconds = 3600", "fizzle_seconds = 5",
                      "backoff_seconds = 3600"]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        h1, h2 = self.lab.hosts
        self.lab.hosts_file({VF: h1.ip, VAC: h2.ip})
        self.vac = h2.spawn_python(
            ["-m", "tests.system.vacpeer", "serve", "--bind", h2.ip, "--port", str(PORT),
             "--space", SPACE, "--name", VAC, "--slots", str(VAC_SLOTS),
             "--machinetypes", json.dumps(vac_machinetypes(time.time()))])
        assert self.vac.stdout is not None
        line = self.vac.stdout.readline()
        assert line.strip() == "ready", f"Vac responder: {line!r}"
        self.write_config()
        log = open(self.root / "daemon.log", "ab")
        self.daemon = h1.popen([VACFACTORY, "--config", str(self.config), "run",
                                "--log-file", str(self.root / "daemon.log")],
                               stdout=log, stderr=subprocess.STDOUT, text=False)
        log.close()

    def status(self) -> Optional[dict]:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def log_tail(self) -> str:
        try:
            return "\n".join((self.root / "daemon.log").read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""

    def wait(self, predicate, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + scaled(timeout)
        while True:
            value = predicate()
            if value:
                return value
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                pytest.fail(f"the vacfactory daemon exited ({self.daemon.returncode}):\n"
                            f"{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Iterator[Mixed]:
    lab = ready_lab(2, prefix=PREFIX, subnet=SUBNET)
    group = Mixed(lab, tmp_path_factory.mktemp("mixed"))
    try:
        group.start()
        group.wait(lambda: group.status(), "the vacfactory daemon's first round")
        yield group
    finally:
        lab.teardown()  # kills the daemon and the Vac responder (their own pids)


def vac_client(mixed: Mixed, message_type: str) -> dict:
    """Vac's client on h2, asking the vacfactory factory on h1."""
    result = mixed.lab.hosts[1].run(
        [sys.executable, "-m", "tests.system.vacpeer", "query", "--factories", VF,
         "--type", message_type, "--space", SPACE, "--port", str(PORT), "--timeout", "3"],
        timeout=90)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_vacs_client_gets_every_slot_and_machinetype_of_a_vacfactory_factory(mixed):
    machines = vac_client(mixed, "machines_query")
    answer = machines["answers"][VF]
    assert answer["count"] == SLOTS and len(answer["items"]) == SLOTS
    assert machines["bad_json"] == 0 and machines["refused"] == 0
    assert machines["longest"] <= 1024  # every datagram whole in Vac's 1024-byte read
    assert all(215 <= size <= 260 for size in machines["query_sizes"])
    assert len(machines["query_sizes"]) == 1  # complete after one query: no re-send needed
    running = [m for m in answer["items"].values() if m["state"] in ("Running", "Starting")]
    empty = [m for m in answer["items"].values() if m["uuid"] is None]
    assert all(m["machine_model"] == "vm-raw" and m["num_processors"] == 1 for m in running)
    assert all(m["num_processors"] == 0 and m["hs06"] == 0.0 for m in empty)

    types = vac_client(mixed, "machinetypes_query")
    answer = types["answers"][VF]
    assert answer["count"] == 40
    assert sorted(answer["items"]) == sorted(("x", "y", "z") + OTHER_MACHINETYPES)
    assert types["bad_json"] == 0 and types["longest"] <= 1024
    assert len(types["query_sizes"]) == 1


def test_a_vacfactory_factory_counts_every_reply_of_a_vac_factory_in_its_shares(mixed):
    """x is far over its share in the space and y backs off after Vac's abort: only z starts.
    Both facts are in the last two of the Vac factory's 40 replies."""
    status = mixed.wait(
        lambda: (s := mixed.status()) and sum(s["processors_by_machinetype"].values()) >= 24 and s,
        "24 VMs on the vacfactory factory", timeout=90)
    by_type = {k: int(v) for k, v in status["processors_by_machinetype"].items() if int(v)}
    assert set(by_type) == {"z"}, by_type
    log = (mixed.root / "daemon.log").read_text(errors="replace")
    assert f"no answer from {VAC}" not in log


def test_vacfactory_commands_list_every_reply_of_the_vac_factory(mixed):
    h1 = mixed.lab.hosts[0]
    result = h1.run([VACFACTORY, "--config", str(mixed.config), "machinetypes", "-J", VAC],
                    timeout=60)
    assert result.returncode == 0, result.stderr
    replies = json.loads(result.stdout)
    assert len(replies) == 40 and {r["factory"] for r in replies} == {VAC}
    result = h1.run([VACFACTORY, "--config", str(mixed.config), "machines", VAC], timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == VAC_SLOTS and all("Shut down" in line and " VM" in line for line in lines)
    result = h1.run([VACFACTORY, "--config", str(mixed.config), "machinetype", "y", VAC],
                    timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["vac", "0", "0.0"]
    assert result.stdout.rstrip().endswith('"300 No more work"')
