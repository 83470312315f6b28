"""A real engine in this process on libvirt's in-process test driver, with clocks the test moves.

Everything is real (configuration files, state directory, the test driver, the VM boundary,
APEL archive and dirq queue) except time: ``clock`` is the wall clock the engine reads, and
``monotonic`` the elapsed-time clock it compares it with to notice clock steps. Advancing
both is time passing; moving only ``clock`` is a clock jump (an NTP step, an admin's
``date -s``).

Guests are simulated here too: :meth:`Engine.step` lets each running VM write its heartbeat
file (mtime = the wall clock, as the VM's file server would stamp it) and power off when its
lifetime is over (optionally leaving a shutdown_message), then runs one engine round.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.engine import naming
from vacfactory.engine.accountant import Accountant
from vacfactory.engine.boundary import VMBoundary
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.engine.factory import EngineParts, Environment, Factory, RoundReport
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import Machine, MachineStore

from tests.faults.guests import Life

START = 1_900_000_000.0
HOST = HostFacts(fqdn="host.example.org", cpu_count=2, mem_total_mb=1 << 20)
_names = itertools.count(1)


class Clock:
    """A clock the test sets; callable like time.time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Guest:
    """What a simulated guest does: heartbeat every ``heartbeat_every`` s (None: never),
    power off at ``end`` (None: runs until killed), leaving ``message``."""

    end: Optional[float] = None
    message: Optional[str] = None
    heartbeat_every: Optional[float] = 60.0
    last_heartbeat: Optional[float] = None


