"""Split a Vac file into sections and options exactly as Vac 03.01 does.

Vac 03.01 reads its files with Python 2's ``ConfigParser.RawConfigParser``; what a site's file
may contain follows from that parser's line rules, which differ from Python 3's configparser
(the strict reader of vacfactory's own files):

- a line whose first character is ``#`` or ``;`` is a comment, and so is a line whose first
  word is ``rem`` (any case) with no indentation; blank lines are skipped everywhere, even
  inside a value;
- an indented line continues the value of the last option (stripped; an indented ``# x`` is
  part of the value, not a comment);
- ``name = value`` or ``name: value``; the name is lower-cased; on the first line of a value
  the text from the first ``;`` on is dropped when whitespace comes before that ``;`` (``#``
  inline is kept); a value of exactly ``""`` is empty;
- ``[header]`` is matched at the start of the line and anything after ``]`` is ignored;
- the same option twice: the last one wins (the caller decides, it sees both).

Only the splitting happens here (no I/O, no option knowledge); the loader maps sections and
options onto the option table. Lines the parser cannot read are reported with their number:
Vac's parser raises on them too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

#: Python 2.7 RawConfigParser.SECTCRE and OPTCRE (allow_no_value=False), unchanged.
_SECTCRE = re.compile(r"\[(?P<header>[^]]+)\]")
_OPTCRE = re.compile(r"(?P<option>[^:=\s][^:=]*)\s*(?P<vi>[:=])\s*(?P<value>.*)$")

#: RawConfigParser's defaults section: its options appear in every section.
DEFAULT_SECTION = "DEFAULT"


@dataclass
class RawOption:
    """One ``name = value`` as Vac's parser reads it."""

    #: lower-cased, as RawConfigParser.optionxform leaves it
    name: str
    value: str
    line: int


@dataclass
class RawSection:
    """One ``[header]`` occurrence and the options under it, in file order."""

    header: str
    line: int
    options: List[RawOption] = field(default_factory=list)


@dataclass(frozen=True)
class SyntaxProblem:
    line: int
    message: str


def _first_line_value(vi: str, value: str) -> str:
    """Python 2: ';' starts a comment only if whitespace precedes the *first* ';'."""
    if vi in ("=", ":") and ";" in value:
        pos = value.find(";")
        if pos != -1 and value[pos - 1].isspace():  # pos 0 looks at the last character, as in 2.7
            value = value[:pos]
    value = value.strip()
    return "" if value == '""' else value


def parse(text: str) -> Tuple[List[RawSection], List[SyntaxProblem]]:
    """The sections of one file in order, and the lines Vac's parser could not read.

    A file whose first non-comment line is not a header gives one problem and no sections
    (Python 2 raises MissingSectionHeaderError there and reads nothing more).
    """
    sections: List[RawSection] = []
    problems: List[SyntaxProblem] = []
    current: Optional[RawSection] = None
    option: Optional[RawOption] = None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip() == "" or line[0] in "#;":
            continue
        if line[0] in "rR" and line.split(None, 1)[0].lower() == "rem":
            continue
        if line[0].isspace() and current is not None and option is not None:
            more = line.strip()
            if more:
                option.value += "\n" + more
            continue
        header = _SECTCRE.match(line)
        if header:
            current = RawSection(header.group("header"), lineno)
            sections.append(current)
            option = None
            continue
        if current is None:
            problems.append(SyntaxProblem(lineno, f"this line comes before any [section] header: {_show(line)}"))
            return [], problems
        mo = _OPTCRE.match(line)
        if not mo:
            problems.append(SyntaxProblem(
                lineno, f"cannot parse this line (expected 'name = value', 'name: value' or '[section]'): "
                        f"{_show(line)}"))
            continue
        name = mo.group("option").rstrip().lower()
        option = RawOption(name, _first_line_value(mo.group("vi"), mo.group("value")), lineno)
        current.options.append(option)
    return sections, problems


def _show(line: str) -> str:
    text = line.strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")
