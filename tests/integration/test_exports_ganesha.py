"""NFS exporters.

The GaneshaExporter tests drive a real ganesha.nfsd bound to 127.0.0.1:20490 and check each
export three ways: the configuration file, ganesha's own log (reload confirmed, export list),
and over the wire with a minimal NFSv4.0 client (COMPOUND PUTROOTFH/LOOKUP/ACCESS/READ) whose
socket is bound to the VM's address (127.0.0.2, 127.0.0.3, ...), which proves per-client
access without mounting anything (this host has no NFS client).

The ExportfsExporter cannot run here (the kernel has no nfsd): its tests check the exact
argument lists it builds, through an injected runner.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

from tests.waiting import scaled
from vacfactory.errors import ExportError
from vacfactory.vmio.exports import (
    CommandResult,
    ExportfsExporter,
    ExportSpec,
    GaneshaExporter,
    NullExporter,
    parse_exportfs_list,
)

PORT = 20490
A_ADDR, B_ADDR, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.9"

# --------------------------------------------------------------------------------------------
# a minimal NFSv4.0 client (RFC 7530 COMPOUND over ONC RPC / TCP record marking)

NFS4_OK, NFS4ERR_NOENT, NFS4ERR_ACCESS, NFS4ERR_NOSPC, NFS4ERR_DQUOT = 0, 2, 13, 28, 69
OP_ACCESS, OP_GETATTR, OP_GETFH, OP_LOOKUP, OP_PUTROOTFH, OP_READ, OP_WRITE = 3, 9, 10, 15, 24, 25, 38
#: fattr4 numbers of the space attributes (RFC 7530 5.7)
FATTR4_SPACE_AVAIL, FATTR4_SPACE_FREE, FATTR4_SPACE_TOTAL = 42, 43, 44
ACCESS_READ, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_EXTEND = 0x1, 0x2, 0x4, 0x8


def _opaque(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def putrootfh() -> bytes:
    return struct.pack(">I", OP_PUTROOTFH)


def lookup(name: str) -> bytes:
    return struct.pack(">I", OP_LOOKUP) + _opaque(name.encode())


def access(mask: int) -> bytes:
    return struct.pack(">II", OP_ACCESS, mask)


def read(count: int) -> bytes:  # anonymous stateid: allowed for READ in NFSv4.0
    return struct.pack(">I", OP_READ) + b"\0" * 16 + struct.pack(">QI", 0, count)


def write(offset: int, data: bytes) -> bytes:  # anonymous stateid: allowed for WRITE in NFSv4.0
    return struct.pack(">I", OP_WRITE) + b"\0" * 16 + struct.pack(">QI", offset, 2) + _opaque(data)


def getattr_space() -> bytes:
    """GETATTR of space_avail, space_free and space_total (all in the second bitmap word)."""
    word = sum(1 << (n - 32) for n in (FATTR4_SPACE_AVAIL, FATTR4_SPACE_FREE, FATTR4_SPACE_TOTAL))
    return struct.pack(">IIII", OP_GETATTR, 2, 0, word)


@dataclass
class Compound:
    status: int
    results: List[Tuple[int, int, object]]


def nfs_compound(src: str, ops: Sequence[bytes], port: int = PORT) -> Compound:
    """One NFSv4.0 COMPOUND from ``src`` with AUTH_SYS uid 0; the per-op results."""
    xid = int.from_bytes(os.urandom(4), "big")
    cred = struct.pack(">I", 0) + _opaque(b"vfvmio") + struct.pack(">III", 0, 0, 0)
    call = struct.pack(">IIIIII", xid, 0, 2, 100003, 4, 1)  # CALL, RPC v2, NFS v4, COMPOUND
    call += struct.pack(">I", 1) + _opaque(cred) + struct.pack(">II", 0, 0)  # AUTH_SYS, no verf
    call += _opaque(b"") + struct.pack(">II", 0, len(ops)) + b"".join(ops)
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
        data = b""
        while True:
            header = _recv_exact(s, 4)
            (marker,) = struct.unpack(">I", header)
            data += _recv_exact(s, marker & 0x7FFFFFFF)
            if marker & 0x80000000:
                break
    return _parse_reply(data, xid)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("NFS server closed the connection")
        buf += chunk
    return buf


def _parse_reply(data: bytes, xid: int) -> Compound:
    pos = 0

    def u32() -> int:
        nonlocal pos
        (value,) = struct.unpack_from(">I", data, pos)
        pos += 4
        return value

    def opaque() -> bytes:
        nonlocal pos
        n = u32()
        value = data[pos:pos + n]
        pos += n + (-n % 4)
        return value

    assert u32() == xid
    assert u32() == 1 and u32() == 0  # REPLY, MSG_ACCEPTED
    u32()
    opaque()  # verifier
    assert u32() == 0  # SUCCESS
    status = u32()
    opaque()  # tag
    results: List[Tuple[int, int, object]] = []
    for _ in range(u32()):
        op, op_status = u32(), u32()
        value: object = None
        if op_status == NFS4_OK:
            if op == OP_ACCESS:
                value = (u32(), u32())  # supported, granted
            elif op == OP_READ:
                u32()  # eof
                value = opaque()
            elif op == OP_GETFH:
                value = opaque()
            elif op == OP_WRITE:
                value = u32()  # count written
                u32()
                pos += 8  # committed, verifier
            elif op == OP_GETATTR:
                for _ in range(u32()):
                    u32()  # the bitmap (we only ask for the space attributes)
                attrs = opaque()
                value = struct.unpack(f">{len(attrs) // 8}Q", attrs)  # avail, free, total
        results.append((op, op_status, value))
        if op_status != NFS4_OK:
            break
    return Compound(status, results)


def read_file(src: str, *path: str) -> Compound:
    return nfs_compound(src, [putrootfh()] + [lookup(p) for p in path] + [read(4096)])


def granted(src: str, *path: str) -> Optional[int]:
    reply = nfs_compound(src, [putrootfh()] + [lookup(p) for p in path] + [access(0x3F)])
    if reply.status != NFS4_OK:
        return None
    return reply.results[-1][2][1]  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Site:
    root: str
    exporter: GaneshaExporter

    def vm_dir(self, uuid: str, what: str) -> str:
        return os.path.join(self.root, "machines", uuid, what)

    def specs(self, uuid: str, client: str) -> List[ExportSpec]:
        return [
            ExportSpec(uuid, client, self.vm_dir(uuid, "machinefeatures"),
                       f"/{uuid}/machinefeatures", True),
            ExportSpec(uuid, client, self.vm_dir(uuid, "jobfeatures"), f"/{uuid}/jobfeatures", True),
            ExportSpec(uuid, client, self.vm_dir(uuid, "joboutputs"), f"/{uuid}/joboutputs", False),
        ]

    def new_exporter(self, **kwargs) -> GaneshaExporter:
        return GaneshaExporter(os.path.join(self.root, "ganesha.conf"),
                               os.path.join(self.root, "ganesha.pid"),
                               os.path.join(self.root, "ganesha.log"),
                               bind_address="127.0.0.1", port=PORT, **kwargs)

    def log(self) -> str:
        with open(os.path.join(self.root, "ganesha.log"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def config(self) -> str:
        with open(os.path.join(self.root, "ganesha.conf"), encoding="utf-8") as f:
            return f.read()


def _make_vm(root: str, uuid: str, cpus: str) -> None:
    for what in ("machinefeatures", "jobfeatures", "joboutputs"):
        os.makedirs(os.path.join(root, "machines", uuid, what), mode=0o755)
    with open(os.path.join(root, "machines", uuid, "machinefeatures", "total_cpu"), "w") as f:
        f.write(cpus)
    with open(os.path.join(root, "machines", uuid, "jobfeatures", "job_id"), "w") as f:
        f.write(uuid)


@pytest.fixture
def site() -> Iterator[Site]:
    assert shutil.which("ganesha.nfsd"), "nfs-ganesha (ganesha.nfsd + FSAL VFS) is required"
    root = tempfile.mkdtemp(prefix="vfvmio-ganesha-")
    os.chmod(root, 0o755)
    _make_vm(root, "vm-a", "4")
    _make_vm(root, "vm-b", "8")
    s = Site(root, None)  # type: ignore[arg-type]
    s.exporter = s.new_exporter()
    yield s
    pid = s.exporter.running_pid()
    s.exporter.stop_server()
    if pid is not None:
        assert s.exporter.running_pid() is None
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# GaneshaExporter with a real ganesha.nfsd


def test_two_vms_are_exported_each_to_its_own_address(site: Site) -> None:
    started = time.monotonic()
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))  # starts ganesha
    first = time.monotonic() - started
    started = time.monotonic()
    site.exporter.set_exports("vm-b", site.specs("vm-b", B_ADDR))  # SIGHUP reload
    add = time.monotonic() - started
    assert first < 5 and add < 1.0

    # the configuration: one client per export, nobody else, squashed identities
    conf = site.config()
    assert conf.count("EXPORT {") == 6
    assert len(re.findall(r"Clients = 127\.0\.0\.2; Access_Type = RO;", conf)) == 2
    assert len(re.findall(r"Clients = 127\.0\.0\.2; Access_Type = RW;", conf)) == 1
    assert len(re.findall(r"Clients = 127\.0\.0\.3; Access_Type = RW;", conf)) == 1
    assert conf.count("    Access_Type = None;") == 7  # 6 exports + EXPORT_DEFAULTS
    assert conf.count("Squash = All_Squash;") == 7  # 6 exports + EXPORT_DEFAULTS
    assert "Protocols = 4;" in conf and "Enable_NLM = false;" in conf
    assert "Graceless = true;" in conf

    # ganesha's log: reload confirmed, every export listed with its path
    log = site.log()
    assert "NFS SERVER INITIALIZED" in log
    assert "Reread exports complete" in log
    for uuid in ("vm-a", "vm-b"):
        assert f"pseudo (/{uuid}/joboutputs) with path ({site.vm_dir(uuid, 'joboutputs')})" in log

    # over the wire: each VM reads its own files
    reply = read_file(A_ADDR, "vm-a", "machinefeatures", "total_cpu")
    assert reply.status == NFS4_OK and reply.results[-1][2] == b"4"
    reply = read_file(B_ADDR, "vm-b", "machinefeatures", "total_cpu")
    assert reply.status == NFS4_OK and reply.results[-1][2] == b"8"
    # ... and never the other VM's, nor can a stranger
    assert read_file(A_ADDR, "vm-b", "machinefeatures", "total_cpu").status != NFS4_OK
    assert read_file(B_ADDR, "vm-a", "jobfeatures", "job_id").status != NFS4_OK
    assert read_file(STRANGER, "vm-a", "machinefeatures", "total_cpu").status != NFS4_OK
    # joboutputs is writable by its VM only; machinefeatures is read-only
    rw = granted(A_ADDR, "vm-a", "joboutputs")
    ro = granted(A_ADDR, "vm-a", "machinefeatures")
    assert rw is not None and rw & ACCESS_MODIFY and rw & ACCESS_EXTEND
    assert ro is not None and ro & ACCESS_READ and not ro & (ACCESS_MODIFY | ACCESS_EXTEND)
    assert granted(B_ADDR, "vm-a", "joboutputs") is None
    # the read-write root belongs to the squashed identity so the VM's root can write there
    st = os.stat(site.vm_dir("vm-a", "joboutputs"))
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_removal_takes_effect_on_sighup(site: Site) -> None:
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    site.exporter.set_exports("vm-b", site.specs("vm-b", B_ADDR))
    assert read_file(A_ADDR, "vm-a", "machinefeatures", "total_cpu").status == NFS4_OK
    pid = site.exporter.running_pid()

    started = time.monotonic()
    site.exporter.remove_exports("vm-a")
    remove = time.monotonic() - started
    assert remove < 1.0
    assert site.exporter.running_pid() == pid  # a reload, not a restart

    reply = read_file(A_ADDR, "vm-a", "machinefeatures", "total_cpu")
    assert reply.status == NFS4ERR_NOENT
    assert read_file(B_ADDR, "vm-b", "machinefeatures", "total_cpu").results[-1][2] == b"8"
    assert "vm-a" not in site.config()
    after = site.log().rsplit("Exports after update", 1)[1]
    assert "/vm-a/" not in after and "/vm-b/machinefeatures" in after


def test_export_ids_are_stable_and_never_reused_while_live(site: Site) -> None:
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    site.exporter.set_exports("vm-b", site.specs("vm-b", B_ADDR))
    ids_b = [i for _, i in site.exporter.exports["vm-b"]]
    site.exporter.set_exports("vm-b", site.specs("vm-b", B_ADDR))  # unchanged
    assert [i for _, i in site.exporter.exports["vm-b"]] == ids_b
    ids_a = {i for _, i in site.exporter.exports["vm-a"]}
    site.exporter.remove_exports("vm-a")
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    new_a = {i for _, i in site.exporter.exports["vm-a"]}
    assert not new_a & set(ids_b) and not new_a & ids_a
    assert read_file(A_ADDR, "vm-a", "jobfeatures", "job_id").results[-1][2] == b"vm-a"


def test_restarted_factory_reconciles_with_the_running_ganesha(site: Site) -> None:
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    site.exporter.set_exports("vm-b", site.specs("vm-b", B_ADDR))
    pid = site.exporter.running_pid()
    restarted = site.new_exporter()  # a new process reading the same files
    assert set(restarted.exports) == {"vm-a", "vm-b"}
    assert restarted.exports["vm-b"] == site.exporter.exports["vm-b"]
    restarted.reconcile({"vm-b": site.specs("vm-b", B_ADDR)})  # vm-a died while we were down
    assert restarted.running_pid() == pid
    assert set(restarted.exports) == {"vm-b"}
    assert read_file(A_ADDR, "vm-a", "machinefeatures", "total_cpu").status == NFS4ERR_NOENT
    assert read_file(B_ADDR, "vm-b", "machinefeatures", "total_cpu").results[-1][2] == b"8"


def test_dead_ganesha_is_restarted_with_the_current_exports(site: Site) -> None:
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    pid = site.exporter.running_pid()
    assert pid is not None
    os.kill(pid, 9)
    deadline = time.monotonic() + scaled(5)
    while site.exporter.running_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.exporter.running_pid() is None
    site.exporter.set_exports("vm-b", site.specs("vm-b", B_ADDR))
    assert site.exporter.running_pid() not in (None, pid)
    assert read_file(A_ADDR, "vm-a", "machinefeatures", "total_cpu").results[-1][2] == b"4"
    assert read_file(B_ADDR, "vm-b", "machinefeatures", "total_cpu").results[-1][2] == b"8"


def test_missing_export_path_raises_and_leaves_exports_alone(site: Site) -> None:
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    before = site.config()
    bad = [ExportSpec("vm-c", "127.0.0.4", os.path.join(site.root, "nope"), "/vm-c/x", True)]
    with pytest.raises(ExportError, match="not a directory"):
        site.exporter.set_exports("vm-c", bad)
    assert site.config() == before
    assert read_file(A_ADDR, "vm-a", "machinefeatures", "total_cpu").status == NFS4_OK


def test_duplicate_pseudo_path_is_refused(site: Site) -> None:
    site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    clash = [ExportSpec("vm-b", B_ADDR, site.vm_dir("vm-b", "joboutputs"), "/vm-a/joboutputs", False)]
    with pytest.raises(ExportError, match="already used"):
        site.exporter.set_exports("vm-b", clash)


def test_start_failure_is_reported_from_the_log(site: Site) -> None:
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", PORT))
    blocker.listen(1)
    try:
        with pytest.raises(ExportError, match="did not start"):
            site.exporter.set_exports("vm-a", site.specs("vm-a", A_ADDR))
    finally:
        blocker.close()
    assert site.exporter.running_pid() is None


def test_a_binary_that_fails_to_start_raises_export_error() -> None:
    """A bogus binary in place of ganesha: the start is refused with its output."""
    root = tempfile.mkdtemp(prefix="vfvmio-ganesha-")
    try:
        _make_vm(root, "vm-a", "1")
        exporter = GaneshaExporter(os.path.join(root, "g.conf"), os.path.join(root, "g.pid"),
                                   os.path.join(root, "g.log"), bind_address="127.0.0.1",
                                   port=PORT + 1, binary="/bin/false", start_timeout=1)
        spec = ExportSpec("vm-a", A_ADDR, os.path.join(root, "machines/vm-a/machinefeatures"),
                          "/vm-a/machinefeatures", True)
        with pytest.raises(ExportError):
            exporter.set_exports("vm-a", [spec])
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# ExportfsExporter: argument lists (no kernel nfsd on this machine)


class FakeRunner:
    def __init__(self, listing: str = "", fail: Optional[str] = None) -> None:
        self.calls: List[List[str]] = []
        self.listing = listing
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        if self.fail and self.fail in argv:
            return CommandResult(1, "", "exportfs: Failed to stat /x: No such file")
        if argv[1:] == ["-v"]:
            return CommandResult(0, self.listing, "")
        return CommandResult(0, "", "")


@pytest.fixture
def tree() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="vfvmio-exportfs-")
    _make_vm(root, "vm-a", "2")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_exportfs_builds_exact_argument_lists(tree: str) -> None:
    runner = FakeRunner()
    exporter = ExportfsExporter(runner=runner)
    mf = os.path.join(tree, "machines/vm-a/machinefeatures")
    out = os.path.join(tree, "machines/vm-a/joboutputs")
    exporter.set_exports("vm-a", [ExportSpec("vm-a", A_ADDR, mf, "/vm-a/machinefeatures", True),
                                  ExportSpec("vm-a", A_ADDR, out, "/vm-a/joboutputs", False)])
    squash = "sync,no_subtree_check,sec=sys,all_squash,anonuid=65534,anongid=65534"
    assert runner.calls == [
        ["exportfs", "-o", "ro," + squash, f"127.0.0.2:{mf}"],
        ["exportfs", "-o", "rw," + squash, f"127.0.0.2:{out}"],
    ]
    assert (os.stat(out).st_uid, os.stat(mf).st_uid) == (65534, 0)
    runner.calls.clear()
    exporter.remove_exports("vm-a")
    assert runner.calls == [["exportfs", "-u", f"127.0.0.2:{mf}"],
                            ["exportfs", "-u", f"127.0.0.2:{out}"]]
    runner.calls.clear()
    exporter.remove_exports("vm-a")
    assert runner.calls == []


def test_exportfs_failure_raises_export_error(tree: str) -> None:
    mf = os.path.join(tree, "machines/vm-a/machinefeatures")
    exporter = ExportfsExporter(binary="/usr/sbin/exportfs", runner=FakeRunner(fail="-o"))
    with pytest.raises(ExportError, match="Failed to stat"):
        exporter.set_exports("vm-a", [ExportSpec("vm-a", A_ADDR, mf, "/x", True)])


def test_exportfs_reconcile_drops_only_our_stale_exports(tree: str) -> None:
    machines = os.path.join(tree, "machines")
    mf = os.path.join(machines, "vm-a/machinefeatures")
    listing = (
        f"{machines}/vm-dead/joboutputs\n\t\t127.0.0.7(sync,wdelay,hide,rw,all_squash)\n"
        f"{mf}\t127.0.0.2(ro,all_squash)\n"
        "/srv/site-data  \t192.168.1.0/24(rw,root_squash)\n"
        f"{machines}/vm\\040space/x\t127.0.0.8(ro)\n"
    )
    runner = FakeRunner(listing)
    exporter = ExportfsExporter(managed_prefix=machines, runner=runner)
    exporter.reconcile({"vm-a": [ExportSpec("vm-a", A_ADDR, mf, "/vm-a/machinefeatures", True)]})
    unexports = [c for c in runner.calls if c[1] == "-u"]
    assert unexports == [["exportfs", "-u", f"127.0.0.7:{machines}/vm-dead/joboutputs"],
                         ["exportfs", "-u", f"127.0.0.8:{machines}/vm space/x"]]
    assert ["exportfs", "-o", "ro,sync,no_subtree_check,sec=sys,all_squash,anonuid=65534,"
            "anongid=65534", f"127.0.0.2:{mf}"] in runner.calls


def test_parse_exportfs_list_handles_wrapped_lines() -> None:
    text = "/a\t10.0.0.1(ro)\n/very/long/path/name\n\t\t10.0.0.2(rw)\n/b  <world>(ro)\n"
    assert parse_exportfs_list(text) == [("10.0.0.1", "/a"), ("10.0.0.2", "/very/long/path/name"),
                                         ("<world>", "/b")]


# --------------------------------------------------------------------------------------------
# the rest of the interface


def test_null_exporter_records_and_forgets() -> None:
    null = NullExporter()
    spec = ExportSpec("vm-a", A_ADDR, "/x", "/vm-a/x", True)
    null.set_exports("vm-a", [spec])
    assert null.exports == {"vm-a": (spec,)}
    null.reconcile({})
    assert null.exports == {}
    null.set_exports("vm-a", [spec])
    null.remove_exports("vm-a")
    assert null.exports == {}


@pytest.mark.parametrize("client,path,pseudo", [
    ("169.254.169.5/24", "/x", "/p"), ("host.example", "/x", "/p"), ("127.0.0.2", "x", "/p"),
    ("127.0.0.2", "/x;y", "/p"), ("127.0.0.2", '/x"', "/p"), ("127.0.0.2", "/a/../b", "/p"),
    ("127.0.0.2", "/x", "/"), ("127.0.0.2", "/x", "/p\n}"), ("127.0.0.2", "/x y", "/p"),
])
def test_export_spec_refuses_values_that_could_break_a_config(client: str, path: str,
                                                              pseudo: str) -> None:
    with pytest.raises(ExportError):
        ExportSpec("vm-a", client, path, pseudo, True)


def test_specs_must_belong_to_the_vm(site: Site) -> None:
    with pytest.raises(ExportError, match="belongs to"):
        site.exporter.set_exports("vm-a", site.specs("vm-b", B_ADDR))
    assert site.exporter.running_pid() is None
