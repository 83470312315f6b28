"""The status page's time series: one point per minute per machinetype, kept for a week.

Points live in ``<state_dir>/history/<hour>.json``, one file per hour (``hour``: Unix time of
the hour's start). Adding a point rewrites only the current hour's file, atomically
(vacfactory/atomic.py), so a kill -9 at any instant loses at most the minute being written,
and a restart reads the history back. Files older than a week are deleted.

A file::

    {"format": 1, "fields": [...FIELDS...],
     "points": [[minute, {"machinetype": [value per field]}], ...]}

Bounded: a point keeps at most ``MAX_CODES`` shutdown codes (the rest are summed under
``"other"``), names are machinetype names (at most ``MAX_NAME`` characters: longer ones, which
only a peer's answer could bring, are cut), and at most ``KEEP_HOURS + 1`` files exist. A week
of 1-minute points of one machinetype takes under ``WEEK_BYTES_PER_MACHINETYPE`` on disk
(tests/unit/test_view_history.py checks it with worst-case points).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import astuple, dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Tuple

from vacfactory.atomic import atomic_write_json, remove_stale_temporaries

log = logging.getLogger(__name__)

FORMAT = 1
POINT_SECONDS = 60
HOUR_SECONDS = 3600
KEEP_HOURS = 7 * 24
#: hours of points the page shows (and what is kept in memory)
PAGE_HOURS = 24
MAX_CODES = 8
MAX_NAME = 64
#: documented bound on disk use: a week of points of one machinetype, worst case
WEEK_BYTES_PER_MACHINETYPE = 4 * 1024 * 1024
_FILE_RE = re.compile(r"([0-9]{1,12})\.json\Z")


@dataclass(frozen=True)
class Sample:
    """One machinetype during one minute."""

    #: configured share, normalised over this factory's machinetypes (0..1)
    target_share: float = 0.0
    #: achieved share of running HS06 on this factory, and across the space (0..1)
    share: float = 0.0
    space_share: float = 0.0
    #: VMs created during the minute
    started: int = 0
    #: 1 if the machinetype was backing off at the end of the minute
    backoff: int = 0
    #: CPU efficiency of its VMs that ended in the last day; None: none ended
    cpu_efficiency: Optional[float] = None
    running_processors: int = 0
    #: VMs that ended during the minute: shutdown code ("none": no message) -> count
    outcomes: Mapping[str, int] = field(default_factory=dict)


FIELDS = ("target_share", "share", "space_share", "started", "backoff", "cpu_efficiency",
          "running_processors", "outcomes")


def _bounded_outcomes(outcomes: Mapping[str, int]) -> Dict[str, int]:
    """At most MAX_CODES codes (the most frequent); the rest summed as "other"."""
    items = sorted(((str(k)[:8], int(v)) for k, v in outcomes.items() if int(v) > 0),
                   key=lambda kv: (-kv[1], kv[0]))
    kept = dict(items[:MAX_CODES])
    rest = sum(v for _, v in items[MAX_CODES:])
    if rest:
        kept["other"] = kept.get("other", 0) + rest
    return kept


def _round(value: Optional[float]) -> Optional[float]:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 4)


def encode(sample: Sample) -> list:
    return [_round(sample.target_share), _round(sample.share), _round(sample.space_share),
            int(sample.started), int(bool(sample.backoff)), _round(sample.cpu_efficiency),
            int(sample.running_processors), _bounded_outcomes(sample.outcomes)]


def decode(values: object, where: str) -> Sample:
    """A sample from a file's list; ValueError naming ``where`` if it is not one."""
    if not isinstance(values, list) or len(values) != len(FIELDS):
        raise ValueError(f"{where}: expected a list of {len(FIELDS)} values")
    t, s, ss, started, backoff, eff, procs, outcomes = values
    numbers = (t, s, ss, eff)
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in numbers):
        raise ValueError(f"{where}: shares and efficiency must be numbers or null")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (started, backoff, procs)):
        raise ValueError(f"{where}: counts must be non-negative integers")
    if not isinstance(outcomes, dict) or not all(isinstance(v, int) for v in outcomes.values()):
        raise ValueError(f"{where}: outcomes must map codes to counts")
    return Sample(t or 0.0, s or 0.0, ss or 0.0, started, backoff, eff, procs, _bounded_outcomes(outcomes))


Point = Tuple[int, Dict[str, Sample]]


