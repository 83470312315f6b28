"""`vacfactory check`: the daemon's health as one Nagios/NRPE status line.

Vac's check-vacd looked at two heartbeat files and ``factory-error`` and never warned. This
check reads only what the daemon leaves in its state directory (plus one libvirt round trip
and one statvfs), so it works whether or not the daemon runs:

=================  ======================================================  ===========
what               how                                                     worst state
=================  ======================================================  ===========
heartbeat          ``factory-heartbeat`` missing or older than max_age     CRITICAL
daemon             nobody holds ``daemon.lock`` (the daemon is not up)     CRITICAL
creation           ``factory-error`` exists (its first line is shown)      CRITICAL
libvirt            the configured URI does not answer (read-only, within   CRITICAL
                   ``--libvirt-timeout``: a hung libvirtd cannot hang it)
disk               free space of state_dir below the thresholds            WARNING/CRITICAL
drain              ``draining`` or ``shutdown_time`` set (or past)             WARNING
accounting         oldest message in ``apel-outgoing`` or                  WARNING
                   ``apel-cloud-outgoing`` older than limit
=================  ======================================================  ===========

Output: exactly one line, ``VACFACTORY <STATE> - <problems> (<summary>) | <perfdata>`` or
``VACFACTORY OK - <summary> | <perfdata>``, and the plugin exit codes 0/1/2/3 (UNKNOWN when
the check itself cannot run, e.g. the configuration does not load).
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from vacfactory.config.model import Config
from vacfactory.errors import VacFactoryError

from vacfactory.accounting.health import undrained_note
from vacfactory.accounting.outgoing import backlog_of
from vacfactory.state.lock import StateLock
from vacfactory.state.status import StatusFiles

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
PREFIX = "VACFACTORY"
DEFAULT_MAX_AGE = 600.0
#: how long the libvirt round trip may take: well inside check_nrpe's default 10 s timeout
DEFAULT_LIBVIRT_TIMEOUT = 5.0
_MAX_MESSAGE = 200
#: the dirq queues ssmsend (or `vacfactory apel send`) empties: job records, and the cloud
#: records of apel_cloud_records (accounting.settings names both the same way)
APEL_QUEUES = (("apel-outgoing", "job"), ("apel-cloud-outgoing", "cloud"))


@dataclass(frozen=True)
class CheckSettings:
    """What the check needs from the configuration (and the command line)."""

    state_dir: str
    libvirt_uri: str
    total_processors: Optional[int] = None
    max_age: float = DEFAULT_MAX_AGE
    disk_warning_mb: int = 10240
    disk_critical_mb: int = 1024
    apel_age_warning_seconds: float = 86400.0
    #: the configuration in force (runtime override included) drains the factory
    draining: bool = False
    shutdown_time: Optional[float] = None

    @classmethod
    def from_config(cls, config: Config, max_age: float = DEFAULT_MAX_AGE) -> "CheckSettings":
        s = config.settings
        return cls(
            state_dir=s.state_dir, libvirt_uri=s.libvirt_uri, total_processors=s.total_processors,
            max_age=max_age, disk_warning_mb=s.check_disk_free_warning_mb,
            disk_critical_mb=s.check_disk_free_critical_mb,
            apel_age_warning_seconds=float(s.check_apel_backlog_warning_seconds),
            draining=bool(s.draining), shutdown_time=s.shutdown_time,
        )


@dataclass(frozen=True)
class CheckResult:
    """The plugin's answer: exit code, the one output line, and its parts."""

    code: int
    line: str
    problems: Tuple[Tuple[int, str], ...] = ()
    perfdata: Tuple[str, ...] = ()

    @property
    def state(self) -> str:
        return STATE_NAMES[self.code]


