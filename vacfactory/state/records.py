"""The records kept in a machine directory, as frozen dataclasses with JSON round-trips.

Each record is one small JSON file written atomically; which files exist tells the VM's
state (see docs/ARCHITECTURE.md). Readers are strict about types: a record that does not
parse is a StateError naming the file, never a half-trusted value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

from vacfactory.errors import StateError

T = TypeVar("T")


@dataclass(frozen=True)
class VMRecord:
    """What a VM is: written once (vm.json) before its domain exists, never changed.

    It carries everything accounting and enforcement need, so a VM stays fully manageable
    and accountable even after its machinetype has left the configuration.
    """

    uuid: str
    name: str                 # libvirt domain name = VM hostname, <short>-NN.<domain>
    slot: int
    factory: str
    space: str
    machinetype: str
    machine_model: str
    processors: int
    memory_mb: int
    created: float
    shutdown_time: float      # the VM's shutdown time at creation (drain may move it earlier)
    hs06_per_processor: Optional[float] = None
    accounting_fqan: Optional[str] = None
    machinegroup: str = ""
    fizzle_seconds: float = 600.0
    mjf_transport: str = "http"
    address: Optional[str] = None   # IPv4 on the private network
    mac: Optional[str] = None
    token: str = ""                 # per-VM secret for the HTTP MJF/metadata server
    root_image_path: Optional[str] = None  # the cached base image its overlay reads (never replaced)

    @property
    def hs06(self) -> float:
        """HS06 of the whole VM (1.0 per processor when the site set no benchmark, as Vac)."""
        return (self.hs06_per_processor or 1.0) * self.processors


@dataclass(frozen=True)
class Started:
    time: float


@dataclass(frozen=True)
class Heartbeat:
    """The factory's last observation of a running VM (not the VM's own heartbeat file).

    ``cpu_percentage`` is Vac's heartbeat figure: CPU use since the previous observation, in
    percent summed over the VM's processors (None for the first observation).
    """

    time: float
    cpu_seconds: float
    cpu_percentage: Optional[float] = None


@dataclass(frozen=True)
class Finished:
    """How and when a VM ended; written before any accounting so the record is deterministic."""

    time: float               # when the factory noticed
    end_time: float           # APEL EndTime: stop event time, else the last observation
    cpu_seconds: float
    outcome: str              # core.outcomes.Outcome value
    reason: str               # 'shutdown_message', 'no_message', a KillReason value, 'create_failed', 'vanished'
    code: Optional[int] = None
    text: str = ""
    cpu_efficiency: Optional[float] = None  # CPU seconds / (wall seconds x processors)

    @property
    def message(self) -> str:
        return f"{self.code} {self.text}".strip() if self.code is not None else ""


@dataclass(frozen=True)
class Accounted:
    time: float
    archive: Optional[str] = None   # archive file written, or None when no record was due
    queued: Optional[str] = None    # dirq element name
    skipped: Optional[str] = None   # why no record (fizzled, never started)


@dataclass(frozen=True)
class Cleaned:
    time: float


def to_json(record: Any) -> Dict[str, Any]:
    return dataclasses.asdict(record)


def from_json(cls: Type[T], value: Any, source: str) -> T:
    """Build ``cls`` from decoded JSON, checking field names and basic types."""
    if not isinstance(value, Mapping):
        raise StateError("not a JSON object", path=source)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(value) - set(fields)
    if unknown:
        raise StateError(f"unknown fields {sorted(unknown)}", path=source)
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            if field.default is dataclasses.MISSING:
                raise StateError(f"missing field {name!r}", path=source)
            continue
        kwargs[name] = _check_type(name, value[name], field.type, source)
    return cls(**kwargs)  # type: ignore[call-arg]


_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def _check_type(name: str, value: Any, annotation: Any, source: str) -> Any:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = text.startswith("Optional[")
    base = text[len("Optional["):-1] if optional else text
    if value is None:
        if optional:
            return None
        raise StateError(f"field {name!r} may not be null", path=source)
    allowed = _TYPES.get(base)
    if allowed is None:
        return value
    if isinstance(value, bool) and base != "bool":
        raise StateError(f"field {name!r} has the wrong type", path=source)
    if not isinstance(value, allowed):
        raise StateError(f"field {name!r} should be {base}, not {type(value).__name__}", path=source)
    return float(value) if base == "float" else value
