"""APEL records: the one place for their fields, text form and the APEL server's rules.

Pure: no I/O and no clock (``now`` is passed in). ``vacfactory.accounting`` writes what this
module renders; tests and ``apel republish`` read records back with :func:`parse_message`.

Why validate here at all: the APEL loader rejects a whole message when one record breaks a
rule, and nobody at the site ever sees that rejection. So every record is checked against the
same rules *before* it is written (``JobRecord._check_fields``, ``SyncRecord``, ``CloudRecord``
of apel/apel, see docs in ``apel/README.md``), and a bad one becomes a logged error with the
VM kept for retry instead of a silently lost job.

Text form (as the APEL unloader writes it and ``RecordFactory`` parses it)::

    APEL-individual-job-message: v0.3
    Key: value
    ...
    %%

ASCII only (ssmsend decodes bodies as ASCII), one ``Key: value`` per line, ``%%`` after
every record, a trailing newline.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from vacfactory.errors import RecordInvalid

JOB_HEADER = "APEL-individual-job-message: v0.3"
SYNC_HEADER = "APEL-sync-message: v0.1"
CLOUD_HEADER = "APEL-cloud-message: v0.4"

JOB = "job"
SYNC = "sync"
CLOUD = "cloud"
KIND_OF_HEADER = {JOB_HEADER: JOB, SYNC_HEADER: SYNC, CLOUD_HEADER: CLOUD}

#: ServiceLevelType values the APEL server accepts (lower case) -> the spelling we write
BENCHMARK_TYPES = {"si2k": "si2k", "hepspec": "HEPSPEC", "hepscore23": "HEPscore23"}

#: APEL refuses EndTime more than this far in the future (JobRecord._check_fields)
APEL_FUTURE_LIMIT_SECONDS = 2 * 86400
#: we refuse a shorter skew: an EndTime after ``now`` means our clock stepped backwards;
#: the VM stays unaccounted and is retried once the clock has caught up
CLOCK_SKEW_TOLERANCE_SECONDS = 3600

#: DECIMAL(10,3): the largest ServiceLevel the database can hold
MAX_SERVICE_LEVEL = 9999999.999

#: the placeholder InfrastructureDescription, like Vac's APEL-VAC
DEFAULT_INFRASTRUCTURE_DESCRIPTION = "APEL-VACFACTORY"
DEFAULT_INFRASTRUCTURE_TYPE = "grid"
CLOUD_TYPE = "vacfactory"

_NULLS = ("", "none", "null")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_INT = re.compile(r"-?[0-9]+")
_ISO = "%Y-%m-%dT%H:%M:%SZ"

Fields = Tuple[Tuple[str, str], ...]


# --------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class RecordRules:
    """What the APEL server accepts for one record type."""

    allowed: Tuple[str, ...]
    mandatory: Tuple[str, ...]
    ints: Tuple[str, ...] = ()
    floats: Tuple[str, ...] = ()
    datetimes: Tuple[str, ...] = ()
    #: fields that are free text and keep ``none``/``null`` as text (APEL's VO exception)
    not_nullable: Tuple[str, ...] = ()
    #: column widths; anything not listed is VARCHAR(255)
    max_lengths: Tuple[Tuple[str, int], ...] = ()

    def max_length(self, key: str) -> int:
        return dict(self.max_lengths).get(key, 255)


JOB_RULES = RecordRules(
    allowed=(
        "Site", "SubmitHost", "MachineName", "Queue", "LocalJobId", "LocalUserId",
        "GlobalUserName", "FQAN", "VO", "VOGroup", "VORole", "WallDuration", "CpuDuration",
        "Processors", "NodeCount", "StartTime", "EndTime", "InfrastructureDescription",
        "InfrastructureType", "MemoryReal", "MemoryVirtual", "ServiceLevelType",
        "ServiceLevel", "SubmitHostType", "UpdateTime",
    ),
    mandatory=("Site", "LocalJobId", "WallDuration", "CpuDuration", "StartTime", "EndTime"),
    ints=("WallDuration", "CpuDuration", "Processors", "NodeCount", "MemoryReal", "MemoryVirtual"),
    floats=("ServiceLevel",),
    datetimes=("StartTime", "EndTime"),
    not_nullable=("VO", "VOGroup", "VORole"),
    max_lengths=(
        ("LocalJobId", 255), ("Queue", 100), ("InfrastructureDescription", 100),
        ("InfrastructureType", 20), ("ServiceLevelType", 50),
    ),
)

SYNC_RULES = RecordRules(
    allowed=("Site", "SubmitHost", "NumberOfJobs", "Month", "Year"),
    mandatory=("Site", "NumberOfJobs", "Month", "Year"),
    ints=("NumberOfJobs", "Month", "Year"),
)

CLOUD_RULES = RecordRules(
    allowed=(
        "RecordCreateTime", "VMUUID", "SiteName", "CloudComputeService", "MachineName",
        "LocalUserId", "LocalGroupId", "GlobalUserName", "FQAN", "VO", "VOGroup", "VORole",
        "Status", "StartTime", "EndTime", "SuspendDuration", "WallDuration", "CpuDuration",
        "CpuCount", "NetworkType", "NetworkInbound", "NetworkOutbound", "PublicIPCount",
        "Memory", "Disk", "BenchmarkType", "Benchmark", "StorageRecordId", "ImageId",
        "CloudType", "UpdateTime",
    ),
    mandatory=("VMUUID", "SiteName"),
    ints=(
        "SuspendDuration", "WallDuration", "CpuDuration", "NetworkInbound", "NetworkOutbound",
        "PublicIPCount", "Memory", "Disk",
    ),
    floats=("CpuCount", "Benchmark"),
    datetimes=("RecordCreateTime", "StartTime", "EndTime"),
    not_nullable=("VO", "VOGroup", "VORole"),
)

RULES_OF_KIND = {JOB: JOB_RULES, SYNC: SYNC_RULES, CLOUD: CLOUD_RULES}


class FieldInvalid(RecordInvalid):
    """One field of one record breaks a rule. Carries the field and the reason for the log."""

    def __init__(self, field: str, reason: str, *, record: Optional[str] = None) -> None:
        self.field = field
        self.reason = reason
        self.record = record
        where = f"{record}: " if record else ""
        super().__init__(f"{where}APEL field {field}: {reason}")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class VMUsage:
    """What the engine knows about one ended VM; everything an APEL record needs from it.

    Times are epoch seconds taken from persisted state (``started``, ``finished``), so a
    retry renders the same EndTime and APEL's REPLACE key (Site, LocalJobId, EndTime) absorbs
    a duplicate.
    """

    uuid: str
    machinetype: str
    #: the VM's name (cloud records' MachineName)
    hostname: str
    processors: int
    start_time: int
    end_time: int
    #: measured from libvirt, never guessed from the wall time
    cpu_seconds: int
    #: memory of the whole VM
    memory_mb: int
    #: None: not benchmarked; ServiceLevel 1.0 is written and the record is not sent
    hs06_per_processor: Optional[float] = None
    accounting_fqan: Optional[str] = None

    @property
    def wall_seconds(self) -> int:
        return int(self.end_time) - int(self.start_time)


@dataclass(frozen=True)
class RecordIdentity:
    """Who reports: the site, the space and this factory, plus the fixed descriptive fields."""

    site: str
    space: str
    factory: str
    benchmark_type: str = "HEPSPEC"
    infrastructure_description: str = DEFAULT_INFRASTRUCTURE_DESCRIPTION
    infrastructure_type: str = DEFAULT_INFRASTRUCTURE_TYPE

    @property
    def submit_host(self) -> str:
        return submit_host(self.space, self.factory)

    @property
    def global_user_name(self) -> str:
        return dn_from_space(self.space)


def submit_host(space: str, factory: str) -> str:
    """``<space>/vacfactory-<factory>``: Vac's ``SPACE/vac-HOST`` with our product name."""
    return f"{space}/vacfactory-{factory}"


