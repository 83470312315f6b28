"""Small helpers for the tiny-guest integration tests (tests/integration/test_guest.py) only.

They talk to libvirt-python directly (the project's own hypervisor module is not used here),
and every libvirt object they create is named with the prefix ``vfguest``.  Network tests use
10.254.78.0/24 with the host on .254.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional
from xml.sax.saxutils import escape, quoteattr

import libvirt

from tests.waiting import scaled

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "images" / "build-tiny-guest.sh"
DEFAULT_GUEST_DIR = REPO / "images" / "build" / "tiny-guest"
PILOT_TEMPLATE = REPO / "contextualization" / "demo-pilot.sh"

PREFIX = "vfguest"
SUBNET = "10.254.78"
HOST_IP = SUBNET + ".254"
LIBVIRT_URI = "qemu:///system"


def unique(kind: str) -> str:
    return "%s-%s-%s" % (PREFIX, kind, secrets.token_hex(3))


# ---------------------------------------------------------------------------------------------
# the image


@dataclass(frozen=True)
class GuestImage:
    directory: Path

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def build_guest(outdir: Optional[Path] = None, force: bool = False,
                timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["FORCE"] = "1" if force else "0"
    cmd = [str(BUILD_SCRIPT)] + ([str(outdir)] if outdir else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=True)


# ---------------------------------------------------------------------------------------------
# a world-readable work directory (qemu runs as libvirt-qemu and must reach kernel, ISO, log)


def make_workdir(tag: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="%s-%s-" % (PREFIX, tag)))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------
# libvirt


def connect() -> libvirt.virConnect:
    """qemu:///system; raises (the tests fail, not skip) when libvirtd is not running."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(LIBVIRT_URI)


def domain_xml(name: str, kernel: Path, initrd: Path, cmdline: str, console_log: Path, *,
               mac: Optional[str] = None, network: Optional[str] = None,
               ide_cdrom: Optional[Path] = None, virtio_iso: Optional[Path] = None,
               memory_mib: int = 256) -> str:
    devices: List[str] = []
    if ide_cdrom is not None:
        devices.append(
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            "<source file=%s/><target dev='hdc' bus='ide'/><readonly/></disk>"
            % quoteattr(str(ide_cdrom)))
    if virtio_iso is not None:
        devices.append(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            "<source file=%s/><target dev='vdb' bus='virtio'/><readonly/></disk>"
            % quoteattr(str(virtio_iso)))
    if network is not None:
        devices.append(
            "<interface type='network'><source network=%s/><mac address=%s/>"
            "<model type='virtio'/></interface>" % (quoteattr(network), quoteattr(mac or "")))
    devices.append("<serial type='file'><source path=%s/><target port='0'/></serial>"
                   % quoteattr(str(console_log)))
    devices.append("<controller type='usb' model='none'/>")  # saves ~0.3 s of boot on TCG
    devices.append("<memballoon model='none'/>")
    return """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {devices}
  </devices>
</domain>""".format(name=escape(name), mem=memory_mib, kernel=escape(str(kernel)),
                    initrd=escape(str(initrd)), cmdline=escape(cmdline),
                    devices="\n    ".join(devices))


