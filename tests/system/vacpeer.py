"""A Vac 03.01 peer for mixed-space tests: its VacQuery client and responder, as Vac does them.

Written from Vac 03.01's ``sendMachinesRequests``/``sendMachinetypesRequests`` and its
responder loop (see ../shared/reference/vac-anchor.md §2 and vac-config-reading.md "VacQuery
as Vac's client does it"), in Python 3 but with Vac's behaviour, not ours:

Client (:func:`vac_query`):
  - one salt per call (base64 of 32 random bytes), cookie ``sha256(salt + factory)`` per
    factory, the same cookie on every re-send;
  - the query is ``json.dumps`` of Vac's dict (default separators: 215-245 bytes), sent to
    ``(factory name, port)`` - the name resolved by the system, as Vac;
  - up to ``tries + 1`` rounds (1 query + 6 re-sends); a round re-sends only to factories
    with fewer replies than their ``num_machines``/``num_machinetypes`` (1 before any reply)
    and stops early when none needs it; each round gathers until a silence of
    ``udp_timeout / tries`` seconds;
  - every reply is read with a **1024-byte** buffer (a longer datagram arrives cut and is not
    JSON: counted as ``bad_json``); the receive buffer is 16 MiB (Vac raises rmem_max);
  - a reply counts if it has the right ``message_type``, ``space`` and every key Vac's client
    tests for, names a listed factory and its cookie is ``sha256(salt + reply['factory'])``;
    replies are keyed by machine / machinetype name.

Responder (:func:`serve`): reads queries with ``recvfrom(1024)``, answers any source whose
query is JSON with a ``cookie`` and this ``space`` (Vac has no other check), with one
``machine_status`` per slot or one ``machinetype_status`` per machinetype (Python 2 style
``json.dumps``), ``factory`` = its name. It never cuts or limits an answer.

Run as a module: ``python -m tests.system.vacpeer query|serve ...`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import signal
import socket
import sys
import time
from typing import Dict, List, Optional

#: Vac's vacqueryTries: re-sends after the first query
VAC_TRIES = 6
#: what Vac's client reads per reply
VAC_READ_BYTES = 1024
VAC_VERSION = "03.01"

#: keys Vac's client requires in each reply kind (besides message_type, cookie, space, factory)
REQUIRED = {
    "machine_status": ("num_machines", "machine", "state", "uuid", "created_time", "started_time",
                       "heartbeat_time", "cpu_seconds", "cpu_percentage", "hs06", "machinetype",
                       "shutdown_message", "shutdown_time"),
    "machinetype_status": ("num_machinetypes", "machinetype", "running_hs06", "num_before_fizzle",
                           "shutdown_message", "shutdown_time", "shutdown_machine"),
}
_COUNT = {"machine_status": "num_machines", "machinetype_status": "num_machinetypes"}
_KEY = {"machine_status": "machine", "machinetype_status": "machinetype"}
_REPLY = {"machines_query": "machine_status", "machinetypes_query": "machinetype_status"}


def grow_buffer(sock: socket.socket) -> None:
    """Vac's setSockBufferSize gives its sockets 16 MiB (it raises net.core.rmem_max); here the
    root-only SO_RCVBUFFORCE gets the same without touching the host's sysctls."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, 16 * 1024 * 1024)
    except (OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)


def vac_query(factories: List[str], message_type: str, space: str, *, port: int,
              udp_timeout: float = 10.0, tries: int = VAC_TRIES, client_name: str = "-") -> dict:
    """One of Vac's query rounds; a summary of what it accepted (see the module doc)."""
    reply_type = _REPLY[message_type]
    salt = base64.b64encode(os.urandom(32))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(udp_timeout / tries)
    grow_buffer(sock)
    responses: Dict[str, dict] = {name: {"items": {}} for name in factories}
    sizes: List[int] = []
    datagrams = bad_json = refused = longest = 0
    started = time.monotonic()
    query_count = 0
    while query_count <= tries:
        query_count += 1
        requests_sent = 0
        for name in factories:
            expected = responses[name].get("count", 1)
            if len(responses[name]["items"]) < expected:
                requests_sent += 1
                query = {"vac_version": f"Vac {VAC_VERSION} {client_name}",
                         "vacquery_version": "VacQuery 01.03", "space": space,
                         "cookie": hashlib.sha256(salt + name.encode()).hexdigest(),
                         "message_type": message_type}
                if message_type == "machines_query":
                    query["method"] = "machines"  # "will be deprecated", Vac says
                data = json.dumps(query).encode()
                sizes.append(len(data))
                try:
                    sock.sendto(data, (name, port))
                except OSError:
                    pass
        if requests_sent == 0:
            break
        while True:  # gather until a silence of udp_timeout / tries
            try:
                data, _ = sock.recvfrom(VAC_READ_BYTES)
            except socket.timeout:
                break
            datagrams += 1
            longest = max(longest, len(data))
            try:
                response = json.loads(data)
            except ValueError:
                bad_json += 1
                continue
            if not (isinstance(response, dict)
                    and response.get("message_type") == reply_type
                    and "cookie" in response and response.get("space") == space
                    and "factory" in response and isinstance(response["factory"], str)
                    and response["cookie"] == hashlib.sha256(
                        salt + response["factory"].encode()).hexdigest()
                    and all(key in response for key in REQUIRED[reply_type])
                    and response["factory"] in responses):
                refused += 1
                continue
            entry = responses[response["factory"]]
            entry["count"] = response[_COUNT[reply_type]]
            entry["items"][response[_KEY[reply_type]]] = response
    sock.close()
    return {
        "answers": {name: {"count": entry.get("count"), "items": entry["items"]}
                    for name, entry in responses.items()},
        "query_sizes": sizes, "rounds": query_count, "datagrams": datagrams,
        "bad_json": bad_json, "refused": refused, "longest": longest,
        "elapsed": time.monotonic() - started,
    }


