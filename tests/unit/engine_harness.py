"""A real engine on libvirt's in-process test driver, for the engine's unit tests.

Everything is real (configuration files, the state directory, libvirt's test driver, the
VM boundary, accounting into a real archive and dirq queue) except time, which the tests
move by hand so that heartbeat and wallclock limits can be crossed without waiting.

The test driver's state is shared by every connection in the process, so each harness uses
its own factory name (and so its own domain-name pattern) and destroys its domains at the end.
"""

from __future__ import annotations

import itertools
import os
import random
import textwrap
from dataclasses import dataclass
from typing import Optional

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.engine import naming
from vacfactory.engine.accountant import Accountant
from vacfactory.engine.boundary import VMBoundary
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.engine.factory import EngineParts, Environment, Factory
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import MachineStore

_counter = itertools.count(1)
START = 1_900_000_000.0


class Clock:
    """A clock the test moves; starts at a fixed, realistic epoch."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


HOST = HostFacts(fqdn="host.example.org", cpu_count=2, mem_total_mb=1 << 20)


def settings_text(name: str, state_dir: str, total: int, extra: str) -> str:
    return textwrap.dedent(
        f"""\
        [settings]
        vac_space = space.example.org
        factory_name = {name}
        gocdb_sitename = TEST-SITE
        hs06_per_processor = 10
        state_dir = {state_dir}
        libvirt_uri = test:///default
        domain_type = test
        total_processors = {total}
        mb_per_processor = 100
        """
    ) + textwrap.dedent(extra)


def machinetype_text(name: str, kernel: str, share: float = 1, extra: str = "") -> str:
    """A machinetype section; ``key = value`` lines in ``extra`` replace the defaults."""
    options = {
        "target_share": str(share),
        "machine_model": "vm-raw",
        "kernel_image": kernel,
        "fizzle_seconds": "60",
        "backoff_seconds": "300",
        "max_wallclock_seconds": "3600",
    }
    for line in textwrap.dedent(extra).splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            options[key.strip()] = value.strip()
    body = "".join(f"{key} = {value}\n" for key, value in options.items())
    return f"\n[machinetype {name}]\n{body}"


@dataclass
class Harness:
    factory: Factory
    hypervisor: LibvirtHypervisor
    clock: Clock
    config_path: str
    state_dir: str
    name: str

    def domains(self):
        pattern = naming.domain_pattern(self.name)
        return [d for d in self.hypervisor.list_domains() if pattern.match(d.name)]

    def live(self):
        return [m for m in self.factory.machines.values() if m.live]

    def power_off(self, machine, message: Optional[str] = None) -> None:
        """What a VM does at the end: maybe write shutdown_message, then its domain goes."""
        if message is not None:
            with open(os.path.join(machine.joboutputs_dir, "shutdown_message"), "w") as f:
                f.write(message + "\n")
        self.hypervisor.destroy(machine.uuid)

    def rewrite_config(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(text)
        # a new mtime even within the same clock tick
        st = os.stat(self.config_path)
        os.utime(self.config_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def restart(self) -> "Harness":
        """A new engine on the same state dir, as after kill -9 (the old one is abandoned)."""
        return make_harness(self.state_dir, None, name=self.name, clock=self.clock, config_path=self.config_path)

    def teardown(self) -> None:
        for domain in self.domains():
            self.hypervisor.destroy(domain.uuid)
        self.hypervisor.close()


def make_harness(
    tmp_dir: str,
    config_text: Optional[str],
    *,
    name: Optional[str] = None,
    clock: Optional[Clock] = None,
    config_path: Optional[str] = None,
    host: HostFacts = HOST,
) -> Harness:
    name = name or f"f{os.getpid()}x{next(_counter)}.example.org"
    config_path = config_path or os.path.join(tmp_dir, "vacfactory.conf")
    if config_text is not None:
        with open(config_path, "w") as f:
            f.write(config_text)
    clock = clock or Clock()
    watcher = ConfigWatcher(ConfigSources.for_main_file(config_path), host_facts=host)
    state_dir = watcher.current.settings.state_dir
    hypervisor = LibvirtHypervisor("test:///default")
    factory = Factory(
        EngineParts(config_source=watcher, hypervisor=hypervisor, store=MachineStore(state_dir),
                    builder=VMBuilder(state_dir), boundary=VMBoundary(), accountant=Accountant.for_config(watcher)),
        Environment(host_processors=64, clock=clock, load_average=lambda: 0.0, rng=random.Random(7)),
    )
    factory.start()
    return Harness(factory, hypervisor, clock, config_path, state_dir, name)


def kernel_file(directory: str) -> str:
    """The test driver boots nothing, but the builder insists the kernel file exists."""
    path = os.path.join(directory, "vmlinux")
    with open(path, "wb") as f:
        f.write(b"\x7fELF not really a kernel")
    return path


def close_daemons(daemons) -> None:
    """Stop in-process daemons (vacfactory.daemon.Daemon) and destroy their domains: the
    test driver is shared by the whole process, so a test's VMs must not outlive it."""
    for daemon in daemons:
        pattern = naming.domain_pattern(daemon.config.settings.factory_name)
        for domain in daemon.hypervisor.list_domains():
            if pattern.match(domain.name):
                daemon.hypervisor.destroy(domain.uuid)
        daemon.close()
