"""Find, read, merge and validate the configuration files into a :class:`Config`.

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
"""

from __future__ import annotations

import configparser
import difflib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from vacfactory.config import options as table
from vacfactory.config import pipes as pipelib
from vacfactory.config import vacsyntax
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.model import Config, MachineType, Settings, SourceStamp, VacuumPipe, frozen_mapping
from vacfactory.config.parsers import is_url
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

DEFAULT_MAIN_FILE = "/etc/vacfactory.conf"
DEFAULT_DROPIN_DIR = "/etc/vacfactory.d"
#: Vac's runtime file, read after /etc/vac.conf when pointed at a Vac configuration.
VAC_RUNTIME_FILE = "/var/run/vac.conf"
#: Vac's own files: reading any of them (or a file named vac.conf) reads the configuration as Vac's.
VAC_MAIN_FILE = "/etc/vac.conf"
VAC_DROPIN_DIR = "/etc/vac.d"

_DEFAULT_SECTION = "\n"  # configparser's DEFAULT section, renamed to something no header can be
#: the kind of a Vac file's [DEFAULT] section while files are merged (no header maps to it)
_VAC_DEFAULTS = "\nDEFAULT"


def is_vac_path(path: str) -> bool:
    """A Vac site's file: /etc/vac.conf, /etc/vac.d/*, /var/run/vac.conf, or any file named vac.conf."""
    absolute = os.path.abspath(path)
    return (os.path.basename(absolute) == "vac.conf"
            or absolute in (VAC_MAIN_FILE, VAC_RUNTIME_FILE, "/run/vac.conf")
            or absolute.startswith(VAC_DROPIN_DIR + "/"))


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ConfigSources:
    """Where the configuration comes from, in reading order (see the module docstring)."""

    main_file: Optional[str]
    dropin_dir: Optional[str]
    #: a missing main file is an error (it was named explicitly)
    main_required: bool = True
    #: files read after the main file if they exist (Vac's /var/run/vac.conf)
    late_files: Tuple[str, ...] = ()
    override_name: str = table.RUNTIME_OVERRIDE_NAME
    #: the files before the override are a Vac site's, read as Vac 03.01 reads them (the
    #: override, which vacfactory writes, is always read strictly)
    vac: bool = False

    @classmethod
    def default(cls) -> "ConfigSources":
        """/etc/vacfactory.d/*.conf, /etc/vacfactory.conf, then the runtime override."""
        return cls(main_file=DEFAULT_MAIN_FILE, dropin_dir=DEFAULT_DROPIN_DIR, main_required=False)

    @classmethod
    def for_main_file(cls, path: str, vac_runtime_file: str = VAC_RUNTIME_FILE,
                      vac: Optional[bool] = None) -> "ConfigSources":
        """``<dir>/<stem>.d/*.conf`` and ``path``; a ``vac.conf`` also gets Vac's runtime file.

        ``vac``: read the files as Vac's (None: when ``path`` is one of Vac's, see is_vac_path).
        As in Vac, a missing main file is then skipped (the drop-ins may hold everything).
        """
        directory, base = os.path.split(path)
        stem = os.path.splitext(base)[0]
        vac = is_vac_path(path) if vac is None else vac
        if base == "vac.conf":
            return cls(main_file=path, dropin_dir=os.path.join(directory, "vac.d"),
                       late_files=(vac_runtime_file,), main_required=not vac, vac=vac)
        return cls(main_file=path, dropin_dir=os.path.join(directory, stem + ".d"), main_required=not vac, vac=vac)

    def dropin_files(self) -> List[str]:
        """The ``*.conf`` files of the drop-in directory, sorted by name."""
        if not self.dropin_dir:
            return []
        try:
            names = os.listdir(self.dropin_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as error:
            logger.warning("cannot list %s: %s", self.dropin_dir, error)
            return []
        # hidden names are editor droppings (.#x.conf), never configuration
        return [os.path.join(self.dropin_dir, n) for n in sorted(names)
                if n.endswith(".conf") and not n.startswith(".")]

    def base_files(self) -> List[str]:
        """Every file to read before the override, in order."""
        files = self.dropin_files()
        if self.main_file and (self.main_required or os.path.exists(self.main_file)):
            files.append(self.main_file)
        files.extend(f for f in self.late_files if os.path.exists(f))
        return files

    def override_path(self, state_dir: str) -> str:
        return os.path.join(state_dir, self.override_name)

    def stamps(self, override_path: Optional[str], extra: Tuple[str, ...] = ()) -> Tuple[SourceStamp, ...]:
        """Cheap identity of every source now: one listdir and one stat per file.

        ``extra`` are further files the configuration depends on (the vacuum pipe caches).
        """
        paths = self.base_files() + ([override_path] if override_path else []) + list(extra)
        return tuple(stamp(p) for p in paths)


def stamp(path: str) -> SourceStamp:
    try:
        st = os.stat(path)
    except OSError:
        return SourceStamp(path, None, None)
    return SourceStamp(path, st.st_mtime_ns, st.st_size, st.st_ino)


# --------------------------------------------------------------------------- problems


class _Problems:
    """Collects errors and warnings; every message is a located ConfigError."""

    def __init__(self) -> None:
        self.errors: List[ConfigError] = []
        self.warnings: List[ConfigError] = []

    def error(self, message: str, where: "_Where", section: Optional[str] = None,
              option: Optional[str] = None) -> None:
        self.errors.append(ConfigError(message, source=where.source, line=where.line,
                                       section=section, option=option))

    def warn(self, message: str, where: "_Where", section: Optional[str] = None,
             option: Optional[str] = None) -> None:
        self.warnings.append(ConfigError(message, source=where.source, line=where.line,
                                         section=section, option=option))

    def sort(self, files: List[str]) -> None:
        """Order problems as an admin reads the files: file by file, line by line."""
        order = {path: i for i, path in enumerate(files)}

        def key(problem: ConfigError) -> Tuple[int, int]:
            return (order.get(problem.source or "", len(order)), problem.line or sys.maxsize)

        self.errors.sort(key=key)
        self.warnings.sort(key=key)


@dataclass(frozen=True)
class _Where:
    source: Optional[str]
    line: Optional[int] = None

    def __str__(self) -> str:
        if not self.source:
            return "default"
        return f"{self.source}:{self.line}" if self.line else self.source


@dataclass(frozen=True)
class _Entry:
    """One option as written: the name used, its raw text, and where."""

    given: str
    raw: str
    where: _Where
    #: written in a Vac file: read as Vac reads it
    vac: bool = False


@dataclass
class _Section:
    kind: str
    name: Optional[str]
    where: _Where
    entries: Dict[str, _Entry] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.kind if self.name is None else f"{self.kind} {self.name}"


_Key = Tuple[str, Optional[str]]


# --------------------------------------------------------------------------- reading one file


def _first_line(lines: Optional[List[int]]) -> Optional[int]:
    return lines[0] if lines else None


def _scan_lines(text: str) -> Tuple[Dict[str, List[int]], Dict[Tuple[str, str], List[int]]]:
    """Line numbers of section headers and options, following configparser's rules.

    Mirrors RawConfigParser._read with comment_prefixes ('#', ';'), no inline comments and
    empty_lines_in_values=False: a line indented deeper than its option continues it.
    """
    headers: Dict[str, List[int]] = {}
    options: Dict[Tuple[str, str], List[int]] = {}
    header: Optional[str] = None
    optname: Optional[str] = None
    indent = sys.maxsize
    for lineno, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            indent = sys.maxsize
            continue
        first = configparser.RawConfigParser.NONSPACECRE.search(line)
        cur_indent = first.start() if first else 0
        if header is not None and optname and cur_indent > indent:
            continue
        indent = cur_indent
        mo = configparser.RawConfigParser.SECTCRE.match(stripped)
        if mo:
            header = mo.group("header")
            headers.setdefault(header, []).append(lineno)
            optname = None
        elif header is None:
            break
        else:
            mo = configparser.RawConfigParser.OPTCRE.match(stripped)
            if mo:
                optname = mo.group("option").rstrip().lower()
                options.setdefault((header, optname), []).append(lineno)
    return headers, options


def _read_source(path: str, override: bool, problems: _Problems, vac: bool = False) -> Optional[List[_Section]]:
    """The sections of one file; None if the file cannot be read at all."""
    where = _Where(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        problems.error(f"cannot read: {error.strerror or error}", where)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        if not vac:
            problems.error(f"is not valid UTF-8 text (byte {error.start})", where)
            return None
        # Vac (Python 2) reads bytes: any file loads
        problems.warn(f"is not valid UTF-8 text (byte {error.start}): read as Latin-1", where)
        text = data.decode("latin-1")
    if vac:
        return _parse_vac_text(text, path, problems)
    return _parse_text(text, path, override, problems)


def _parse_text(text: str, source: str, override: bool, problems: _Problems) -> List[_Section]:
    """Parse one file's text into located sections, reporting every problem in it."""
    parser = configparser.RawConfigParser(
        strict=False, interpolation=None, empty_lines_in_values=False,
        default_section=_DEFAULT_SECTION, comment_prefixes=("#", ";"), inline_comment_prefixes=None,
    )
    lines = text.split("\n")
    try:
        parser.read_string(text, source=source)
    except configparser.MissingSectionHeaderError as error:
        problems.error("this line comes before any [section] header: "
                       f"{_show_line(lines, error.lineno)}", _Where(source, error.lineno))
        return []
    except configparser.ParsingError as error:
        for lineno, _ in error.errors:
            problems.error(f"cannot parse this line (expected 'name = value' or '[section]'): "
                           f"{_show_line(lines, lineno)}", _Where(source, lineno))
    except configparser.Error as error:  # not expected with strict=False; report, do not crash
        problems.error(f"cannot parse: {error}", _Where(source))
        return []
    header_lines, option_lines = _scan_lines(text)
    sections: List[_Section] = []
    for header in parser.sections():
        hwhere = _Where(source, _first_line(header_lines.get(header)))
        key = _classify_header(header, hwhere, problems)
        if key is None:
            continue
        section = _Section(key[0], key[1], hwhere)
        for optname, raw in parser.items(header, raw=True):
            if not optname:
                continue  # "= value": already reported as a parse error
            linenos: List[Optional[int]] = [*option_lines.get((header, optname), [])] or [None]
            owhere = _Where(source, linenos[-1])
            if len(linenos) > 1:
                problems.error(f"given twice in this section (first at line {linenos[0]})",
                               owhere, section.title, optname)
            _add_entry(section, optname, raw, owhere, override, problems)
        sections.append(section)
    return sections


def _parse_vac_text(text: str, source: str, problems: _Problems) -> List[_Section]:
    """Parse one Vac file the way Vac 03.01 does (see config/vacsyntax.py and the module docstring).

    Lines Python 2's parser cannot read are errors (they stop Vac's readConf too); sections and
    options Vac does not read are ignored with one warning each.
    """
    raw_sections, syntax_problems = vacsyntax.parse(text)
    for problem in syntax_problems:
        problems.error(problem.message, _Where(source, problem.line))
    sections: List[_Section] = []
    for raw in raw_sections:
        hwhere = _Where(source, raw.line)
        if raw.header == vacsyntax.DEFAULT_SECTION:
            section = _Section(_VAC_DEFAULTS, None, hwhere)
            for option in raw.options:
                where = _Where(source, option.line)
                previous = section.entries.get(option.name)
                if previous is not None:
                    problems.warn(f"given twice in this section (first at line {previous.where.line}): the last "
                                  "one wins, as in Vac", where, vacsyntax.DEFAULT_SECTION, option.name)
                section.entries[option.name] = _Entry(option.name, option.value, where, True)
            sections.append(section)
            continue
        key = _classify_vac_header(raw.header, hwhere, problems)
        if key is None:
            continue
        section = _Section(key[0], key[1], hwhere)
        for option in raw.options:
            _add_entry(section, option.name, option.value, _Where(source, option.line), False, problems, vac=True)
        sections.append(section)
    return sections


_VAC_KINDS = ["settings", "machinetype", "vacuum_pipe"]


def _classify_vac_header(header: str, where: _Where, problems: _Problems) -> Optional[_Key]:
    """Vac's reading of a header: exactly [settings]; [machinetype NAME], [vmtype NAME] and
    [vacuum_pipe PREFIX] with the header lower-cased; every other section ignored with a warning."""
    if header == "settings":
        return (table.SETTINGS, None)
    words = header.lower().split(None, 1)
    kind_word = words[0] if words else ""
    if kind_word in table.SECTION_KINDS and kind_word != "settings" and len(words) == 2:
        kind, name = table.SECTION_KINDS[kind_word], words[1].strip()
        if kind_word in table.LEGACY_SECTION_KINDS:
            problems.warn(f"deprecated section kind: use [{table.LEGACY_SECTION_KINDS[kind_word]} {name}]",
                          where, header)
        if not re.fullmatch(table.SECTION_NAME_PATTERN, name):
            what = "machinetype name" if kind == table.MACHINETYPE else "vacuum pipe prefix"
            problems.error(f"{what} {name!r} must match {table.SECTION_NAME_PATTERN} "
                           "(letters, digits and '-'; Vac lower-cases it)", where, header)
        return (kind, name)
    if kind_word == "settings":
        why = "Vac reads only a section named exactly [settings] (section names are case-sensitive)"
    elif kind_word in table.SECTION_KINDS:
        why = f"needs a name: [{kind_word} NAME]"
    elif kind_word in table.FORBIDDEN_SECTIONS:
        why = f"Vac 03.01 does not read this section ({table.FORBIDDEN_SECTIONS[kind_word]})"
    else:
        why = "Vac 03.01 does not read this section" + _suggest(kind_word, _VAC_KINDS)
    problems.warn(f"ignored: {why}", where, header)
    return None


def _show_line(lines: List[str], lineno: Optional[int]) -> str:
    if lineno is None or not 1 <= lineno <= len(lines):
        return ""
    text = lines[lineno - 1].strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _suggest(word: str, candidates: List[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _classify_header(header: str, where: _Where, problems: _Problems) -> Optional[_Key]:
    """Map a header to (kind, name); report forbidden, unknown and badly named sections."""
    words = header.split(None, 1)
    kind_word = words[0].lower() if words else ""
    name = words[1].strip() if len(words) > 1 else None
    if kind_word in table.FORBIDDEN_SECTIONS and name is None:
        problems.error(table.FORBIDDEN_SECTIONS[kind_word], where, header)
        return None
    kind = table.SECTION_KINDS.get(kind_word)
    if kind is None:
        known = ["settings", "machinetype NAME", "vacuum_pipe PREFIX"]
        problems.error("unknown section: expected one of " + ", ".join(f"[{k}]" for k in known)
                       + _suggest(kind_word, list(table.SECTION_KINDS)), where, header)
        return None
    if kind == table.SETTINGS:
        if name is not None:
            problems.error("[settings] takes no name", where, header)
        return (kind, None)
    if name is None:
        problems.error(f"needs a name: [{kind_word} NAME]", where, header)
        return None
    if kind_word in table.LEGACY_SECTION_KINDS:
        problems.warn(f"deprecated section kind: use [{table.LEGACY_SECTION_KINDS[kind_word]} {name}]",
                      where, header)
    if not re.fullmatch(table.SECTION_NAME_PATTERN, name):
        what = "machinetype name" if kind == table.MACHINETYPE else "vacuum pipe prefix"
        problems.error(f"{what} {name!r} must match {table.SECTION_NAME_PATTERN} "
                       "(lower-case letters, digits and '-')", where, header)
    return (kind, name)


_SECTION_SHAPES = {table.SETTINGS: "[settings]", table.MACHINETYPE: "[machinetype NAME]",
                   table.VACUUM_PIPE: "[vacuum_pipe PREFIX]"}


def _unknown_option_message(kind: str, optname: str) -> str:
    """'unknown option', with the likely intended name, or the section it belongs in."""
    others = [k for k in (table.SETTINGS, table.MACHINETYPE) if k != kind]
    for other in others:
        if optname in table.accepted_options(other) or optname in table.aliases_of(other):
            return f"unknown option here: {optname} belongs in {_SECTION_SHAPES[other]}"
    hint = _suggest(optname, list(table.accepted_options(kind)) + list(table.aliases_of(kind)))
    if hint:
        return "unknown option" + hint
    for other in others:
        match = difflib.get_close_matches(optname, list(table.accepted_options(other)), n=1, cutoff=0.6)
        if match:
            return f"unknown option (did you mean {match[0]} in {_SECTION_SHAPES[other]}?)"
    return "unknown option"


def _add_entry(section: _Section, optname: str, raw: str, where: _Where, override: bool,
               problems: _Problems, vac: bool = False) -> None:
    """Resolve an option name (canonical, alias, family, ignored, unknown) and record it.

    ``vac``: written in a Vac file, where what Vac does not read is ignored with a warning
    and the last of two values wins (Vac's parser), instead of being an error.
    """
    title = section.title
    refuse = problems.warn if vac else problems.error
    ignored_note = ": ignored" if vac else ""
    accepted = table.accepted_options(section.kind)
    canonical: Optional[str] = None
    if optname in accepted:
        canonical = optname
    elif optname in table.aliases_of(section.kind):
        canonical = table.aliases_of(section.kind)[optname]
        if not accepted[canonical].ignored:  # an ignored option gets one warning, below
            problems.warn(f"deprecated: use {canonical}", where, title, optname)
    else:
        for family in table.families_of(section.kind):
            if optname.startswith(family.prefix):
                suffix = optname[len(family.prefix):]
                if not re.fullmatch(family.suffix_pattern, suffix):
                    refuse(f"the name after {family.prefix} must match {family.suffix_pattern}{ignored_note}",
                           where, title, optname)
                    return
                if suffix in family.reserved:
                    refuse(f"{suffix!r} {family.reserved_why}: choose another name{ignored_note}",
                           where, title, optname)
                    return
                canonical = optname
                break
    if canonical is None:
        ignored = table.ignored_of(section.kind).get(optname)
        if ignored is not None:
            problems.warn(f"ignored: {ignored.reason}", where, title, optname)
            return
        if vac:
            problems.warn("ignored: Vac 03.01 does not read it; "
                          + _unknown_option_message(section.kind, optname), where, title, optname)
        else:
            problems.error(_unknown_option_message(section.kind, optname), where, title, optname)
        return
    row = accepted.get(canonical)
    if override and row is not None and row.not_in_override:
        problems.error("cannot be set in the runtime override file", where, title, optname)
        return
    if row is not None and row.ignored:
        problems.warn(f"{table.IGNORED_PREFIX}: {row.ignored}", where, title, optname)
    previous = section.entries.get(canonical)
    if vac and previous is not None and previous.where.source == where.source:
        also = "" if previous.given == optname else f" as {previous.given}"
        problems.warn(f"also given{also} at line {previous.where.line}: the last one wins, as in Vac",
                      where, title, optname)
    elif previous is not None and previous.given != optname and previous.where.source == where.source:
        problems.error(f"also given as {previous.given} at line {previous.where.line}", where, title, optname)
    section.entries[canonical] = _Entry(optname, raw, where, vac)


def _canonical_name(kind: str, optname: str) -> Optional[str]:
    """The option a section of ``kind`` takes ``optname`` as (canonical, alias or family), or None."""
    if optname in table.accepted_options(kind):
        return optname
    aliases = table.aliases_of(kind)
    if optname in aliases:
        return aliases[optname]
    for family in table.families_of(kind):
        if optname.startswith(family.prefix) and re.fullmatch(family.suffix_pattern, optname[len(family.prefix):]):
            return optname
    return None


def _apply_vac_defaults(merged: Dict[_Key, _Section], problems: _Problems) -> None:
    """Python 2 RawConfigParser's [DEFAULT]: each option appears in every section; a section's
    own value wins. Each section takes what it accepts; an option no section takes is ignored
    with one warning (Vac reads nothing it does not look for)."""
    defaults = merged.pop((_VAC_DEFAULTS, None), None)
    if defaults is None:
        return
    for name, entry in defaults.entries.items():
        taken = False
        for (kind, _), section in merged.items():
            canonical = _canonical_name(kind, name)
            if canonical is None:
                continue
            taken = True
            if canonical not in section.entries:
                section.entries[canonical] = entry
        if not taken:
            known = [n for k in (table.SETTINGS, table.MACHINETYPE) for n in table.accepted_options(k)]
            problems.warn("ignored: no section Vac 03.01 reads takes it" + _suggest(name, known), entry.where,
                          vacsyntax.DEFAULT_SECTION, entry.given)


def _merge(merged: Dict[_Key, _Section], sections: List[_Section]) -> None:
    """Later files win per option; same-named sections merge (Vac's RawConfigParser.read)."""
    for section in sections:
        key = (section.kind, section.name)
        target = merged.get(key)
        if target is None:
            merged[key] = _Section(section.kind, section.name, section.where, dict(section.entries))
        else:
            target.entries.update(section.entries)


# --------------------------------------------------------------------------- values


def _parse_entry(row: Any, entry: _Entry, title: str, problems: _Problems) -> Any:
    """Parse one entry with its row's type; raises ValueError with the reason.

    An entry from a Vac file is read as Vac reads it (see _parse_vac_entry); it may give
    ``table.VAC_UNSET``: the option counts as not set.
    """
    if entry.vac:
        return _parse_vac_entry(row, entry, title, problems)
    return _parse_strict(row, entry, title, problems)


def _parse_vac_entry(row: Any, entry: _Entry, title: str, problems: _Problems) -> Any:
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


def _parse_strict(row: Any, entry: _Entry, title: str, problems: _Problems) -> Any:
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
class _Evaluated:
    values: Dict[str, Any]
    failed: set
    origins: Dict[str, str]
    families: Dict[str, Dict[str, Any]]


def _evaluate(section: _Section, host: HostFacts, settings: Mapping[str, Any],
              problems: _Problems, vac: bool = False) -> _Evaluated:
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
            value = _parse_entry(row, entry, title, problems)
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
    return _Evaluated(values, failed, origins, families)


def _apply_rules(section: _Section, host: HostFacts, settings: Mapping[str, Any], values: Dict[str, Any],
                 failed: set, problems: _Problems, vac: bool = False) -> None:
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


def _evaluate_families(section: _Section, problems: _Problems, origins: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
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


# --------------------------------------------------------------------------- building


def _build(merged: Dict[_Key, _Section], host: HostFacts, problems: _Problems, fallback: _Where,
           stamps: Tuple[SourceStamp, ...], pipe_dir: Optional[str] = None, vac: bool = False) -> Optional[Config]:
    """Evaluate every section into the frozen model; None if anything was wrong.

    ``pipe_dir`` holds the vacuum pipe caches (``<prefix>.pipe``); None: pipes define nothing.
    ``vac``: the configuration is a Vac site's (Vac's defaults and rule severities).
    """
    settings_section = merged.get((table.SETTINGS, None)) or _Section(table.SETTINGS, None, fallback)
    s = _evaluate(settings_section, host, {}, problems, vac)
    origins: Dict[str, Mapping[str, str]] = {settings_section.title: frozen_mapping(s.origins)}
    settings_families = s.families
    machinetypes: Dict[str, Any] = {}
    pipes: Dict[str, Any] = {}
    expansions = _read_pipe_caches(merged, pipe_dir, problems)
    from_pipes = {mt.name for expansion in expansions.values() for mt in expansion.machinetypes}
    pipe_prefixes = tuple(f"{p}-" for (k, p) in merged if k == table.VACUUM_PIPE and p is not None)
    for (kind, name), section in merged.items():
        if kind == table.MACHINETYPE and name is not None:
            if name in from_pipes:
                _check_local_entries(section, problems)  # merged with its pipe below
                continue
            if name.startswith(pipe_prefixes):
                m = _evaluate_pipe_refinement(section, host, s.values, problems, vac)
                if m is not None:
                    origins[section.title] = frozen_mapping(_inherit_origins(m.origins, s.origins, settings_families))
                    machinetypes[name] = _make_machinetype(name, m, settings_families)
                continue
            m = _evaluate(section, host, s.values, problems, vac)
            origins[section.title] = frozen_mapping(_inherit_origins(m.origins, s.origins, settings_families))
            if not problems.errors:
                machinetypes[name] = _make_machinetype(name, m, settings_families)
        elif kind == table.VACUUM_PIPE and name is not None:
            pipe, pipe_origins = _make_pipe(section, host, s.values, problems, vac)
            origins[section.title] = frozen_mapping(pipe_origins)
            if pipe is not None:
                pipes[name] = pipe
                expansion = expansions.get(name)
                if expansion is not None and not problems.errors:
                    for mt_name, mt, mt_origins in _pipe_machinetypes(
                            section, expansion, merged, host, s.values, settings_families, problems, vac):
                        if mt_name in machinetypes:
                            problems.warn(f"{pipelib.label(name, expansion.url)}: machinetype {mt_name} is "
                                          "already defined: entry skipped", _Where(None))
                            continue
                        machinetypes[mt_name] = mt
                        origins[f"{table.MACHINETYPE} {mt_name}"] = frozen_mapping(
                            _inherit_origins(mt_origins, s.origins, settings_families))
    problems.sort([st.path for st in stamps] or [fallback.source or ""])
    if problems.errors:
        return None
    families: Dict[str, Any] = {k: frozen_mapping(v) for k, v in settings_families.items()}
    settings = Settings(**s.values, **families)
    return Config(
        settings=settings,
        machinetypes=frozen_mapping(machinetypes),
        vacuum_pipes=frozen_mapping(pipes),
        warnings=tuple(str(w) for w in problems.warnings),
        sources=stamps,
        origins=frozen_mapping(origins),
    )


def _inherit_origins(own: Dict[str, str], settings: Dict[str, str],
                     settings_families: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    merged = dict(own)
    for family in table.families_of(table.MACHINETYPE):
        for suffix in settings_families.get(family.attribute, {}):
            merged.setdefault(family.prefix + suffix, settings.get(family.prefix + suffix, "settings"))
    return merged


def _make_machinetype(name: str, m: _Evaluated, settings_families: Dict[str, Dict[str, Any]]) -> Any:
    values = dict(m.values)
    base = values.get(table.FILES_BASE)
    for row in table.options_of(table.MACHINETYPE):
        if row.relative_to_files:
            values[row.name] = _resolve_files(base, values.get(row.name))
    families: Dict[str, Any] = {}
    for family in table.families_of(table.MACHINETYPE):
        combined = dict(settings_families.get(family.attribute, {}))
        combined.update(m.families.get(family.attribute, {}))
        if family.relative_to_files:
            combined = {k: _resolve_files(base, v) for k, v in combined.items()}
        families[family.attribute] = frozen_mapping(combined)
    # a Vac machinetype may load without an image (share 0, or with a warning): never started
    startable = table.machinetype_startable(values) and bool(values.get("root_image") or values.get("kernel_image"))
    return MachineType(name=name, startable=startable, **values, **families)


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
    """Sidecar of a pipe cache: URL, fetch times, validators (written by vacfactory.pipefetch)."""
    return os.path.join(state_dir, PIPE_CACHE_DIR, prefix + PIPE_META_SUFFIX)


def _pipe_share(section: _Section) -> float:
    row = table.accepted_options(table.VACUUM_PIPE)["target_share"]
    entry = section.entries.get("target_share")
    try:
        return float(row.type.parse(entry.raw)) if entry is not None else float(row.default)
    except ValueError:
        return 0.0  # reported when the section is evaluated


def _read_pipe_caches(merged: Dict[_Key, _Section], pipe_dir: Optional[str],
                      problems: _Problems) -> Dict[str, pipelib.PipeExpansion]:
    """Expand every pipe from its cache file. The network is never touched here: the daemon
    refreshes the caches (vacfactory.pipefetch), so `config check` and the daemon agree."""
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
                          "it defines no machinetypes until the daemon fetches it", _Where(None))
            continue
        except OSError as error:
            problems.warn(f"{where}: cannot read the cache {path}: {error.strerror or error}", _Where(None))
            continue
        try:
            expansion = pipelib.expand_bytes(prefix, url, _pipe_share(section), data)
        except pipelib.PipeError as error:
            problems.warn(f"{where}: the cache {path} is unusable: {error}", _Where(None))
            continue
        cached_url = _cached_url(os.path.join(pipe_dir, prefix + PIPE_META_SUFFIX))
        if cached_url is not None and cached_url != url:
            problems.warn(f"{where}: the cache was fetched from {cached_url}; using it until the new URL "
                          "is fetched", _Where(None))
        for message in expansion.problems:
            problems.warn(message, _Where(None))
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


def _check_local_entries(section: _Section, problems: _Problems) -> None:
    """A site section that refines a pipe machinetype: its own values must parse (errors are the
    site's, and fail the configuration like any other local mistake)."""
    accepted = table.accepted_options(table.MACHINETYPE)
    for name, entry in section.entries.items():
        try:
            row = accepted.get(name)
            if row is not None:
                _parse_entry(row, entry, section.title, problems)
            else:
                for family in table.families_of(table.MACHINETYPE):
                    if name.startswith(family.prefix):
                        family.type.parse(entry.raw)
                        break
        except ValueError as error:
            problems.error(str(error), entry.where, section.title, entry.given)


def _evaluate_pipe_refinement(section: _Section, host: HostFacts, settings: Mapping[str, Any],
                               problems: _Problems, vac: bool = False) -> Optional[_Evaluated]:
    """A site section named like a pipe's machinetype (``PREFIX-SUFFIX``) that the pipe does
    not define now (not fetched yet, or its entry is broken). Its own values must parse; if it
    is not a complete machinetype on its own it is skipped with a warning, so a pipe outage or
    a VO's mistake never makes the site's configuration invalid."""
    before = len(problems.errors)
    _check_local_entries(section, problems)
    if len(problems.errors) > before:
        return None
    scratch = _Problems()
    evaluated = _evaluate(section, host, settings, scratch, vac)
    problems.warnings.extend(scratch.warnings)
    if scratch.errors:
        for error in scratch.errors:
            problems.warn(f"{error}: no vacuum pipe defines machinetype {section.name} now, and this section alone "
                          "is not a complete machinetype: skipped", _Where(None))
        return None
    return evaluated


def _pipe_machinetypes(pipe_section: _Section, expansion: pipelib.PipeExpansion, merged: Dict[_Key, _Section],
                       host: HostFacts, settings: Mapping[str, Any], settings_families: Dict[str, Dict[str, Any]],
                       problems: _Problems, vac: bool = False) -> List[Tuple[str, Any, Dict[str, str]]]:
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
        at = _Where(f"{where} machinetypes[{pipe_mt.index}]")
        entries: Dict[str, _Entry] = {k: _Entry(k, v, at) for k, v in pipe_mt.options.items()}
        entries[table.FILES_BASE] = _Entry(table.FILES_BASE, os.path.join(
            settings_state_dir, "machinetypes", expansion.prefix), _Where(where))
        entries.update({k: v for k, v in pipe_section.entries.items() if k not in own})
        local = merged.get((table.MACHINETYPE, pipe_mt.name))
        if local is not None:
            entries.update(local.entries)
        section = _Section(table.MACHINETYPE, pipe_mt.name, local.where if local else at, entries)
        scratch = _Problems()
        evaluated = _evaluate(section, host, settings, scratch, vac)
        for warning in scratch.warnings:
            problems.warnings.append(warning)
        if scratch.errors:
            for error in scratch.errors:
                if error.source and error.source.startswith(where):
                    text = f"{error.source}.{error.option}: {error.message}" if error.option else str(error)
                else:
                    text = str(error)
                problems.warn(f"{text}: entry {pipe_mt.name} skipped", _Where(None))
            continue
        result.append((pipe_mt.name, _make_machinetype(pipe_mt.name, evaluated, settings_families),
                       evaluated.origins))
    return result


def _make_pipe(section: _Section, host: HostFacts, settings: Mapping[str, Any],
               problems: _Problems, vac: bool = False) -> Tuple[Optional[Any], Dict[str, str]]:
    """Validate a [vacuum_pipe] section; machinetype options are kept as raw text."""
    own = table.options_of(table.VACUUM_PIPE)
    own_names = {row.name for row in own}
    accepted = table.accepted_options(table.VACUUM_PIPE)
    own_section = _Section(section.kind, section.name, section.where,
                           {k: v for k, v in section.entries.items() if k in own_names})
    evaluated = _evaluate(own_section, host, settings, problems, vac)
    raw: Dict[str, str] = {}
    origins = dict(evaluated.origins)
    for name, entry in section.entries.items():
        if name in own_names:
            continue
        origins[name] = str(entry.where)
        row = accepted.get(name)
        try:
            if row is not None:
                _parse_entry(row, entry, section.title, problems)
            else:
                family = next(f for f in table.families_of(table.VACUUM_PIPE) if name.startswith(f.prefix))
                family.type.parse(entry.raw)
        except ValueError as error:
            problems.error(str(error), entry.where, section.title, entry.given)
            continue
        raw[name] = entry.raw
    if problems.errors:
        return None, origins
    assert section.name is not None  # a [vacuum_pipe] header always names its prefix
    return VacuumPipe(prefix=section.name, options=frozen_mapping(raw), **evaluated.values), origins


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
    problems = _Problems()
    merged: Dict[_Key, _Section] = {}
    base = sources.base_files()
    stamps = [stamp(p) for p in base]
    if not base:
        looked = [p for p in (sources.dropin_dir and os.path.join(sources.dropin_dir, "*.conf"),
                              sources.main_file) if p]
        problems.error("no configuration file found (looked for " + ", ".join(looked) + ")",
                       _Where(sources.main_file))
    unreadable = not base
    for path in base:
        sections = _read_source(path, False, problems, sources.vac)
        unreadable = unreadable or sections is None
        _merge(merged, sections or [])
    _apply_vac_defaults(merged, problems)
    override_path = _find_override(sources, merged)
    if override_path is not None:
        stamps.append(stamp(override_path))
        if stamps[-1].exists:
            sections = _read_source(override_path, True, problems)
            unreadable = unreadable or sections is None
            _merge(merged, sections or [])
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
        fallback = _Where(sources.main_file or (base[0] if base else None))
        config = _build(merged, host, problems, fallback, tuple(stamps), pipe_dir, sources.vac)
    errors = ConfigErrors(problems.errors) if problems.errors else None
    warnings = tuple(str(w) for w in problems.warnings)
    return _Attempt(config, errors, warnings, watched, override_path, pipe_paths)


def _state_dir_of(merged: Dict[_Key, _Section]) -> Optional[str]:
    """state_dir as the files read so far give it (None if it is invalid)."""
    row = table.accepted_options(table.SETTINGS)[table.STATE_DIR]
    settings = merged.get((table.SETTINGS, None))
    entry = settings.entries.get(table.STATE_DIR) if settings else None
    if entry is None:
        return row.default
    try:
        return _parse_entry(row, entry, "settings", _Problems())
    except ValueError:
        return None  # reported when [settings] is evaluated


def _find_pipe_dir(merged: Dict[_Key, _Section], vac: bool = False) -> Optional[str]:
    """pipes_cache_dir as the files give it, else its default (None if it is invalid)."""
    settings = merged.get((table.SETTINGS, None))
    entry = settings.entries.get(PIPES_CACHE_OPTION) if settings else None
    if entry is not None:
        try:
            return _parse_entry(table.accepted_options(table.SETTINGS)[PIPES_CACHE_OPTION], entry, "settings",
                                _Problems())
        except ValueError:
            return None  # reported when [settings] is evaluated
    if vac:
        return os.path.join(table.VAC_STATE_DIR, PIPE_CACHE_DIR)
    state_dir = _state_dir_of(merged)
    return os.path.join(state_dir, PIPE_CACHE_DIR) if state_dir else None


def _find_override(sources: ConfigSources, merged: Dict[_Key, _Section]) -> Optional[str]:
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
    problems = _Problems()
    merged: Dict[_Key, _Section] = {}
    _merge(merged, _parse_vac_text(text, source, problems) if vac else _parse_text(text, source, False, problems))
    _apply_vac_defaults(merged, problems)
    config = _build(merged, host_facts, problems, _Where(source), (), None, vac)
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
