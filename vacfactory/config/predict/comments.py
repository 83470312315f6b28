"""`` #`` inside a value: configparser and Vac's parser keep it, admins expect a comment."""

from __future__ import annotations

import re
from typing import Iterable, List, Optional

from .findings import HEADER_LINE, WARNING, Finding, lines

#: an option line (not indented) as configparser splits it: name, then = or :, then the value
_OPTION_LINE = re.compile(r"(?P<name>[^\s=:\[][^=:]*?)\s*[=:]\s*(?P<value>.*)$")


#: options whose values are text pasted into user_data (often shell), where '#' is meant
_FREE_TEXT = ("user_data_option_",)


def inline_comments(files: Iterable[str]) -> List[Finding]:
    """Values that contain `` #``: configparser (and Vac's parser) keep it as part of the value.

    Runs on the raw files, so it also explains a value that failed to parse because of it.
    user_data_option_* values are left alone: they are text for user_data, often shell.
    """
    findings: List[Finding] = []
    for path in files:
        section: Optional[str] = None
        option: Optional[str] = None
        for lineno, line in lines(path):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", ";")):
                continue
            header = HEADER_LINE.match(line)
            if header and not line[:1].isspace():
                section, option = header.group("header").strip(), None
                continue
            if line[:1].isspace() and option is not None:
                value = stripped  # a continuation line of the option above
            else:
                match = _OPTION_LINE.match(line)
                if match is None:
                    continue
                option, value = match.group("name").strip().lower(), match.group("value")
            if re.search(r"\s#", value) and not option.startswith(_FREE_TEXT):
                findings.append(Finding(
                    WARNING,
                    f"the value {value.strip()!r} contains ' #': that is part of the value, not a "
                    "comment (Vac's parser keeps it too: '#' starts a comment only at the start of "
                    "a line); put the comment on a line of its own",
                    path, lineno, section, option))
    return findings
