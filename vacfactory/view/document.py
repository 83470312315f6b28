"""The status page's JSON documents, from the engine's facts and status.json (no I/O here).

``GET /status.json`` (see docs/status-page.md for every key) holds this factory's slots (the
rows of ``vacfactory machines --json``, plus ``age``, ``heartbeat_age`` and ``cpu_efficiency``),
processors busy/free, the engine's last decision and why it stopped (status.json's reasons),
each machinetype's shares and counters, the space's factories, and the recent VMs.
``GET /history.json`` holds the per-machinetype series of the last 24 hours.

Read-only and without secrets: rows never carry the VM's token or user_data, and recent VMs
link to ``/machine/UUID``, which serves what ``vacfactory machine UUID`` prints.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Mapping, Optional, Tuple

from vacfactory import __version__
from vacfactory.cli.machines import machine_row, machine_rows
from vacfactory.core.efficiency import vm_efficiency
from vacfactory.view.feed import EngineFacts
from vacfactory.view.history import Sample

FORMAT = 1
RECENT_VMS = 20
#: status.json keys the page shows as the engine's reasons (see state/status.py's writer)
ENGINE_KEYS = ("time", "blind", "decision", "created", "failed", "waiting_for_images", "creation_paused",
               "creation_failures", "draining", "shutdown_time", "backoffs", "config")


def _slot(row: dict, now: float) -> dict:
    """A machines --json row plus what the map shows (seconds and a ratio)."""
    row = dict(row)
    if row.get("name") is None:
        return row
    live = row["state"] in ("Starting", "Running")
    end = now if live else (row.get("finished") or now)
    row["age"] = max(0.0, end - (row.get("created") or end))
    row["heartbeat_age"] = max(0.0, now - row["heartbeat"]) if live and row.get("heartbeat") else None
    started = row.get("started")
    if started and row.get("cpu_seconds") is not None:
        last = row.get("heartbeat") if live else row.get("finished")
        row["cpu_efficiency"] = vm_efficiency(row["cpu_seconds"], (last or started) - started, row["processors"])
    else:
        row["cpu_efficiency"] = None
    return row


def _share(value: float, total: float) -> float:
    return value / total if total > 0 else 0.0


def machinetypes(facts: EngineFacts) -> List[dict]:
    configured = facts.machinetypes()
    running: Dict[str, Tuple[int, int]] = {}
    for machine in facts.machines:
        if machine.live:
            vms, procs = running.get(machine.record.machinetype, (0, 0))
            running[machine.record.machinetype] = (vms + 1, procs + machine.record.processors)
    local_total = sum(m.running_hs06 for m in configured)
    space_total = sum(m.space_running_hs06 for m in configured)
    metrics = {m.machinetype: m for m in facts.metrics.machinetypes} if facts.metrics else {}
    efficiency = dict(facts.metrics.cpu_efficiency) if facts.metrics else {}
    outcomes: Dict[str, Dict[str, int]] = {}
    for o in facts.metrics.outcomes if facts.metrics else ():
        outcomes.setdefault(o.machinetype, {})[o.code] = outcomes.get(o.machinetype, {}).get(o.code, 0) + o.count
    result = []
    for mt in configured:
        counted = metrics.get(mt.name)
        result.append({
            "name": mt.name,
            "target_share": mt.target_share,
            "share": _share(mt.running_hs06, local_total),
            "space_share": _share(mt.space_running_hs06, space_total),
            "running_vms": running.get(mt.name, (0, 0))[0],
            "running_processors": running.get(mt.name, (0, 0))[1],
            "backoff_remaining_seconds": mt.backoff_remaining_seconds,
            "cpu_efficiency": efficiency.get(mt.name),
            "created_since_start": counted.creations if counted else 0,
            "outcomes_since_start": outcomes.get(mt.name, {}),
        })
    return result


def recent(facts: EngineFacts, now: float) -> List[dict]:
    """The newest VMs (by creation), newest first, with a link to their evidence."""
    newest = heapq.nlargest(RECENT_VMS, facts.machines, key=lambda m: (m.record.created, m.record.uuid))
    rows = []
    for machine in newest:
        row = _slot(machine_row(machine, facts.creation_failures), now)
        row["link"] = f"/machine/{machine.record.uuid}"
        code = machine.finished.code if machine.finished is not None else None
        row["code"] = code
        rows.append(row)
    return rows


def status_document(facts: EngineFacts, status: Optional[Mapping], now: float) -> dict:
    slots = [_slot(row, now) for row in machine_rows(
        {m.record.uuid: m for m in facts.machines}, facts.total_processors, failures=facts.creation_failures)]
    busy = sum(m.record.processors for m in facts.machines if m.live)
    status = status if isinstance(status, Mapping) else {}
    return {
        "format": FORMAT,
        "vacfactory": __version__,
        "factory": facts.factory,
        "time": now,
        "round_time": facts.time,
        "processors": {"total": facts.total_processors, "busy": busy,
                       "free": max(0, facts.total_processors - busy)},
        "engine": {key: status.get(key) for key in ENGINE_KEYS},
        "slots": slots,
        "machinetypes": machinetypes(facts),
        "space": [{"name": f.name, "state": f.state, "age": f.age, "processors": dict(f.processors)}
                  for f in facts.space],
        "recent": recent(facts, now),
    }


def history_samples(document: Mapping, started_before: Mapping[str, int],
                    outcomes_before: Mapping[str, Mapping[str, int]]) -> Dict[str, Sample]:
    """One point per machinetype from a status document; VMs started and ended are the
    counters' growth since the last point (a daemon restart resets them: counted from 0)."""
    samples = {}
    for mt in document["machinetypes"]:
        name = mt["name"]
        created = mt["created_since_start"]
        before = started_before.get(name, 0)
        ended = {}
        for code, count in mt["outcomes_since_start"].items():
            prior = outcomes_before.get(name, {}).get(code, 0)
            grown = count - prior if count >= prior else count
            if grown:
                ended[code] = grown
        samples[name] = Sample(
            target_share=mt["target_share"], share=mt["share"], space_share=mt["space_share"],
            started=created - before if created >= before else created,
            backoff=int(mt["backoff_remaining_seconds"] > 0), cpu_efficiency=mt["cpu_efficiency"],
            running_processors=mt["running_processors"], outcomes=ended,
        )
    return samples
