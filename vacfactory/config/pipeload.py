"""Vacuum pipes while loading: each pipe expanded from its cache file (never the network:
the daemon refreshes the caches, :mod:`vacfactory.fetch.pipefetch`), and its entries merged
with the site's sections and evaluated like them. Precedence, as in Vac: the site's
``[machinetype PREFIX-SUFFIX]`` section, then the ``[vacuum_pipe PREFIX]`` options, then the
pipe document. Whatever a pipe says, the site's own configuration stays valid: a broken
entry is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from vacfactory.config import options as table
from vacfactory.config import pipes as pipelib
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.model import VacuumPipe, frozen_mapping
from vacfactory.config.evaluation import Evaluated, evaluate, make_machinetype, parse_entry
from vacfactory.config.sections import Entry, Key, Problems, Section, Where

# --------------------------------------------------------------------------- vacuum pipes

PIPE_CACHE_DIR = "pipescache"
#: the option naming the pipe cache directory (default <state_dir>/pipescache, Vac's in Vac mode)
PIPES_CACHE_OPTION = "pipes_cache_dir"
PIPE_CACHE_SUFFIX = ".pipe"
PIPE_META_SUFFIX = ".meta.json"


def pipe_cache_path(state_dir: str, prefix: str) -> str:
    """``<state_dir>/pipescache/<prefix>.pipe``: the last good document of a pipe (Vac's place)."""
    return os.path.join(state_dir, PIPE_CACHE_DIR, prefix + PIPE_CACHE_SUFFIX)


def pipe_meta_path(state_dir: str, prefix: str) -> str:
    """Sidecar of a pipe cache: URL, fetch times, validators (written by vacfactory.fetch.pipefetch)."""
    return os.path.join(state_dir, PIPE_CACHE_DIR, prefix + PIPE_META_SUFFIX)


def _pipe_share(section: Section) -> float:
    row = table.accepted_options(table.VACUUM_PIPE)["target_share"]
    entry = section.entries.get("target_share")
    try:
        return float(row.type.parse(entry.raw)) if entry is not None else float(row.default)
    except ValueError:
        return 0.0  # reported when the section is evaluated


def read_pipe_caches(merged: Dict[Key, Section], pipe_dir: Optional[str],
                      problems: Problems) -> Dict[str, pipelib.PipeExpansion]:
    """Expand every pipe from its cache file. The network is never touched here: the daemon
    refreshes the caches (vacfactory.fetch.pipefetch), so `config check` and the daemon agree."""
    expansions: Dict[str, pipelib.PipeExpansion] = {}
    if pipe_dir is None:
        return expansions
    for (kind, prefix), section in merged.items():
        if kind != table.VACUUM_PIPE or prefix is None or not re.fullmatch(table.SECTION_NAME_PATTERN, prefix):
            continue
        entry = section.entries.get("vacuum_pipe_url")
        if entry is None:
            continue
        url = entry.raw
        where = pipelib.label(prefix, url)
        path = os.path.join(pipe_dir, prefix + PIPE_CACHE_SUFFIX)
        try:
            with open(path, "rb") as f:
                data = f.read(pipelib.MAX_DOCUMENT_BYTES + 1)
        except FileNotFoundError:
            problems.warn(f"{where}: {_never_fetched(os.path.join(pipe_dir, prefix + PIPE_META_SUFFIX), path)}: "
                          "it defines no machinetypes until the daemon fetches it", Where(None))
            continue
        except OSError as error:
            problems.warn(f"{where}: cannot read the cache {path}: {error.strerror or error}", Where(None))
            continue
        try:
            expansion = pipelib.expand_bytes(prefix, url, _pipe_share(section), data)
        except pipelib.PipeError as error:
            problems.warn(f"{where}: the cache {path} is unusable: {error}", Where(None))
            continue
        cached_url = _cached_url(os.path.join(pipe_dir, prefix + PIPE_META_SUFFIX))
        if cached_url is not None and cached_url != url:
            problems.warn(f"{where}: the cache was fetched from {cached_url}; using it until the new URL "
                          "is fetched", Where(None))
        for message in expansion.problems:
            problems.warn(message, Where(None))
        expansions[prefix] = expansion
    return expansions


def _never_fetched(meta_path: str, cache_path: str) -> str:
    """Why a pipe has no cache: never tried, or the last attempt's error (from its sidecar)."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    error = meta.get("error") if isinstance(meta, dict) else None
    if not error:
        return f"not fetched yet (no {cache_path})"
    attempted = meta.get("attempted")
    when = ""
    if isinstance(attempted, (int, float)) and not isinstance(attempted, bool):
        when = " at " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(attempted))
    return f"no usable download yet: the last fetch{when} failed: {error}"


def _cached_url(meta_path: str) -> Optional[str]:
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) else None


def check_local_entries(section: Section, problems: Problems) -> None:
    """A site section that refines a pipe machinetype: its own values must parse (errors are the
    site's, and fail the configuration like any other local mistake)."""
    accepted = table.accepted_options(table.MACHINETYPE)
    for name, entry in section.entries.items():
        try:
            row = accepted.get(name)
            if row is not None:
                parse_entry(row, entry, section.title, problems)
            else:
                for family in table.families_of(table.MACHINETYPE):
                    if name.startswith(family.prefix):
                        family.type.parse(entry.raw)
                        break
        except ValueError as error:
            problems.error(str(error), entry.where, section.title, entry.given)


def evaluate_pipe_refinement(section: Section, host: HostFacts, settings: Mapping[str, Any],
                               problems: Problems, vac: bool = False) -> Optional[Evaluated]:
    """A site section named like a pipe's machinetype (``PREFIX-SUFFIX``) that the pipe does
    not define now (not fetched yet, or its entry is broken). Its own values must parse; if it
    is not a complete machinetype on its own it is skipped with a warning, so a pipe outage or
    a VO's mistake never makes the site's configuration invalid."""
    before = len(problems.errors)
    check_local_entries(section, problems)
    if len(problems.errors) > before:
        return None
    scratch = Problems()
    evaluated = evaluate(section, host, settings, scratch, vac)
    problems.warnings.extend(scratch.warnings)
    if scratch.errors:
        for error in scratch.errors:
            problems.warn(f"{error}: no vacuum pipe defines machinetype {section.name} now, and this section alone "
                          "is not a complete machinetype: skipped", Where(None))
        return None
    return evaluated


def pipe_machinetypes(pipe_section: Section, expansion: pipelib.PipeExpansion, merged: Dict[Key, Section],
                       host: HostFacts, settings: Mapping[str, Any], settings_families: Dict[str, Dict[str, Any]],
                       problems: Problems, vac: bool = False) -> List[Tuple[str, Any, Dict[str, str]]]:
    """Each pipe entry merged with the site's values and evaluated like a local section.

    Precedence, as in Vac: the site's ``[machinetype PREFIX-SUFFIX]`` section, then the
    ``[vacuum_pipe PREFIX]`` options, then the pipe document. An entry that fails (a rule
    between options, a default that does not fit) is skipped with a warning; the site's own
    configuration stays valid whatever a pipe says.
    """
    settings_state_dir = table.VAC_STATE_DIR if vac else (settings.get(table.STATE_DIR) or "/var/lib/vacfactory")
    own = {row.name for row in table.options_of(table.VACUUM_PIPE)}
    result: List[Tuple[str, Any, Dict[str, str]]] = []
    where = pipelib.label(expansion.prefix, expansion.url)
    for pipe_mt in expansion.machinetypes:
        at = Where(f"{where} machinetypes[{pipe_mt.index}]")
        entries: Dict[str, Entry] = {k: Entry(k, v, at) for k, v in pipe_mt.options.items()}
        entries[table.FILES_BASE] = Entry(table.FILES_BASE, os.path.join(
            settings_state_dir, "machinetypes", expansion.prefix), Where(where))
        entries.update({k: v for k, v in pipe_section.entries.items() if k not in own})
        local = merged.get((table.MACHINETYPE, pipe_mt.name))
        if local is not None:
            entries.update(local.entries)
        section = Section(table.MACHINETYPE, pipe_mt.name, local.where if local else at, entries)
        scratch = Problems()
        evaluated = evaluate(section, host, settings, scratch, vac)
        for warning in scratch.warnings:
            problems.warnings.append(warning)
        if scratch.errors:
            for error in scratch.errors:
                if error.source and error.source.startswith(where):
                    text = f"{error.source}.{error.option}: {error.message}" if error.option else str(error)
                else:
                    text = str(error)
                problems.warn(f"{text}: entry {pipe_mt.name} skipped", Where(None))
            continue
        result.append((pipe_mt.name, make_machinetype(pipe_mt.name, evaluated, settings_families),
                       evaluated.origins))
    return result


def make_pipe(section: Section, host: HostFacts, settings: Mapping[str, Any],
               problems: Problems, vac: bool = False) -> Tuple[Optional[Any], Dict[str, str]]:
    """Validate a [vacuum_pipe] section; machinetype options are kept as raw text."""
    own = table.options_of(table.VACUUM_PIPE)
    own_names = {row.name for row in own}
    accepted = table.accepted_options(table.VACUUM_PIPE)
    own_section = Section(section.kind, section.name, section.where,
                           {k: v for k, v in section.entries.items() if k in own_names})
    evaluated = evaluate(own_section, host, settings, problems, vac)
    raw: Dict[str, str] = {}
    origins = dict(evaluated.origins)
    for name, entry in section.entries.items():
        if name in own_names:
            continue
        origins[name] = str(entry.where)
        row = accepted.get(name)
        try:
            if row is not None:
                parse_entry(row, entry, section.title, problems)
            else:
                family = next(f for f in table.families_of(table.VACUUM_PIPE) if name.startswith(f.prefix))
                family.type.parse(entry.raw)
        except ValueError as error:
            problems.error(str(error), entry.where, section.title, entry.given)
            continue
        raw[name] = entry.raw
    if problems.errors:
        return None, origins
    return VacuumPipe(prefix=section.name, options=frozen_mapping(raw), **evaluated.values), origins