# -- the responder ----------------------------------------------------------------------------


def _header(message_type: str, cookie: str, space: str, name: str) -> dict:
    return {"message_type": message_type, "vac_version": f"Vac {VAC_VERSION} vacd-responder",
            "daemon_version": f"Vac {VAC_VERSION} vacd-responder",
            "vacquery_version": "VacQuery 01.03", "cookie": cookie, "space": space,
            "factory": name, "time_sent": int(time.time()), "site": space.split(".", 1)[-1]}


def answers(query: dict, space: str, name: str, machinetypes: List[dict],
            slots: int) -> List[bytes]:
    """Vac's replies to one query (no check but cookie and space, as Vac)."""
    if "cookie" not in query or query.get("space") != space:
        return []
    kind = query.get("message_type") or {"machines": "machines_query",
                                         "machinetypes": "machinetypes_query"}.get(
        query.get("method"))
    out = []
    if kind == "machinetypes_query":
        for status in machinetypes:
            message = _header("machinetype_status", query["cookie"], space, name)
            message.update(num_machinetypes=len(machinetypes), running_machines=0,
                           running_cpus=0.0, running_processors=0.0, running_hs06=0.0,
                           num_before_fizzle=0, shutdown_message=None, shutdown_time=None,
                           shutdown_machine=None)
            message.update(status)
            out.append(json.dumps(message).encode())
    elif kind == "machines_query":
        short, _, domain = name.partition(".")
        for ordinal in range(slots):
            message = _header("machine_status", query["cookie"], space, name)
            message.update(num_machines=slots, machine=f"{short}-{ordinal:02d}.{domain}",
                           state="Shut down", uuid=None, created_time=None, started_time=None,
                           heartbeat_time=None, num_cpus=0, num_processors=0, cpu_seconds=0,
                           cpu_percentage=0.0, hs06=0.0, machinetype=None, machine_model="cernvm3",
                           shutdown_message=None, shutdown_time=None)
            out.append(json.dumps(message).encode())
    return out


def serve(bind: str, port: int, space: str, name: str, machinetypes: List[dict],
          slots: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    sock.settimeout(0.2)
    stopping: List[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    counts = {"queries": 0, "datagrams_sent": 0}
    print("ready", flush=True)
    while not stopping:
        try:
            data, address = sock.recvfrom(VAC_READ_BYTES)
        except socket.timeout:
            continue
        try:
            query = json.loads(data)
        except ValueError:
            continue
        if not isinstance(query, dict):
            continue
        counts["queries"] += 1
        for reply in answers(query, space, name, machinetypes, slots):
            sock.sendto(reply, address)
            counts["datagrams_sent"] += 1
    print(json.dumps(counts), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.system.vacpeer")
    verbs = parser.add_subparsers(dest="verb", required=True)
    query = verbs.add_parser("query", help="one Vac client round; prints a JSON summary")
    query.add_argument("--factories", required=True, help="comma-separated factory names")
    query.add_argument("--type", default="machinetypes_query")
    query.add_argument("--space", required=True)
    query.add_argument("--port", type=int, required=True)
    query.add_argument("--timeout", type=float, default=10.0)
    serve_p = verbs.add_parser("serve", help="a Vac responder until SIGTERM")
    serve_p.add_argument("--bind", required=True)
    serve_p.add_argument("--port", type=int, required=True)
    serve_p.add_argument("--space", required=True)
    serve_p.add_argument("--name", required=True)
    serve_p.add_argument("--machinetypes", required=True, help="JSON list of machinetype_status")
    serve_p.add_argument("--slots", type=int, default=0)
    args = parser.parse_args(argv)
    if args.verb == "query":
        print(json.dumps(vac_query(args.factories.split(","), args.type, args.space,
                                   port=args.port, udp_timeout=args.timeout)))
        return 0
    return serve(args.bind, args.port, args.space, args.name, json.loads(args.machinetypes),
                 args.slots)


if __name__ == "__main__":
    sys.exit(main())
