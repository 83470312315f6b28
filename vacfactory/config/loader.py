"""Find, read, merge and validate the configuration files into a :class:`Config`, and
watch them (the I/O part, and the public face of the configuration's loading).

Files are read in order, later ones winning per option and same-named sections merging (as
in Vac): sorted ``<dir>/<stem>.d/*.conf``, the main file, Vac's ``/var/run/vac.conf`` when the
main file is a ``vac.conf``, and last the runtime override ``<state_dir>/runtime.conf`` (found
from the state_dir the earlier files give, so it may not set state_dir itself).

Two readings share the option table. vacfactory's own files go through the standard
:mod:`configparser` (so the syntax is exactly Python's INI dialect) and are read strictly. A Vac
site's files (``ConfigSources.vac``: Vac's paths, or asked for) are read the way Vac 03.01's
``readConf()`` reads them: Python 2 RawConfigParser's syntax (``config/vacsyntax.py``), what Vac
ignores ignored with one warning, and each option's Vac reading (``Option.vac_parse``, the
``vac_severity`` of rules, Vac's paths as defaults); the runtime override stays strict. For the
strict reading, configparser does not report where an option was written, so a small scan of the
same text, following configparser's own line rules, records the line of every section header
and option. Every problem of every file is collected and raised together as
:class:`ConfigErrors`, each one naming file, line, section and option.

Everything about options themselves (names, aliases, types, defaults, rules) comes from
``config/options.py``; this module only knows the file layout and the section kinds.

The parts: :mod:`.sources` (which files, in which order), :mod:`.sections` (reading and
merging them), :mod:`.evaluation` (values, defaults, rules), :mod:`.pipeload` (vacuum pipes
from their caches).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from vacfactory.config import options as table
from vacfactory.config import pipes as pipelib
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.model import Config, Settings, SourceStamp, frozen_mapping
from vacfactory.config.evaluation import evaluate, inherit_origins, make_machinetype, parse_entry
from vacfactory.config.pipeload import (PIPE_CACHE_DIR, PIPE_CACHE_SUFFIX, PIPE_META_SUFFIX, PIPES_CACHE_OPTION,
                                        check_local_entries, evaluate_pipe_refinement, make_pipe, pipe_cache_path,
                                        pipe_machinetypes, pipe_meta_path, read_pipe_caches)
from vacfactory.config.sections import (Key, Problems, Section, Where, apply_vac_defaults, merge_sections,
                                        parse_text, parse_vac_text, read_source)
# the sources' and the pipe caches' names are re-exported: the loader is the configuration's public face
from vacfactory.config.sources import (DEFAULT_DROPIN_DIR, DEFAULT_MAIN_FILE, VAC_DROPIN_DIR, VAC_MAIN_FILE,
                                       VAC_RUNTIME_FILE, ConfigSources, is_vac_path, stamp)
from vacfactory.errors import ConfigError, ConfigErrors

logger = logging.getLogger(__name__)

__all__ = [
    "CheckResult",
    "ConfigSources",
    "ConfigWatcher",
    "HostFacts",
    "PollResult",
    "check_config",
    "load_config",
    "load_config_string",
]

# --------------------------------------------------------------------------- building


def _build(merged: Dict[Key, Section], host: HostFacts, problems: Problems, fallback: Where,
           stamps: Tuple[SourceStamp, ...], pipe_dir: Optional[str] = None, vac: bool = False) -> Optional[Config]:
    """Evaluate every section into the frozen model; None if anything was wrong.

    ``pipe_dir`` holds the vacuum pipe caches (``<prefix>.pipe``); None: pipes define nothing.
    ``vac``: the configuration is a Vac site's (Vac's defaults and rule severities).
    """
    settings_section = merged.get((table.SETTINGS, None)) or Section(table.SETTINGS, None, fallback)
    s = evaluate(settings_section, host, {}, problems, vac)
    origins: Dict[str, Mapping[str, str]] = {settings_section.title: frozen_mapping(s.origins)}
    settings_families = s.families
    machinetypes: Dict[str, Any] = {}
    pipes: Dict[str, Any] = {}
    expansions = read_pipe_caches(merged, pipe_dir, problems)
    from_pipes = {mt.name for expansion in expansions.values() for mt in expansion.machinetypes}
    pipe_prefixes = tuple(f"{p}-" for (k, p) in merged if k == table.VACUUM_PIPE and p is not None)
    for (kind, name), section in merged.items():
        if kind == table.MACHINETYPE and name is not None:
            if name in from_pipes:
                check_local_entries(section, problems)  # merged with its pipe below
                continue
            if name.startswith(pipe_prefixes):
                m = evaluate_pipe_refinement(section, host, s.values, problems, vac)
                if m is not None:
                    origins[section.title] = frozen_mapping(inherit_origins(m.origins, s.origins, settings_families))
                    machinetypes[name] = make_machinetype(name, m, settings_families)
                continue
            m = evaluate(section, host, s.values, problems, vac)
            origins[section.title] = frozen_mapping(inherit_origins(m.origins, s.origins, settings_families))
            if not problems.errors:
                machinetypes[name] = make_machinetype(name, m, settings_families)
        elif kind == table.VACUUM_PIPE and name is not None:
            pipe, pipe_origins = make_pipe(section, host, s.values, problems, vac)
            origins[section.title] = frozen_mapping(pipe_origins)
            if pipe is not None:
                pipes[name] = pipe
                expansion = expansions.get(name)
                if expansion is not None and not problems.errors:
                    for mt_name, mt, mt_origins in pipe_machinetypes(
                            section, expansion, merged, host, s.values, settings_families, problems, vac):
                        if mt_name in machinetypes:
                            problems.warn(f"{pipelib.label(name, expansion.url)}: machinetype {mt_name} is "
                                          "already defined: entry skipped", Where(None))
                            continue
                        machinetypes[mt_name] = mt
                        origins[f"{table.MACHINETYPE} {mt_name}"] = frozen_mapping(
                            inherit_origins(mt_origins, s.origins, settings_families))
    problems.sort([st.path for st in stamps] or [fallback.source or ""])
    if problems.errors:
        return None
    settings = Settings(**s.values, **{k: frozen_mapping(v) for k, v in settings_families.items()})
    return Config(
        settings=settings,
        machinetypes=frozen_mapping(machinetypes),
        vacuum_pipes=frozen_mapping(pipes),
        warnings=tuple(str(w) for w in problems.warnings),
        sources=stamps,
        origins=frozen_mapping(origins),
    )


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Attempt:
    config: Optional[Config]
    errors: Optional[ConfigErrors]
    warnings: Tuple[str, ...]
    #: the configuration files, then the vacuum pipe caches (Config.sources has the files only)
    stamps: Tuple[SourceStamp, ...]
    override_path: Optional[str]
    #: the vacuum pipe caches the configuration was expanded from (watched like the files)
    pipe_paths: Tuple[str, ...] = ()


def _attempt(sources: ConfigSources, host: HostFacts) -> _Attempt:
    problems = Problems()
    merged: Dict[Key, Section] = {}
    base = sources.base_files()
    stamps = [stamp(p) for p in base]
    if not base:
        looked = [p for p in (sources.dropin_dir and os.path.join(sources.dropin_dir, "*.conf"),
                              sources.main_file) if p]
        problems.error("no configuration file found (looked for " + ", ".join(looked) + ")",
                       Where(sources.main_file))
    unreadable = not base
    for path in base:
        sections = read_source(path, False, problems, sources.vac)
        unreadable = unreadable or sections is None
        merge_sections(merged, sections or [])
    apply_vac_defaults(merged, problems)
    override_path = _find_override(sources, merged)
    if override_path is not None:
        stamps.append(stamp(override_path))
        if stamps[-1].exists:
            sections = read_source(override_path, True, problems)
            unreadable = unreadable or sections is None
            merge_sections(merged, sections or [])
    pipe_dir = _find_pipe_dir(merged, sources.vac)
    pipe_paths: Tuple[str, ...] = ()
    if pipe_dir is not None:
        pipe_paths = tuple(os.path.join(pipe_dir, prefix + PIPE_CACHE_SUFFIX)
                           for (kind, prefix) in merged if kind == table.VACUUM_PIPE and prefix is not None
                           and re.fullmatch(table.SECTION_NAME_PATTERN, prefix))
    # stat the caches before reading them: a cache replaced meanwhile is noticed at the next poll
    watched = tuple(stamps) + tuple(stamp(p) for p in pipe_paths)
    config = None
    if not unreadable:  # otherwise "required option is missing" and the like would only be noise
        fallback = Where(sources.main_file or (base[0] if base else None))
        config = _build(merged, host, problems, fallback, tuple(stamps), pipe_dir, sources.vac)
    errors = ConfigErrors(problems.errors) if problems.errors else None
    warnings = tuple(str(w) for w in problems.warnings)
    return _Attempt(config, errors, warnings, watched, override_path, pipe_paths)


def _state_dir_of(merged: Dict[Key, Section]) -> Optional[str]:
    """state_dir as the files read so far give it (None if it is invalid)."""
    row = table.accepted_options(table.SETTINGS)[table.STATE_DIR]
    settings = merged.get((table.SETTINGS, None))
    entry = settings.entries.get(table.STATE_DIR) if settings else None
    if entry is None:
        return row.default
    try:
        return parse_entry(row, entry, "settings", Problems())
    except ValueError:
        return None  # reported when [settings] is evaluated


def _find_pipe_dir(merged: Dict[Key, Section], vac: bool = False) -> Optional[str]:
    """pipes_cache_dir as the files give it, else its default (None if it is invalid)."""
    settings = merged.get((table.SETTINGS, None))
    entry = settings.entries.get(PIPES_CACHE_OPTION) if settings else None
    if entry is not None:
        try:
            return parse_entry(table.accepted_options(table.SETTINGS)[PIPES_CACHE_OPTION], entry, "settings",
                                Problems())
        except ValueError:
            return None  # reported when [settings] is evaluated
    if vac:
        return os.path.join(table.VAC_STATE_DIR, PIPE_CACHE_DIR)
    state_dir = _state_dir_of(merged)
    return os.path.join(state_dir, PIPE_CACHE_DIR) if state_dir else None


def _find_override(sources: ConfigSources, merged: Dict[Key, Section]) -> Optional[str]:
    """The override's path from the state_dir of the files read so far (None if it is invalid).

    A relative state_dir is resolved against the file that sets it, as for the value itself,
    so the override is found wherever the command runs from."""
    state_dir = _state_dir_of(merged)
    return sources.override_path(state_dir) if state_dir else None


def load_config(sources: ConfigSources, host_facts: Optional[HostFacts] = None) -> Config:
    """Read and validate the configuration; raise ConfigErrors listing every problem."""
    attempt = _attempt(sources, host_facts if host_facts is not None else HostFacts.probe())
    if attempt.errors is not None:
        raise attempt.errors
    assert attempt.config is not None
    return attempt.config


@dataclass(frozen=True)
class CheckResult:
    """Everything `vacfactory config check` reports: warnings survive even when there are errors."""

    config: Optional[Config]
    errors: Tuple[ConfigError, ...]
    warnings: Tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def check_config(sources: ConfigSources, host_facts: Optional[HostFacts] = None) -> CheckResult:
    """Like :func:`load_config`, but return the errors and warnings instead of raising."""
    attempt = _attempt(sources, host_facts if host_facts is not None else HostFacts.probe())
    errors = tuple(attempt.errors.errors) if attempt.errors is not None else ()
    return CheckResult(attempt.config, errors, attempt.warnings)


def load_config_string(text: str, host_facts: HostFacts, source: str = "<string>", vac: bool = False) -> Config:
    """Validate configuration text without files (no drop-ins, no override): handy in tests.

    ``vac``: read the text as a Vac site's file (no vacuum pipe caches are read)."""
    problems = Problems()
    merged: Dict[Key, Section] = {}
    merge_sections(merged, parse_vac_text(text, source, problems) if vac else parse_text(text, source, False, problems))
    apply_vac_defaults(merged, problems)
    config = _build(merged, host_facts, problems, Where(source), (), None, vac)
    if problems.errors:
        raise ConfigErrors(problems.errors)
    assert config is not None
    return config


