"""Ground truth about VMs, independent of the factory, and simulated guests for the test driver.

:class:`GroundTruth` watches a libvirt daemon on its own connection and records, for every
domain whose name one of the registered factories would use, when it started and when it
stopped (lifecycle events, stamped on arrival; a periodic listing fills in what an event
missed). The fault checks compare the factory's records with these times, so a factory that
loses or shortens a VM cannot mark its own homework.

:class:`SimulatedGuests` adds what a real guest does on libvirt's test driver, where nothing
boots: while its domain runs it prints to its serial console (``console.log`` in its machine
directory, the file the factory reads as a VM's last sign of life when it ended while the
factory was down), and at the end of a lifetime drawn when it first appears it may write
``joboutputs/shutdown_message`` and powers off (its domain is destroyed on the guests' own
connection). Whether the factory is alive, dead or blind makes no difference to them.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Pattern

from vacfactory.engine import naming
from vacfactory.errors import HypervisorError
from vacfactory.hypervisor.base import DomainEvent
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor


@dataclass
class Life:
    """One domain's life as seen from outside the factory."""

    uuid: str
    name: str
    start: float
    stop: Optional[float] = None
    #: where ``stop`` came from: "event", "listing" (approximate), "powered off", "outage"
    how: str = ""
    #: simulated guests only: when it powers off, and what shutdown_message it leaves
    fate: Optional[float] = None
    message: Optional[str] = None
    factory: str = ""
    #: the start event was missed (e.g. the watcher was reconnecting): ``start`` is when a
    #: listing first showed the domain, an upper bound only
    approx_start: bool = False


@dataclass
class Registered:
    """A factory whose domains are watched."""

    name: str
    pattern: Pattern[str]
    state_dir: str
    #: simulated guests: draws a lifetime in seconds and a shutdown_message (or None)
    lifetime: Optional[Callable[[random.Random], float]] = None
    message: Optional[Callable[[random.Random], Optional[str]]] = None
    lives: Dict[str, Life] = field(default_factory=dict)