def _clean(text: str) -> str:
    """One line without '|' (Nagios reads the rest as performance data)."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


def unknown(message: str) -> CheckResult:
    """The check could not run (e.g. the configuration does not load)."""
    return CheckResult(UNKNOWN, f"{PREFIX} UNKNOWN - {_clean(message)}", ((UNKNOWN, message),))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.2f} hours"
    return f"{seconds / 86400:.1f} days"


def _perf(label: str, value: Any, unit: str = "", warn: Any = "", crit: Any = "", low: Any = "",
          high: Any = "") -> str:
    return f"{label}={value}{unit};{warn};{crit};{low};{high}".rstrip(";")


def _disk_free_mb(path: str) -> int:
    return shutil.disk_usage(path).free // (1024 * 1024)


def answer_within(action: Callable[[], Any], timeout: float) -> Optional[str]:
    """Run ``action`` in a daemon thread: None if it returned within ``timeout`` seconds, else
    why not (its VacFactoryError or OSError, or the timeout). A connection to a hung libvirtd
    blocks inside libvirt for ever and cannot be interrupted, so the thread is abandoned: the
    plugin prints its line and exits within its own timeout anyway."""
    outcome: Dict[str, str] = {}
    done = threading.Event()

    def run() -> None:
        try:
            action()
        except (VacFactoryError, OSError) as error:
            outcome["error"] = str(error)
        finally:
            done.set()

    threading.Thread(target=run, name="vacfactory-check-probe", daemon=True).start()
    if not done.wait(timeout):
        return f"no answer within {timeout:g} s (libvirtd hung or overloaded?)"
    return outcome.get("error")


def run_check(settings: CheckSettings, now: float, libvirt_ping: Callable[[], Union[bool, str, None]],
              disk_free_mb: Callable[[str], int] = _disk_free_mb) -> CheckResult:
    """Look at everything and build the status line. ``libvirt_ping`` asks the configured URI
    (the CLI passes a deadline-bounded read-only round trip) and answers True or None when it
    is reachable, else False or why not; ``disk_free_mb`` is replaceable in tests."""
    problems: List[Tuple[int, str]] = []
    perfdata: List[str] = []
    state_dir = settings.state_dir
    if not os.path.isdir(state_dir):
        problems.append((CRITICAL, f"state directory {state_dir} does not exist (has the daemon ever run?)"))
    status = StatusFiles(state_dir)

    beat = status.last_beat()
    if beat is None:
        problems.append((CRITICAL, "no factory heartbeat"))
    else:
        age = max(0.0, now - beat)
        perfdata.append(_perf("heartbeat_age", f"{age:.0f}", "s", "", f"{settings.max_age:.0f}", 0))
        if age > settings.max_age:
            problems.append((CRITICAL, f"no factory heartbeat for {_duration(age)}"))

    try:
        holder = StateLock(state_dir).holder()
    except OSError as error:  # not "not running": it may well run (a check run as non-root)
        problems.append((UNKNOWN, f"cannot read the daemon lock {error.filename or state_dir}: "
                                  f"{error.strerror or error}"))
    else:
        if holder is None:
            problems.append((CRITICAL, "daemon not running"))

    if settings.shutdown_time is not None and now >= settings.shutdown_time:
        problems.append((WARNING, "past shutdown_time: no VMs are started"))
    elif settings.draining:
        problems.append((WARNING, "draining: no new VMs are started"))
    elif settings.shutdown_time is not None:
        problems.append((WARNING, f"draining: shutdown_time in {_duration(settings.shutdown_time - now)}"))

    error = status.error()
    if error:
        problems.append((CRITICAL, f"creation error: {error.splitlines()[0]}"))
    current = status.status() or {}
    paused = current.get("creation_paused")
    if isinstance(paused, str) and paused:  # the engine stopped creating: the disk is full
        problems.append((CRITICAL, paused.splitlines()[0]))

    answer = libvirt_ping()
    if answer is False:
        problems.append((CRITICAL, f"libvirt {settings.libvirt_uri} unreachable"))
    elif answer is not True and answer is not None:
        why = str(answer)
        if why.startswith(f"{settings.libvirt_uri}: "):  # HypervisorError names the URI too
            why = why[len(settings.libvirt_uri) + 2:]
        problems.append((CRITICAL, f"libvirt {settings.libvirt_uri} unreachable: {why}"))

    try:
        free = disk_free_mb(state_dir if os.path.isdir(state_dir) else os.path.dirname(state_dir) or "/")
    except OSError as exc:
        problems.append((UNKNOWN, f"cannot measure free disk space: {exc.strerror or exc}"))
    else:
        perfdata.append(_perf("disk_free", free, "MB", settings.disk_warning_mb, settings.disk_critical_mb, 0))
        if free < settings.disk_critical_mb:
            problems.append((CRITICAL, f"only {free} MiB free in {state_dir}"))
        elif free < settings.disk_warning_mb:
            problems.append((WARNING, f"only {free} MiB free in {state_dir}"))

    _accounting(settings, now, problems, perfdata)
    summary, counts = _summary(current, settings.total_processors)
    perfdata = counts + perfdata
    return _result(problems, summary, perfdata)


def _accounting(settings: CheckSettings, now: float, problems: List[Tuple[int, str]], perfdata: List[str]) -> None:
    """The backlog of both outgoing queues: a cloud queue nobody sends warns like a job queue."""
    counts: Dict[str, int] = {}
    stamps: List[int] = []
    for name, kind in APEL_QUEUES:
        try:
            backlog = backlog_of(os.path.join(settings.state_dir, name))
        except OSError as exc:
            problems.append((UNKNOWN, f"cannot read {name}: {exc.strerror or exc}"))
            return
        counts[kind] = backlog.count
        if backlog.oldest is not None:
            stamps.append(backlog.oldest)
    total = sum(counts.values())
    oldest = max(0.0, now - min(stamps)) if stamps else 0.0
    perfdata.append(_perf("apel_queued", total, "", "", "", 0))
    perfdata.append(_perf("apel_cloud_queued", counts["cloud"], "", "", "", 0))
    perfdata.append(_perf("apel_oldest_age", f"{oldest:.0f}", "s", f"{settings.apel_age_warning_seconds:.0f}", "", 0))
    if total and oldest > settings.apel_age_warning_seconds:
        cloud = f" ({counts['cloud']} of them cloud records)" if counts["cloud"] else ""
        problems.append((WARNING, f"{total} APEL messages waiting{cloud}, the oldest for {_duration(oldest)}"
                             + undrained_note(settings.state_dir, now)))


def _summary(status: Optional[dict], total: Optional[int]) -> Tuple[str, List[str]]:
    """``12/16 processors, 12 VMs`` from status.json, and its perfdata."""
    if not status:
        return "no status yet", []
    processors = _int(status.get("running_processors"))
    machines = _int(status.get("running_machines"))
    total = _int(status.get("total_processors")) if total is None else total
    shown_total = "?" if total is None else str(total)
    text = f"{processors}/{shown_total} processors, {machines} VM{'' if machines == 1 else 's'}"
    perf = [_perf("running_processors", processors, "", "", "", 0, "" if total is None else total),
            _perf("running_vms", machines, "", "", "", 0)]
    return text, perf


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _result(problems: List[Tuple[int, str]], summary: str, perfdata: List[str]) -> CheckResult:
    code = max((severity for severity, _ in problems), key=_rank, default=OK)
    # worst first, then in the order they were found
    ordered = sorted(problems, key=lambda p: -_rank(p[0]))
    if code == OK:
        head = f"{PREFIX} OK - {summary}"
    else:
        head = f"{PREFIX} {STATE_NAMES[code]} - " + "; ".join(_clean(m) for _, m in ordered) + f" ({summary})"
    line = head + (" | " + " ".join(perfdata) if perfdata else "")
    return CheckResult(code, line, tuple(ordered), tuple(perfdata))


def _rank(severity: int) -> int:
    """CRITICAL > UNKNOWN > WARNING > OK for ordering messages (Nagios' own precedence)."""
    return {OK: 0, WARNING: 1, UNKNOWN: 2, CRITICAL: 3}[severity]
