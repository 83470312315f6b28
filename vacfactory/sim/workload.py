"""The workload model: how much work each machinetype's experiment has over time.

A machinetype's supply is ``steady`` (always work), ``bursty`` (work for ``on_hours``, then
none for ``off_hours``, repeating, starting ``phase_hours`` into the cycle) or ``drained``
(work except from ``from_hours`` for ``for_hours``, default a day). A VM that starts while its
machinetype has work runs its lifetime (lognormal, mean ``mean_hours``) and ends ``200``; one
that starts when there is none ends after ``nowork_seconds`` with ``300 Nothing to do`` (or,
with ``"nowork_ends": "fizzle"``, with no message: a fizzle).

A workload file is JSON::

    {"hours": 168, "warmup_hours": 24,
     "machinetypes": {"atlas": {"supply": "steady", "mean_hours": 12},
                      "lhcb": {"supply": "bursty", "on_hours": 6, "off_hours": 6}},
     "share_change": {"at_hours": 96, "shares": {"atlas": 2, "lhcb": 5}}}

Machinetypes not named in the file get a steady supply; shares come from the configuration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from vacfactory.errors import VacFactoryError

SUPPLIES = ("steady", "bursty", "drained")


class WorkloadError(VacFactoryError):
    """A workload file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Supply:
    """When a machinetype's experiment has work."""

    kind: str = "steady"
    on_hours: float = 6.0
    off_hours: float = 6.0
    phase_hours: float = 0.0
    from_hours: float = 48.0
    for_hours: float = 24.0

    def has_work(self, seconds: float) -> bool:
        hours = seconds / 3600.0
        if self.kind == "bursty":
            return (hours + self.phase_hours) % (self.on_hours + self.off_hours) < self.on_hours
        if self.kind == "drained":
            return not self.from_hours <= hours < self.from_hours + self.for_hours
        return True


@dataclass(frozen=True)
class WorkloadType:
    """One machinetype's work and the life of its VMs."""

    name: str
    share: float
    supply: Supply = field(default_factory=Supply)
    mean_hours: float = 12.0
    sigma: float = 0.5
    #: how long a VM that finds no work lives before it ends "300 Nothing to do"
    nowork_seconds: float = 300.0
    #: how it ends: "300" (the message) or "fizzle" (no message, shorter than fizzle_seconds)
    nowork_ends: str = "300"
    #: the longest payload a pilot runs: the remaining payload when a VM is given notice
    payload_max_seconds: float = 3600.0
    max_wallclock_seconds: float = 48 * 3600.0
    #: the machinetype's backoff_seconds and fizzle_seconds (None: the simulation's)
    backoff_seconds: Optional[float] = None
    fizzle_seconds: Optional[float] = None

    def lifetime(self, rng) -> float:
        mu = math.log(self.mean_hours * 3600.0) - self.sigma ** 2 / 2.0  # mean = mean_hours
        return min(rng.lognormvariate(mu, self.sigma), self.max_wallclock_seconds)


@dataclass(frozen=True)
class ShareChange:
    at_hours: float
    shares: Mapping[str, float]


@dataclass(frozen=True)
class Workload:
    types: Tuple[WorkloadType, ...]
    hours: float = 168.0
    warmup_hours: float = 24.0
    share_change: Optional[ShareChange] = None


def parse_workload(text: str, shares: Mapping[str, float], where: str,
                   defaults: Optional[Mapping[str, Any]] = None) -> Workload:
    """A workload from JSON ``text`` for machinetypes with ``shares`` (from the configuration).

    ``defaults`` override WorkloadType's defaults (e.g. fizzle and wallclock from the
    configuration). Errors name ``where`` and the entry.
    """
    try:
        data = json.loads(text)
    except ValueError as error:
        raise WorkloadError(f"{where}: not JSON: {error}") from None
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: the top level must be an object")
    unknown = set(data) - {"hours", "warmup_hours", "machinetypes", "share_change"}
    if unknown:
        raise WorkloadError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    hours = _number(data.get("hours", 168.0), f"{where}: hours", 0.1, 24 * 366)
    warmup = _number(data.get("warmup_hours", min(24.0, hours / 4)), f"{where}: warmup_hours",
                     0.0, hours - 0.01)
    entries = data.get("machinetypes", {})
    if not isinstance(entries, dict):
        raise WorkloadError(f"{where}: machinetypes must be an object")
    for name in entries:
        if name not in shares:
            raise WorkloadError(f"{where}: machinetypes.{name}: not a configured machinetype "
                                f"with a share ({', '.join(sorted(shares)) or 'none'})")
    types = tuple(_type(name, share, entries.get(name, {}), f"{where}: machinetypes.{name}",
                        defaults or {})
                  for name, share in shares.items())
    change = None
    if "share_change" in data:
        change = _share_change(data["share_change"], shares, f"{where}: share_change")
    return Workload(types, hours, warmup, change)


_TYPE_KEYS = {"supply": None, "nowork_ends": None, "on_hours": (0.01, 1e4), "off_hours": (0.0, 1e4),
              "phase_hours": (0.0, 1e4), "from_hours": (0.0, 1e5), "for_hours": (0.0, 1e5),
              "mean_hours": (0.01, 1e3), "sigma": (0.0, 3.0), "nowork_seconds": (1.0, 86400.0),
              "payload_max_seconds": (1.0, 7 * 86400.0)}


def _type(name: str, share: float, entry: Any, where: str,
          defaults: Mapping[str, Any]) -> WorkloadType:
    if not isinstance(entry, dict):
        raise WorkloadError(f"{where}: must be an object")
    unknown = set(entry) - set(_TYPE_KEYS)
    if unknown:
        raise WorkloadError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    kind = entry.get("supply", "steady")
    if kind not in SUPPLIES:
        raise WorkloadError(f"{where}.supply: {kind!r} is not one of {', '.join(SUPPLIES)}")
    ends = entry.get("nowork_ends", "300")
    if ends not in ("300", "fizzle"):
        raise WorkloadError(f"{where}.nowork_ends: {ends!r} is not 300 or fizzle")
    values = {key: _number(entry[key], f"{where}.{key}", *bounds)
              for key, bounds in _TYPE_KEYS.items() if bounds and key in entry}
    supply_keys = ("on_hours", "off_hours", "phase_hours", "from_hours", "for_hours")
    supply = Supply(kind, **{k: v for k, v in values.items() if k in supply_keys})
    rest = dict(defaults)
    rest["nowork_ends"] = ends
    rest.update({k: v for k, v in values.items() if k not in supply_keys})
    return WorkloadType(name, share, supply, **rest)


def _share_change(entry: Any, shares: Mapping[str, float], where: str) -> ShareChange:
    if not isinstance(entry, dict) or not isinstance(entry.get("shares"), dict):
        raise WorkloadError(f"{where}: must be an object with at_hours and shares")
    at = _number(entry.get("at_hours"), f"{where}.at_hours", 0.0, 1e5)
    new: Dict[str, float] = {}
    for name, value in entry["shares"].items():
        if name not in shares:
            raise WorkloadError(f"{where}.shares.{name}: not a configured machinetype")
        new[name] = _number(value, f"{where}.shares.{name}", 0.0, 1e9)
    if sum(new.values()) <= 0:
        raise WorkloadError(f"{where}.shares: at least one share must be above 0")
    return ShareChange(at, new)


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkloadError(f"{where}: {value!r} is not a number")
    if not low <= value <= high:
        raise WorkloadError(f"{where}: {value} is not in [{low:g}, {high:g}]")
    return float(value)
