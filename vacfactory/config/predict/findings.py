"""What `config check` predicts, as located findings, and where in the files an option was
written (``Config.origins``, or the section header for an option left at its default)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from vacfactory.config.model import Config
from vacfactory.config import options as table

ERROR = "error"
WARNING = "warning"
NOTE = "note"
SEVERITIES = (ERROR, WARNING, NOTE)

HEADER_LINE = re.compile(r"\s*\[(?P<header>[^\]]+)\]")


@dataclass(frozen=True)
class Finding:
    """One predicted problem, located like a configuration error."""

    severity: str
    message: str
    source: Optional[str] = None
    line: Optional[int] = None
    section: Optional[str] = None
    option: Optional[str] = None

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "") + ": "
        what = f"[{self.section}] " if self.section else ""
        what += f"{self.option}: " if self.option else ""
        return f"{where}{what}{self.message}"

    def as_dict(self) -> Dict[str, Any]:
        return {"severity": self.severity, "message": self.message, "source": self.source,
                "line": self.line, "section": self.section, "option": self.option, "text": str(self)}


# --------------------------------------------------------------------------- where an option is


class Locator:
    """File and line of an option of the effective configuration (``Config.origins``).

    An option left at its default has no line; such findings name the section's header
    instead (found by scanning the files), or for a pipe's machinetype the pipe's section.
    """

    def __init__(self, config: Config, files: Sequence[str]) -> None:
        self.config = config
        self.files = list(files)
        self._headers: Optional[Dict[str, Tuple[str, int]]] = None

    def finding(self, severity: str, message: str, section: str, option: Optional[str] = None) -> Finding:
        source, line = self.where(section, option)
        return Finding(severity, message, source, line, section, option)

    def where(self, section: str, option: Optional[str]) -> Tuple[Optional[str], Optional[int]]:
        origin = self.config.origins.get(section, {}).get(option, "default") if option else "default"
        if origin == "settings" and option:
            origin = self.config.origins.get(table.SETTINGS, {}).get(option, "default")
        source, _, line = origin.rpartition(":")
        if source and line.isdigit():
            return source, int(line)
        if origin not in ("default", "settings"):
            return origin, None
        return self.header(section)

    def header(self, section: str) -> Tuple[Optional[str], Optional[int]]:
        if self._headers is None:
            self._headers = _scan_headers(self.files)
        found = self._headers.get(_normal_title(section))
        if found is None and section.startswith(table.MACHINETYPE + " "):
            name = section.split(" ", 1)[1]
            for prefix in getattr(self.config, "vacuum_pipes", {}):
                if name.startswith(prefix + "-"):
                    found = self._headers.get(f"{table.VACUUM_PIPE} {prefix}")
        if found is None:
            return (self.files[-1] if self.files else None), None
        return found


def _normal_title(title: str) -> str:
    words = title.lower().split()
    if words and words[0] == "vmtype":
        words[0] = table.MACHINETYPE
    return " ".join(words)


def _scan_headers(files: Iterable[str]) -> Dict[str, Tuple[str, int]]:
    """The first place each section header appears (later files add, never replace)."""
    found: Dict[str, Tuple[str, int]] = {}
    for path in files:
        for lineno, line in lines(path):
            match = HEADER_LINE.match(line)
            if match:
                found.setdefault(_normal_title(match.group("header")), (path, lineno))
    return found


def lines(path: str) -> List[Tuple[int, str]]:
    """(number, text) of every line of ``path``; [] when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return list(enumerate(f.read().split("\n"), start=1))
    except OSError:
        return []


def ordered(findings: Iterable[Finding], files: Sequence[str]) -> List[Finding]:
    """Errors, warnings, notes; each group in file and line order, as an admin reads them."""
    order = {path: i for i, path in enumerate(files)}
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (rank[f.severity], order.get(f.source or "", len(order)),
                                           f.line or 0))


def count(findings: Iterable[Finding], severity: str) -> int:
    return sum(1 for f in findings if f.severity == severity)


def as_mapping(findings: Iterable[Finding]) -> List[Mapping[str, Any]]:
    return [f.as_dict() for f in findings]
