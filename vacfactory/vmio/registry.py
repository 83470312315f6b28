"""Which VM is which, for the HTTP server: by source address and by per-VM token.

The engine registers a VM before its domain starts and removes it when the VM ends. The HTTP
server resolves every request through this registry, so a VM can only ever reach the
directories named in its own :class:`VMEndpoint`.

A token is 128 random bits or more (hex). It lets a VM behind NAT (or any address we did not
assign) identify itself; it is only ever handed to the VM itself, in its meta_data.json (over
HTTP and on its config drive), never listed and never put in user_data.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Tuple

from vacfactory.errors import ExportError

TOKEN_BYTES = 16
_TOKEN = re.compile(r"[0-9a-f]{32,128}")
_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def normalise_address(address: str) -> str:
    """A source address as the registry knows it: ``::ffff:1.2.3.4`` (a dual-stack socket)
    as ``1.2.3.4``, a scope (``%eth0``) dropped; text that is no address unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(ip)


def new_token() -> str:
    """A fresh per-VM token: 128 random bits from the OS CSPRNG, as 32 lower-case hex digits."""
    return secrets.token_hex(TOKEN_BYTES)


def valid_token(token: object) -> bool:
    """True if ``token`` has the shape of a token (it may still be unknown)."""
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


@dataclass(frozen=True)
class VMEndpoint:
    """Everything the HTTP server may serve to, or accept from, one VM.

    ``meta`` holds extra metadata: ``public_key`` (OpenSSH public key lines, one key per
    line, offered as meta_data.json ``public_keys`` and EC2 ``public-keys/0/openssh-key``),
    ``availability_zone`` (Vac used the factory's FQDN), and any other string values, which
    are copied into the ``meta`` object of meta_data.json.
    """

    uuid: str
    name: str
    address: str
    token: str
    machinefeatures_dir: str
    jobfeatures_dir: str
    joboutputs_dir: str
    user_data_path: str
    machinetype: str
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _UUID.fullmatch(self.uuid):
            raise ValueError(f"bad VM uuid {self.uuid!r}")
        try:
            ipaddress.IPv4Address(self.address)
        except ValueError:
            raise ValueError(f"{self.uuid}: bad VM address {self.address!r}") from None
        if not valid_token(self.token):
            raise ValueError(f"{self.uuid}: token must be 32-128 lower-case hex digits")
        # freeze the mapping so a registered endpoint cannot change under the server
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))


class VMRegistry:
    """Thread-safe set of live VM endpoints, indexed by uuid, address and token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uuid: Dict[str, VMEndpoint] = {}
        self._by_address: Dict[str, VMEndpoint] = {}
        self._by_token: Dict[str, VMEndpoint] = {}

    def add(self, vm: VMEndpoint) -> None:
        """Register ``vm``; re-adding the same uuid replaces its entry.

        Raises ExportError if another live VM already holds the address or the token: two VMs
        must never be able to resolve to each other's files.
        """
        with self._lock:
            for index, key in ((self._by_address, vm.address), (self._by_token, vm.token)):
                other = index.get(key)
                if other is not None and other.uuid != vm.uuid:
                    what = "address" if index is self._by_address else "token"
                    raise ExportError(f"{vm.uuid}: {what} already registered to {other.uuid}")
            self._remove_locked(vm.uuid)
            self._by_uuid[vm.uuid] = vm
            self._by_address[vm.address] = vm
            self._by_token[vm.token] = vm

    def remove(self, uuid: str) -> Optional[VMEndpoint]:
        """Forget a VM; returns its endpoint, or None if it was not registered."""
        with self._lock:
            return self._remove_locked(uuid)

    def _remove_locked(self, uuid: str) -> Optional[VMEndpoint]:
        vm = self._by_uuid.pop(uuid, None)
        if vm is not None:
            self._by_address.pop(vm.address, None)
            self._by_token.pop(vm.token, None)
        return vm

    def by_uuid(self, uuid: str) -> Optional[VMEndpoint]:
        with self._lock:
            return self._by_uuid.get(uuid)

    def by_address(self, address: str) -> Optional[VMEndpoint]:
        with self._lock:
            return self._by_address.get(address)

    def by_token(self, token: str) -> Optional[VMEndpoint]:
        if not valid_token(token):
            return None
        with self._lock:
            return self._by_token.get(token)

    def all(self) -> Tuple[VMEndpoint, ...]:
        """A snapshot of every registered VM, ordered by uuid."""
        with self._lock:
            return tuple(self._by_uuid[u] for u in sorted(self._by_uuid))

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_uuid)
