"""Fuzzing a real factory daemon's responder over real UDP, between network namespaces.

h1 runs ``vacfactory run`` (libvirt's test driver, a space key, 4 processors); h2 is a
factory of its space that sends more than 10,000 bad datagrams - random bytes, oversized ones,
signed queries garbled in one byte, signed JSON that is no query, queries signed with another
key or not at all, for another space, replies instead of queries, stale and replayed queries -
and h3, a host that is not a factory, sends valid signed queries. Afterwards the daemon must be
alive, must not have answered one of them, its log must name every reject by reason and sender
(summed lines, see space/responder.py), and it must still answer a valid query correctly within
the UDP deadline.

The fuzzer is this module run as a script in h2 (``fuzz``) and h3 (``outsider``); it knows
which reason each datagram must be rejected for, so the daemon's log is checked count by count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from tests.system.netns import ready_lab

pytestmark = pytest.mark.system

PREFIX = "vffz"
SUBNET = "10.199.56"
SPACE = "vffz.example.org"
PORT = 19997
KEY = "the key of the fuzzed space"
MODULE = "tests.system.test_space_fuzz_netns"
VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
PROCESSORS = 4
UDP_TIMEOUT = 2.0
#: datagrams per category from the factory h2 (and from the outsider h3)
PLAN = {
    "junk": 3000,          # random bytes up to 1024
    "garbled": 2000,       # a valid signed query with one byte changed
    "oversize": 800,       # more than MAX_QUERY_BYTES
    "signed_junk": 1500,   # signed JSON objects that are no valid query
    "wrong_key": 600,
    "unsigned": 600,
    "wrong_space": 500,
    "reply": 400,          # a signed reply, not a query
    "stale": 400,          # signed an hour ago (or ahead)
    "replay": 400,         # a query answered once, then sent again
}
OUTSIDER = 300
#: datagrams a second: well under what the responder handles, so the kernel drops none
RATE = 2000


def fqdn(label: str) -> str:
    return f"{label}.{SPACE}"


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    lab = ready_lab(3, prefix=PREFIX, subnet=SUBNET)
    lab.hosts_file({fqdn("f1"): lab.hosts[0].ip, fqdn("f2"): lab.hosts[1].ip,
                    fqdn("outsider"): lab.hosts[2].ip})
    yield lab
    lab.teardown()


def write_config(directory: Path, key_file: Path) -> Path:
    kernel = directory / "vmlinux"
    kernel.write_bytes(b"not a kernel: the test driver boots nothing")
    config = directory / "vacfactory.conf"
    config.write_text("\n".join([
        "[settings]",
        f"vac_space = {SPACE}",
        f"factory_name = {fqdn('f1')}",
        f"factories = {fqdn('f1')} {fqdn('f2')}",
        f"state_dir = {directory / 'state'}",
        "libvirt_uri = test:///default",
        "domain_type = test",
        f"total_processors = {PROCESSORS}",
        "hs06_per_processor = 10",
        "mb_per_processor = 64",
        "total_memory_mb = 1024",
        "overload_per_processor = 1000",
        "cycle_seconds = 1",
        f"udp_port = {PORT}",
        f"udp_timeout_seconds = {UDP_TIMEOUT:g}",
        f"space_key_file = {key_file}",
        "version_logger = 0",
        "",
        "[machinetype x]",
        "target_share = 1",
        "machine_model = vm-raw",
        f"kernel_image = {kernel}",
        "max_wallclock_seconds = 86400",
        "",
    ]))
    return config


_REJECT = re.compile(r"responder: (\d+) datagrams? rejected as (\w+) \(no reply\)"
                     r"(?: over [\d.]+ s)?, from (.*?); e\.g\. (.*)$")


def logged_rejects(log: Path) -> Tuple[Counter, Dict[str, Counter], Dict[str, str]]:
    """(count per reason, per reason the count per sender, an example line per reason)."""
    counts: Counter = Counter()
    senders: Dict[str, Counter] = {}
    examples: Dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _REJECT.search(line)
        if match is None:
            continue
        count, reason = int(match.group(1)), match.group(2)
        counts[reason] += count
        examples.setdefault(reason, line)
        for part in match.group(3).split(", "):
            peer, _, n = part.rpartition(" x")
            senders.setdefault(reason, Counter())[peer] += int(n)
    return counts, senders, examples


def udp_receive_errors(host) -> int:
    """The kernel's count of datagrams dropped for a full socket buffer in ``host``."""
    lines = [line.split() for line in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1]))["RcvbufErrors"])


