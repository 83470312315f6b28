"""What the receiver accepts (the policy part; no sockets, no files): where it listens,
which VM a source address is, and how much each VM may send.

Who sent a datagram is decided by the source address only (the resolver: source IP -> the
VM's machine directory, from the VM registry); the hostname a message claims is kept as text
but never trusted. Each VM has its own token bucket (``rate_per_second`` with ``burst``), so
a VM flooding the receiver cannot starve another VM's messages, and its files are capped at
``max_bytes_per_vm`` in total.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

#: default server published to VMs: the factory's metadata address on the private network
DEFAULT_SERVER = "169.254.169.254:514"
#: addresses the factory holds on the private network (hypervisor.network / daemon)
FACTORY_ADDRESSES = ("169.254.169.254", "169.254.169.253")
#: room kept below the per-VM cap for the line that says the cap was reached
CAP_NOTE_RESERVE = 256


def parse_hostport(text: str) -> Tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); ValueError for anything else."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return host, number


def receiver_address(syslog_server: Optional[str],
                     own_addresses: Iterable[str] = FACTORY_ADDRESSES) -> Optional[Tuple[str, int]]:
    """Where the factory's receiver binds: ``syslog_server`` when it names one of the factory's
    own private-network addresses; None when syslog is off or VMs log to another host."""
    if not syslog_server:
        return None
    host, port = parse_hostport(syslog_server)
    return (host, port) if host in set(own_addresses) else None


def registry_resolver(registry) -> Callable[[str], Optional[str]]:
    """The resolver for a :class:`vacfactory.vmio.registry.VMRegistry`: address -> machine dir.

    A VM leaves the registry when it is cleaned, so its late messages are then dropped as
    unknown, and a new VM that gets the same slot address is a different directory.
    """
    def resolve(address: str) -> Optional[str]:
        vm = registry.by_address(address)
        return os.path.dirname(vm.joboutputs_dir) if vm is not None else None

    return resolve


@dataclass(frozen=True)
class SyslogLimits:
    """Per-VM caps: total bytes of its syslog files, messages a second (with a burst)."""

    max_bytes_per_vm: int = 20 * 1024 * 1024
    rate_per_second: float = 50.0
    burst: int = 500
    max_datagram: int = 8192

    def __post_init__(self) -> None:
        if self.max_bytes_per_vm < CAP_NOTE_RESERVE * 2 or self.rate_per_second <= 0 or self.burst < 1:
            raise ValueError("syslog limits: max_bytes_per_vm >= 512, rate > 0 and burst >= 1")
        if not 512 <= self.max_datagram <= 65507:
            raise ValueError("syslog limits: max_datagram must be 512-65507 bytes")


class TokenBucket:
    """``rate`` messages a second on average, ``burst`` at once; a step back of the clock
    neither refills nor blocks."""

    __slots__ = ("tokens", "refilled")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.refilled = now

    def take(self, now: float, rate: float, burst: int) -> bool:
        elapsed = now - self.refilled
        self.refilled = now
        if elapsed > 0:
            self.tokens = min(float(burst), self.tokens + elapsed * rate)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
