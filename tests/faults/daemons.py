"""Real factory processes for the fault suite: configuration, ``vacfactory run``, restarts.

A :class:`FactoryUnderTest` owns one factory: a directory with its configuration, state
directory and log, a unique factory name (so a unique domain-name pattern) and UDP port.
``spawn()`` starts a real ``vacfactory run`` (optionally armed with
``VACFACTORY_CRASH_AT``); ``recover()`` runs the restart that the checks follow
(:mod:`tests.faults.oneround`) and says how long it took.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from tests.integration.mounts import unmount_under
from tests.integration.realfactory import nfs_port_holder  # noqa: F401 - the fault tests take it from here
from vacfactory.engine import naming
from vacfactory.errors import HypervisorError
from vacfactory.state.machines import MachineStore
from vacfactory.vmio.exports import GaneshaExporter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
_names = itertools.count(1)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_name(prefix: str) -> str:
    """A factory name no other test (or engineer) uses: its domains are only ours."""
    return f"{prefix}{os.getpid()}x{next(_names)}t{int(time.time() * 1000) % 100000}.faults.example.org"


@dataclass
class Machinetype:
    name: str
    options: Dict[str, str]

    def seconds(self, key: str, default: float) -> float:
        return float(self.options.get(key, default))


@dataclass
class Recovery:
    """What the restart's first round did, and when."""

    spawned: float
    began: float
    round_time: float
    round_end: float
    report: Dict
    error: Optional[str] = None

    @property
    def seconds(self) -> float:
        """From the restart (process spawned) to the end of its first completed round."""
        return self.round_end - self.spawned


