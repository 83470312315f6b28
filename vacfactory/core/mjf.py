"""Machine/Job Features (HSF-TN-2016-02) key values: the one place for MJF keys.

``state/`` writes these as files in ``machines/<uuid>/{machinefeatures,jobfeatures}/`` and
``vmio/`` serves them over HTTP; both take the dictionaries built here.

Values are plain text written byte for byte as Vac 03.01 writes them: without a trailing
newline, except ``allocated_cpu`` and ``allocated_CPU``, which Vac ends with one
(:data:`NEWLINE_KEYS`; a pilot that reads them raw, e.g. ``read`` in a shell or a byte
comparison, sees the same bytes on a Vac and a vacfactory factory). HSF clients (DIRAC's
``MJF``, PanDA's ``features.py``) strip whitespace anyway. Integers are written as integers
(``"8"``) and HS06 as a compact float (``"85.6"``).

Besides the 2016 keys we write Vac's deprecated ones, which older pilots still read, and the
site's ``machinefeatures_option_XXX`` extras (which may not replace any key we write).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

#: HSF-TN-2016-02 $MACHINEFEATURES keys (``hs06`` only when the site sets hs06_per_processor)
MACHINEFEATURES_KEYS: Tuple[str, ...] = ("total_cpu", "hs06", "shutdowntime", "grace_secs")

#: HSF-TN-2016-02 $JOBFEATURES keys (``hs06_job`` only when the site sets hs06_per_processor)
JOBFEATURES_KEYS: Tuple[str, ...] = (
    "allocated_cpu",
    "hs06_job",
    "shutdowntime_job",
    "grace_secs_job",
    "jobstart_secs",
    "job_id",
    "wall_limit_secs",
    "cpu_limit_secs",
    "max_rss_bytes",
    "max_swap_bytes",
    "scratch_limit_bytes",
)

#: pre-2016 machine keys Vac still writes
LEGACY_MACHINEFEATURES_KEYS: Tuple[str, ...] = ("phys_cores", "log_cores", "jobslots")

#: pre-2016 job keys Vac still writes (``mem_limit_MB`` is in units of 1000**2 bytes, as Vac)
LEGACY_JOBFEATURES_KEYS: Tuple[str, ...] = (
    "allocated_CPU",
    "cpufactor_lrms",
    "cpu_limit_secs_lrms",
    "wall_limit_secs_lrms",
    "mem_limit_MB",
)

#: keys whose value Vac ends with a newline (its makeMJF writes ``str(processors) + '\\n'`` for
#: these two and no newline for any other key)
NEWLINE_KEYS: Tuple[str, ...] = ("allocated_cpu", "allocated_CPU")

#: keys whose values change while a VM runs (re-read by clients; rewritten on drain)
DYNAMIC_MACHINEFEATURES_KEYS: Tuple[str, ...] = ("shutdowntime", "grace_secs")
DYNAMIC_JOBFEATURES_KEYS: Tuple[str, ...] = ("shutdowntime_job", "grace_secs_job")

_KEY = re.compile(r"[a-z0-9_]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESERVED_MACHINE_KEYS = frozenset(MACHINEFEATURES_KEYS + LEGACY_MACHINEFEATURES_KEYS)

Extras = Tuple[Tuple[str, str], ...]


def valid_key(name: str) -> bool:
    """True if ``name`` may be an MJF key we publish: ``[a-z0-9_]+`` (it becomes a file name
    and a URL path, so nothing else is allowed)."""
    return bool(_KEY.match(name))


def _check_text(what: str, value: str) -> None:
    if _CONTROL.search(value):
        raise ValueError(f"MJF {what} contains a control character or newline: {value!r}")


def _normalise_extras(extras: Union[Mapping[str, str], Iterable[Tuple[str, str]]]) -> Extras:
    """Extras as sorted (key, value) pairs, checked: valid names, no standard key, one line."""
    pairs = extras.items() if isinstance(extras, Mapping) else extras
    normal = tuple(sorted((str(key), str(value)) for key, value in pairs))
    seen = set()
    for key, value in normal:
        if not valid_key(key):
            raise ValueError(f"machinefeatures extra key {key!r} is not [a-z0-9_]+")
        if key in _RESERVED_MACHINE_KEYS:
            raise ValueError(f"machinefeatures extra {key!r} would override a standard key")
        if key in seen:
            raise ValueError(f"machinefeatures extra {key!r} given twice")
        seen.add(key)
        _check_text(f"machinefeatures extra {key!r}", value)
    return normal


@dataclass(frozen=True)
class MJFInput:
    """Everything the MJF values of one VM are computed from (times are epoch seconds).

    ``extra_machinefeatures`` may be given as a mapping; it is stored as sorted (key, value)
    pairs so the input stays frozen and hashable. ``scratch_bytes`` and ``max_swap_bytes`` are
    published as given (0 when the VM has no scratch disk or swap).
    """

    job_id: str
    processors: int
    jobstart: int
    shutdown_time: int
    mb_per_processor: int
    hs06_per_processor: Optional[float]
    grace_seconds: int = 0
    scratch_bytes: int = 0
    max_swap_bytes: int = 0
    #: stored as sorted pairs whatever was given (see the class docstring)
    extra_machinefeatures: Union[Extras, Mapping[str, str]] = ()

    def __post_init__(self) -> None:
        if not self.job_id or _CONTROL.search(self.job_id) or self.job_id != self.job_id.strip():
            raise ValueError(f"MJF job_id {self.job_id!r} is empty or not one plain word")
        if self.processors < 1:
            raise ValueError(f"MJF processors must be at least 1, not {self.processors}")
        for name in ("mb_per_processor", "grace_seconds", "scratch_bytes", "max_swap_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"MJF {name} may not be negative ({getattr(self, name)})")
        hs06 = self.hs06_per_processor
        if hs06 is not None and not (math.isfinite(hs06) and hs06 >= 0):
            raise ValueError(f"MJF hs06_per_processor {hs06!r} is not a finite number >= 0")
        object.__setattr__(
            self, "extra_machinefeatures", _normalise_extras(self.extra_machinefeatures)
        )

    @property
    def extras(self) -> Dict[str, str]:
        """The site's extra machinefeatures keys (``machinefeatures_option_XXX``)."""
        return dict(_normalise_extras(self.extra_machinefeatures))

    @property
    def wall_limit_seconds(self) -> int:
        """Seconds from job start to shutdown time; never negative."""
        return max(0, int(self.shutdown_time) - int(self.jobstart))

    @property
    def max_rss_bytes(self) -> int:
        return int(self.mb_per_processor) * int(self.processors) * 1048576


