"""Value types of configuration options: parse one option's text, describe it for the docs.

Each type turns the raw text of one option (already stripped by configparser; continuation
lines joined with ``\\n``) into a Python value, or raises :class:`ValueError` whose message
says what is wrong in words an admin can act on. The loader adds the file, line, section and
option. Types also describe themselves (``name``, ``constraints()``) so the generated
documentation cannot disagree with what the parser accepts.

Numbers are matched with explicit regular expressions rather than bare ``int()``/``float()``:
Python would otherwise accept ``1_000``, non-ASCII digits, ``nan`` and ``inf``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from vacfactory.core.values import FQDN_PATTERN, HOSTNAME_PATTERN  # noqa: F401 (re-exported)

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_MULTILINE_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # tab and newline allowed

#: Vac compared booleans against single spellings; we accept all of these everywhere.
TRUE_WORDS = ("yes", "true", "on", "1")
FALSE_WORDS = ("no", "false", "off", "0")


def quote(text: str) -> str:
    """Show a value in a message; long values are shortened so one error stays one line."""
    shown = text if len(text) <= 60 else text[:57] + "..."
    return repr(shown)


def _check_text(text: str, multiline: bool) -> None:
    if not multiline and "\n" in text:
        raise ValueError("must be a single line")
    pattern = _CONTROL_MULTILINE_RE if multiline else _CONTROL_RE
    if pattern.search(text):
        raise ValueError("must not contain control characters")


@dataclass(frozen=True)
class ValueType:
    """Base of all value types."""

    #: short name for the docs ("integer", "boolean", ...)
    name: str = "string"

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def constraints(self) -> str:
        """Human description of the accepted values beyond the type name ('' if none)."""
        return ""

    def format(self, value: Any) -> str:
        """Render a parsed value the way an admin would write it in the file."""
        return str(value)

    @property
    def python_type(self) -> Any:
        return str


@dataclass(frozen=True)
class Text(ValueType):
    """Free text, optionally restricted by a regular expression."""

    name: str = "string"
    pattern: Optional[str] = None
    pattern_doc: str = ""
    multiline: bool = False
    allow_empty: bool = False
    max_length: Optional[int] = None
    lower: bool = False
    #: a rule of core/values.py the value must pass too (its message says what is wrong)
    check: Optional[Callable[[str], Any]] = None

    def parse(self, text: str) -> str:
        _check_text(text, self.multiline)
        if not text and not self.allow_empty:
            raise ValueError("must not be empty")
        if self.max_length is not None and len(text) > self.max_length:
            raise ValueError(f"{quote(text)} is longer than {self.max_length} characters")
        value = text.lower() if self.lower else text
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ValueError(f"{quote(text)} {self.pattern_doc or 'must match ' + self.pattern}")
        if self.check is not None:
            self.check(value)
        return value

    def constraints(self) -> str:
        parts = []
        if self.pattern_doc:
            parts.append(self.pattern_doc)
        elif self.pattern:
            parts.append(f"must match `{self.pattern}`")
        if self.max_length is not None and "characters" not in self.pattern_doc:
            parts.append(f"at most {self.max_length} characters")
        if self.multiline:
            parts.append("may span several lines (indent continuation lines)")
        return "; ".join(parts)


@dataclass(frozen=True)
class Integer(ValueType):
    name: str = "integer"
    min: Optional[int] = None
    max: Optional[int] = None

    def parse(self, text: str) -> int:
        _check_text(text, False)
        if not _INT_RE.match(text):
            raise ValueError(f"{quote(text)} is not an integer")
        if len(text.lstrip("+-")) > 30:
            raise ValueError(f"{quote(text)} is too large")
        value = int(text)
        _check_range(value, self.min, self.max, False)
        return value

    def constraints(self) -> str:
        return _describe_range(self.min, self.max, False)

    @property
    def python_type(self) -> Any:
        return int


@dataclass(frozen=True)
class Number(ValueType):
    """A finite decimal number (int or float syntax); the value is a float."""

    name: str = "number"
    min: Optional[float] = None
    max: Optional[float] = None
    min_exclusive: bool = False

    def parse(self, text: str) -> float:
        _check_text(text, False)
        if not _FLOAT_RE.match(text):
            raise ValueError(f"{quote(text)} is not a number")
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{quote(text)} is too large")
        _check_range(value, self.min, self.max, self.min_exclusive)
        return value

    def constraints(self) -> str:
        return _describe_range(self.min, self.max, self.min_exclusive)

    def format(self, value: Any) -> str:
        return _fmt_number(value)

    @property
    def python_type(self) -> Any:
        return float


def _fmt_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _check_range(value: float, lo: Optional[float], hi: Optional[float], lo_exclusive: bool) -> None:
    if lo is not None:
        if lo_exclusive and value <= lo:
            raise ValueError(f"must be > {_fmt_number(lo)} (got {_fmt_number(value)})")
        if not lo_exclusive and value < lo:
            raise ValueError(f"must be >= {_fmt_number(lo)} (got {_fmt_number(value)})")
    if hi is not None and value > hi:
        raise ValueError(f"must be <= {_fmt_number(hi)} (got {_fmt_number(value)})")


def _describe_range(lo: Optional[float], hi: Optional[float], lo_exclusive: bool) -> str:
    if lo is not None and hi is not None and not lo_exclusive:
        return f"{_fmt_number(lo)} to {_fmt_number(hi)}"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_exclusive else '>='} {_fmt_number(lo)}")
    if hi is not None:
        parts.append(f"<= {_fmt_number(hi)}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Boolean(ValueType):
    """yes/no, true/false, on/off, 1/0 in any case (Vac's options each took only some)."""

    name: str = "boolean"

    def parse(self, text: str) -> bool:
        _check_text(text, False)
        word = text.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{quote(text)} is not a boolean (use yes/no, true/false, on/off or 1/0)")

    def constraints(self) -> str:
        return "yes/no, true/false, on/off, 1/0 (any case)"

    def format(self, value: Any) -> str:
        return "yes" if value else "no"

    @property
    def python_type(self) -> Any:
        return bool


@dataclass(frozen=True)
class Choice(ValueType):
    """One of a fixed set of words, matched case-insensitively, stored in canonical spelling."""

    name: str = "choice"
    choices: Tuple[str, ...] = ()
    #: optional one-line explanation of each choice, for the docs
    choice_docs: Tuple[Tuple[str, str], ...] = ()

    def parse(self, text: str) -> str:
        _check_text(text, False)
        for choice in self.choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"{quote(text)} is not one of {', '.join(self.choices)}")

    def constraints(self) -> str:
        return "one of " + ", ".join(f"`{c}`" for c in self.choices)


