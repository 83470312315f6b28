"""Vacuum pipes as pure data: validate a VO's JSON document and expand it into machinetypes.

A vacuum pipe (``[vacuum_pipe PREFIX]`` with ``vacuum_pipe_url``) is a JSON document a VO
publishes::

    {"cache_seconds": 3600,
     "machinetypes": [{"suffix": "prod", "target_share": 3, "root_image": "https://...", ...}]}

Each entry becomes the machinetype ``PREFIX-SUFFIX``. The document comes from the network,
so everything in it is hostile until proven otherwise:

- only Vac's whitelist of options (plus ``root_image_sha256``) is taken; anything else is
  ignored with a message;
- every value is converted from JSON to the text an admin would write and parsed by the
  *same* option-table type as a local configuration (one source of truth), so a
  non-numeric number fails here exactly as it would in /etc/vacfactory.conf;
- Vac's path rules apply, plus a character set for paths and URLs (no whitespace, no shell
  metacharacters), so ``root_image: "/cvmfs/x; cmd"`` is refused here, and in any case no
  value ever reaches a shell (every subprocess gets an argument list);
- an http(s) URL must name a host and carry no credentials (``user:pw@``); which hosts it may
  reach is decided when it is fetched (:mod:`vacfactory.fetch.urlpolicy`: public addresses only,
  unless the site lists an internal mirror), because that needs the site's allow-list and a
  name lookup. :func:`pipe_source` tells the fetcher that a value came from a pipe, and which;
- a broken entry is skipped with a message naming ``pipe PREFIX (URL) machinetypes[N].OPTION``
  and the rest of the pipe still works (Vac: ``int('abc')`` from a pipe stopped the factory).

Shares are split as Vac does: ``pipe target_share x entry target_share / sum of the entries'
target_shares`` (every entry with a valid share counts in the sum, so one broken entry never
hands its share to the others).

Fetching and caching live in :mod:`vacfactory.fetch.pipefetch`; merging with the site's own sections
(which always win) in :mod:`vacfactory.config.loader`. This module does no I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from vacfactory.config.model import Config
from vacfactory.config import options as table
from vacfactory.config.parsers import Boolean, Integer, ValueType, Words, quote
from vacfactory.core import values
from vacfactory.errors import VacFactoryError
from vacfactory.fetch.urlpolicy import UrlRefused, check_url_form

#: Vac 03.01's accepted options (``readConf``), plus our root_image_sha256 (safer, additive)
WHITELIST = frozenset({
    "accounting_fqan", "backoff_seconds", "container_command", "cvmfs_repositories",
    "fizzle_seconds", "disk_gb_per_processor", "heartbeat_file", "heartbeat_seconds",
    "image_signing_dn", "legacy_proxy", "machine_model", "max_processors",
    "max_wallclock_seconds", "min_processors", "min_wallclock_seconds", "root_device",
    "root_image", "root_image_sha256", "scratch_device", "tmp_binds", "user_data",
    "user_data_proxy",
})
#: option families a pipe may set (Vac: user_data_option_XXX and user_data_file_XXX)
WHITELIST_PREFIXES = ("user_data_option_", "user_data_file_")

#: largest pipe document we read (real ones are a few kilobytes)
MAX_DOCUMENT_BYTES = 1 << 20
#: most machinetypes one pipe may define
MAX_ENTRIES = 256
#: Vac's cache_seconds when the document gives none
DEFAULT_CACHE_SECONDS = 3600
#: a pipe is never fetched more often than this, whatever it asks for
MIN_CACHE_SECONDS = 60
#: ... nor kept longer than this without trying again
MAX_CACHE_SECONDS = 7 * 86400

SUFFIX_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
#: characters allowed in paths and URLs from a pipe: no whitespace, quotes, ; & | $ ` < > ( ) etc.
SAFE_CHARS = r"[A-Za-z0-9._/:%+=@,-]+"
SAFE_CHARS_DOC = "may contain only letters, digits and . _ - / : % + = @ , (no spaces or shell metacharacters)"

#: options whose values name files or URLs on the factory
_LOCATIONS = ("root_image", "user_data")
#: options that may only be a plain name (Vac: no '/')
_PLAIN_NAMES = ("cvmfs_repositories", "heartbeat_file")


class PipeError(VacFactoryError):
    """A whole pipe document is unusable (not JSON, wrong shape, too large)."""


def label(prefix: str, url: str) -> str:
    """How every message names a pipe: ``pipe PREFIX (URL)``."""
    return f"pipe {prefix} ({url})"


@dataclass(frozen=True)
class PipeDocument:
    """A document whose shape is valid; its entries are still raw JSON values."""

    cache_seconds: int
    entries: Tuple[Any, ...]
    #: document-level problems that did not make it unusable (e.g. a bad cache_seconds)
    problems: Tuple[str, ...] = ()


@dataclass(frozen=True)
class PipeMachinetype:
    """One valid entry: its machinetype name and options as configuration text.

    ``options`` maps canonical option names to the text an admin would write; each was
    already parsed by its option-table type. ``target_share`` is the split share.
    """

    name: str
    index: int
    suffix: str
    options: Mapping[str, str]


@dataclass(frozen=True)
class PipeExpansion:
    """What one pipe document defines, and everything wrong with it."""

    prefix: str
    url: str
    machinetypes: Tuple[PipeMachinetype, ...]
    problems: Tuple[str, ...]
    cache_seconds: int = DEFAULT_CACHE_SECONDS

    @property
    def entry_count(self) -> int:
        return len(self.machinetypes)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_document(data: bytes) -> PipeDocument:
    """Check the shape of a downloaded (or cached) document; PipeError if unusable."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise PipeError(f"document of {len(data)} bytes is larger than {MAX_DOCUMENT_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PipeError(f"document is not UTF-8 (byte {error.start})") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise PipeError(f"document is not JSON: {str(error)[:100]}") from None
    if not isinstance(document, dict):
        raise PipeError("document is not a JSON object")
    if "machinetypes" not in document:
        raise PipeError("document has no machinetypes list")
    entries = document["machinetypes"]
    if not isinstance(entries, list):
        raise PipeError("machinetypes is not a list")
    if len(entries) > MAX_ENTRIES:
        raise PipeError(f"machinetypes has {len(entries)} entries, more than {MAX_ENTRIES}")
    problems: List[str] = []
    cache_seconds = DEFAULT_CACHE_SECONDS
    if "cache_seconds" in document:
        try:
            cache_seconds = int(_number(document["cache_seconds"], Integer(min=0)))
        except ValueError as error:
            problems.append(f"cache_seconds: {error}; using {DEFAULT_CACHE_SECONDS}")
    cache_seconds = min(max(cache_seconds, MIN_CACHE_SECONDS), MAX_CACHE_SECONDS)
    return PipeDocument(cache_seconds=cache_seconds, entries=tuple(entries), problems=tuple(problems))


def _number(value: Any, vtype: ValueType) -> Any:
    """A JSON number (or numeric string) through an Integer/Number type."""
    return vtype.parse(json_to_text(value, vtype))


def json_to_text(value: Any, vtype: ValueType) -> str:
    """The configuration text for a JSON value, or ValueError.

    Vac ``str()``'d everything (a list became a Python repr); we accept exactly the JSON kinds
    that have an obvious text form for the option's type.
    """
    if value is None:
        raise ValueError("must not be null")
    if isinstance(value, bool):
        if isinstance(vtype, Boolean):
            return "yes" if value else "no"
        raise ValueError(f"must be a {vtype.name}, not {str(value).lower()}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if isinstance(vtype, Integer) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and isinstance(vtype, Words):
        if not all(isinstance(item, str) and item and item.split() == [item] for item in value):
            raise ValueError("must be a list of words (strings without spaces)")
        return " ".join(value)
    kinds: Dict[type, str] = {dict: "an object", list: "a list"}
    kind = kinds.get(type(value), type(value).__name__)
    raise ValueError(f"must be a {vtype.name}, not {kind}")


def _path_rules(option: str, text: str) -> Optional[str]:
    """Vac's rules for values naming files or URLs on the factory, plus our character set."""
    is_family_file = option.startswith("user_data_file_")
    if option in _LOCATIONS or is_family_file or option == "tmp_binds":
        if not re.fullmatch(SAFE_CHARS, text.replace(" ", "_") if option == "tmp_binds" else text):
            return f"{quote(text)} {SAFE_CHARS_DOC}"
        if "/../" in f"/{text}/":
            return f"{quote(text)} must not contain '..'"
    if (option in _PLAIN_NAMES or is_family_file) and "/" in text:
        return f"{quote(text)} must be a plain name (no '/')"
    if option in _LOCATIONS and text.startswith(("http://", "https://")):
        try:
            check_url_form(text, from_pipe=True)
        except UrlRefused as error:
            return str(error)
    if option == "user_data" and "/" in text and not text.startswith(("http://", "https://")):
        return f"{quote(text)} must be an http(s) URL or a plain file name"
    if option == "root_image" and "/" in text and not text.startswith(
            ("http://", "https://", "docker://", "/cvmfs/")):
        return f"{quote(text)} must be an http(s) or docker:// URL, a /cvmfs/ path or a plain file name"
    if option == "root_image" and text.lower().startswith("docker://"):
        try:  # what reaches the container runtime: an image reference and nothing else
            values.docker_image(text)
        except ValueError as error:
            return str(error)
    return None


def _show_key(key: str) -> str:
    """An option name from the document, safe to put in one log line."""
    return key if re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", key) else quote(key)


def _option_type(option: str) -> Optional[ValueType]:
    row = table.accepted_options(table.MACHINETYPE).get(option)
    if row is not None:
        return row.type
    for family in table.families_of(table.MACHINETYPE):
        if option.startswith(family.prefix) and re.fullmatch(family.suffix_pattern, option[len(family.prefix):]):
            return family.type
    return None


def _accepted(option: str) -> bool:
    return option in WHITELIST or option.startswith(WHITELIST_PREFIXES)


def _entry_share(entry: Any) -> Optional[float]:
    """An entry's own target_share if it is valid (Vac counts those in the sum)."""
    if not isinstance(entry, dict) or "target_share" not in entry:
        return None
    try:
        return float(_number(entry["target_share"], table.accepted_options(table.MACHINETYPE)["target_share"].type))
    except ValueError:
        return None


def expand(prefix: str, url: str, pipe_share: float, document: PipeDocument) -> PipeExpansion:
    """The machinetypes a pipe defines: validated option text per entry, and the problems.

    Options the site sets in ``[vacuum_pipe]`` or ``[machinetype PREFIX-SUFFIX]`` are merged
    later by the loader (they win); here only the document is judged.
    """
    where = label(prefix, url)
    problems = [f"{where} {p}" for p in document.problems]
    shares = [_entry_share(e) for e in document.entries]
    total = sum(s for s in shares if s is not None)
    machinetypes: List[PipeMachinetype] = []
    seen: Dict[str, int] = {}
    for index, entry in enumerate(document.entries):
        at = f"{where} machinetypes[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{at}: must be a JSON object: entry skipped")
            continue
        suffix = entry.get("suffix")
        if not isinstance(suffix, str) or not re.fullmatch(SUFFIX_PATTERN, suffix):
            why = "is missing" if suffix is None else f"{quote(str(suffix))} must match {SUFFIX_PATTERN}"
            problems.append(f"{at}.suffix: {why}: entry skipped")
            continue
        name = f"{prefix}-{suffix}"
        if name in seen:
            problems.append(f"{at}.suffix: {suffix!r} is already used by machinetypes[{seen[name]}]: entry skipped")
            continue
        options, entry_problems = _entry_options(at, entry)
        if entry_problems:
            problems.extend(f"{p}: entry {name} skipped" for p in entry_problems)
            continue
        seen[name] = index
        share = shares[index]
        if share is not None:
            options["target_share"] = repr(pipe_share * share / total) if total > 0 else "0.0"
        machinetypes.append(PipeMachinetype(name=name, index=index, suffix=suffix, options=options))
    for message in _ignored_messages(where, document.entries):
        problems.append(message)
    return PipeExpansion(prefix=prefix, url=url, machinetypes=tuple(machinetypes), problems=tuple(problems),
                         cache_seconds=document.cache_seconds)


def _entry_options(at: str, entry: Mapping[str, Any]) -> Tuple[Dict[str, str], List[str]]:
    """Validated option text of one entry, and the reasons it is broken (if any)."""
    options: Dict[str, str] = {}
    problems: List[str] = []
    for option, value in entry.items():
        if option == "suffix" or (option != "target_share" and not _accepted(option)):
            continue  # ignored options are reported once per pipe by _ignored_messages
        if option == "target_share":
            vtype: Optional[ValueType] = table.accepted_options(table.MACHINETYPE)["target_share"].type
        else:
            vtype = _option_type(option)
        if vtype is None:
            problems.append(f"{at}.{_show_key(option)}: not a valid option name")
            continue
        try:
            text = json_to_text(value, vtype)
            vtype.parse(text)
        except ValueError as error:
            problems.append(f"{at}.{option}: {error}")
            continue
        rule = _path_rules(option, text)
        if rule is not None:
            problems.append(f"{at}.{option}: {rule}")
            continue
        if option != "target_share":
            options[option] = text
    return options, problems


def _ignored_messages(where: str, entries: Tuple[Any, ...]) -> List[str]:
    """One message per option name a pipe gives that is not accepted (Vac printed each)."""
    ignored: Dict[str, int] = {}
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            for option in entry:
                if option != "suffix" and option != "target_share" and not _accepted(str(option)):
                    ignored.setdefault(str(option), index)
    return [f"{where} machinetypes[{index}].{_show_key(option)}: not accepted from a vacuum pipe: ignored"
            for option, index in ignored.items()]


def pipe_source(config: Config, machinetype: str, option: str) -> Optional[str]:
    """``pipe PREFIX (URL) machinetypes[N]`` if ``option`` of ``machinetype`` came from a
    vacuum pipe document (the site's own sections win and are not pipe values), else None.
    Downloads of such values are checked by :mod:`vacfactory.fetch.urlpolicy`."""
    origins = getattr(config, "origins", {}).get(f"{table.MACHINETYPE} {machinetype}", {})
    origin = origins.get(option)
    return origin if isinstance(origin, str) and origin.startswith("pipe ") else None


def expand_bytes(prefix: str, url: str, pipe_share: float, data: bytes) -> PipeExpansion:
    """:func:`parse_document` then :func:`expand`; PipeError if the document is unusable."""
    return expand(prefix, url, pipe_share, parse_document(data))


def usable(expansion: PipeExpansion, document: PipeDocument) -> bool:
    """A download may replace the cache only if it defines something, or means to define
    nothing (an empty list): a document whose every entry is broken is a bad download."""
    return bool(expansion.machinetypes) or not document.entries
