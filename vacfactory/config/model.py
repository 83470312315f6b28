"""The validated configuration: frozen values the rest of vacfactory reads.

``Settings``, ``MachineType`` and ``VacuumPipe`` are frozen dataclasses generated from the
option table, one attribute per canonical option name, so adding a row to
``config/options.py`` is all it takes to add an option, and a mistyped name
(``settings.total_procesors``) raises AttributeError instead of quietly giving None. Unset
optional options are None; list options are tuples; mappings are read-only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Tuple

from vacfactory.config import options as table


def _option_fields(section: str) -> List[Any]:
    fields: List[Any] = []
    for row in table.options_of(section):
        annotation = row.type.python_type
        if row.default is None and not row.required:
            annotation = Optional[annotation]
        # secrets stay out of repr(), so logging a Settings object cannot leak them
        fields.append((row.name, annotation, dataclasses.field(repr=not row.secret)))
    return fields


def _family_fields(section: str) -> List[Any]:
    return [(family.attribute, Mapping[str, str]) for family in table.families_of(section)]


def _make(name: str, fields: List[Any], doc: str, namespace: Optional[dict] = None) -> type:
    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace=dict(namespace or {}, __doc__=doc))
    cls.__module__ = __name__
    return cls


Settings: Any = _make(
    "Settings",
    _option_fields(table.SETTINGS) + _family_fields(table.SETTINGS),
    "The [settings] section: one attribute per option (see docs/configuration.md), plus "
    "user_data_options / user_data_files (defaults for every machinetype, unresolved paths) "
    "and machinefeatures_options.",
)

MachineType: Any = _make(
    "MachineType",
    [("name", str), ("startable", bool)]
    + _option_fields(table.MACHINETYPE)
    + _family_fields(table.MACHINETYPE),
    "One [machinetype NAME] section with defaults applied: one attribute per option, plus "
    "name, startable (False for container models vacfactory does not run), and "
    "user_data_options / user_data_files merged over the [settings] ones (the machinetype "
    "wins; file paths resolved against <machinetype_path>/files/).",
)

VacuumPipe: Any = _make(
    "VacuumPipe",
    [("prefix", str)] + _option_fields(table.VACUUM_PIPE) + [("options", Mapping[str, str])],
    "One [vacuum_pipe PREFIX] section. ``options`` holds the other (machinetype) options as "
    "validated raw text under their canonical names: they are defaults for the machinetypes "
    "the pipe defines, merged with the pipe's JSON when it is expanded.",
    namespace={"url": property(lambda self: self.vacuum_pipe_url, doc="The vacuum_pipe_url.")},
)


@dataclass(frozen=True)
class SourceStamp:
    """Identity of one configuration file when it was read: a change means re-read it.

    ``mtime_ns``, ``size`` and ``inode`` are None when the file did not exist (a missing runtime
    override is recorded too, so that its appearance is noticed). The inode catches an editor
    that renames a new file into place within one mtime tick and with the same size.
    """

    path: str
    mtime_ns: Optional[int]
    size: Optional[int]
    inode: Optional[int] = None

    @property
    def exists(self) -> bool:
        return self.mtime_ns is not None


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    settings: Any
    #: machinetypes in configuration order
    machinetypes: Mapping[str, Any]
    vacuum_pipes: Mapping[str, Any]
    #: deprecation and other warnings, formatted like errors (file:line: [section] option: ...)
    warnings: Tuple[str, ...]
    #: every file consulted (including absent ones whose appearance matters)
    sources: Tuple[SourceStamp, ...]
    #: section title ("settings", "machinetype lhcb", ...) -> option -> "file:line" or "default"
    origins: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class EffectiveOption:
    """One option's effective value, for `vacfactory config show` and logs."""

    name: str
    #: the value as it would be written in a file ("" when unset; masked when secret)
    text: str
    #: the parsed value (None when unset or secret), JSON-friendly
    value: Any
    #: "file:line", "default", or "settings" for values inherited from [settings]
    origin: str
    is_set: bool


SECRET_MASK = "********"


def effective_options(config: Config) -> List[Tuple[str, List[EffectiveOption]]]:
    """Every section's options in table order with value and origin (secrets masked)."""
    sections: List[Tuple[str, List[EffectiveOption]]] = []
    settings_title = table.SETTINGS
    sections.append((settings_title, _effective(config, settings_title, table.SETTINGS, config.settings, None)))
    for name, machinetype in config.machinetypes.items():
        title = f"{table.MACHINETYPE} {name}"
        sections.append((title, _effective(config, title, table.MACHINETYPE, machinetype, None)))
    for prefix, pipe in config.vacuum_pipes.items():
        title = f"{table.VACUUM_PIPE} {prefix}"
        sections.append((title, _effective(config, title, table.VACUUM_PIPE, pipe, pipe.options)))
    return sections


def _effective(config: Config, title: str, kind: str, obj: Any,
               raw_options: Optional[Mapping[str, str]]) -> List[EffectiveOption]:
    origins = config.origins.get(title, {})
    rows: List[EffectiveOption] = []
    for row in table.options_of(kind):
        value = getattr(obj, row.name)
        origin = origins.get(row.name, "default")
        if value is None:
            rows.append(EffectiveOption(row.name, "", None, origin, False))
        elif row.secret:
            rows.append(EffectiveOption(row.name, SECRET_MASK, None, origin, True))
        else:
            shown = list(value) if isinstance(value, tuple) else value
            rows.append(EffectiveOption(row.name, row.type.format(value), shown, origin, True))
    for family in table.families_of(kind):
        for suffix, value in getattr(obj, family.attribute, {}).items():
            name = family.prefix + suffix
            rows.append(EffectiveOption(name, str(value), value, origins.get(name, "settings"), True))
    for name, text in (raw_options or {}).items():
        rows.append(EffectiveOption(name, text, text, origins.get(name, "default"), True))
    return rows


def frozen_mapping(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A read-only view of a copy of ``mapping`` (keeps insertion order)."""
    return MappingProxyType(dict(mapping))
