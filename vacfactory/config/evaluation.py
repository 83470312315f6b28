"""Evaluating merged sections into values (the policy part): each option parsed with its
type (or its Vac reading), defaults filled in table order, the rules between options applied,
and machinetypes built with their ``files/`` paths resolved.

Everything about options themselves (names, aliases, types, defaults, rules) comes from
``config/options.py``; this module only applies it to a :class:`~.sections.Section`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from vacfactory.config import options as table
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.model import MachineType, frozen_mapping
from vacfactory.config.parsers import is_url
from vacfactory.config.sections import Entry, Problems, Section

# --------------------------------------------------------------------------- values


def parse_entry(row: Any, entry: Entry, title: str, problems: Problems) -> Any:
    """Parse one entry with its row's type; raises ValueError with the reason.

    An entry from a Vac file is read as Vac reads it (see _parse_vac_entry); it may give
    ``table.VAC_UNSET``: the option counts as not set.
    """
    if entry.vac:
        return _parse_vac_entry(row, entry, title, problems)
    return _parse_strict(row, entry, title, problems)


def _parse_vac_entry(row: Any, entry: Entry, title: str, problems: Problems) -> Any:
    """Vac's reading: the row's vac_parse if it has one; an empty value is "not set" where the
    option has no default; a value vacfactory cannot parse for an option it ignores anyway is
    ignored with a warning. Anything else as in vacfactory's own files."""
    vac_parse = getattr(row, "vac_parse", None)
    if vac_parse is not None:
        value = vac_parse(entry.raw)
    elif entry.raw == "" and getattr(row, "default", None) is None and not getattr(row, "required", False):
        try:
            value = row.type.parse("")
        except ValueError:
            value = table.VAC_UNSET  # Vac stores '' and treats it as "not set"
    else:
        try:
            value = _parse_strict(row, entry, title, problems)
        except ValueError as error:
            if not getattr(row, "ignored", ""):
                raise
            value = table.Noted(table.VAC_UNSET, f"{error}: ignored (vacfactory does not use this option)")
    if isinstance(value, table.Noted):
        problems.warn(value.message, entry.where, title, entry.given)
        value = value.value
    return value


def _parse_strict(row: Any, entry: Entry, title: str, problems: Problems) -> Any:
    lowered = entry.raw.strip().lower()
    for text, value in getattr(row, "legacy_values", ()):
        if lowered == text:
            if not getattr(row, "ignored", ""):  # an ignored option was warned about already
                problems.warn(f"{entry.raw!r} is deprecated here: use {row.type.format(value)}",
                              entry.where, title, entry.given)
            return value
    value = row.type.parse(entry.raw)
    if getattr(row.type, "relative_to_config", False) and not value.startswith("/") and entry.where.source:
        value = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(entry.where.source)), value))
    return value


@dataclass
class Evaluated:
    values: Dict[str, Any]
    failed: set
    origins: Dict[str, str]
    families: Dict[str, Dict[str, Any]]


def evaluate(section: Section, host: HostFacts, settings: Mapping[str, Any],
              problems: Problems, vac: bool = False) -> Evaluated:
    """Parse a section's options, fill defaults in table order, then apply the rules.

    ``vac``: the configuration is a Vac site's (Vac's default paths, Vac's rule severities).
    """
    title = section.title
    rows = table.options_of(section.kind)
    values: Dict[str, Any] = {}
    failed: set = set()
    origins: Dict[str, str] = {}
    for row in rows:
        entry = section.entries.get(row.name)
        origins[row.name] = str(entry.where) if entry else "default"
        if entry is None:
            continue
        try:
            value = parse_entry(row, entry, title, problems)
        except ValueError as error:
            problems.error(str(error), entry.where, title, entry.given)
            failed.add(row.name)
            continue
        if value is table.VAC_UNSET:
            origins[row.name] = "default"
            continue
        values[row.name] = value
    for row in rows:
        if row.name in values or row.name in failed:
            continue
        if row.required:
            problems.error("required option is missing", section.where, title, row.name)
            failed.add(row.name)
        elif isinstance(row.default, table.Computed):
            value = row.default.compute(table.DefaultContext(host, values, settings, section.name, vac))
            if value is None:
                values[row.name] = None
                failed.add(row.name)  # it depends on an option that is already reported
                continue
            try:
                row.type.parse(row.type.format(value))
            except ValueError as error:
                problems.error(f"the default ({row.default.describe}: {row.type.format(value)!r}) is not "
                               f"usable: {error}; set {row.name}", section.where, title, row.name)
                failed.add(row.name)
                continue
            values[row.name] = value
        else:
            values[row.name] = row.default
    _apply_rules(section, host, settings, values, failed, problems, vac)
    families = _evaluate_families(section, problems, origins)
    return Evaluated(values, failed, origins, families)


