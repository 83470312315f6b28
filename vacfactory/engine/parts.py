"""What a Factory is built from: its collaborators, and its environment (clocks, host, hooks).

``EngineParts``: ``config_source`` has ``current`` and ``poll()`` returning an object with
``config``, ``changed`` and ``errors`` (config.loader.ConfigWatcher); ``hypervisor`` runs the
domains; ``store`` holds the machine directories; ``builder`` describes a VM (engine.vmbuild);
``boundary`` publishes a VM's MJF/joboutputs and reads what it wrote (engine.boundary);
``accountant`` writes its APEL record (engine.accountant).

``Environment``: the defaults are the real ones (the daemon overrides the clock, the wake event
and the hooks; tests inject their own clocks, load, randomness and free space).
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vacfactory.core.views import SpaceView
from vacfactory.engine.pause import free_bytes
from vacfactory.hypervisor.base import Hypervisor
from vacfactory.state.machines import Machine, MachineStore


@dataclass(frozen=True)
class EngineParts:
    config_source: Any
    hypervisor: Hypervisor
    store: MachineStore
    builder: Any
    boundary: Any
    accountant: Any


def _load_average() -> float:
    return max(os.getloadavg())


@dataclass(frozen=True)
class Environment:
    #: the processors the host has (the factory never plans more)
    host_processors: int = field(default_factory=lambda: os.cpu_count() or 1)
    clock: Callable[[], float] = time.time
    #: elapsed time, to tell a step of the wall clock from time passing: None means
    #: time.monotonic for the real clock, and no clock-step detection for an injected one
    monotonic: Optional[Callable[[], float]] = None
    load_average: Callable[[], float] = _load_average
    rng: Optional[random.Random] = None
    free_space: Callable[[str], int] = free_bytes
    #: ends the wait between rounds (the daemon shares it with the image cache, whose finished
    #: downloads wake the engine); None: the factory makes its own
    wake: Optional[threading.Event] = None
    #: the space-wide view given this factory's own view (config, own, now) -> SpaceView
    space_view: Optional[Callable[[object, SpaceView, float], SpaceView]] = None
    #: hears about every VM that ran and ended, once its `finished` is written
    on_finished: Optional[Callable[[Machine], None]] = None
    #: hears about every VM this engine starts, mid-round
    on_created: Optional[Callable[[Machine], None]] = None