class GroundTruth:
    """Start and stop times of the watched factories' domains (see the module doc)."""

    def __init__(self, uri: str, poll_seconds: float = 0.5, hv=None) -> None:
        """``hv``: watch this hypervisor (a ContainerHypervisor) instead of libvirt at ``uri``."""
        self.uri = uri
        self.poll_seconds = poll_seconds
        self._lock = threading.RLock()
        self._factories: List[Registered] = []
        self._stopping = threading.Event()
        self.hv = hv if hv is not None else LibvirtHypervisor(uri)
        self.hv.set_event_callback(self._on_event)
        self.reachable = True
        self._thread = threading.Thread(target=self._loop, name="ground-truth", daemon=True)
        self._thread.start()

    # -- registration and queries ---------------------------------------------------------

    def register(self, name: str, state_dir: str,
                 lifetime: Optional[Callable[[random.Random], float]] = None,
                 message: Optional[Callable[[random.Random], Optional[str]]] = None) -> Registered:
        entry = Registered(name=name, pattern=naming.domain_pattern(name), state_dir=state_dir,
                           lifetime=lifetime, message=message)
        with self._lock:
            self._factories.append(entry)
        return entry

    def unregister(self, entry: Registered) -> None:
        with self._lock:
            if entry in self._factories:
                self._factories.remove(entry)

    def lives(self, name: str) -> Dict[str, Life]:
        """A copy of the lives of factory ``name``'s domains."""
        with self._lock:
            for entry in self._factories:
                if entry.name == name:
                    return {u: Life(**vars(l)) for u, l in entry.lives.items()}
        return {}

    def domains(self, name: str):
        """The domains of factory ``name`` that the hypervisor lists now."""
        pattern = naming.domain_pattern(name)
        return [d for d in self.hv.list_domains() if pattern.match(d.name)]

    def settle(self, name: str, timeout: float = 5.0) -> None:
        """Catch up with a listing (domains whose start event was missed), then wait until
        every domain that is gone has its stop recorded (events are async)."""
        self.step()
        deadline = time.monotonic() + timeout
        while True:
            listed = {d.uuid for d in self.domains(name)}
            now = time.time()
            with self._lock:
                entry = self._entry(name)
                pending = [l for u, l in entry.lives.items() if l.stop is None and u not in listed]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    for life in pending:  # no event came: the listing says it is gone
                        life.stop, life.how = now, "listing"
                    return
            time.sleep(0.05)

    def mark_all_stopped(self, name: str, when: float, how: str) -> None:
        """Every domain of ``name`` that was running ended at ``when`` (a test-driver outage)."""
        with self._lock:
            for life in self._entry(name).lives.values():
                if life.stop is None:
                    life.stop, life.how = when, how

    def _entry(self, name: str) -> Registered:
        for entry in self._factories:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def _owner(self, domain_name: str) -> Optional[Registered]:
        for entry in self._factories:
            if entry.pattern.match(domain_name):
                return entry
        return None

    # -- observation ----------------------------------------------------------------------

    def _on_event(self, event: DomainEvent) -> None:
        with self._lock:
            entry = self._owner(event.name)
            if entry is None:
                return
            life = entry.lives.get(event.uuid)
            if event.kind == "started":
                if life is None:
                    entry.lives[event.uuid] = Life(event.uuid, event.name, event.time, factory=entry.name)
                elif event.time < life.start and life.stop is None:
                    life.start, life.approx_start = event.time, False
            elif event.kind in ("stopped", "crashed"):
                if life is None:  # its start went unseen (it was created before we watched)
                    return
                if life.stop is None or life.how == "listing":
                    life.stop, life.how = event.time, "event"

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.step()
            self._stopping.wait(self.poll_seconds)

    def step(self) -> None:
        try:
            domains = self.hv.list_domains()
        except HypervisorError:
            self.reachable = False
            return
        self.reachable = True
        now = time.time()
        with self._lock:
            listed = set()
            for domain in domains:
                entry = self._owner(domain.name)
                if entry is None:
                    continue
                listed.add(domain.uuid)
                if domain.uuid not in entry.lives:
                    entry.lives[domain.uuid] = Life(domain.uuid, domain.name, now, factory=entry.name,
                                                    approx_start=True)
                self.observe_running(entry, entry.lives[domain.uuid], now)

    def observe_running(self, entry: Registered, life: Life, now: float) -> None:
        """Hook for simulated guests: called for each running domain at each step."""

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.hv.close()


class SimulatedGuests(GroundTruth):
    """Ground truth plus guests that print to their console and power off on their own."""

    def __init__(self, uri: str, poll_seconds: float = 0.2, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.powered_off = 0
        #: while set, guests keep printing but none powers off (a test wants a quiet moment)
        self.hold = threading.Event()
        super().__init__(uri, poll_seconds)

    def observe_running(self, entry: Registered, life: Life, now: float) -> None:
        if entry.lifetime is None:
            return
        if life.fate is None:
            life.fate = life.start + entry.lifetime(self.rng)
            life.message = entry.message(self.rng) if entry.message else None
        machine_dir = os.path.join(entry.state_dir, "machines", life.uuid)
        if now < life.fate or self.hold.is_set():
            _console(machine_dir, f"GUEST: alive at {now:.2f}\n")
            return
        if life.message:
            try:
                with open(os.path.join(machine_dir, "joboutputs", "shutdown_message"), "w") as f:
                    f.write(life.message + "\n")
            except OSError:
                pass
        _console(machine_dir, f"GUEST: powering off at {now:.2f}\n")
        try:
            if self.hv.destroy(life.uuid):
                self.powered_off += 1
        except HypervisorError:
            pass


def _console(machine_dir: str, line: str) -> None:
    """Append to the VM's console log (never creating its machine directory)."""
    try:
        fd = os.open(os.path.join(machine_dir, "console.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        os.write(fd, line.encode())
    except OSError:  # a full disk: the guest's output is lost, as with virtlogd
        pass
    finally:
        os.close(fd)