def test_a_daemon_survives_10000_fuzzed_datagrams_logs_every_reject_and_still_answers(
        lab, tmp_path):
    server, fuzzer, outsider = lab.hosts
    key_file = tmp_path / "space.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    config = write_config(tmp_path, key_file)
    log = tmp_path / "daemon.log"
    with open(log, "ab") as out:
        daemon = server.popen([VACFACTORY, "--config", str(config), "run", "--log-file", str(log)],
                              stdout=out, stderr=subprocess.STDOUT, text=False)
    status = tmp_path / "state" / "status.json"
    deadline = time.time() + 60
    while not (status.exists() and json.loads(status.read_text())["running_processors"]
               == PROCESSORS):
        assert daemon.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    drops_before = udp_receive_errors(server)

    began = time.time()
    result = fuzzer.run([sys.executable, "-m", MODULE, "fuzz", "--target", server.ip,
                         "--key-file", str(key_file), "--seed", "1"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fuzzed = json.loads(result.stdout.splitlines()[-1])
    result = outsider.run([sys.executable, "-m", MODULE, "outsider", "--target", server.ip,
                           "--key-file", str(key_file)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outside = json.loads(result.stdout.splitlines()[-1])
    sent = sum(fuzzed["expected"].values()) + outside["sent"]
    print(f"\nsent {sent} bad datagrams in {time.time() - began:.1f} s: "
          f"{dict(fuzzed['expected'])}, unknown_peer {outside['sent']}")
    assert sent >= 10_000
    assert fuzzed["replies"] == 0 and outside["replies"] == 0, "a bad datagram got a reply"
    assert fuzzed["legit_answered"], "the query later replayed was not valid to begin with"

    # the log: every reject, by reason and sender (summed lines come within 10 s)
    expected = Counter(fuzzed["expected"])
    expected["unknown_peer"] += outside["sent"]
    deadline = time.time() + 30
    while True:
        counts, senders, examples = logged_rejects(log)
        if sum(counts.values()) >= sent or time.time() > deadline:
            break
        time.sleep(0.5)
    dropped = udp_receive_errors(server) - drops_before
    print(f"logged rejects: {dict(counts)}; kernel drops: {dropped}")
    for reason, line in sorted(examples.items()):
        print(f"  {line.split(': ', 1)[-1][:200]}")
    assert sum(counts.values()) == sent - dropped
    for reason, number in expected.items():
        assert number - dropped <= counts[reason] <= number, (reason, counts[reason], number)
        peer = outsider.ip if reason == "unknown_peer" else fuzzer.ip
        assert senders[reason][peer] >= number - dropped, (reason, senders[reason])
        assert "e.g. " + peer in examples[reason]
    assert set(counts) == set(expected), f"unexpected reasons: {set(counts) - set(expected)}"

    # alive, no internal error, and a valid query is answered correctly within the deadline
    assert daemon.poll() is None, log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "responder failed" not in text
    result = fuzzer.run([sys.executable, "-m", MODULE, "query", "--target", server.ip,
                         "--key-file", str(key_file)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.splitlines()[-1])
    running = json.loads(status.read_text())["processors_by_machinetype"]
    assert answer["answered"], answer
    assert answer["elapsed"] < UDP_TIMEOUT, answer
    assert answer["machinetypes"] == {"x": running["x"]} and running["x"] == PROCESSORS


# -- the processes ----------------------------------------------------------------------------


class Sender:
    """Sends to the daemon at RATE datagrams a second, counting any reply that comes back."""

    def __init__(self, target: str) -> None:
        self.target = (target, PORT)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = 0
        self.replies = 0
        self._began = time.monotonic()

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.target)
        self.sent += 1
        ahead = self.sent / RATE - (time.monotonic() - self._began)
        if ahead > 0.01:
            time.sleep(ahead)
        self.drain()

    def drain(self) -> None:
        while True:
            try:
                self.sock.recvfrom(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self.replies += 1

    def finish(self, wait: float = 2.0) -> None:
        """Wait for late replies (there must be none)."""
        end = time.monotonic() + wait
        while time.monotonic() < end:
            self.drain()
            time.sleep(0.05)


def _query(kind, space: str, rng: random.Random, now: float, pad: int = 0) -> bytes:
    from vacfactory.space.protocol import encode_query

    return encode_query(kind, space, "%064x" % rng.getrandbits(256), now=now, pad_to=pad)


def _json_junk(rng: random.Random, depth: int = 0):
    choice = rng.randrange(7 if depth < 3 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False, 0, -1, 1e308, 3.5, 10 ** 20])
    if choice == 2:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(20)))
    if choice == 3:
        return rng.choice(["machines_query", "factory_query", "VacQuery 01.03", SPACE, ""])
    if choice == 4:
        return rng.randrange(-10 ** 9, 10 ** 9)
    if choice == 5:
        return [_json_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["message_type", "method", "vacquery_version", "space", "cookie", "time_sent", "x"]
    return {rng.choice(keys) if rng.random() < 0.7 else str(rng.random()):
            _json_junk(rng, depth + 1) for _ in range(rng.randrange(1, 8))}


def _broken_query(rng: random.Random, now: float) -> Optional[bytes]:
    """A query as a JSON object, broken in one place so that it decodes to nothing."""
    from vacfactory.errors import ProtocolError
    from vacfactory.space.protocol import QueryType, decode

    if rng.random() < 0.4:
        document = _json_junk(rng)
        if not isinstance(document, dict) or not document:
            document = {"junk": document}
    else:
        document = json.loads(_query(QueryType.MACHINETYPES, SPACE, rng, now))
        field = rng.choice(["space", "cookie", "vacquery_version", "message_type", "time_sent"])
        if rng.random() < 0.5:
            document.pop(field, None)
            if field == "message_type":
                document.pop("method", None)
        else:
            document[field] = _json_junk(rng, 3) if rng.random() < 0.5 else "x y " * 80
    body = json.dumps(document).encode()
    try:
        decode(body, peer="fuzzer")
    except ProtocolError:
        return body
    return None  # still a valid message: not junk


def _fuzz(args: argparse.Namespace) -> int:
    from vacfactory.space import auth
    from vacfactory.space.protocol import MAX_QUERY_BYTES, QueryType, render_replies
    from vacfactory.space.snapshot import FactorySnapshot, FactoryStatus, MachinetypeStatus

    key = Path(args.key_file).read_text().splitlines()[0].encode()
    rng = random.Random(args.seed)
    sender = Sender(args.target)
    expected: Counter = Counter()
    kinds = list(QueryType)

    def send(datagram: bytes, reason: str) -> None:
        sender.send(datagram)
        expected["oversize" if len(datagram) > MAX_QUERY_BYTES else reason] += 1

    # first the replays: one query answered (on its own socket), then the same bytes again
    legit = auth.sign(_query(QueryType.FACTORY, SPACE, rng, time.time()), key)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(UDP_TIMEOUT)
        sock.sendto(legit, (args.target, PORT))
        try:
            legit_answered = bool(sock.recvfrom(65535)[0])
        except socket.timeout:
            legit_answered = False
    for _ in range(PLAN["replay"]):
        send(legit, "replay")

    reply_bytes = [template.fill("%064x" % rng.getrandbits(256), time.time())
                   for template in render_replies(QueryType.MACHINETYPES, FactorySnapshot(
                       space=SPACE, factory=fqdn("f2"), factory_status=FactoryStatus(),
                       machinetypes=(MachinetypeStatus("x"), MachinetypeStatus("y"))))]
    plan = [name for name, count in PLAN.items() if name != "replay" for _ in range(count)]
    rng.shuffle(plan)
    for name in plan:
        now = time.time()
        if name == "junk":
            data = rng.randbytes(rng.randrange(MAX_QUERY_BYTES + 1))
            send(data, "unsigned" if auth.split(data)[1] is None else "bad_signature")
        elif name == "garbled":
            data = bytearray(auth.sign(_query(rng.choice(kinds), SPACE, rng, now), key))
            position = rng.randrange(len(data))
            data[position] = (data[position] + rng.randrange(1, 256)) % 256
            data = bytes(data)
            send(data, "unsigned" if auth.split(data)[1] is None else "bad_signature")
        elif name == "oversize":
            if rng.random() < 0.5:
                data = rng.randbytes(rng.randrange(MAX_QUERY_BYTES + 1, 9000))
            else:
                data = auth.sign(_query(rng.choice(kinds), SPACE, rng, now,
                                        pad=rng.randrange(MAX_QUERY_BYTES + 1, 4000)), key)
            send(data, "oversize")
        elif name == "signed_junk":
            body = None
            while body is None:
                body = _broken_query(rng, now)
            send(auth.sign(body, key), "malformed")
        elif name == "wrong_key":
            send(auth.sign(_query(rng.choice(kinds), SPACE, rng, now), b"another key"),
                 "bad_signature")
        elif name == "unsigned":
            send(_query(rng.choice(kinds), SPACE, rng, now), "unsigned")
        elif name == "wrong_space":
            space = rng.choice(["other.example.org", "vac01.example.ac.uk", SPACE + ".evil"])
            send(auth.sign(_query(rng.choice(kinds), space, rng, now), key), "wrong_space")
        elif name == "reply":
            send(auth.sign(rng.choice(reply_bytes), key), "not_query")
        elif name == "stale":
            skew = rng.choice([-1, 1]) * rng.uniform(120, 86400)
            send(auth.sign(_query(rng.choice(kinds), SPACE, rng, now + skew), key), "stale")
    sender.finish()
    print(json.dumps({"expected": dict(expected), "replies": sender.replies,
                      "legit_answered": legit_answered}))
    return 0


def _outsider(args: argparse.Namespace) -> int:
    from vacfactory.space import auth
    from vacfactory.space.protocol import QueryType

    key = Path(args.key_file).read_text().splitlines()[0].encode()
    rng = random.Random(2)
    sender = Sender(args.target)
    for _ in range(OUTSIDER):  # perfectly valid, signed and fresh: but not from a factory
        sender.send(auth.sign(_query(QueryType.FACTORY, SPACE, rng, time.time()), key))
    sender.finish()
    print(json.dumps({"sent": sender.sent, "replies": sender.replies}))
    return 0


def _valid_query(args: argparse.Namespace) -> int:
    from vacfactory.space.client import query_space
    from vacfactory.space.protocol import QueryType

    key = Path(args.key_file).read_text().splitlines()[0].encode()
    result = query_space([fqdn("f1")], QueryType.MACHINETYPES, SPACE, UDP_TIMEOUT, port=PORT,
                         space_key=key, local_name=fqdn("f2"),
                         resolver=lambda name: [args.target])
    replies: List = result.answered[fqdn("f1")].replies if result.answered else []
    print(json.dumps({
        "answered": bool(result.answered) and not result.incomplete,
        "elapsed": result.elapsed,
        "machinetypes": {r.status.machinetype: r.status.running_processors for r in replies},
    }))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("verb", choices=["fuzz", "outsider", "query"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return {"fuzz": _fuzz, "outsider": _outsider, "query": _valid_query}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
