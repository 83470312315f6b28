"""Free ports for test daemons."""

from __future__ import annotations

import random
import socket


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing uses, below the ephemeral range: a port the kernel hands out for bind(0)
    may be taken a moment later by any process's outgoing connection (without SO_REUSEADDR,
    which a daemon rightly sees as a conflict)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, low)
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port found below the ephemeral range")
