"""The space: VacQuery protocol, UDP responder, query client, space view and simulator.

Many factories, no central manager: each factory answers VacQuery datagrams about what it
runs (:mod:`.responder`, from a :mod:`.snapshot` the engine publishes), asks all the others
the same (:mod:`.client`, one overall deadline) and turns the answers into the scheduler's
space view (:mod:`.view`). :mod:`.protocol` is the wire format without I/O; :mod:`.auth` the
optional space key; :mod:`.simulator` runs a whole space in one process.

Only this package opens UDP sockets.
"""

from vacfactory.space.client import FactoryReplies, Gatherer, SpaceReplies, query_space
from vacfactory.space.protocol import (
    DEFAULT_PORT,
    VACQUERY_VERSION,
    Query,
    QueryType,
    Reply,
    ReplyType,
    decode,
    encode_query,
    replies_for,
)
from vacfactory.space.responder import Responder, ResponderStats, ResolvedPeers
from vacfactory.space.snapshot import (
    FactorySnapshot,
    FactoryStatus,
    MachineStatus,
    MachinetypeStatus,
)

__all__ = [
    "DEFAULT_PORT",
    "VACQUERY_VERSION",
    "FactoryReplies",
    "FactorySnapshot",
    "FactoryStatus",
    "Gatherer",
    "MachineStatus",
    "MachinetypeStatus",
    "Query",
    "QueryType",
    "Reply",
    "ReplyType",
    "ResolvedPeers",
    "Responder",
    "ResponderStats",
    "SpaceReplies",
    "decode",
    "encode_query",
    "query_space",
    "replies_for",
]
