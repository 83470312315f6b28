"""A real factory for integration tests: one `vacfactory run` subprocess with real TCG guests.

Shared by the VM-boundary, traceability, drain and demo tests; also what they check with:
nfs-ganesha's exports (``ganesha_exports``), who holds the NFS port (``nfs_port_holder``), the
libvirt domains of a factory (``domains_named``). Every slot has the same MAC and IP in every
factory, so another factory with real VMs on this host at the same time spoils a run; the
harness watches for that (``look_for_foreign_vms``/``assert_alone``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import libvirt

from tests.integration.mounts import unmount_under
from tests import waiting
from vacfactory.engine import naming
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.vmio.exports import GaneshaExporter

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
REPO = Path(__file__).resolve().parents[2]
PILOT = str(REPO / "contextualization" / "demo-pilot.sh")
EXPORT_MARK = "# vacfactory-export "  # vmio.exports: one JSON line per export in ganesha.conf


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5,
             factory: Optional["RealFactory"] = None) -> object:
    """tests.waiting.wait_for that also watches for other factories' VMs on our network."""
    def look() -> object:
        if factory is not None:
            factory.look_for_foreign_vms()
        return condition()
    return waiting.wait_for(look, what, timeout, interval, details=factory.diagnostics if factory else None)


def stop_daemon(process: Optional[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to a daemon still running and wait for it (killed if it will not end)."""
    if process is not None and process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=waiting.scaled(60))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class RealFactory:
    """One `vacfactory run` subprocess with its own name, state directory and UDP port."""

    def __init__(self, workdir: str, tag: str) -> None:
        self.name = f"vfvb{os.getpid()}{tag}.example.org"
        self.dir = os.path.join(workdir, tag)
        os.mkdir(self.dir, 0o755)
        os.chmod(self.dir, 0o755)  # qemu (libvirt-qemu) must reach the disks and console logs
        self.state_dir = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "vacfactory.conf")
        self.log = os.path.join(self.dir, "daemon.log")
        self.udp_port = free_udp_port()
        self.process: Optional[subprocess.Popen] = None
        self.hypervisor = LibvirtHypervisor("qemu:///system")
        self.pattern = naming.domain_pattern(self.name)
        self.foreign: Dict[str, str] = {}  # other factories' VMs seen on our network: name -> MAC
        self._last_look = 0.0

    def write_config(self, settings: str, machinetypes: str) -> None:
        text = textwrap.dedent(f"""\
            [settings]
            vac_space = space.example.org
            factory_name = {self.name}
            state_dir = {self.state_dir}
            libvirt_uri = qemu:///system
            domain_type = qemu
            mb_per_processor = 256
            hs06_per_processor = 10
            overload_per_processor = 50
            cycle_seconds = 5
            udp_port = {self.udp_port}
            """) + textwrap.dedent(settings) + "\n" + machinetypes
        with open(self.config + ".new", "w") as f:
            f.write(text)
        os.replace(self.config + ".new", self.config)

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [VACFACTORY, "--config", self.config, "run", "--log-level", os.environ.get("VFVB_LOG_LEVEL", "INFO")],
                stdout=log, stderr=subprocess.STDOUT,
            )
        # a VM gets its user_data from the metadata server: fail clearly if it cannot serve
        refused = ("metadata server cannot listen", "metadata server cannot bind")
        wait_for(lambda: "metadata/MJF server listening" in self.log_text()
                 or any(r in self.log_text() for r in refused), 30, "the daemon's metadata server", factory=self)
        assert not any(r in self.log_text() for r in refused), \
            "another factory holds 169.254.169.253/.254 port 80:\n" + self.log_text()[-2000:]

    def sighup(self) -> None:
        assert self.process is not None and self.process.poll() is None, "the daemon died"
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        stop_daemon(self.process)
        self.process = None

    def cleanup(self) -> None:
        """Stop the daemon, destroy any VM of ours it left, stop the ganesha it started, unmount
        the joboutputs filesystems of NFS VMs it left running."""
        self.stop()
        try:
            for domain in self.domains():
                self.hypervisor.destroy(domain.uuid)
        finally:
            ganesha = os.path.join(self.state_dir, "ganesha")
            if os.path.isdir(ganesha):
                GaneshaExporter(os.path.join(ganesha, "ganesha.conf"), os.path.join(ganesha, "ganesha.pid"),
                                os.path.join(ganesha, "ganesha.log")).stop_server()
            unmount_under(self.state_dir)  # NFS VMs' joboutputs filesystems the daemon kept
            self.hypervisor.close()

    def look_for_foreign_vms(self) -> None:
        """Note VMs of other factories on the factory network (at most every 2 s).

        Every factory gives slot N the same MAC and IP, so another factory's VMs running at
        the same time (another test run on this host) take our VMs' addresses: they fetch our
        VMs' user_data, write into their joboutputs, and break the isolation test. Such a run
        proves nothing and fails with a clear message (see ``assert_alone``).
        """
        if time.monotonic() - self._last_look < 2.0:
            return
        self._last_look = time.monotonic()
        conn = libvirt.openReadOnly("qemu:///system")
        try:
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    name, xml = domain.name(), domain.XMLDesc(0)
                except libvirt.libvirtError:  # it ended meanwhile
                    continue
                if self.pattern.match(name) or "<source network='vacfactory'" not in xml:
                    continue
                mac = re.search(r"<mac address='([^']+)'", xml)
                self.foreign[name] = mac.group(1) if mac else "?"
        finally:
            conn.close()

    def assert_alone(self) -> None:
        assert not self.foreign, (
            f"other factories' VMs shared the vacfactory network (and our slots' MAC/IP addresses) "
            f"during this run, so it proves nothing: {self.foreign}. Run it when no other factory "
            "with real VMs runs on this host.")

    def machines(self) -> Dict[str, Machine]:
        try:
            return MachineStore(self.state_dir, create=False).load_all()
        except Exception:  # noqa: BLE001 - the daemon has not made the directory yet
            return {}

    def of_type(self, machinetype: str) -> List[Machine]:
        return sorted((m for m in self.machines().values() if m.record.machinetype == machinetype),
                      key=lambda m: m.record.created)

    def domains(self):
        return [d for d in self.hypervisor.list_domains() if self.pattern.match(d.name)]

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        parts = [f"--- other factories' VMs seen on the network: {self.foreign or 'none'}",
                 "--- daemon log (tail)", self.log_text()[-4000:]]
        for machine in self.machines().values():
            parts.append(f"--- {machine.name} {machine.uuid} {machine.record.machinetype} state={machine.state} "
                         f"finished={machine.finished}")
            parts.append(read(machine.console_log)[-1500:])
        return "\n".join(parts)


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def nfs_port_holder() -> Optional[str]:
    """Who already listens on 169.254.169.254:2049 (where the factory's ganesha must bind).

    SO_REUSEADDR, as servers bind: the TIME_WAIT connections an earlier run's NFS clients left
    on the port (for a minute) are no server and do not stop ganesha from binding."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("169.254.169.254", 2049))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return None  # no such address yet: the daemon creates the network
            shown = subprocess.run(["ss", "-Hltnp", "sport = :2049"], capture_output=True, text=True)
            return shown.stdout.strip() or str(error)
    return None


def ganesha_exports(state_dir: str) -> List[dict]:
    """The exports in the ganesha.conf of the factory with ``state_dir`` (one dict per export)."""
    text = read(os.path.join(state_dir, "ganesha", "ganesha.conf"))
    return [json.loads(line[len(EXPORT_MARK):]) for line in text.splitlines() if line.startswith(EXPORT_MARK)]


def domains_named(factory_name: str, uri: str = "qemu:///system") -> List[str]:
    """Names of every domain of the factory ``factory_name`` libvirt knows, running or only
    defined (the engine's own listing covers running domains)."""
    pattern = naming.domain_pattern(factory_name)
    conn = libvirt.openReadOnly(uri)
    try:
        return sorted(d.name() for d in conn.listAllDomains(0) if pattern.match(d.name()))
    finally:
        conn.close()
