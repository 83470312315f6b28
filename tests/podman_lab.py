"""A private Podman service for tests: real containers, isolated from every other podman user.

Each :class:`PodmanService` has its own containers.conf and storage.conf (graph root, run root,
tmp dir, volumes, network definitions under one temporary directory), and its own default
network (own bridge, own /24), so services of parallel test runs never share containers,
images, IP addresses or bridges. It serves the Docker-compatible API on a private socket.

Choices this machine needs (Debian 12, podman 4.3.1, hybrid cgroup v1, no systemd): runc (crun
fails with hybrid cgroups), the cgroupfs cgroup manager, and the file events logger (there is
no journald). Images are built here, since no registry is reachable: :meth:`import_busybox`
imports a root filesystem of busybox-static with every applet linked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Set

from tests.waiting import scaled

__all__ = ["PodmanService", "BUSYBOX", "missing_tools", "running_lab"]

BUSYBOX = "localhost/vf-busybox:1"
BUSYBOX_BINARY = "/bin/busybox"  # busybox-static: the image needs no libraries
TOOLS = ("podman", "runc", "conmon")


def missing_tools() -> List[str]:
    """What a PodmanService needs and this machine lacks (tools/setup-machine.sh installs it)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not os.path.isfile(BUSYBOX_BINARY):
        missing.append(BUSYBOX_BINARY + " (busybox-static)")
    return missing


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0-10.249.255.0 that no route of this host touches."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for _ in range(200):
        candidate = ipaddress.ip_network(f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError("no free /24 in 10.200.0.0/16-10.249.0.0/16 for a podman network")


class PodmanService:
    """``podman system service`` on a private socket with private storage; see the module."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="vfpm-", dir="/tmp")  # short: socket paths
        self.socket_path = os.path.join(self.directory, "podman.sock")
        self.url = "unix://" + self.socket_path
        self.log_path = os.path.join(self.directory, "service.log")
        self.subnet = _free_subnet()
        self.bridge = "vfpm" + secrets.token_hex(4)
        self.env: Dict[str, str] = dict(
            os.environ,
            CONTAINERS_CONF=os.path.join(self.directory, "containers.conf"),
            CONTAINERS_STORAGE_CONF=os.path.join(self.directory, "storage.conf"),
        )
        self.env.pop("NOTIFY_SOCKET", None)
        self._process: Optional[subprocess.Popen] = None
        self._images: Set[str] = set()
        self._write_configuration()

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def _write_configuration(self) -> None:
        for part in ("graph", "run", "tmp", "volumes", "networks"):
            os.makedirs(self._path(part), exist_ok=True)
        with open(self._path("containers.conf"), "w") as f:
            f.write(f"""[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{self._path('tmp')}"
volume_path = "{self._path('volumes')}"
[network]
network_backend = "netavark"
network_config_dir = "{self._path('networks')}"
""")
        with open(self._path("storage.conf"), "w") as f:
            f.write(f"""[storage]
driver = "overlay"
graphroot = "{self._path('graph')}"
runroot = "{self._path('run')}"
""")
        # the default network "podman", defined here so that it gets our bridge and subnet
        # (the built-in one is podman0 on 10.88.0.0/16 for every podman on the host)
        gateway = str(next(self.subnet.hosts()))
        network = {
            "name": "podman", "id": secrets.token_hex(32), "driver": "bridge",
            "network_interface": self.bridge, "created": "2026-01-01T00:00:00Z",
            "subnets": [{"subnet": str(self.subnet), "gateway": gateway}],
            "ipv6_enabled": False, "internal": False, "dns_enabled": False,
            "ipam_options": {"driver": "host-local"},
        }
        with open(self._path("networks", "podman.json"), "w") as f:
            json.dump(network, f)

    def podman(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the podman CLI on this service's storage."""
        return subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, check=check,
                              timeout=scaled(timeout))

    def start(self, timeout: float = 30.0) -> "PodmanService":
        """Start the service and return once it has said it is ready (sd_notify READY=1)."""
        if self._process is not None and self._process.poll() is None:
            return self
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"podman lab: missing {', '.join(missing)} (run tools/setup-machine.sh)")
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        notify_path = self._path("notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            env = dict(self.env, NOTIFY_SOCKET=notify_path)
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    ["podman", "system", "service", "--time=0", self.url],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + scaled(timeout)
            while True:
                remaining = deadline - time.monotonic()
                if self._process.poll() is not None or remaining <= 0:
                    self.stop()
                    raise RuntimeError(f"podman service did not become ready:\n{self.log_tail()}")
                notify.settimeout(min(remaining, 0.5))  # and notice a service that died
                try:
                    message = notify.recv(4096).decode(errors="replace")
                except socket.timeout:
                    continue
                if "READY=1" in message.split("\n"):
                    return self

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill_service(self) -> None:
        """Kill the API service only (a runtime outage); its containers keep running."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=scaled(30))

    def import_busybox(self, tag: str = BUSYBOX) -> str:
        """An image of busybox-static with every applet linked in /bin, imported once."""
        if tag in self._images:
            return tag
        root = self._path("busybox-root")
        shutil.rmtree(root, ignore_errors=True)
        for part in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            os.makedirs(os.path.join(root, part))
        shutil.copy2(BUSYBOX_BINARY, os.path.join(root, "bin", "busybox"))
        applets = subprocess.run([BUSYBOX_BINARY, "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox" and "/" not in applet:
                os.symlink("busybox", os.path.join(root, "bin", applet))
        with open(os.path.join(root, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        with open(os.path.join(root, "etc", "group"), "w") as f:
            f.write("root:x:0:\nnogroup:x:65534:\n")
        archive = self._path("busybox.tar")
        subprocess.run(["tar", "-C", root, "-cf", archive, "."], check=True)
        self.podman("import", "-q", archive, tag)
        os.unlink(archive)
        shutil.rmtree(root)
        self._images.add(tag)
        return tag

    def containers(self) -> List[str]:
        """Names of every container on this service, running or not."""
        listing = self.podman("ps", "-a", "--format", "{{.Names}}").stdout
        return [line for line in listing.splitlines() if line]

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as error:
            return f"({self.log_path}: {error.strerror})"

    def stop(self) -> None:
        """Kill the service, remove every container it made and its storage."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=scaled(10))
        if os.path.isdir(self.directory):
            self.podman("rm", "--all", "--force", "--time", "0", check=False)
            self.podman("rmi", "--all", "--force", check=False)  # unmounts its layers
            shutil.rmtree(self.directory, ignore_errors=True)
        self._images.clear()


@contextlib.contextmanager
def running_lab() -> Iterator[PodmanService]:
    """A started service with the busybox image, stopped (with every container it made) at the
    end; fails the test (never skips it) when podman is missing."""
    import pytest

    missing = missing_tools()
    if missing:
        pytest.fail(f"podman lab: missing {', '.join(missing)} (tools/setup-machine.sh installs them)")
    service = PodmanService()
    try:
        service.start()
        service.import_busybox()
        yield service
    finally:
        service.stop()
