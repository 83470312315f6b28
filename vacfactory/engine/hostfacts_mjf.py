"""Host facts published to VMs as extra machinefeatures keys (cpu_model, kernel_version, ...).

Experiments and accounting want to know the hardware a VM ran on (some VOs require the CPU
model in their job records), and a VM cannot find out by itself: with ``cpu_mode = host-model``
or ``none`` it sees a virtual CPU, and it never sees the host's kernel. The keys, what each
means and how it is computed are listed in docs/machine-features.md; in short:

``cpu_model``, ``cpu_vendor``, ``cpu_family``, ``cpu_model_id``, ``cpu_stepping``,
``cpu_microcode`` (first processor of /proc/cpuinfo), ``cpu_arch`` (uname machine),
``cpu_x86_64_level`` (the x86-64 micro-architecture level 1-4, from the CPU flags: what HEP
software builds are compiled for), ``host_processors``, ``host_cores``, ``host_sockets``
(logical processors, distinct physical cores, distinct packages), ``kernel_version``
(/proc/sys/kernel/osrelease), ``os_release`` (PRETTY_NAME of /etc/os-release) and
``hypervisor`` (given by the caller: only ``hypervisor/`` may ask libvirt).

The full CPU flag list is not published: it is 1-2 KB, the VM reads its own (possibly masked)
flags from its /proc/cpuinfo, and ``cpu_x86_64_level`` says what software needs to know.

Every value is one line of printable text (at most :data:`MAX_VALUE` characters), a key
whose value cannot be found is left out, and no key collides with a standard MJF key
(``core.mjf.valid_key``, checked when the module is imported). The host is read once, when
the daemon starts: these facts do not change without a reboot.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from vacfactory.core import mjf

log = logging.getLogger(__name__)

#: every key :func:`host_machinefeatures` may write (docs/machine-features.md documents each)
HOST_KEYS: Tuple[str, ...] = (
    "cpu_model",
    "cpu_vendor",
    "cpu_family",
    "cpu_model_id",
    "cpu_stepping",
    "cpu_microcode",
    "cpu_arch",
    "cpu_x86_64_level",
    "host_processors",
    "host_cores",
    "host_sockets",
    "kernel_version",
    "os_release",
    "hypervisor",
)

#: the machinefeatures key holding the syslog server (host:port) VMs should log to
SYSLOG_KEY = "syslog"
#: the user_data substitution of the same value: ##user_data_syslog_server##
SYSLOG_SUBSTITUTION = "syslog_server"

#: longest value published; a CPU model name is < 64 characters, an os-release < 100
MAX_VALUE = 256
#: /proc/cpuinfo of a 1,000-thread host is ~1.5 MB; we never read more than this
MAX_CPUINFO_BYTES = 8 * 1024 * 1024

#: x86-64 micro-architecture levels (x86-64 psABI), as /proc/cpuinfo spells the flags
X86_64_LEVELS: Tuple[Tuple[int, Tuple[str, ...]], ...] = (
    (2, ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")),
    (3, ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")),
    (4, ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
)
_X86_64_BASELINE = ("cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2")

_WHITESPACE = re.compile(r"\s+")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")

def _check_keys() -> None:
    """Every key we add must be a valid MJF name and no standard one (a programming error)."""
    standard = set(mjf.MACHINEFEATURES_KEYS + mjf.LEGACY_MACHINEFEATURES_KEYS + mjf.JOBFEATURES_KEYS)
    for key in HOST_KEYS + (SYSLOG_KEY,):
        if not mjf.valid_key(key) or key in standard:
            raise ImportError(f"host fact key {key!r} is not a valid, non-standard MJF key")


_check_keys()


def clean_value(value: str) -> str:
    """One line of printable ASCII: whitespace runs become one space, anything else ``?``.

    MJF values become files and HTTP bodies that pilots put into their own records, so they
    must never carry a newline or a control character, whatever a kernel or a BIOS says.
    """
    text = _WHITESPACE.sub(" ", value).strip()
    return _UNPRINTABLE.sub("?", text)[:MAX_VALUE]


def _read_text(path: str, limit: int = 65536) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError as error:
        log.info("host facts: cannot read %s: %s", path, error.strerror)
        return None


def parse_cpuinfo(text: str) -> Tuple[Dict[str, str], List[Dict[str, str]]]:
    """(first processor's fields, every processor's fields) of /proc/cpuinfo text.

    Blocks are separated by blank lines; some architectures (arm64) put machine-wide lines
    such as ``Hardware`` in a block of their own, which lands in the list too.
    """
    blocks: List[Dict[str, str]] = []
    current: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        name, colon, value = line.partition(":")
        if colon:
            current.setdefault(name.strip().lower(), value.strip())
    if current:
        blocks.append(current)
    processors = [b for b in blocks if "processor" in b]
    first = processors[0] if processors else (blocks[0] if blocks else {})
    return first, processors


def x86_64_level(flags: Iterable[str]) -> Optional[int]:
    """The highest x86-64 level (1-4) whose flags are all present; None if not even x86-64."""
    have: Set[str] = set(flags)
    if not have.issuperset(_X86_64_BASELINE) or "lm" not in have:
        return None
    level = 1
    for candidate, needed in X86_64_LEVELS:
        if not have.issuperset(needed):
            break
        level = candidate
    return level


def _cpu_facts(first: Mapping[str, str], processors: List[Dict[str, str]], arch: str) -> Dict[str, str]:
    facts: Dict[str, str] = {}
    # x86 "model name"; arm64 has none (its block says "CPU part"), POWER "cpu", MIPS "cpu model"
    for field in ("model name", "cpu model", "cpu"):
        if first.get(field):
            facts["cpu_model"] = first[field]
            break
    for key, field in (("cpu_vendor", "vendor_id"), ("cpu_family", "cpu family"), ("cpu_model_id", "model"),
                       ("cpu_stepping", "stepping"), ("cpu_microcode", "microcode")):
        if first.get(field):
            facts[key] = first[field]
    if "cpu_vendor" not in facts and first.get("cpu implementer"):
        facts["cpu_vendor"] = f"implementer {first['cpu implementer']} part {first.get('cpu part', '?')}"
    if arch in ("x86_64", "amd64"):
        level = x86_64_level(first.get("flags", "").split())
        if level is not None:
            facts["cpu_x86_64_level"] = str(level)
    if processors:
        facts["host_processors"] = str(len(processors))
        packages = {p.get("physical id") for p in processors if "physical id" in p}
        cores = {(p.get("physical id"), p.get("core id")) for p in processors if "core id" in p}
        if packages:
            facts["host_sockets"] = str(len(packages))
        if cores:
            facts["host_cores"] = str(len(cores))
    return facts


def _os_pretty_name(path: str) -> Optional[str]:
    text = _read_text(path)
    if text is None:
        return None
    values: Dict[str, str] = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        if equals:
            values[name.strip()] = value.strip().strip("'\"")
    return values.get("PRETTY_NAME") or " ".join(v for v in (values.get("NAME"), values.get("VERSION")) if v) or None


def host_machinefeatures(
    proc: str = "/proc",
    hypervisor: str = "",
    *,
    os_release: str = "/etc/os-release",
    arch: Optional[str] = None,
) -> Dict[str, str]:
    """The host-fact machinefeatures keys of this host (see the module docstring).

    ``proc`` and ``os_release`` are where /proc and /etc/os-release are (tests point them at
    made-up trees); ``arch`` defaults to this host's ``uname -m``; ``hypervisor`` is what
    the hypervisor adapter says it is (e.g. ``QEMU 7.2.0 libvirt 9.0.0 kvm``), or "" to leave
    the key out. Never raises for an unreadable or odd host: missing facts are left out.
    """
    machine = arch if arch is not None else platform.machine()
    raw: Dict[str, str] = {}
    cpuinfo = _read_text(os.path.join(proc, "cpuinfo"), MAX_CPUINFO_BYTES)
    if cpuinfo is not None:
        first, processors = parse_cpuinfo(cpuinfo)
        raw.update(_cpu_facts(first, processors, machine))
    if machine:
        raw["cpu_arch"] = machine
    kernel = _read_text(os.path.join(proc, "sys", "kernel", "osrelease"), 4096)
    if kernel:
        raw["kernel_version"] = kernel
    pretty = _os_pretty_name(os_release)
    if pretty:
        raw["os_release"] = pretty
    if hypervisor:
        raw["hypervisor"] = hypervisor
    facts = {key: clean_value(raw[key]) for key in HOST_KEYS if key in raw}
    return {key: value for key, value in facts.items() if value}


def syslog_machinefeatures(syslog_server: Optional[str]) -> Dict[str, str]:
    """``{"syslog": "host:port"}``, or nothing when syslog_server is empty (VMs log nowhere)."""
    value = clean_value(syslog_server or "")
    return {SYSLOG_KEY: value} if value else {}


def syslog_substitutions(syslog_server: Optional[str]) -> Dict[str, str]:
    """The ``extra`` for ``core.userdata.standard_substitutions``: ##user_data_syslog_server##.

    Always present (empty when syslog is off), so a template's rsyslog line gets an empty
    target rather than the literal pattern.
    """
    return {SYSLOG_SUBSTITUTION: clean_value(syslog_server or "")}


def merge_extras(
    host_facts: Mapping[str, str],
    syslog: Mapping[str, str],
    site_options: Mapping[str, str],
) -> Dict[str, str]:
    """The ``extra_machinefeatures`` of a VM: host facts, the syslog key, then the site's own.

    The site's ``machinefeatures_option_XXX`` wins over a host fact or the syslog key of the
    same name: that is how a site corrects a fact, or hides one (an empty value) that it does
    not want VMs to see.
    """
    merged: Dict[str, str] = dict(host_facts)
    merged.update(syslog)
    merged.update(site_options)
    return merged
