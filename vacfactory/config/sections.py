"""Reading configuration files into located sections, and merging them (the parse part).

Two readings share the option table. vacfactory's own files go through the standard
:mod:`configparser` (so the syntax is exactly Python's INI dialect) and are read strictly. A Vac
site's files are read the way Vac 03.01's ``readConf()`` reads them: Python 2
RawConfigParser's syntax (``config/vacsyntax.py``), what Vac ignores ignored with one warning.
For the strict reading, configparser does not report where an option was written, so a small
scan of the same text, following configparser's own line rules, records the line of every
section header and option. Every problem is collected (:class:`Problems`), each one naming
file, line, section and option; nothing here evaluates a value beyond its option's name.
"""

from __future__ import annotations

import configparser
import difflib
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from vacfactory.config import options as table
from vacfactory.config import vacsyntax
from vacfactory.errors import ConfigError

DEFAULT_SECTION = "\n"  # configparser's DEFAULT section, renamed to something no header can be
#: the kind of a Vac file's [DEFAULT] section while files are merged (no header maps to it)
_VAC_DEFAULTS = "\nDEFAULT"

# --------------------------------------------------------------------------- problems


class Problems:
    """Collects errors and warnings; every message is a located ConfigError."""

    def __init__(self) -> None:
        self.errors: List[ConfigError] = []
        self.warnings: List[ConfigError] = []

    def error(self, message: str, where: "Where", section: Optional[str] = None,
              option: Optional[str] = None) -> None:
        self.errors.append(ConfigError(message, source=where.source, line=where.line,
                                       section=section, option=option))

    def warn(self, message: str, where: "Where", section: Optional[str] = None,
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
class Where:
    source: Optional[str]
    line: Optional[int] = None

    def __str__(self) -> str:
        if not self.source:
            return "default"
        return f"{self.source}:{self.line}" if self.line else self.source


@dataclass(frozen=True)
class Entry:
    """One option as written: the name used, its raw text, and where."""

    given: str
    raw: str
    where: Where
    #: written in a Vac file: read as Vac reads it
    vac: bool = False


@dataclass
class Section:
    kind: str
    name: Optional[str]
    where: Where
    entries: Dict[str, Entry] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.kind if self.name is None else f"{self.kind} {self.name}"


Key = Tuple[str, Optional[str]]


# --------------------------------------------------------------------------- reading one file


def scan_lines(text: str) -> Tuple[Dict[str, List[int]], Dict[Tuple[str, str], List[int]]]:
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


def read_source(path: str, override: bool, problems: Problems, vac: bool = False) -> Optional[List[Section]]:
    """The sections of one file; None if the file cannot be read at all."""
    where = Where(path)
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
        return parse_vac_text(text, path, problems)
    return parse_text(text, path, override, problems)


def parse_text(text: str, source: str, override: bool, problems: Problems) -> List[Section]:
    """Parse one file's text into located sections, reporting every problem in it."""
    parser = configparser.RawConfigParser(
        strict=False, interpolation=None, empty_lines_in_values=False,
        default_section=DEFAULT_SECTION, comment_prefixes=("#", ";"), inline_comment_prefixes=None,
    )
    lines = text.split("\n")
    try:
        parser.read_string(text, source=source)
    except configparser.MissingSectionHeaderError as error:
        problems.error("this line comes before any [section] header: "
                       f"{_show_line(lines, error.lineno)}", Where(source, error.lineno))
        return []
    except configparser.ParsingError as error:
        for lineno, _ in error.errors:
            problems.error(f"cannot parse this line (expected 'name = value' or '[section]'): "
                           f"{_show_line(lines, lineno)}", Where(source, lineno))
    except configparser.Error as error:  # not expected with strict=False; report, do not crash
        problems.error(f"cannot parse: {error}", Where(source))
        return []
    header_lines, option_lines = scan_lines(text)
    sections: List[Section] = []
    for header in parser.sections():
        hwhere = Where(source, (header_lines.get(header) or [None])[0])
        key = _classify_header(header, hwhere, problems)
        if key is None:
            continue
        section = Section(key[0], key[1], hwhere)
        for optname, raw in parser.items(header, raw=True):
            if not optname:
                continue  # "= value": already reported as a parse error
            linenos = option_lines.get((header, optname)) or [None]
            owhere = Where(source, linenos[-1])
            if len(linenos) > 1:
                problems.error(f"given twice in this section (first at line {linenos[0]})",
                               owhere, section.title, optname)
            _add_entry(section, optname, raw, owhere, override, problems)
        sections.append(section)
    return sections


def parse_vac_text(text: str, source: str, problems: Problems) -> List[Section]:
    """Parse one Vac file the way Vac 03.01 does (see config/vacsyntax.py and the module docstring).

    Lines Python 2's parser cannot read are errors (they stop Vac's readConf too); sections and
    options Vac does not read are ignored with one warning each.
    """
    raw_sections, syntax_problems = vacsyntax.parse(text)
    for problem in syntax_problems:
        problems.error(problem.message, Where(source, problem.line))
    sections: List[Section] = []
    for raw in raw_sections:
        hwhere = Where(source, raw.line)
        if raw.header == vacsyntax.DEFAULT_SECTION:
            section = Section(_VAC_DEFAULTS, None, hwhere)
            for option in raw.options:
                where = Where(source, option.line)
                previous = section.entries.get(option.name)
                if previous is not None:
                    problems.warn(f"given twice in this section (first at line {previous.where.line}): the last "
                                  "one wins, as in Vac", where, vacsyntax.DEFAULT_SECTION, option.name)
                section.entries[option.name] = Entry(option.name, option.value, where, True)
            sections.append(section)
            continue
        key = _classify_vac_header(raw.header, hwhere, problems)
        if key is None:
            continue
        section = Section(key[0], key[1], hwhere)
        for option in raw.options:
            _add_entry(section, option.name, option.value, Where(source, option.line), False, problems, vac=True)
        sections.append(section)
    return sections


_VAC_KINDS = ["settings", "machinetype", "vacuum_pipe"]


def _classify_vac_header(header: str, where: Where, problems: Problems) -> Optional[Key]:
    """Vac's reading of a header: exactly [settings]; [machinetype NAME], [vmtype NAME] and
    [vacuum_pipe PREFIX] with the header lower-cased; every other section ignored with a warning."""
    if header == "settings":
        return (table.SETTINGS, None)
    words = header.lower().split(None, 1)
    kind_word = words[0] if words else ""
    if kind_word in table.SECTION_KINDS and kind_word != "settings" and len(words) == 2:
        return _named_section(kind_word, words[1].strip(), where, header, problems,
                              "letters, digits and '-'; Vac lower-cases it")
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


def _classify_header(header: str, where: Where, problems: Problems) -> Optional[Key]:
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
    return _named_section(kind_word, name, where, header, problems, "lower-case letters, digits and '-'")


def _named_section(kind_word: str, name: str, where: Where, header: str, problems: Problems,
                   name_rule: str) -> Key:
    """(kind, name) of a named section: a legacy kind word is warned about, a name that does
    not match the pattern (``name_rule`` says it in words) is an error."""
    kind = table.SECTION_KINDS[kind_word]
    if kind_word in table.LEGACY_SECTION_KINDS:
        problems.warn(f"deprecated section kind: use [{table.LEGACY_SECTION_KINDS[kind_word]} {name}]",
                      where, header)
    if not re.fullmatch(table.SECTION_NAME_PATTERN, name):
        what = "machinetype name" if kind == table.MACHINETYPE else "vacuum pipe prefix"
        problems.error(f"{what} {name!r} must match {table.SECTION_NAME_PATTERN} ({name_rule})", where, header)
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


def _add_entry(section: Section, optname: str, raw: str, where: Where, override: bool,
               problems: Problems, vac: bool = False) -> None:
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
    section.entries[canonical] = Entry(optname, raw, where, vac)


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


def apply_vac_defaults(merged: Dict[Key, Section], problems: Problems) -> None:
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


def merge_sections(merged: Dict[Key, Section], sections: List[Section]) -> None:
    """Later files win per option; same-named sections merge (Vac's RawConfigParser.read)."""
    for section in sections:
        key = (section.kind, section.name)
        target = merged.get(key)
        if target is None:
            merged[key] = Section(section.kind, section.name, section.where, dict(section.entries))
        else:
            target.entries.update(section.entries)