class VM:
    """One transient vfguest domain with a serial console log file."""

    def __init__(self, conn: libvirt.virConnect, image: GuestImage, workdir: Path, tag: str,
                 cmdline: str = "", **xml_args) -> None:
        self.conn = conn
        self.name = unique(tag)
        self.console_log = workdir / (self.name + ".console.log")
        self.xml = domain_xml(self.name, image.vmlinux, image.initrd,
                              ("console=ttyS0 quiet panic=-1 " + cmdline).strip(),
                              self.console_log, **xml_args)
        self.started_at = 0.0
        self.gone_at: Optional[float] = None
        self.dom: Optional[libvirt.virDomain] = None

    def start(self) -> "VM":
        self.started_at = time.monotonic()
        self.dom = self.conn.createXML(self.xml, 0)
        return self

    def exists(self) -> bool:
        try:
            self.conn.lookupByName(self.name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise
        return True

    def wait_gone(self, timeout: float) -> float:
        """Seconds from start until the domain disappeared; AssertionError after timeout."""
        deadline = time.monotonic() + scaled(timeout)  # longer while the machine is busy
        while time.monotonic() < deadline:
            if not self.exists():
                self.gone_at = time.monotonic()
                return self.gone_at - self.started_at
            time.sleep(0.2)
        raise AssertionError("%s still running after %.0f s; console:\n%s"
                             % (self.name, timeout, self.console()))

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + scaled(timeout)  # longer while the machine is busy
        while time.monotonic() < deadline:
            if needle in self.console():
                return
            time.sleep(0.2)
        raise AssertionError("%r not on the console of %s after %.0f s:\n%s"
                             % (needle, self.name, timeout, self.console()))

    def destroy(self) -> None:
        if self.dom is None:
            return
        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            pass  # already gone


def guest_lines(console: str) -> List[str]:
    return [line.strip() for line in console.splitlines() if line.startswith("GUEST: ")]


# ---------------------------------------------------------------------------------------------
# an isolated libvirt network on 10.254.78.0/24


class GuestNetwork:
    """Transient isolated network, host HOST_IP, static DHCP leases for the given MACs."""

    def __init__(self, conn: libvirt.virConnect, hosts: Dict[str, str]) -> None:
        self.conn = conn
        self.name = unique("net")
        self.bridge = "vfguestbr" + secrets.token_hex(2)
        dhcp_hosts = "".join("<host mac='%s' ip='%s'/>" % (mac, ip) for mac, ip in hosts.items())
        self.xml = """<network>
  <name>{name}</name>
  <bridge name='{bridge}' stp='off' delay='0'/>
  <ip address='{host}' netmask='255.255.255.0'>
    <dhcp><range start='{subnet}.100' end='{subnet}.200'/>{hosts}</dhcp>
  </ip>
</network>""".format(name=self.name, bridge=self.bridge, host=HOST_IP, subnet=SUBNET,
                     hosts=dhcp_hosts)
        self.net = conn.networkCreateXML(self.xml)

    def destroy(self) -> None:
        try:
            self.net.destroy()
        except libvirt.libvirtError:
            pass


def mac_for(ip: str) -> str:
    """Vac-style MAC: 56:4D followed by the four bytes of the IP."""
    return "56:4d:" + ":".join("%02x" % int(b) for b in ip.split("."))


# ---------------------------------------------------------------------------------------------
# HTTP metadata / MJF / joboutputs stub (per client IP, like Vac's servers)

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class Machine:
    ip: str
    joboutputs: Path
    user_data: Optional[bytes] = None
    machinefeatures: Dict[str, str] = field(default_factory=dict)
    jobfeatures: Dict[str, str] = field(default_factory=dict)
    meta_data: Optional[dict] = None
    token: Optional[str] = None    # MJF served under /<token>/... only, if set


class MetadataStub:
    """Threaded HTTP server bound to (host, ephemeral port).

    GET /latest/user-data, /openstack/latest/meta_data.json, /latest/meta-data.json,
    GET [/<token>]/{machinefeatures,jobfeatures}[/][KEY] (HTML index like Vac's),
    POST or PUT [/<token>]/joboutputs/NAME (writes the file).  Every request is logged.
    """

    def __init__(self, host: str) -> None:
        self.machines: Dict[str, Machine] = {}
        self.requests: List[tuple] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, fmt, *args):  # quiet
                pass

            def _reply(self, code: int, body: bytes = b"", ctype: str = "text/plain"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _machine(self) -> Optional[Machine]:
                with stub.lock:
                    stub.requests.append((self.client_address[0], self.command, self.path))
                    return stub.machines.get(self.client_address[0])

            def _mjf_path(self, m: Machine) -> Optional[List[str]]:
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if m.token is not None:
                    if not parts or parts[0] != m.token:
                        return None
                    parts = parts[1:]
                return parts

            def do_GET(self):
                m = self._machine()
                if m is None:
                    return self._reply(403)
                path = self.path.split("?")[0]
                if path == "/latest/user-data" and m.user_data is not None:
                    return self._reply(200, m.user_data)
                if path in ("/openstack/latest/meta_data.json", "/latest/meta-data.json") \
                        and m.meta_data is not None:
                    return self._reply(200, json.dumps(m.meta_data, indent=1).encode(),
                                       "application/json")
                parts = self._mjf_path(m)
                if parts and parts[0] in ("machinefeatures", "jobfeatures") and len(parts) <= 2:
                    values = m.machinefeatures if parts[0] == "machinefeatures" \
                        else m.jobfeatures
                    if len(parts) == 1:
                        items = "".join('<li><a href="%s">%s</a></li>' % (k, k)
                                        for k in sorted(values))
                        return self._reply(200, ("<html><body><ul>%s</ul></body></html>"
                                                 % items).encode(), "text/html")
                    if parts[1] in values:
                        return self._reply(200, values[parts[1]].encode())
                return self._reply(404)

            def do_POST(self):
                m = self._machine()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = self._mjf_path(m) if m else None
                if not parts or len(parts) != 2 or parts[0] != "joboutputs" \
                        or not _KEY.match(parts[1]):
                    return self._reply(403)
                tmp = m.joboutputs / (".tmp-" + parts[1])
                tmp.write_bytes(body)
                os.replace(tmp, m.joboutputs / parts[1])
                return self._reply(201)

            do_PUT = do_POST

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://%s:%d" % (host, self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, machine: Machine) -> Machine:
        with self.lock:
            self.machines[machine.ip] = machine
        return machine

    def paths_from(self, ip: str) -> List[str]:
        with self.lock:
            return [p for (c, _m, p) in self.requests if c == ip]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# nfs-ganesha (userspace NFSv4 server), own config/pid/log, bound to one address


@dataclass
class Export:
    path: Path
    pseudo: str
    client: str
    read_only: bool = False


class Ganesha:
    """NFSv4-only ganesha.nfsd in the foreground, squashing every client identity to
    ANON_UID/ANON_GID like the factory's exporter (so read-write export roots must be
    writable by that identity: see chown_for_rw)."""

    ANON_UID = ANON_GID = 65534

    @classmethod
    def chown_for_rw(cls, path: Path) -> None:
        os.chown(path, cls.ANON_UID, cls.ANON_GID)

    def __init__(self, workdir: Path, bind: str, exports: List[Export]) -> None:
        self.dir = workdir / "ganesha"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "recovery").mkdir(exist_ok=True)
        self.bind = bind
        self.conf = self.dir / "ganesha.conf"
        self.log = self.dir / "ganesha.log"
        self.pidfile = self.dir / "ganesha.pid"
        blocks = []
        for n, e in enumerate(exports, start=1):
            access = "RO" if e.read_only else "RW"
            blocks.append("""EXPORT {
    Export_Id = %d;
    Path = "%s";
    Pseudo = "%s";
    Access_Type = %s;
    Squash = All_Squash;
    Anonymous_Uid = %d;
    Anonymous_Gid = %d;
    SecType = sys;
    Protocols = 4;
    Transports = TCP;
    CLIENT { Clients = %s; Access_Type = %s; }
    FSAL { Name = VFS; }
}""" % (n, e.path, e.pseudo, access, self.ANON_UID, self.ANON_GID, e.client, access))
        self.conf.write_text("""NFS_CORE_PARAM {
    Bind_addr = %s;
    NFS_Port = 2049;
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}
NFSV4 {
    Graceless = true;
    Lease_Lifetime = 10;
    RecoveryBackend = fs;
    RecoveryRoot = "%s";
}
NFS_KRB5 { Active_krb5 = false; }
LOG { Default_Log_Level = EVENT; }
%s
""" % (bind, self.dir / "recovery", "\n".join(blocks)))
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20) -> "Ganesha":
        self.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(self.conf), "-L", str(self.log),
             "-p", str(self.pidfile), "-N", "NIV_EVENT"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + scaled(timeout)  # longer while the machine is busy
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("ganesha.nfsd exited (%s):\n%s"
                                     % (self.proc.returncode, self.log_text()))
            try:
                with socket.create_connection((self.bind, 2049), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("ganesha.nfsd not listening on %s:2049:\n%s"
                             % (self.bind, self.log_text()))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# user_data


def render_user_data(template: str, values: Dict[str, str]) -> str:
    """Vac's substitution: ##user_data_KEY## -> value, then leftover markers are removed."""
    for key, value in values.items():
        template = template.replace("##user_data_%s##" % key, value)
    return re.sub(r"##user_data_[a-z0-9_]*##", "", template)


def make_config_drive(path: Path, user_data: str, meta_data: Optional[dict] = None) -> Path:
    tree = path.parent / (path.name + ".d")
    latest = tree / "openstack" / "latest"
    latest.mkdir(parents=True)
    (latest / "user_data").write_text(user_data)
    if meta_data is not None:
        (latest / "meta_data.json").write_text(json.dumps(meta_data))
    subprocess.run(["genisoimage", "-quiet", "-o", str(path), "-V", "config-2", "-J", "-R",
                    str(tree)], check=True, capture_output=True)
    shutil.rmtree(tree)
    path.chmod(0o644)
    return path
