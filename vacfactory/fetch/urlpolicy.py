"""Which hosts a download may reach: the guard against server-side request forgery (SSRF).

A vacuum pipe is written by a VO, not by the site, so a URL it gives (``root_image``,
``user_data``) may name only hosts that resolve to public addresses. Refused: loopback,
link-local (169.254.169.253/254 are the factory's own metadata addresses), private,
shared (100.64/10), unique-local (fc00::/7), unspecified, multicast, reserved and
documentation ranges (everything :attr:`ipaddress.IPv4Address.is_global` says is not
global, plus multicast), IPv4-mapped IPv6 forms of those, and every address of the factory
itself. A site-internal mirror is allowed by listing it in ``internal_url_hosts``: a host
name (that name, whatever it resolves to) or an address or CIDR network (any name that
resolves into it). Credentials in a URL (``user:pw@host``) are refused from pipes.

The check returns the addresses it approved; the fetcher (:mod:`vacfactory.fetch.safefetch`)
connects to exactly those, so a name that resolves differently a moment later (DNS
rebinding) cannot swap in an internal address. URLs the admin writes in a configuration file
are trusted for their first host (the admin's choice), but every redirect, from any URL, is
checked like a pipe's URL, and never leads from https to http.

Name lookups use the system resolver (:func:`socket.getaddrinfo`), bounded by its own
timeouts (resolv.conf), not by the download deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import FrozenSet, Iterable, List, Optional, Tuple, Union

from vacfactory.errors import VacFactoryError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlRefused(VacFactoryError):
    """A URL names a host it may not reach (or is malformed); the message says why."""


class HostNotFound(VacFactoryError):
    """A URL's host does not resolve (an outage, not a refusal)."""


@dataclass(frozen=True)
class Target:
    """Where one request goes: the URL's parts and the approved addresses to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    #: path and query, as sent in the request line
    request_target: str
    addresses: Tuple[str, ...]


def refusal_reason(address: IPAddress) -> Optional[str]:
    """Why ``address`` may not be reached from a pipe URL, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal_reason(address.ipv4_mapped)
    for test, kind in ((address.is_unspecified, "unspecified"), (address.is_loopback, "loopback"),
                       (address.is_link_local, "link-local"), (address.is_multicast, "multicast"),
                       (address.is_reserved, "reserved")):
        if test:
            return f"a {kind} address"
    if isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL:
        return "a unique-local address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")


def own_addresses() -> FrozenSet[IPAddress]:
    """Every address of this host's interfaces (Linux /proc; empty where unreadable)."""
    found: set = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            previous = ""
            for line in f:
                if "/32 host LOCAL" in line and previous.strip().startswith("|--"):
                    found.add(ipaddress.ip_address(previous.strip()[3:].strip()))
                previous = line
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                raw = line.split()[0]
                found.add(ipaddress.ip_address(":".join(raw[i:i + 4] for i in range(0, 32, 4))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def getaddrinfo(host: str, port: int) -> List[str]:
    """The addresses ``host`` resolves to (tests replace this to play DNS rebinding)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise HostNotFound(f"cannot resolve {host}: {error}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_internal_hosts(words: Iterable[str]) -> Tuple[Tuple[str, ...], Tuple[IPNetwork, ...]]:
    """``internal_url_hosts`` items: host names and address/CIDR networks; ValueError if bad."""
    names: List[str] = []
    networks: List[IPNetwork] = []
    for word in words:
        text = word.strip().lower()
        try:
            networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not text or not all(part and len(part) <= 63 and part.replace("-", "").isalnum()
                               for part in text.rstrip(".").split(".")):
            raise ValueError(f"{word!r} is neither a host name nor an address or CIDR network")
        names.append(text.rstrip("."))
    return tuple(names), tuple(networks)


def check_url_form(url: str, from_pipe: bool = True) -> urllib.parse.SplitResult:
    """The parts of an http(s) URL; UrlRefused for other schemes, no host, a bad port, and
    (from a pipe) credentials. Pure: no name lookups."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UrlRefused(f"{url!r} is not a valid URL: {error}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise UrlRefused(f"{url!r}: only http and https URLs may be fetched")
    if not parts.hostname:
        raise UrlRefused(f"{url!r} names no host")
    if from_pipe and (parts.username is not None or parts.password is not None or "@" in parts.netloc):
        raise UrlRefused("URLs with credentials (user:password@) are refused from vacuum pipes")
    if port == 0:
        raise UrlRefused(f"{url!r}: port 0")
    return parts


@dataclass(frozen=True)
class UrlPolicy:
    """The allow-list and the factory's own addresses; :meth:`target` applies them."""

    internal_names: Tuple[str, ...] = ()
    internal_networks: Tuple[IPNetwork, ...] = ()
    #: None: read from the system at each check (interfaces can change)
    own: Optional[FrozenSet[IPAddress]] = field(default=None, compare=False)

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "UrlPolicy":
        names, networks = parse_internal_hosts(words)
        return cls(names, networks)

    def allows_address(self, address: IPAddress) -> Optional[str]:
        """None if a checked URL may connect to ``address``, else why not."""
        plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
        if any(plain in net for net in self.internal_networks if net.version == plain.version):
            return None
        why = refusal_reason(plain)
        if why is None and plain in (self.own if self.own is not None else own_addresses()):
            why = "an address of this factory"
        return why

    def target(self, url: str, checked: bool = True) -> Target:
        """Resolve ``url`` once and return the addresses to connect to.

        ``checked`` False (a URL the admin configured): its host is trusted as it is.
        True (a pipe's URL, every redirect): credentials refused, every resolved address must
        pass :meth:`allows_address` unless the host name is listed; else UrlRefused.
        """
        parts = check_url_form(url, from_pipe=checked)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
        request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            literal: Optional[IPAddress] = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [str(literal)] if literal is not None else getaddrinfo(host, port)
        if not addresses:
            raise HostNotFound(f"{host} resolves to no address")
        if checked and host.rstrip(".") not in self.internal_names:
            for text in addresses:
                why = self.allows_address(ipaddress.ip_address(text.split("%")[0]))
                if why is not None:
                    shown = host if literal is not None else f"{host} resolves to {text}, which"
                    raise UrlRefused(f"{shown} is {why}; list it in internal_url_hosts "
                                     "if it is a site-internal mirror")
        return Target(url=url, scheme=scheme, host=host, port=port, request_target=request_target,
                      addresses=tuple(addresses))


__all__ = ["UrlPolicy", "UrlRefused", "HostNotFound", "Target", "refusal_reason", "own_addresses", "getaddrinfo",
           "parse_internal_hosts", "check_url_form"]