def format_hs06(value: float) -> str:
    """HS06 as a short float: rounded to 1/1000 so ``10.7 x 8`` is ``85.6``, not ``85.60000001``."""
    return repr(round(float(value), 3) + 0.0)


def machinefeatures(inp: MJFInput) -> Dict[str, str]:
    """``$MACHINEFEATURES`` key -> value for one VM (the VM is the whole "machine")."""
    processors = str(int(inp.processors))
    values = {
        "total_cpu": processors,
        "shutdowntime": str(int(inp.shutdown_time)),
        "grace_secs": str(int(inp.grace_seconds)),
        "phys_cores": processors,
        "log_cores": processors,
        "jobslots": "1",
    }
    if inp.hs06_per_processor is not None:
        values["hs06"] = format_hs06(inp.hs06_per_processor * inp.processors)
    values.update(inp.extras)
    return values


def jobfeatures(inp: MJFInput) -> Dict[str, str]:
    """``$JOBFEATURES`` key -> value for one VM (the VM is the "job")."""
    processors = str(int(inp.processors))
    allocated = processors + "\n"  # Vac's format for these two keys (NEWLINE_KEYS)
    wall = inp.wall_limit_seconds
    cpu = wall * int(inp.processors)
    rss = inp.max_rss_bytes
    values = {
        "allocated_cpu": allocated,
        "shutdowntime_job": str(int(inp.shutdown_time)),
        "grace_secs_job": str(int(inp.grace_seconds)),
        "jobstart_secs": str(int(inp.jobstart)),
        "job_id": inp.job_id,
        "wall_limit_secs": str(wall),
        "cpu_limit_secs": str(cpu),
        "max_rss_bytes": str(rss),
        "max_swap_bytes": str(int(inp.max_swap_bytes)),
        "scratch_limit_bytes": str(int(inp.scratch_bytes)),
        "allocated_CPU": allocated,
        "cpufactor_lrms": "1.0",
        "cpu_limit_secs_lrms": str(cpu),
        "wall_limit_secs_lrms": str(wall),
        "mem_limit_MB": str(rss // 1000000),
    }
    if inp.hs06_per_processor is not None:
        values["hs06_job"] = format_hs06(inp.hs06_per_processor * inp.processors)
    return values


def shutdown_keys(shutdown_time: int, grace_seconds: int) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(machinefeatures, jobfeatures) values to rewrite in a running VM whose shutdown time moved.

    Only the dynamic keys change: clients re-read ``shutdowntime``/``shutdowntime_job``, while
    ``wall_limit_secs`` and ``cpu_limit_secs`` are limits fixed when the job started (Vac too
    rewrites only the shutdown times).
    """
    when = str(int(shutdown_time))
    grace = str(int(grace_seconds))
    return (
        {"shutdowntime": when, "grace_secs": grace},
        {"shutdowntime_job": when, "grace_secs_job": grace},
    )