@dataclass
class FactoryUnderTest:
    base: str
    uri: str
    domain_type: str
    total_processors: int
    machinetypes: List[Machinetype]
    settings: Dict[str, str] = field(default_factory=dict)
    prefix: str = "vff"
    name: str = ""
    udp_port: int = 0
    state_dir: str = ""
    process: Optional[subprocess.Popen] = None

    def __post_init__(self) -> None:
        self.name = self.name or unique_name(self.prefix)
        self.udp_port = self.udp_port or free_udp_port()
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.state_dir = self.state_dir or os.path.join(self.base, "state")
        self.config_path = os.path.join(self.base, "vacfactory.conf")
        self.log_path = os.path.join(self.base, "factory.log")
        self.pattern = naming.domain_pattern(self.name)
        self.write_config()

    # -- configuration ----------------------------------------------------------------------

    def config_text(self) -> str:
        settings = {
            "vac_space": "faults.example.org",
            "factory_name": self.name,
            "factories": ".",
            "gocdb_sitename": "FAULT-SITE",
            "hs06_per_processor": "10",
            "state_dir": self.state_dir,
            "libvirt_uri": self.uri,
            "domain_type": self.domain_type,
            "total_processors": str(self.total_processors),
            "mb_per_processor": "256" if self.domain_type != "test" else "64",
            "cycle_seconds": "1",
            "overload_per_processor": "50",
            "nfs_exporter": "none",  # the real-TCG crash trials set ganesha
            "udp_port": str(self.udp_port),
            "udp_timeout_seconds": "2",
        }
        settings.update(self.settings)
        text = "[settings]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        for mt in self.machinetypes:
            text += f"\n[machinetype {mt.name}]\n" + "".join(f"{k} = {v}\n" for k, v in mt.options.items())
        return text

    def write_config(self) -> None:
        with open(self.config_path, "w") as f:
            f.write(self.config_text())

    @property
    def nfs_exporter(self) -> str:
        return self.settings.get("nfs_exporter", "none")

    def ganesha(self) -> GaneshaExporter:
        """The factory's nfs-ganesha (the paths vacfactory.daemon gives it)."""
        directory = os.path.join(self.state_dir, "ganesha")
        return GaneshaExporter(os.path.join(directory, "ganesha.conf"), os.path.join(directory, "ganesha.pid"),
                               os.path.join(directory, "ganesha.log"))

    def retention_seconds(self) -> Dict[str, float]:
        return {mt.name: mt.seconds("machines_dir_days", 3.0) * 86400 for mt in self.machinetypes}

    def fizzle_seconds(self) -> float:
        """The smallest fizzle_seconds of the machinetypes (for VMs whose directory is gone)."""
        return min(mt.seconds("fizzle_seconds", 600) for mt in self.machinetypes)

    # -- processes --------------------------------------------------------------------------

    def spawn(self, crash_at: Optional[str] = None, extra_env: Optional[Mapping[str, str]] = None
              ) -> subprocess.Popen:
        """Start ``vacfactory run`` (armed to SIGKILL itself at ``crash_at``, NAME[:N])."""
        env = dict(os.environ)
        env.pop("VACFACTORY_CRASH_AT", None)
        if crash_at:
            env["VACFACTORY_CRASH_AT"] = crash_at
        env.update(extra_env or {})
        with open(self.log_path, "a") as log:
            log.write(f"==== {time.time():.3f} vacfactory run{' VACFACTORY_CRASH_AT=' + crash_at if crash_at else ''}\n")
            log.flush()
            self.process = subprocess.Popen(
                [VACFACTORY, "--config", self.config_path, "run", "--log-level", "INFO"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            )
        return self.process

    def kill(self) -> Optional[int]:
        """kill -9 the running ``vacfactory run``; its exit status (None if none ran)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        return process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> Optional[int]:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def recover(self, timeout: float = 120) -> Recovery:
        """Restart and stop right after the first round (tests.faults.oneround)."""
        spawned = time.time()
        with open(self.log_path, "a") as log:
            log.write(f"==== {spawned:.3f} restart (one round)\n")
        result = subprocess.run(
            [sys.executable, "-m", "tests.faults.oneround", self.config_path, self.log_path],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "VACFACTORY_CRASH_AT"},
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            return Recovery(spawned, spawned, 0.0, time.time(), {},
                            error=f"restart exited {result.returncode}: {result.stderr[-2000:]}")
        report = json.loads(lines[-1])
        if "error" in report:
            return Recovery(spawned, report["began"], 0.0, time.time(), report,
                            error=report["error"] + "\n" + report.get("traceback", ""))
        return Recovery(spawned, report["began"], report["round_time"], report["round_end"], report)

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def cleanup(self, hypervisor=None, remove: bool = True) -> None:
        """Kill the daemon, destroy every domain of this factory, stop its nfs-ganesha (which
        outlives the daemon, as it does in production), remove its directory."""
        self.kill()
        if hypervisor is not None:
            try:
                for domain in hypervisor.list_domains():
                    if self.pattern.match(domain.name):
                        hypervisor.destroy(domain.uuid)
            except HypervisorError:
                pass
        if self.nfs_exporter == "ganesha":
            self.ganesha().stop_server()
        unmount_under(self.base)  # NFS VMs' joboutputs filesystems, kept across kills
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)


def ask_responder(factory: FactoryUnderTest) -> Tuple[bool, str]:
    """`vacfactory factories --json` against the factory's own responder."""
    result = subprocess.run([VACFACTORY, "--config", factory.config_path, "factories", "--json", "-t", "3"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return False, f"exit {result.returncode}: {result.stderr.strip()}"
    try:
        replies = json.loads(result.stdout)
    except ValueError:
        return False, f"not JSON: {result.stdout[:200]}"
    return bool(replies), result.stdout[:200]


def freeze_after_first_round(factory: FactoryUnderTest, since: float, timeout: float = 60.0
                             ) -> Optional[Tuple[float, float]]:
    """Wait for the first completed, non-blind round that started after ``since``, then
    SIGSTOP the daemon before it can start another; (round start, round end) or None."""
    path = os.path.join(factory.state_dir, "factory-heartbeat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = heartbeat_time(factory.state_dir)
        if value is not None and value >= since:
            factory.process.send_signal(signal.SIGSTOP)
            return value, os.stat(path).st_mtime
        time.sleep(0.005)
    return None


def machines(factory: FactoryUnderTest):
    """The factory's machine directories now (read-only; [] before it made any)."""
    try:
        return list(MachineStore(factory.state_dir, create=False).load_all().values())
    except Exception:  # noqa: BLE001 - not created yet
        return []


def wait_for(condition, timeout: float, interval: float = 0.1):
    """Poll ``condition()`` until it returns something true; that value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def heartbeat_time(state_dir: str) -> Optional[float]:
    """The start time of the last completed, non-blind round (``factory-heartbeat``)."""
    try:
        with open(os.path.join(state_dir, "factory-heartbeat")) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


def guest_cmdline(lifetime: int) -> str:
    """The tiny guest in plain mode for ``lifetime`` seconds.

    Every factory on this host puts slot N's VM on the same libvirt network with the same
    address, and whichever metadata server answers 169.254.169.254 first hands out *its* VM's
    user_data: with several factories running (other people's tests, the demo), a guest could
    run a stranger's pilot and end at the wrong time. Pointing the guest's metadata URL at a
    closed local port keeps it in plain mode (the fetch fails in about 4 s).
    """
    return f"console=ttyS0 quiet panic=-1 vf_metadata_url=http://127.0.0.1:9 vf_lifetime={int(lifetime)}"


def make_root_image(directory: str) -> str:
    """A tiny raw base image the VMs' qcow2 overlays read (a real disk for the leak checks)."""
    path = os.path.join(directory, "root.img")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        os.chmod(path, 0o644)
    return path


def make_fake_kernel(directory: str) -> str:
    """The test driver boots nothing, but the builder insists the kernel file exists."""
    path = os.path.join(directory, "vmlinux")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(b"\x7fELF not really a kernel")
        os.chmod(path, 0o644)
    return path


def split(seconds: List[float]) -> Tuple[float, float]:
    return (min(seconds), max(seconds)) if seconds else (0.0, 0.0)
