"""Real factory daemons sharing a space over real UDP, each in its own network namespace.

Every factory is a ``vacfactory run`` process in a namespace of a :class:`NetnsLab` (veth +
bridge), on libvirt's in-process test driver (each process has its own private hypervisor, so
VMs need no qemu). Factories find each other through a per-namespace ``/etc/hosts``. Test
driver domains never end on their own, so every machinetype has a short
``max_wallclock_seconds``: the factory's wallclock kill ends each VM and the scheduler decides
again, over and over, which is what makes shares observable in about a minute.

The space (module fixture :func:`space`), one factory per host:

=====  =======  ===============  =========================================================
host   factory  machinetypes     role
=====  =======  ===============  =========================================================
h1     a        x=1, y=0         runs only x: the load the others must balance against
h2     b        x=1, y=1         balances x and y over the *space*
h3     c        x=1, y=1         balances x and y over the *space*
h4     d        y=1 only         signs with a wrong space key: must be ignored both ways
h5     e        x=1, y=1         ``factories = .``: the control, deciding alone
=====  =======  ===============  =========================================================

Every factory has 10 processors of 10 HS06. a, b, c (and d) list each other; a, b and c share
a key through ``space_key_file``. What the scheduler should reach:

- with the space view, b and c see a's 10 x VMs, so equal x and y HS06 over a+b+c (15 and
  15) needs b+c to run 5 x and **15 y**;
- a factory deciding alone (e, and b or c if the space view were not used) runs 5 x and
  5 y, which would make b+c run **10 y**;
- if d's 10 y VMs were counted, x = y over a+b+c+d (20 and 20) would also give b+c **10 y**.

So "b+c run about 15 y" holds only if the space view is used *and* the wrong-key factory is
not in it. VMs are created at most one per ``starting_seconds`` per factory
(``max_starting_processors = 1``): creations stagger, so the views factories decide on (at
most one query interval, 5 s, old) are never wrong about more than a VM or two of a peer.
With every VM of a factory created in one round (max_starting_processors = 10) all of them
also end in one round, and b and c - identical, in lockstep - refill together on the same
view and herd: measured, both flip between 0 x + 10 y and 5 x + 5 y every VM lifetime
(space: 10 x/20 y, then 20 x/10 y) for as long as the run lasts. Real VMs do not end in
lockstep; the scheduler's behaviour there is reported, not tested here.

Later tests change the space, in file order: c is killed (-9); b is killed and a fresh b
joins (it must decide its first round with the space view); a is restarted and stopped with
SIGTERM (the stop must not wait for a query round). Each of them also works alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from tests.system.netns import Host, NetnsLab, netns_problem, ready_lab
from tests.waiting import scaled, wait_for
from vacfactory.engine.spacewatch import QUERY_SECONDS, stale_after

pytestmark = pytest.mark.system

PREFIX = "vfsys"
SUBNET = "10.199.52"
SPACE = "vfsys.example.org"
PORT = 19996
VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")

PROCESSORS = 10
HS06 = 10.0
#: a VM lives this long before the factory's wallclock kill ends it
WALLCLOCK = 30
#: one VM may start per factory every STARTING_SECONDS (max_starting_processors = 1)
STARTING_SECONDS = 3.0
#: the UDP deadline of a query round. A dead (or wrong-key) peer makes every round of the
#: query thread last this long; a decision round blocked by it would show a gap this long.
UDP_TIMEOUT = 4.0
CYCLE = 1.0
#: an empty factory is full after PROCESSORS x STARTING_SECONDS; then a few rounds more
WARMUP = PROCESSORS * STARTING_SECONDS + 5.0
#: the shares are measured over one whole VM lifetime after the warm-up: every VM of the
#: space is killed and replaced by a new decision inside the window
WINDOW = float(WALLCLOCK)
#: how often the status files are read
SAMPLE_SECONDS = 0.25

#: a, b and c share this key; d has another one
RIGHT_KEY = "the space key of a, b and c"
WRONG_KEY = "not the space key"


def fqdn(label: str) -> str:
    return f"{label}.{SPACE}"


MEMBERS = tuple(fqdn(label) for label in "abcd")


@dataclass
class FactorySpec:
    """One factory daemon's configuration (what differs between the factories)."""

    label: str
    shares: Dict[str, float]
    peers: Sequence[str]
    key: Optional[str]