def _apply_rules(section: Section, host: HostFacts, settings: Mapping[str, Any], values: Dict[str, Any],
                 failed: set, problems: Problems, vac: bool = False) -> None:
    for rule in table.RULES:
        if rule.section != section.kind or failed.intersection(rule.needs):
            continue
        context = table.DefaultContext(host, values, settings, section.name, vac)
        message = rule.test(context)
        if message is None:
            continue
        entry = section.entries.get(rule.option)
        where = entry.where if entry else section.where
        given = entry.given if entry else rule.option
        vac_rule = vac and rule.vac_severity is not None
        severity = rule.vac_severity if vac_rule else rule.severity
        replacement = rule.vac_replacement if vac_rule else rule.replacement
        if severity == "warning":
            problems.warn(message, where, section.title, given)
            if replacement is not None:
                values[rule.option] = replacement(context)
        else:
            problems.error(message, where, section.title, given)
            failed.add(rule.option)


def _evaluate_families(section: Section, problems: Problems, origins: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    result: Dict[str, Dict[str, Any]] = {f.attribute: {} for f in table.families_of(section.kind)}
    for name, entry in section.entries.items():
        for family in table.families_of(section.kind):
            if name.startswith(family.prefix):
                origins[name] = str(entry.where)
                try:
                    result[family.attribute][name[len(family.prefix):]] = family.type.parse(entry.raw)
                except ValueError as error:
                    problems.error(str(error), entry.where, section.title, entry.given)
                break
    return result


def _resolve_files(base: Optional[str], value: Any) -> Any:
    """A relative path means <machinetype_path>/files/<path>; URLs and absolute paths stay."""
    if not isinstance(value, str) or not base or is_url(value) or value.startswith("/"):
        return value
    return os.path.join(base, "files", value)


def inherit_origins(own: Dict[str, str], settings: Dict[str, str],
                     settings_families: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    merged = dict(own)
    for family in table.families_of(table.MACHINETYPE):
        for suffix in settings_families.get(family.attribute, {}):
            merged.setdefault(family.prefix + suffix, settings.get(family.prefix + suffix, "settings"))
    return merged


def make_machinetype(name: str, m: Evaluated, settings_families: Dict[str, Dict[str, Any]]) -> Any:
    values = dict(m.values)
    base = values.get(table.FILES_BASE)
    for row in table.options_of(table.MACHINETYPE):
        if row.relative_to_files:
            values[row.name] = _resolve_files(base, values.get(row.name))
    families: Dict[str, Mapping[str, Any]] = {}
    for family in table.families_of(table.MACHINETYPE):
        combined = dict(settings_families.get(family.attribute, {}))
        combined.update(m.families.get(family.attribute, {}))
        if family.relative_to_files:
            combined = {k: _resolve_files(base, v) for k, v in combined.items()}
        families[family.attribute] = frozen_mapping(combined)
    # a Vac machinetype may load without an image (share 0, or with a warning): never started
    startable = table.machinetype_startable(values) and bool(values.get("root_image") or values.get("kernel_image"))
    return MachineType(name=name, startable=startable, **values, **families)