@dataclass(frozen=True)
class Path(ValueType):
    """A file system path; ``absolute`` requires a leading '/'. '..' components are refused.

    ``relative_to_config``: a relative path is allowed (with '..') and the loader resolves
    it against the directory of the file that set it, like an include in nginx or sudoers;
    this lets a configuration bundled with a checkout (conf/demo.conf) name its own folders.
    """

    name: str = "path"
    absolute: bool = True
    relative_to_config: bool = False

    def parse(self, text: str) -> str:
        _check_text(text, False)
        if not text:
            raise ValueError("must not be empty")
        if self.relative_to_config:
            return text
        if self.absolute and not text.startswith("/"):
            raise ValueError(f"{quote(text)} must be an absolute path")
        if ".." in text.split("/"):
            raise ValueError(f"{quote(text)} must not contain '..'")
        return text

    def constraints(self) -> str:
        if self.relative_to_config:
            return "absolute path, or relative to the directory of the file that sets it"
        if self.absolute:
            return "absolute path"
        return "absolute, or relative to the machinetype's files directory; no `..`"


@dataclass(frozen=True)
class Location(ValueType):
    """A path (absolute or relative to the machinetype's files) or a URL with one of ``schemes``."""

    name: str = "path or URL"
    schemes: Tuple[str, ...] = ("http", "https")
    allow_paths: bool = True

    def parse(self, text: str) -> str:
        _check_text(text, False)
        if not text:
            raise ValueError("must not be empty")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
            scheme = text.split("://", 1)[0].lower()
            if scheme not in self.schemes:
                raise ValueError(f"{quote(text)}: URL scheme must be one of {', '.join(self.schemes)}")
            if " " in text or len(text) == len(scheme) + 3:
                raise ValueError(f"{quote(text)} is not a valid URL")
            return text
        if not self.allow_paths:
            raise ValueError(f"{quote(text)} must be a URL ({', '.join(s + '://' for s in self.schemes)})")
        if ".." in text.split("/"):
            raise ValueError(f"{quote(text)} must not contain '..'")
        return text

    def constraints(self) -> str:
        schemes = ", ".join(f"`{s}://`" for s in self.schemes)
        if not self.allow_paths:
            return f"URL: {schemes}"
        return f"absolute path, path relative to the machinetype's files directory, or URL: {schemes}"


def is_url(value: str) -> bool:
    """True if ``value`` (as accepted by :class:`Location`) is a URL rather than a path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


@dataclass(frozen=True)
class Words(ValueType):
    """A whitespace-separated list; each item is checked by ``item``. Stored as a tuple."""

    name: str = "list"
    item: ValueType = field(default_factory=Text)
    lower: bool = False

    def parse(self, text: str) -> Tuple[Any, ...]:
        # any whitespace (spaces, tabs, continuation lines) separates items; items check the rest
        words = (text.lower() if self.lower else text).split()
        return tuple(self.item.parse(word) for word in words)

    def constraints(self) -> str:
        inner = self.item.constraints()
        return "whitespace-separated" + (f"; each item: {inner}" if inner else "")

    def format(self, value: Any) -> str:
        return " ".join(self.item.format(v) for v in value)

    @property
    def python_type(self) -> Any:
        return Tuple[str, ...]


@dataclass(frozen=True)
class RegexText(ValueType):
    """A Python regular expression (validated by compiling it)."""

    name: str = "regex"

    def parse(self, text: str) -> str:
        _check_text(text, False)
        if not text:
            raise ValueError("must not be empty")
        try:
            re.compile(text)
        except (re.error, RecursionError, OverflowError) as error:
            raise ValueError(f"{quote(text)} is not a valid regular expression ({error})") from None
        return text

    def constraints(self) -> str:
        return "a Python regular expression"