@dataclass
class Engine:
    factory: Factory
    hypervisor: LibvirtHypervisor
    clock: Clock
    monotonic: Clock
    state_dir: str
    name: str
    config_path: str
    #: decides each new VM's fate: (machine, now) -> Guest
    fate: Callable[[Machine, float], Guest]
    guests: Dict[str, Guest] = field(default_factory=dict)
    #: ground truth in the engine's clock: uuid -> Life (start = domain created, stop = gone)
    lives: Dict[str, Life] = field(default_factory=dict)
    #: the same lives in monotonic (elapsed) time: uuid -> [start, stop or None]
    elapsed_marks: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    #: monotonic times of the clock jumps
    jumps: List[float] = field(default_factory=list)
    last_report: Optional[RoundReport] = None
    first_round: Optional[float] = None
    #: how many VMs have ended so far (lives may be forgotten once checked)
    ended: int = 0

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks move."""
        self.clock.now += seconds
        self.monotonic.now += seconds

    def jump(self, seconds: float) -> None:
        """The wall clock is stepped; no time passes."""
        self.clock.now += seconds
        self.jumps.append(self.monotonic.now)

    def elapsed(self) -> Dict[str, float]:
        """Real run time of each VM that ended (monotonic)."""
        return {u: m[1] - m[0] for u, m in self.elapsed_marks.items() if m[1] is not None}

    def straddled(self, uuid: str) -> bool:
        """Was the VM running across a clock jump?"""
        start, stop = self.elapsed_marks.get(uuid, (None, None))
        return start is not None and any(start < j and (stop is None or j < stop) for j in self.jumps)

    def domains(self):
        pattern = naming.domain_pattern(self.name)
        return [d for d in self.hypervisor.list_domains() if pattern.match(d.name)]

    def live(self) -> List[Machine]:
        return [m for m in self.factory.machines.values() if m.live]

    def guests_act(self) -> None:
        """Each running VM heartbeats or powers off, as its fate says."""
        now = self.clock.now
        running = {d.uuid for d in self.domains()}
        for machine in self.live():
            if machine.uuid not in running:
                continue
            guest = self.guests.get(machine.uuid)
            if guest is None:
                guest = self.guests[machine.uuid] = self.fate(machine, now)
            if guest.end is not None and now >= guest.end:
                if guest.message:
                    with open(os.path.join(machine.joboutputs_dir, "shutdown_message"), "w") as f:
                        f.write(guest.message + "\n")
                self.hypervisor.destroy(machine.uuid)
                self._stopped(machine.uuid, now, "powered off")
                del self.guests[machine.uuid]
                continue
            if guest.heartbeat_every is not None and (
                guest.last_heartbeat is None or abs(now - guest.last_heartbeat) >= guest.heartbeat_every
            ):
                self.heartbeat(machine, now)
                guest.last_heartbeat = now

    def heartbeat(self, machine: Machine, when: float) -> None:
        path = os.path.join(machine.joboutputs_dir, "heartbeat")
        with open(path, "w") as f:
            f.write(f"{when}\n")
        os.utime(path, (when, when))

    def round(self) -> RoundReport:
        before = {d.uuid for d in self.domains()}
        report = self.factory.run_round()
        now = self.clock.now
        after = {d.uuid: d for d in self.domains()}
        for uuid in before - set(after):
            self._stopped(uuid, now, "destroyed")
        for uuid, domain in after.items():
            if uuid not in self.lives:
                self.lives[uuid] = Life(uuid, domain.name, now, factory=self.name)
                self.elapsed_marks[uuid] = [self.monotonic.now, None]
        self.last_report = report
        if self.first_round is None:
            self.first_round = report.time
        return report

    def step(self, seconds: float) -> RoundReport:
        """``seconds`` pass, the guests act, the engine runs a round."""
        self.advance(seconds)
        self.guests_act()
        return self.round()

    def _stopped(self, uuid: str, when: float, how: str) -> None:
        life = self.lives.get(uuid)
        if life is not None and life.stop is None:
            life.stop, life.how = when, how
            self.elapsed_marks[uuid][1] = self.monotonic.now
            self.ended += 1

    def forget(self, uuids) -> None:
        """Drop the ground truth of VMs already checked (a long soak keeps its memory flat)."""
        for uuid in uuids:
            self.lives.pop(uuid, None)
            self.elapsed_marks.pop(uuid, None)

    def teardown(self) -> None:
        for domain in self.domains():
            self.hypervisor.destroy(domain.uuid)
        self.hypervisor.close()


def config_text(name: str, state_dir: str, total: int, machinetypes: Dict[str, Dict[str, str]],
                settings: Optional[Dict[str, str]] = None) -> str:
    values = {
        "vac_space": "faults.example.org", "factory_name": name, "gocdb_sitename": "FAULT-SITE",
        "hs06_per_processor": "10", "state_dir": state_dir, "libvirt_uri": "test:///default",
        "domain_type": "test", "total_processors": str(total), "mb_per_processor": "64",
    }
    values.update(settings or {})
    text = "[settings]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    for mt, options in machinetypes.items():
        text += f"\n[machinetype {mt}]\n" + "".join(f"{k} = {v}\n" for k, v in options.items())
    return text


def make_engine(directory: str, total: int, machinetypes: Dict[str, Dict[str, str]],
                fate: Callable[[Machine, float], Guest], settings: Optional[Dict[str, str]] = None,
                start: float = START, seed: int = 7) -> Engine:
    name = f"vfeng{os.getpid()}x{next(_names)}.faults.example.org"
    state_dir = os.path.join(directory, "state")
    config_path = os.path.join(directory, "vacfactory.conf")
    with open(config_path, "w") as f:
        f.write(config_text(name, state_dir, total, machinetypes, settings))
    clock, monotonic = Clock(start), Clock(1000.0)
    watcher = ConfigWatcher(ConfigSources.for_main_file(config_path), host_facts=HOST)
    hypervisor = LibvirtHypervisor("test:///default")
    factory = Factory(
        EngineParts(config_source=watcher, hypervisor=hypervisor, store=MachineStore(state_dir),
                    builder=VMBuilder(state_dir), boundary=VMBoundary(), accountant=Accountant.for_config(watcher)),
        Environment(host_processors=64, clock=clock, monotonic=monotonic, load_average=lambda: 0.0,
                    rng=random.Random(seed)),
    )
    factory.start()
    return Engine(factory, hypervisor, clock, monotonic, state_dir, name, config_path, fate)


def fake_kernel(directory: str) -> str:
    path = os.path.join(directory, "vmlinux")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(b"\x7fELF not really a kernel")
    return path