class HistoryStore:
    """The bounded, crash-safe series. One writer (the status page's thread)."""

    def __init__(self, directory: str, sync: bool = True, now: Optional[float] = None) -> None:
        """Reads the points of the day before ``now`` (default: the wall clock); files from
        the future (a clock stepped back) are ignored, and deleted by the next new hour."""
        self.directory = directory
        self.sync = sync
        #: the last PAGE_HOURS of points, oldest first
        self.points: List[Point] = []
        self._hour: Optional[int] = None
        self._hour_points: List[Point] = []
        os.makedirs(directory, mode=0o755, exist_ok=True)
        remove_stale_temporaries(directory)  # a kill -9 mid-write leaves one
        self._load(time.time() if now is None else now)

    # -- reading ----------------------------------------------------------------------

    def _hours_on_disk(self) -> List[int]:
        hours = []
        for name in os.listdir(self.directory):
            match = _FILE_RE.match(name)
            if match:
                hours.append(int(match.group(1)))
        return sorted(hours)

    def _read_hour(self, hour: int) -> List[Point]:
        path = self._path(hour)
        try:
            with open(path, "rb") as handle:
                doc = json.loads(handle.read(WEEK_BYTES_PER_MACHINETYPE).decode("utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("points"), list):
                raise ValueError(f"{path}: not a format {FORMAT} history file")
            points = []
            for index, item in enumerate(doc["points"]):
                where = f"{path}: points[{index}]"
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                        and isinstance(item[1], dict)):
                    raise ValueError(f"{where}: expected [minute, {{machinetype: values}}]")
                points.append((item[0], {str(name)[:MAX_NAME]: decode(values, f"{where}.{name}")
                                         for name, values in item[1].items()}))
            return points
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError too
            log.warning("history: %s: skipped (%s)", path, error)
            return []

    def _load(self, now: float) -> None:
        current = int(now) - int(now) % HOUR_SECONDS
        hours = [h for h in self._hours_on_disk() if current - PAGE_HOURS * HOUR_SECONDS < h <= current]
        for hour in hours:
            self.points.extend(self._read_hour(hour))
        self.points.sort(key=lambda p: p[0])
        if hours:
            self._hour = hours[-1]
            self._hour_points = [p for p in self.points if p[0] - p[0] % HOUR_SECONDS == hours[-1]]

    # -- writing ----------------------------------------------------------------------

    def _path(self, hour: int) -> str:
        return os.path.join(self.directory, f"{hour}.json")

    def add(self, now: float, samples: Mapping[str, Sample]) -> None:
        """The point of the minute containing ``now`` (replacing one already there)."""
        minute = int(now) - int(now) % POINT_SECONDS
        hour = minute - minute % HOUR_SECONDS
        point = (minute, {name[:MAX_NAME]: replace(sample, outcomes=_bounded_outcomes(sample.outcomes))
                          for name, sample in samples.items()})
        if hour != self._hour:
            self._hour, self._hour_points = hour, []
            self._prune(hour)
        if self._hour_points and self._hour_points[-1][0] == minute:
            self._hour_points[-1] = point
        else:
            self._hour_points.append(point)
        if self.points and self.points[-1][0] == minute:
            self.points[-1] = point
        else:
            self.points.append(point)
        cut = minute - PAGE_HOURS * HOUR_SECONDS
        while self.points and self.points[0][0] <= cut:
            self.points.pop(0)
        atomic_write_json(self._path(hour), {
            "format": FORMAT, "fields": list(FIELDS),
            "points": [[m, {n: encode(s) for n, s in values.items()}] for m, values in self._hour_points],
        }, sync=self.sync)

    def _prune(self, current_hour: int) -> None:
        """Delete files older than a week (or from the future: a clock stepped back)."""
        for hour in self._hours_on_disk():
            if hour <= current_hour - KEEP_HOURS * HOUR_SECONDS or hour > current_hour:
                try:
                    os.unlink(self._path(hour))
                except OSError as error:
                    log.warning("history: cannot delete %s: %s", self._path(hour), error)
        if self.points and self.points[-1][0] >= current_hour + HOUR_SECONDS:
            self.points = [p for p in self.points if p[0] < current_hour]

    # -- the page ---------------------------------------------------------------------

    def series(self, since: float) -> Dict[str, Dict[str, list]]:
        """machinetype -> {"time": [...], field: [...]} for the points after ``since``; a
        machinetype missing from a point has null there (it was not configured then)."""
        points = [p for p in self.points if p[0] > since]
        names = sorted({name for _, values in points for name in values})
        result: Dict[str, Dict[str, list]] = {}
        for name in names:
            columns: Dict[str, list] = {"time": []}
            for f in FIELDS:
                columns[f] = []
            for minute, values in points:
                sample = values.get(name)
                if sample is None:
                    continue
                columns["time"].append(minute)
                for f, value in zip(FIELDS, astuple(sample)):
                    columns[f].append(dict(value) if f == "outcomes" else value)
            result[name] = columns
        return result
