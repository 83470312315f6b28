"""The project's exception hierarchy.

Every error says where the problem came from (a config file and line, a machine, a peer
address), so that one log line or one CLI message is enough to act on it.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence


class VacFactoryError(Exception):
    """Base class of every error vacfactory raises on purpose."""


class ConfigError(VacFactoryError):
    """One problem in the configuration, located as precisely as we can.

    str() gives ``FILE:LINE: [SECTION] OPTION: MESSAGE`` with the parts that are known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: Optional[str] = None,
        line: Optional[int] = None,
        section: Optional[str] = None,
        option: Optional[str] = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.section = section
        self.option = option
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "") + ": "
        what = ""
        if self.section:
            what += f"[{self.section}] "
        if self.option:
            what += f"{self.option}: "
        return f"{where}{what}{self.message}"


class ConfigErrors(ConfigError):
    """All the problems found in one configuration, reported together."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: Sequence[ConfigError] = tuple(errors)
        VacFactoryError.__init__(self, str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class InvalidValue(VacFactoryError, ValueError):
    """A value broke one of the rules of ``core/values.py`` (a device, name, path, address).

    Also a ValueError, so that a parser's caller that reports ValueErrors with the file and
    line (the configuration loader) reports these the same way.
    """


class StateError(VacFactoryError):
    """A machine directory or other state file is missing, unreadable or inconsistent."""

    def __init__(self, message: str, *, machine: Optional[str] = None, path: Optional[str] = None):
        self.machine = machine
        self.path = path
        prefix = machine or path
        super().__init__(f"{prefix}: {message}" if prefix else message)


class HypervisorError(VacFactoryError):
    """libvirt (or another hypervisor) refused or failed an operation."""

    def __init__(self, message: str, *, domain: Optional[str] = None, uri: Optional[str] = None):
        self.domain = domain
        self.uri = uri
        prefix = domain or uri
        super().__init__(f"{prefix}: {message}" if prefix else message)


class VMInputError(VacFactoryError):
    """Something a VM wrote (joboutputs, an HTTP request, a syslog datagram) was rejected."""

    def __init__(self, message: str, *, machine: Optional[str] = None, item: Optional[str] = None):
        self.machine = machine
        self.item = item
        where = ":".join(p for p in (machine, item) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ExportError(VacFactoryError):
    """Publishing a VM's directories (NFS export, HTTP registration) failed."""


class AccountingError(VacFactoryError):
    """An APEL record could not be built, validated, archived, queued or sent."""


class RecordInvalid(AccountingError):
    """An APEL record breaks one of the APEL server's rules; the VM stays unaccounted."""


class ProtocolError(VacFactoryError):
    """A VacQuery datagram is malformed; it is dropped without a reply."""

    def __init__(self, message: str, *, peer: Optional[str] = None):
        self.peer = peer
        super().__init__(f"{peer}: {message}" if peer else message)


class ImageError(VacFactoryError):
    """A root image could not be fetched, verified or cached."""


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, about ``limit`` characters, cut between words and marked
    ``[...]``: a long word at the limit is kept whole (up to twice the limit; only a single
    word longer than that is cut)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    if cut < limit // 2:  # most of the room would be lost: end after the long word instead
        end = text.find(" ", limit)
        cut = end if 0 < end <= 2 * limit else limit
    return text[:cut].rstrip() + " [...]"
