"""A real daemon (libvirt's test driver) serving the status page on a loopback port, for the
status page's tests: rounds are run by the test (``round()``), the page's thread and the
listener are the daemon's own."""

from __future__ import annotations

import itertools
import json
import os
import socket
import textwrap
import time
import urllib.request
from typing import Callable, Optional

from tests.unit.engine_harness import HOST, Clock, close_daemons, kernel_file
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon

_names = itertools.count(1)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: str, processors: int = 4, machinetypes: Optional[dict] = None,
                 extra: str = "") -> str:
    """A factory on the test driver with metrics_port set; machinetypes: name -> share."""
    name = f"d{os.getpid()}view{next(_names)}.example.org"
    kernel = kernel_file(directory)
    text = textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = {name}
        gocdb_sitename = TEST-SITE
        hs06_per_processor = 10
        state_dir = {os.path.join(directory, 'state')}
        libvirt_uri = test:///default
        domain_type = test
        total_processors = {processors}
        mb_per_processor = 100
        udp_port = {free_port(socket.SOCK_DGRAM)}
        metrics_port = {free_port()}
        overload_per_processor = 100000
        """) + textwrap.dedent(extra)
    for mt, share in (machinetypes or {"alpha": 3, "beta": 1}).items():
        text += textwrap.dedent(f"""
            [machinetype {mt}]
            target_share = {share}
            machine_model = vm-raw
            kernel_image = {kernel}
            fizzle_seconds = 60
            backoff_seconds = 600
            """)
    path = os.path.join(directory, "vacfactory.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


class ViewDaemon:
    def __init__(self, config_path: str, clock: Optional[Clock] = None) -> None:
        self.clock = clock or Clock()
        self.daemon = Daemon(ConfigSources.for_main_file(config_path), host_facts=HOST, clock=self.clock)
        self.daemon.page.min_build_seconds = 0.05  # the tests wait for each round's document
        self.daemon.start()

    @property
    def url(self) -> str:
        host, port = self.daemon.metrics.address
        return f"http://{host}:{port}"

    def round(self) -> None:
        """One engine round and what the daemon does after it; then wait for the page."""
        self.daemon.factory.run_round()
        self.daemon._after_round()
        wanted = self.daemon.factory.last_report.time
        wait_for(lambda: (self.status() or {}).get("round_time") == wanted, "the page to show the round")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return response.read()

    def status(self) -> Optional[dict]:
        try:
            return json.loads(self.get("/status.json"))
        except urllib.error.HTTPError:
            return None

    def live(self) -> list:
        return [m for m in self.daemon.factory.machines.values() if m.live]

    def power_off(self, machine, message: Optional[str] = None) -> None:
        if message is not None:
            with open(os.path.join(machine.joboutputs_dir, "shutdown_message"), "w") as f:
                f.write(message + "\n")
        self.daemon.hypervisor.destroy(machine.uuid)

    def close(self) -> None:
        close_daemons([self.daemon])


def wait_for(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


