"""Fairness between VMs (policy, no sockets): how many connections each may hold, and the
order in which their requests are served. No VM can deny HTTP to another (a refused
heartbeat gets a VM killed).

- A connection is counted at accept against the VM registered at its source address. Each
  VM's share is ``max_connections_per_vm``, lowered when needed so that every registered
  VM's share fits in ``max_connections`` (a VM found over a share that shrank loses its idle
  connections at the next sweep).
- A connection from an unregistered address is refused at accept, unless
  ``max_unidentified_connections`` opens a pool for token-only clients (at most
  ``max_connections_per_address`` each); that pool is apart from the VMs' shares.
- Requests are served round-robin over owners, one request per owner per turn (and one
  connection after another within an owner): a pipelined batch, or many connections, of one
  VM cannot make another VM's request wait for more than one request of each other VM.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Iterator, Optional, Set, Tuple

from vacfactory.vmio.http.connection import Connection
from vacfactory.vmio.registry import VMEndpoint, VMRegistry

VM_OWNER = "vm:"
ADDRESS_OWNER = "addr:"


def unidentified(owner: str) -> bool:
    """An owner from the pool of unregistered addresses (token-only clients)."""
    return owner.startswith(ADDRESS_OWNER)


class Shares:
    """Connections counted per owner against the limits."""

    def __init__(self, registry: VMRegistry, max_connections: int, max_per_vm: int,
                 max_unidentified: int, max_per_address: int) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.max_per_vm = max_per_vm
        self.max_unidentified = max_unidentified
        self.max_per_address = max_per_address
        self.per_owner: Dict[str, int] = {}
        self.unidentified = 0

    def vm_share(self) -> int:
        """How many connections one registered VM may hold now: ``max_connections_per_vm``,
        or less if that many for every registered VM would not fit in ``max_connections``."""
        room = self.max_connections - self.max_unidentified
        return max(1, min(self.max_per_vm, room // max(1, len(self.registry))))

    def owner_of(self, peer: str) -> Tuple[Optional[str], Optional[VMEndpoint]]:
        """(owner, the VM at that address); owner None: an unregistered address, no pool."""
        vm = self.registry.by_address(peer)
        if vm is not None:
            return VM_OWNER + vm.uuid, vm
        return (ADDRESS_OWNER + peer if self.max_unidentified > 0 else None), None

    def full(self, owner: str, open_connections: int) -> bool:
        """Would one more connection of ``owner`` pass a limit?"""
        if open_connections >= self.max_connections:
            return True
        held = self.per_owner.get(owner, 0)
        if unidentified(owner):
            return self.unidentified >= self.max_unidentified or held >= self.max_per_address
        return held >= self.vm_share()

    def add(self, owner: str) -> None:
        self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        if unidentified(owner):
            self.unidentified += 1

    def remove(self, owner: str) -> None:
        remaining = self.per_owner.get(owner, 1) - 1
        if remaining > 0:
            self.per_owner[owner] = remaining
        else:
            self.per_owner.pop(owner, None)
        if unidentified(owner):
            self.unidentified -= 1

    def over_share(self) -> Set[str]:
        """The VMs holding more connections than their (shrunken) share."""
        share = self.vm_share()
        return {owner for owner, n in self.per_owner.items() if n > share and not unidentified(owner)}

    def still_over(self, owner: str) -> bool:
        return self.per_owner.get(owner, 0) > self.vm_share()


class RoundRobin:
    """Owners with a request waiting, each with its connections in order."""

    def __init__(self) -> None:
        self._ring: Deque[str] = deque()
        self._waiting: Dict[str, Deque[Connection]] = {}

    def __bool__(self) -> bool:
        return bool(self._ring)

    def enqueue(self, conn: Connection) -> None:
        if conn.queued:
            return
        conn.queued = True
        waiting = self._waiting.get(conn.owner)
        if waiting is None:
            waiting = self._waiting[conn.owner] = deque()
            self._ring.append(conn.owner)
        waiting.append(conn)

    def turn(self) -> Iterator[Connection]:
        """One turn: the next connection of each owner that had one waiting when it began."""
        for _ in range(len(self._ring)):
            owner = self._ring.popleft()
            waiting = self._waiting[owner]
            conn = waiting.popleft()
            conn.queued = False
            if waiting:
                self._ring.append(owner)
            else:
                del self._waiting[owner]
            yield conn

    def clear(self) -> None:
        self._ring.clear()
        self._waiting.clear()