def dn_from_space(space: str) -> str:
    """The space name reversed into DCs: ``vac01.example.com`` -> ``/DC=com/DC=example/DC=vac01``."""
    labels = [label for label in space.split(".") if label]
    return "".join(f"/DC={label}" for label in reversed(labels))


def placeholder_site(space: str) -> str:
    """Vac's Site when ``gocdb_sitename`` is unset: the space name minus its first label."""
    _, _, rest = space.partition(".")
    return rest or space


def canonical_benchmark_type(value: str) -> str:
    """``hepspec`` -> ``HEPSPEC``, ``HEPSCORE23`` -> ``HEPscore23``; FieldInvalid otherwise."""
    canonical = BENCHMARK_TYPES.get(value.strip().lower())
    if canonical is None:
        raise FieldInvalid(
            "ServiceLevelType", f"{value!r} is not one of {', '.join(BENCHMARK_TYPES.values())}"
        )
    return canonical


def format_service_level(value: float) -> str:
    """At most 3 decimals (the column is DECIMAL(10,3)), no float noise: 10.5, 1.0, 12.125."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def is_fizzle(usage: VMUsage, fizzle_seconds: float) -> bool:
    """A VM that ran less than ``fizzle_seconds`` gets no record (Vac's rule)."""
    return why_no_record(usage.wall_seconds, fizzle_seconds) is not None


def why_no_record(wall_seconds: Optional[float], fizzle_seconds: float) -> Optional[str]:
    """Vac's rule, in one place: why an ended VM gets no APEL record, or None if it gets one.

    A VM that never started (``wall_seconds`` None) or ran less than ``fizzle_seconds`` (a
    fizzle) gets none; every other VM does, whatever its outcome.
    """
    if wall_seconds is None:
        return "never started"
    if wall_seconds < fizzle_seconds:
        return f"ran {int(wall_seconds)} s, less than fizzle_seconds ({int(fizzle_seconds)})"
    return None


# --------------------------------------------------------------------------- rendering


def job_fields(usage: VMUsage, identity: RecordIdentity) -> Fields:
    """The individual job record of one VM, in Vac's field order."""
    level = usage.hs06_per_processor if usage.hs06_per_processor is not None else 1.0
    memory_kb = str(int(usage.memory_mb) * 1024)
    fields: List[Tuple[str, str]] = [
        ("Site", identity.site),
        ("SubmitHost", identity.submit_host),
        ("LocalJobId", usage.uuid),
        ("LocalUserId", identity.factory),
        ("Queue", usage.machinetype),
        ("GlobalUserName", identity.global_user_name),
    ]
    if usage.accounting_fqan:
        fields.append(("FQAN", usage.accounting_fqan))
    fields += [
        ("WallDuration", str(usage.wall_seconds)),
        ("CpuDuration", str(int(usage.cpu_seconds))),
        ("Processors", str(int(usage.processors))),
        ("NodeCount", "1"),
        ("InfrastructureDescription", identity.infrastructure_description),
        ("InfrastructureType", identity.infrastructure_type),
        ("StartTime", str(int(usage.start_time))),
        ("EndTime", str(int(usage.end_time))),
        ("MemoryReal", memory_kb),
        ("MemoryVirtual", memory_kb),
        ("ServiceLevelType", identity.benchmark_type),
        ("ServiceLevel", format_service_level(level)),
    ]
    return tuple(fields)


def sync_fields(site: str, submit_host_name: str, count: int, year: int, month: int) -> Fields:
    """One sync record: how many jobs of (Site, SubmitHost) ended in that month."""
    return (
        ("Site", site),
        ("SubmitHost", submit_host_name),
        ("NumberOfJobs", str(int(count))),
        ("Month", str(int(month))),
        ("Year", str(int(year))),
    )


def cloud_fields(usage: VMUsage, identity: RecordIdentity) -> Fields:
    """The v0.4 cloud record of one VM (CloudRecord field order).

    RecordCreateTime is left out on purpose: it would be the only field that changes between
    a first attempt and a retry, and the loader uses EndTime for completed VMs anyway.
    Memory is in MB, as the EGI cloud record defines it.
    """
    fields: List[Tuple[str, str]] = [
        ("VMUUID", usage.uuid),
        ("SiteName", identity.site),
        ("CloudComputeService", identity.space),
        ("MachineName", usage.hostname),
        ("LocalUserId", identity.factory),
        ("LocalGroupId", usage.machinetype),
        ("GlobalUserName", identity.global_user_name),
    ]
    if usage.accounting_fqan:
        fields.append(("FQAN", usage.accounting_fqan))
    fields += [
        ("Status", "completed"),
        ("StartTime", str(int(usage.start_time))),
        ("EndTime", str(int(usage.end_time))),
        ("SuspendDuration", "0"),
        ("WallDuration", str(usage.wall_seconds)),
        ("CpuDuration", str(int(usage.cpu_seconds))),
        ("CpuCount", str(int(usage.processors))),
        ("Memory", str(int(usage.memory_mb))),
    ]
    if usage.hs06_per_processor is not None:
        fields += [
            ("BenchmarkType", identity.benchmark_type),
            ("Benchmark", format_service_level(usage.hs06_per_processor)),
        ]
    fields.append(("CloudType", CLOUD_TYPE))
    return tuple(fields)


def render_message(header: str, records: Sequence[Fields]) -> str:
    """Header line, ``Key: value`` lines, ``%%`` after every record, trailing newline."""
    parts = [header, "\n"]
    for fields in records:
        for key, value in fields:
            parts.append(f"{key}: {value}\n")
        parts.append("%%\n")
    return "".join(parts)


def job_message(usage: VMUsage, identity: RecordIdentity, now: float) -> str:
    """Render and validate one VM's job message (one record per message). FieldInvalid if bad."""
    fields = job_fields(usage, identity)
    validate_fields(JOB, dict(fields), now, record=usage.uuid)
    return render_message(JOB_HEADER, [fields])


def cloud_message(usage: VMUsage, identity: RecordIdentity, now: float) -> str:
    """Render and validate one VM's cloud message. FieldInvalid if bad."""
    fields = cloud_fields(usage, identity)
    validate_fields(CLOUD, dict(fields), now, record=usage.uuid)
    return render_message(CLOUD_HEADER, [fields])


def sync_message(site: str, submit_host_name: str, count: int, year: int, month: int, now: float) -> str:
    """Render and validate one sync message (one record)."""
    fields = sync_fields(site, submit_host_name, count, year, month)
    validate_fields(SYNC, dict(fields), now, record=f"sync {year:04d}{month:02d}")
    return render_message(SYNC_HEADER, [fields])


# --------------------------------------------------------------------------- validation


def validate_fields(kind: str, fields: Mapping[str, str], now: float, *, record: Optional[str] = None) -> None:
    """Apply the APEL server's rules for ``kind`` (plus our stricter ones) to one record.

    Raises FieldInvalid naming the first field that breaks a rule. Ours on top of APEL's:
    values must be printable ASCII without surrounding blanks or ``%%``; integers may not be
    negative; EndTime may not be more than CLOCK_SKEW_TOLERANCE_SECONDS after ``now``;
    FQAN must start with ``/``; ServiceLevel must be positive.
    """
    rules = RULES_OF_KIND[kind]
    _check_text(rules, fields, record)
    present = {k: v for k, v in fields.items() if k in rules.not_nullable or v.strip().lower() not in _NULLS}
    for key in rules.mandatory:
        if key not in present:
            raise FieldInvalid(key, "mandatory field missing or null", record=record)
    numbers: Dict[str, int] = {}
    for key in rules.ints:
        if key in present:
            numbers[key] = _parse_int(key, present[key], record)
    times = {key: parse_datetime(key, present[key], record) for key in rules.datetimes if key in present}
    for key in rules.floats:
        if key in present:
            _parse_float(key, present[key], record)
    if kind == JOB:
        _check_job(present, times, now, record)
    elif kind == SYNC:
        if not 1 <= numbers["Month"] <= 12:
            raise FieldInvalid("Month", f"{numbers['Month']} is not a month", record=record)
        if not 1970 <= numbers["Year"] <= 9999:
            raise FieldInvalid("Year", f"{numbers['Year']} is not a plausible year", record=record)
    for key, value in numbers.items():
        if value < 0:
            raise FieldInvalid(key, f"{value} is negative", record=record)
    if "FQAN" in present and not present["FQAN"].startswith("/"):
        raise FieldInvalid("FQAN", f"{present['FQAN']!r} does not start with '/'", record=record)


def _check_text(rules: RecordRules, fields: Mapping[str, str], record: Optional[str]) -> None:
    for key, value in fields.items():
        if key not in rules.allowed:
            raise FieldInvalid(key, "unknown field (APEL rejects the whole message)", record=record)
        if not isinstance(value, str) or not _PRINTABLE_ASCII.fullmatch(value):
            raise FieldInvalid(key, f"{value!r} is not printable ASCII", record=record)
        if value != value.strip():
            raise FieldInvalid(key, f"{value!r} has leading or trailing blanks", record=record)
        if "%%" in value:
            raise FieldInvalid(key, "contains the record separator '%%'", record=record)
        limit = rules.max_length(key)
        if len(value) > limit:
            raise FieldInvalid(key, f"longer than {limit} characters", record=record)


def _check_job(present: Mapping[str, str], times: Mapping[str, int], now: float, record: Optional[str]) -> None:
    start, end = times["StartTime"], times["EndTime"]
    if end < start:
        raise FieldInvalid("EndTime", f"{end} is before StartTime {start}", record=record)
    if end > now + APEL_FUTURE_LIMIT_SECONDS:
        raise FieldInvalid("EndTime", f"{end} is more than 2 days in the future (APEL rejects it)", record=record)
    if end > now + CLOCK_SKEW_TOLERANCE_SECONDS:
        raise FieldInvalid(
            "EndTime", f"{end} is {end - now:.0f} s in the future: clock problem? kept for retry", record=record
        )
    unit = present.get("ServiceLevelType")
    level = present.get("ServiceLevel")
    if unit is None or level is None:
        # APEL substitutes 'custom' and then rejects it: always send both
        raise FieldInvalid("ServiceLevelType" if unit is None else "ServiceLevel",
                           "ServiceLevelType and ServiceLevel must be given together", record=record)
    if unit.lower() not in BENCHMARK_TYPES:
        raise FieldInvalid("ServiceLevelType", f"{unit!r} not valid (si2k, HEPSPEC, HEPscore23)", record=record)
    value = float(level)
    if not 0 < value <= MAX_SERVICE_LEVEL:
        raise FieldInvalid("ServiceLevel", f"{level} is not a positive DECIMAL(10,3)", record=record)


def _parse_int(key: str, value: str, record: Optional[str]) -> int:
    if not _INT.fullmatch(value):
        raise FieldInvalid(key, f"{value!r} is not an integer", record=record)
    return int(value)


def _parse_float(key: str, value: str, record: Optional[str]) -> float:
    try:
        number = float(value)
    except ValueError:
        raise FieldInvalid(key, f"{value!r} is not a number", record=record) from None
    if not math.isfinite(number):
        raise FieldInvalid(key, f"{value!r} is not a finite number", record=record)
    return number


def parse_datetime(key: str, value: str, record: Optional[str] = None) -> int:
    """APEL's datetime: epoch seconds or ``%Y-%m-%dT%H:%M:%SZ``; epoch seconds returned."""
    if _INT.fullmatch(value):
        return int(value)
    try:
        return calendar.timegm(time.strptime(value, _ISO))
    except ValueError:
        raise FieldInvalid(key, f"{value!r} is neither epoch seconds nor {_ISO}", record=record) from None


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Message:
    """One parsed APEL message: its kind and its records in order."""

    header: str
    kind: str
    records: Tuple[Mapping[str, str], ...]


def parse_message(text: str) -> Message:
    """Parse a message the way APEL's RecordFactory does, strictly. RecordInvalid if malformed.

    Strict where APEL is lenient in ways that would hide our own bugs: the text must be
    ASCII, the header known, every non-blank line ``Key: value``, no key twice in a record,
    and the message must end with ``%%``.
    """
    if not _PRINTABLE_ASCII.fullmatch(text.replace("\n", "").replace("\r", "").replace("\t", " ")):
        raise RecordInvalid("message is not ASCII")
    header, sep, body = text.replace("\r\n", "\n").partition("\n")
    header = header.strip()
    kind = KIND_OF_HEADER.get(header)
    if kind is None:
        raise RecordInvalid(f"message type {header!r} not recognised")
    if not sep or not body.rstrip().endswith("%%"):
        raise RecordInvalid("message does not end with the record separator '%%'")
    records: List[Mapping[str, str]] = []
    for chunk in body.split("%%"):
        if not chunk.strip():
            continue
        records.append(_parse_record(chunk))
    return Message(header=header, kind=kind, records=tuple(records))


def _parse_record(chunk: str) -> Mapping[str, str]:
    fields: Dict[str, str] = {}
    for line in chunk.split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise RecordInvalid(f"line {line!r} is not 'Key: value'")
        key = key.strip()
        if key in fields:
            raise RecordInvalid(f"field {key} given twice in one record")
        fields[key] = value.strip()
    return fields


def validate_message(message: Message, now: float) -> None:
    """Apply :func:`validate_fields` to every record of a parsed message."""
    for fields in message.records:
        record = fields.get("LocalJobId") or fields.get("VMUUID")
        validate_fields(message.kind, fields, now, record=record)


# --------------------------------------------------------------------------- months


def month_of(epoch: float) -> str:
    """``YYYYMM`` of an epoch time, in UTC (APEL derives EndYear/EndMonth the same way)."""
    t = time.gmtime(epoch)
    return f"{t.tm_year:04d}{t.tm_mon:02d}"


_MONTH = re.compile(r"([0-9]{4})(0[1-9]|1[0-2])")


def is_month(text: str) -> bool:
    return bool(_MONTH.fullmatch(text))


def parse_month(text: str) -> Tuple[int, int]:
    """``YYYYMM`` -> (year, month); ValueError if it is not a month."""
    match = _MONTH.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a month (YYYYMM)")
    return int(match.group(1)), int(match.group(2))


def months_between(first: str, last: str) -> List[str]:
    """Every ``YYYYMM`` from ``first`` to ``last`` inclusive (empty if first > last)."""
    year, month = parse_month(first)
    end = parse_month(last)
    months = []
    while (year, month) <= end:
        months.append(f"{year:04d}{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def month_start(month: str) -> int:
    """Epoch seconds of the first instant of a ``YYYYMM`` month, UTC."""
    year, mon = parse_month(month)
    return calendar.timegm((year, mon, 1, 0, 0, 0, 0, 0, 0))


def records_of(messages: Iterable[Message], kind: str) -> List[Mapping[str, str]]:
    """All records of one kind from several messages (tests and reports)."""
    return [record for message in messages if message.kind == kind for record in message.records]