SPECS = (
    FactorySpec("a", {"x": 1, "y": 0}, MEMBERS, RIGHT_KEY),
    FactorySpec("b", {"x": 1, "y": 1}, MEMBERS, RIGHT_KEY),
    FactorySpec("c", {"x": 1, "y": 1}, MEMBERS, RIGHT_KEY),
    FactorySpec("d", {"y": 1}, MEMBERS, WRONG_KEY),
    FactorySpec("e", {"x": 1, "y": 1}, (".",), None),
)


@dataclass
class Daemon:
    """A ``vacfactory run`` process in one host of the lab, and its files."""

    spec: FactorySpec
    host: Host
    directory: Path
    kernel: Path
    key_file: Optional[Path]
    #: processors that may be starting at once (1: VMs start one per STARTING_SECONDS)
    max_starting: int = 1
    process: Optional[subprocess.Popen] = None

    @property
    def name(self) -> str:
        return fqdn(self.spec.label)

    @property
    def config(self) -> Path:
        return self.directory / "vacfactory.conf"

    @property
    def log(self) -> Path:
        return self.directory / "daemon.log"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def write_config(self) -> None:
        lines = [
            "[settings]",
            f"vac_space = {SPACE}",
            f"factory_name = {self.name}",
            f"factories = {' '.join(self.spec.peers)}",
            f"state_dir = {self.state}",
            "libvirt_uri = test:///default",
            "domain_type = test",
            f"total_processors = {PROCESSORS}",
            f"hs06_per_processor = {HS06:g}",
            "mb_per_processor = 64",
            "total_memory_mb = 1024",
            # the load average of this shared 2-core machine must never veto a round
            "overload_per_processor = 1000",
            f"cycle_seconds = {CYCLE:g}",
            f"udp_port = {PORT}",
            f"udp_timeout_seconds = {UDP_TIMEOUT:g}",
            f"max_starting_processors = {self.max_starting}",
            f"starting_seconds = {STARTING_SECONDS:g}",
            "version_logger = 0",
        ]
        if self.key_file is not None:
            lines.append(f"space_key_file = {self.key_file}")
        for machinetype, share in self.spec.shares.items():
            lines += [
                "",
                f"[machinetype {machinetype}]",
                f"target_share = {share:g}",
                "machine_model = vm-raw",
                f"kernel_image = {self.kernel}",
                f"max_wallclock_seconds = {WALLCLOCK}",
                "fizzle_seconds = 5",
                "backoff_seconds = 0",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = self.host.popen(
                [VACFACTORY, "--config", str(self.config), "run", "--log-file", str(self.log)],
                stdout=log, stderr=subprocess.STDOUT, text=False)

    def kill(self) -> None:
        """kill -9: no clean shutdown, no goodbye to the space."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def status(self) -> Optional[dict]:
        """The daemon's status.json (rewritten atomically after every decision round)."""
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def log_lines(self) -> List[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def created_since(self, since: float) -> List[Tuple[float, str]]:
        """(creation time, machinetype) of the VMs this factory created after ``since``, in
        order (every VM directory has a vm.json written once, before its domain starts)."""
        found = []
        for record in (self.state / "machines").glob("*/vm.json"):
            try:
                vm = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if vm.get("created", 0) > since:
                found.append((float(vm["created"]), str(vm["machinetype"])))
        return sorted(found)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``vacfactory --config <this factory's> args...`` run in this factory's namespace."""
        return self.host.run([VACFACTORY, "--config", str(self.config), *args], timeout=timeout)


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_time(line: str) -> Optional[float]:
    """The epoch time of a daemon log line (logging's asctime is local time, milliseconds)."""
    match = _LOG_TIME.match(line)
    if match is None:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


@dataclass(frozen=True)
class Sample:
    """One reading of one factory's status.json."""

    at: float  # when the test read it
    round_time: float  # when the daemon's last decision round ran
    processors: Dict[str, int]  # running processors per machinetype

    def get(self, machinetype: str) -> int:
        return self.processors.get(machinetype, 0)

    @property
    def running(self) -> int:
        return sum(self.processors.values())


#: one pass of the sampler: factory label -> its reading (a factory whose status.json could
#: not be read in that pass is missing)
Pass = Dict[str, Sample]


class Space:
    """The five daemons of the module, and a thread reading their status every 0.25 s."""

    def __init__(self, lab: NetnsLab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.daemons: Dict[str, Daemon] = {}
        self.passes: List[Tuple[float, Pass]] = []
        self.started = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="vfsys-sampler", daemon=True)
        self._steady: Optional[List[Pass]] = None

    def start(self) -> None:
        kernel = self.root / "vmlinux"
        kernel.write_bytes(b"not a kernel: the test driver boots nothing")
        keys = {}
        for key, name in ((RIGHT_KEY, "space.key"), (WRONG_KEY, "other.key")):
            keys[key] = self.root / name
            keys[key].write_text(key + "\n")
            keys[key].chmod(0o600)
        self.lab.hosts_file({fqdn(spec.label): host.ip for spec, host in zip(SPECS, self.lab.hosts)})
        for spec, host in zip(SPECS, self.lab.hosts):
            daemon = Daemon(spec, host, self.root / spec.label, kernel,
                            keys[spec.key] if spec.key else None)
            daemon.directory.mkdir()
            daemon.write_config()
            self.daemons[spec.label] = daemon
        self.started = time.time()
        for daemon in self.daemons.values():
            daemon.start()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stopping.wait(SAMPLE_SECONDS):
            reading: Pass = {}
            for label, daemon in self.daemons.items():
                status = daemon.status()
                if status is not None:
                    reading[label] = Sample(
                        time.time(), float(status["time"]),
                        {k: int(v) for k, v in status["processors_by_machinetype"].items()})
            with self._lock:
                self.passes.append((time.time(), reading))

    def between(self, start: float, end: float) -> List[Pass]:
        """The sampler's passes from ``start`` to ``end`` (epoch seconds)."""
        with self._lock:
            return [reading for at, reading in self.passes if start <= at <= end]

    def wait_until(self, when: float) -> None:
        """Sleep until ``when``, failing early if a daemon the test did not kill has died."""
        while time.time() < when:
            for daemon in self.daemons.values():
                code = daemon.process.poll() if daemon.process is not None else None
                if code is not None and code != -signal.SIGKILL:
                    tail = "\n".join(daemon.log_lines()[-20:])
                    pytest.fail(f"factory {daemon.spec.label} exited ({code}):\n{tail}")
            time.sleep(min(1.0, max(when - time.time(), 0.0)))

    def steady(self) -> List[Pass]:
        """The passes of the measurement window [WARMUP, WARMUP + WINDOW] after the start
        (waiting for its end the first time)."""
        if self._steady is None:
            start, end = self.started + WARMUP, self.started + WARMUP + WINDOW
            self.wait_until(end + SAMPLE_SECONDS)
            self._steady = [p for p in self.between(start, end) if len(p) == len(SPECS)]
            assert len(self._steady) >= WINDOW / SAMPLE_SECONDS / 2, \
                f"only {len(self._steady)} complete readings of the five status files"
        return self._steady


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Iterator[Space]:
    """The lab's five factories, started together; the lab kills them at the end.

    FAILS (never skips) when network namespaces are unavailable.
    """
    lab = ready_lab(len(SPECS), prefix=PREFIX, subnet=SUBNET)
    group = Space(lab, tmp_path_factory.mktemp("space"))
    try:
        group.start()
        yield group
    finally:
        group.stop()
        lab.teardown()


def total(passes: Sequence[Pass], labels: str, machinetype: str) -> List[int]:
    """Running processors of ``machinetype`` summed over the factories ``labels``, per pass."""
    return [sum(p[label].get(machinetype) for label in labels) for p in passes
            if all(label in p for label in labels)]


def figures(values: Sequence[float]) -> str:
    """mean/min/max, for assertion messages and the printed measurements."""
    return f"mean {statistics.mean(values):.2f}, min {min(values)}, max {max(values)}"


def unknown_reports(daemon: Daemon, pattern: str = r"space: no answer from (.*) \(counted as unknown\)"
                    ) -> List[Tuple[float, frozenset]]:
    """(time, factories) of each "space: no answer from ..." the daemon logged.

    The space watcher logs the set of silent factories whenever it changes, so the last line
    is the set it currently counts as unknown. (``pattern``: another such line, e.g. the
    factories whose last answer is still counted.)"""
    found = []
    for line in daemon.log_lines():
        match = re.search(pattern, line)
        when = log_time(line)
        if match and when is not None:
            found.append((when, frozenset(match.group(1).split(", "))))
    return found


def replying_factories(result: subprocess.CompletedProcess) -> Dict[str, dict]:
    """``machinetypes --json`` output -> factory -> {machinetype: running_processors}."""
    out: Dict[str, dict] = {}
    for reply in json.loads(result.stdout):
        out.setdefault(reply["factory"], {})[reply["machinetype"]] = reply["running_processors"]
    return out


# -- tests -----------------------------------------------------------------------------------


def test_lab_hosts_resolve_names_from_their_own_hosts_file_which_teardown_removes() -> None:
    """The name resolution the factories rely on: inside a lab host, a name of the lab's
    hosts file resolves; the real /etc/hosts is untouched; teardown leaves nothing behind."""
    problem = netns_problem(PREFIX)
    if problem is not None:
        pytest.fail(f"network namespaces unavailable: {problem}")
    real_hosts = Path("/etc/hosts").read_bytes()
    lab = NetnsLab(1, prefix=PREFIX, subnet="10.199.54")
    try:
        lab.setup()
        lab.hosts_file({"probe.vfsys.example.org": "10.199.54.77"})
        answer = lab.hosts[0].python(
            "import socket; print(socket.gethostbyname('probe.vfsys.example.org'))")
        assert answer.stdout.strip() == "10.199.54.77", answer.stderr
        assert Path("/etc/hosts").read_bytes() == real_hosts
        etc_dir = Path("/etc/netns") / lab.hosts[0].netns
        assert (etc_dir / "hosts").is_file()
    finally:
        lab.teardown()
    assert not etc_dir.exists()
    assert Path("/etc/hosts").read_bytes() == real_hosts

#: processors of x (and of y) a, b and c run between them when x and y get equal HS06
SPACE_TARGET = 3 * PROCESSORS / 2
#: y that b and c would run between them if each decided alone (or if d's y were counted)
ALONE_Y = PROCESSORS


def test_shares_converge_over_the_space(space: Space) -> None:
    """a, b and c reach equal x and y HS06 over the space: b and c run 3 y for every x.

    Tolerance. The mean over a whole VM lifetime (every VM of the space replaced by a new
    decision inside the window) must be within ±1 of 15: b and c, identical and started
    together, often decide in lockstep, and the 5 x VMs the target asks of them can then
    only be split 2+3 or 3+2 with both flipping together (14 or 16). Each reading must be
    within ±3: a factory decides on its peers' answers as they were up to one query round
    ago (a round lasts the 4 s deadline, since d never answers, plus a 1 s pause), so b and c
    can each replace a VM or two on the same outdated judgement before they see each other's
    choice; measured excursions reach ±2 for a few seconds. Deciding alone, b and c would run
    10 y (5 fewer): outside both bands.
    """
    steady = space.steady()
    x, y = total(steady, "abc", "x"), total(steady, "abc", "y")
    a_x, a_y = total(steady, "a", "x"), total(steady, "a", "y")
    near = sum(abs(v - SPACE_TARGET) <= 1 for v in x) / len(x)
    print(f"\nover the space a+b+c ({len(x)} readings in {WINDOW:.0f} s): x {figures(x)}; "
          f"y {figures(y)}; x within ±1 of {SPACE_TARGET:g} in {near:.0%}; a's x {figures(a_x)}")
    assert max(a_y) == 0, "a started y, whose share is 0 there"
    assert statistics.mean(a_x) >= PROCESSORS - 0.5, f"a is not full of x: {figures(a_x)}"
    assert abs(statistics.mean(x) - SPACE_TARGET) <= 1, f"x over a+b+c: {figures(x)}"
    assert abs(statistics.mean(y) - SPACE_TARGET) <= 1, f"y over a+b+c: {figures(y)}"
    assert all(abs(v - SPACE_TARGET) <= 3 for v in x + y), f"x {figures(x)}; y {figures(y)}"


def test_a_factory_deciding_alone_gets_its_share_but_not_the_space_share(space: Space) -> None:
    """The control: e has b's machinetypes but ``factories = .``. Alone it splits its own
    processors 1:1 (5 x, 5 y). b and c, with the same configuration, run together at least
    4 y more than two such lone factories would: what they achieve is a *space* share."""
    steady = space.steady()
    e_x, e_y = total(steady, "e", "x"), total(steady, "e", "y")
    bc_y = total(steady, "bc", "y")
    print(f"\ne alone: x {figures(e_x)}; y {figures(e_y)}; b+c y {figures(bc_y)}")
    for values in (e_x, e_y):
        assert abs(statistics.mean(values) - PROCESSORS / 2) <= 0.5, figures(values)
        assert all(abs(v - PROCESSORS / 2) <= 1 for v in values), figures(values)
    assert statistics.mean(bc_y) - 2 * statistics.mean(e_y) >= 4, \
        f"b+c y {figures(bc_y)} vs e's y {figures(e_y)}"
    assert not any("no answer" in line for line in space.daemons["e"].log_lines()), \
        "e, alone in its space, asked someone"


def test_a_factory_with_the_wrong_space_key_is_ignored_both_ways(space: Space) -> None:
    """d (y only, another key) runs 10 y all along, yet b and c still run ~15 y: counting d's
    10 y would make x = y over a+b+c+d at 20 each, i.e. only 10 y on b and c. Every keyed
    factory counts d as unknown, d counts all of them as unknown, and the command line with
    b's configuration hears a, b and c but not d (and with d's, only d itself)."""
    steady = space.steady()
    d_y, bc_y = total(steady, "d", "y"), total(steady, "bc", "y")
    print(f"\nd's y {figures(d_y)}; b+c y {figures(bc_y)}")
    assert statistics.mean(d_y) >= PROCESSORS - 0.5, f"d is not running its y VMs: {figures(d_y)}"
    assert statistics.mean(bc_y) >= SPACE_TARGET - 1, f"b+c y {figures(bc_y)}: d was counted?"

    end_of_window = space.started + WARMUP + WINDOW
    for label in "abc":
        reports = [r for r in unknown_reports(space.daemons[label]) if r[0] <= end_of_window]
        assert reports and reports[-1][1] == {fqdn("d")}, f"{label} reported {reports}"
    d_reports = unknown_reports(space.daemons["d"])
    assert d_reports and d_reports[-1][1] == {fqdn(label) for label in "abc"}, d_reports
    assert not any("every factory answered" in line for line in space.daemons["d"].log_lines())

    seen_by_b = space.daemons["b"].cli("machinetypes", "--json")
    assert seen_by_b.returncode == 1, seen_by_b.stderr  # 1: some factory did not answer
    assert set(replying_factories(seen_by_b)) == {fqdn(label) for label in "abc"}
    assert fqdn("d") in seen_by_b.stderr
    assert replying_factories(seen_by_b)[fqdn("a")]["x"] >= PROCESSORS - 1

    seen_by_d = space.daemons["d"].cli("machinetypes", "--json")
    assert set(replying_factories(seen_by_d)) == {fqdn("d")}, seen_by_d.stdout
    assert all(fqdn(label) in seen_by_d.stderr for label in "abc"), seen_by_d.stderr


def test_a_killed_factory_costs_the_others_no_round_and_is_dropped_from_their_view(
        space: Space) -> None:
    """kill -9 c. a and b go on deciding every cycle (a round never waits for the UDP
    deadline: the space is queried by another thread), refill every VM the wallclock kill
    ends, notice c's silence within one query interval plus one deadline but keep counting
    its last answer (one lost datagram must not make a factory's VMs vanish), report c
    unknown once that answer is older than the staleness window, and b - now sharing only
    with a's 10 x - turns all its processors to y within one VM lifetime after that."""
    space.steady()  # the shares were measured with c alive
    b = space.daemons["b"]
    killed_at = time.time()
    space.daemons["c"].kill()
    silence_noticed_by = killed_at + QUERY_SECONDS + UDP_TIMEOUT + 2.0
    window = stale_after(UDP_TIMEOUT)
    noticed_by = killed_at + window + QUERY_SECONDS + UDP_TIMEOUT + 2.0
    end = noticed_by + WALLCLOCK + 3.0
    space.wait_until(end)
    passes = space.between(killed_at, end)

    for label in "ab":
        daemon = space.daemons[label]
        rounds = sorted({p[label].round_time for p in passes if label in p})
        gaps = [later - earlier for earlier, later in zip(rounds, rounds[1:])]
        created = daemon.created_since(killed_at)
        assert len(rounds) >= 2, f"{label} ran {len(rounds)} rounds after the kill"
        print(f"\n{label} after the kill: {len(rounds)} rounds, longest gap {max(gaps):.2f} s, "
              f"{len(created)} VMs created")
        assert rounds[0] - killed_at < 2 * CYCLE + 1 and end - rounds[-1] < 2 * CYCLE + 1
        # a round that waited for a query would be UDP_TIMEOUT + CYCLE after the previous one
        assert max(gaps) < UDP_TIMEOUT, f"{label}: a round waited {max(gaps):.2f} s"
        running = [p[label].running for p in passes if label in p]
        assert min(running) >= PROCESSORS - 1, f"{label} did not refill: {figures(running)}"
        assert len(created) >= (end - killed_at) / WALLCLOCK * PROCESSORS / 2, created
        held = [r for r in unknown_reports(
            daemon, r"space: no answer this round from (.*); counting") if r[0] >= killed_at]
        assert held and held[0][1] == {fqdn("c")}, f"{label} did not hold c's answer: {held}"
        assert held[0][0] <= silence_noticed_by, \
            f"{label} noticed c's silence {held[0][0] - killed_at:.1f} s after the kill"
        reports = [r for r in unknown_reports(daemon) if r[0] >= killed_at]
        assert reports, f"{label} never reported c unknown"
        when, names = reports[0]
        print(f"{label} held c's last answer from {held[0][0] - killed_at:.1f} s and reported c "
              f"unknown {when - killed_at:.1f} s after the kill (window {window:g} s)")
        assert names == {fqdn("c"), fqdn("d")}, names
        # c's last answer came at most one round (QUERY_SECONDS + UDP_TIMEOUT) before the kill
        assert when >= killed_at + window - QUERY_SECONDS - UDP_TIMEOUT, \
            f"{label} dropped c's answer {when - killed_at:.1f} s after the kill, before the window"
        assert when <= noticed_by, f"{label} noticed c {when - killed_at:.1f} s after the kill"

    final = [p["b"] for p in passes[-4:]]
    print(f"b at the end: {[s.processors for s in final]}")
    assert all(s.get("x") == 0 and s.get("y") >= PROCESSORS - 1 for s in final), \
        "b still runs x for c's sake after c died"


def test_a_factory_joining_a_busy_space_decides_its_first_round_with_the_space_view(
        space: Space) -> None:
    """b is replaced by a fresh factory b (same name and configuration, empty state: a
    reinstalled host), now allowed to start all its processors in one round. The space it
    joins is a's 10 x (c is dead, d ignored), so its first round must create (nearly) only
    y. A first round decided before the space has answered sees nothing but b itself and
    splits 5 x + 5 y - VMs that would keep the space off its shares for their whole lifetime
    (days, in production).

    (Why a fresh state: the old b's test-driver VMs died with its process, and the test
    driver reports no CPU time, so the factory has no sign of life for them and finishes them
    as 0-second fizzles, which back y off. Real domains outlive a daemon and are adopted.)"""
    space.steady()  # a is full of x (when this test runs alone)
    c = space.daemons["c"]
    if c.process is not None and c.process.poll() is None:
        c.kill()  # (when this test runs alone)
    b = space.daemons["b"]
    b.kill()
    b.state.rename(b.directory / "state.before")
    b.max_starting = PROCESSORS
    b.write_config()
    joined_at = time.time()
    b.start()
    space.wait_until(joined_at + UDP_TIMEOUT + 10.0)
    created = b.created_since(joined_at)
    assert created, "b created nothing after it joined"
    # the next round is at least cycle_seconds later (nothing ends meanwhile to wake it)
    first_round = [mt for when, mt in created if when - created[0][0] < CYCLE]
    print(f"\nb's first round after it joined, {created[0][0] - joined_at:.1f} s after it: "
          f"{first_round}")
    assert len(first_round) == PROCESSORS, f"b did not fill in one round: {created}"
    assert first_round.count("y") >= PROCESSORS - 1, \
        f"b's first round ignored the space (a runs 10 x): {first_round}"
    assert created[0][0] - joined_at < UDP_TIMEOUT + 5.0, "b waited too long to start VMs"


def test_a_stop_signal_is_not_held_up_by_a_query_round_waiting_for_silent_peers(
        space: Space) -> None:
    """SIGTERM a while it waits for its first query round, which lasts the whole UDP deadline
    (d never answers a, nor does c once killed). The daemon must stop at once - neither the
    start-up wait for the space nor the query still in flight may hold up the exit."""
    c = space.daemons["c"]
    if c.process is not None and c.process.poll() is None:
        c.kill()  # (when this test runs alone)
    a = space.daemons["a"]
    a.kill()
    seen = len(a.log_lines())
    a.start()
    assert a.process is not None
    def listening() -> bool:
        assert a.process.poll() is None, a.log_lines()[seen:]
        return any("responder listening" in line for line in a.log_lines()[seen:])
    wait_for(listening, "a's responder to listen", 30, interval=0.05, details=lambda: "\n".join(a.log_lines()[seen:]))
    signalled = time.monotonic()
    os.kill(a.process.pid, signal.SIGTERM)
    code = a.process.wait(timeout=scaled(30))
    took = time.monotonic() - signalled
    print(f"\na stopped {took:.2f} s after SIGTERM (UDP deadline {UDP_TIMEOUT:g} s)")
    assert code == 0, a.log_lines()[seen:]
    assert any("vacfactory stopped" in line for line in a.log_lines()[seen:])
    assert took < UDP_TIMEOUT / 2, f"the stop waited {took:.2f} s for the space"