# --------------------------------------------------------------------------- watching


@dataclass(frozen=True)
class PollResult:
    """Outcome of one :meth:`ConfigWatcher.poll`.

    ``config`` is always the last good configuration. ``changed`` is True when a re-read gave
    a good configuration that differs from the previous one. ``errors`` is set for as long as
    the files on disk are broken (the daemon logs it whenever it differs from the last poll).
    """

    config: Config
    changed: bool
    errors: Optional[ConfigErrors]


class ConfigWatcher:
    """Keeps the last good configuration and re-reads the files only when they change.

    A poll costs one listdir of the drop-in directory and one stat per file; the files are
    parsed again only when one appeared, vanished or changed mtime, size or inode. A broken
    edit never replaces the running configuration: running VMs are not touched because of it.
    """

    def __init__(self, sources: ConfigSources, host_facts: Optional[HostFacts] = None) -> None:
        self.sources = sources
        self.host_facts = host_facts if host_facts is not None else HostFacts.probe()
        #: how many times the files were parsed (tests and debugging)
        self.parse_count = 0
        attempt = self._read()
        if attempt.errors is not None:
            raise attempt.errors
        assert attempt.config is not None
        self._current: Config = attempt.config
        self._errors: Optional[ConfigErrors] = None

    @property
    def current(self) -> Config:
        return self._current

    @property
    def errors(self) -> Optional[ConfigErrors]:
        """The problems of the files on disk, if the last read failed."""
        return self._errors

    def _read(self) -> _Attempt:
        self.parse_count += 1
        attempt = _attempt(self.sources, self.host_facts)
        self._stamps = attempt.stamps
        self._override_path = attempt.override_path
        self._pipe_paths = attempt.pipe_paths
        return attempt

    def poll(self) -> PollResult:
        if self.sources.stamps(self._override_path, self._pipe_paths) == self._stamps:
            return PollResult(self._current, False, self._errors)
        attempt = self._read()
        if attempt.errors is not None:
            # the engine logs the rejection (one line per problem); logging it here too doubled it
            logger.debug("configuration not reloaded, keeping the last good one:\n%s", attempt.errors)
            self._errors = attempt.errors
            return PollResult(self._current, False, self._errors)
        assert attempt.config is not None
        previous = self._current
        self._current = attempt.config
        self._errors = None
        changed = _content(previous) != _content(attempt.config)
        if changed:
            logger.info("configuration reloaded")
        return PollResult(self._current, changed, None)


def _content(config: Config) -> Tuple[Any, ...]:
    return (config.settings, dict(config.machinetypes), dict(config.vacuum_pipes))
