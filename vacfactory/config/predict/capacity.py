"""Shares, processors and memory: what the scheduler can never use (core/scheduler.py's rules)."""

from __future__ import annotations

from typing import Any, List

from vacfactory.config.model import Config
from vacfactory.config import options as table

from .findings import WARNING, Finding, Locator


def _active(config: Config) -> List[Any]:
    """Machinetypes the scheduler may start: a VM model and a share above 0."""
    return [mt for mt in config.machinetypes.values() if mt.startable and mt.target_share > 0]


def _largest_vm(s: Any) -> int:
    """The most processors one VM can get (core/scheduler.py's _sized)."""
    return min(s.processors_per_superslot, s.max_starting_processors, s.total_processors)


def shares(config: Config, locator: Locator) -> List[Finding]:
    """Warn when no machinetype can ever be started because every share is 0."""
    startable = [mt for mt in config.machinetypes.values() if mt.startable]
    if not startable or _active(config):
        return []
    names = ", ".join(mt.name for mt in startable)
    first = startable[0].name
    return [locator.finding(WARNING, f"every machinetype's target_share is 0 ({names}): no VM will ever "
                                     "be started", f"{table.MACHINETYPE} {first}", "target_share")]


def processors(config: Config, locator: Locator) -> List[Finding]:
    """Processors that can never be used: VM sizes capped below max_processors, machinetypes
    whose min_processors never fits, and a last partial superslot no machinetype can use."""
    s = config.settings
    findings: List[Finding] = []
    caps = (("processors_per_superslot", s.processors_per_superslot),
            ("max_starting_processors", s.max_starting_processors),
            ("total_processors", s.total_processors))
    limit_name, limit = min(caps, key=lambda cap: cap[1])
    active = _active(config)
    for mt in active:
        title = f"{table.MACHINETYPE} {mt.name}"
        if mt.min_processors > min(s.processors_per_superslot, s.total_processors):
            continue  # the loader's own rule already warned (options._rule_min_processors_fit)
        if mt.min_processors > s.max_starting_processors:
            findings.append(locator.finding(
                WARNING, f"{mt.min_processors} processors needed, but a VM gets at most "
                         f"{s.max_starting_processors} (max_starting_processors = "
                         f"{s.max_starting_processors}): this machinetype is never started",
                title, "min_processors"))
        elif mt.max_processors > limit:
            findings.append(locator.finding(
                WARNING, f"{mt.max_processors}, but VMs get at most {limit} processors "
                         f"({limit_name} = {limit} in [settings])", title, "max_processors"))
    pps = s.processors_per_superslot
    rest = s.total_processors % pps
    if rest and active:
        users = [mt.name for mt in active if mt.min_processors <= rest]
        start = f"total_processors = {s.total_processors} is not a multiple of processors_per_superslot = {pps}"
        if users:
            message = f"{start}: the last {rest} form a smaller superslot (VMs of at most {rest} processors)"
        else:
            message = (f"{start}: the last {rest} can only take VMs of at most {rest} processors, and "
                       "every machinetype's min_processors is larger: they are never used")
        findings.append(locator.finding(WARNING, message, table.SETTINGS, "processors_per_superslot"))
    return findings


def memory(config: Config, locator: Locator, host_mb: int) -> List[Finding]:
    """Memory of the configured VMs against total_memory_mb (a cap: processors go unused) and
    against the host's memory (overcommit, which vac.conf(5) allows: a warning only)."""
    s = config.settings
    findings: List[Finding] = []
    per = s.mb_per_processor
    wanted = s.total_processors * per
    cap = getattr(s, "total_memory_mb", None)
    if cap is not None:
        for mt in _active(config):
            if mt.min_processors > _largest_vm(s):
                continue  # never started anyway, and already said so
            if mt.min_processors * per > cap:
                findings.append(locator.finding(
                    WARNING, f"{per} MiB per processor: the smallest VM of machinetype {mt.name} "
                             f"({mt.min_processors} x {per} MiB) does not fit in total_memory_mb = {cap}: "
                             "it is never started",
                    table.SETTINGS, "mb_per_processor"))
        if wanted > cap and _active(config):
            usable = cap // per
            default = config.origins.get(table.SETTINGS, {}).get("total_memory_mb", "default") == "default"
            which = " (the default: this host's memory)" if default else ""
            findings.append(locator.finding(
                WARNING, f"{cap} MiB{which} holds VMs for "
                         f"only {usable} of the {s.total_processors} processors "
                         f"(mb_per_processor = {per}): {s.total_processors - usable} processors are never used",
                table.SETTINGS, "total_memory_mb"))
    if host_mb > 0 and wanted > host_mb and s.domain_type != "test":
        findings.append(locator.finding(
            WARNING, f"{s.total_processors} processors x {per} MiB = {wanted} MiB, more than this host's "
                     f"{host_mb} MiB: memory is overcommitted (vac.conf(5) allows it; if the VMs use it "
                     "all the host swaps or the kernel kills VMs)", table.SETTINGS, "mb_per_processor"))
    return findings
