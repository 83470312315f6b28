"""joboutputs is hostile input: a table of adversarial directories, each proving that the
reader raises nothing, reads and deletes nothing outside the VM's directory, uses bounded
memory, and leaves the disk within the caps after enforce_limits.

"Nothing outside is read" is checked with inotify on the places the traps point at (another
VM's joboutputs, a directory outside every VM, /etc/shadow): any open, read, write, create,
delete or move there during the operation fails the test.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import pytest

from vacfactory.core.outcomes import ShutdownMessage
from vacfactory.vmio import joboutputs as jo
from vacfactory.vmio.joboutputs import JobOutputsLimits

MiB = 1024 * 1024
LIMITS = JobOutputsLimits()  # 10 MiB per file, 100 MiB per VM, 256 files
SECRET = b"200 OUTSIDE-SECRET-never-read\n"
OTHER_VM_SECRET = b"200 OTHER-VM-SECRET-never-read\n"
MEMORY_BOUND = 4 * MiB


# --------------------------------------------------------------------------------------------
# inotify tripwire


class Tripwire:
    """Reports any access (open/read/write/create/delete/move) under the watched paths."""

    IN_ACCESS, IN_MODIFY, IN_OPEN = 0x1, 0x2, 0x20
    IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
    IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
    MASK = (IN_ACCESS | IN_MODIFY | IN_OPEN | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
            | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)

    def __init__(self, paths: List[str]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, "inotify_init1 failed"
        self.names: Dict[int, str] = {}
        for path in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.MASK)
            assert wd >= 0, f"cannot watch {path}"
            self.names[wd] = path

    def events(self) -> List[Tuple[str, int, str]]:
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode(
                    "utf-8", "replace")
                found.append((self.names.get(wd, "?"), mask, name))
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------------------------
# the world: two VMs and a directory outside both


@dataclass
class World:
    root: str
    jo: str            # VM A's joboutputs (the VM under test)
    other_jo: str      # VM B's joboutputs
    outside: str       # not any VM's

    @property
    def secret(self) -> str:
        return os.path.join(self.outside, "secret")

    def path(self, name: str) -> str:
        return os.path.join(self.jo, name)

    def write(self, name: str, data: bytes) -> None:
        with open(self.path(name), "wb") as f:
            f.write(data)


def _snapshot(top: str) -> Dict[str, Tuple[int, bytes]]:
    """Every entry under ``top`` with its type and (for files) content: must never change."""
    snap: Dict[str, Tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content = b""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = f.read()
            snap[p] = (stat.S_IFMT(st.st_mode), content)
    return snap


@pytest.fixture
def world():
    root = tempfile.mkdtemp(prefix="vfvmio-jo-")
    a = os.path.join(root, "machines", "vm-a", "joboutputs")
    b = os.path.join(root, "machines", "vm-b", "joboutputs")
    outside = os.path.join(root, "outside")
    for d in (a, b, os.path.join(outside, "sub")):
        os.makedirs(d)
    with open(os.path.join(b, "shutdown_message"), "wb") as f:
        f.write(OTHER_VM_SECRET)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(SECRET)
    with open(os.path.join(outside, "sub", "keep"), "wb") as f:
        f.write(b"keep me")
    yield World(root, a, b, outside)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            if os.path.isdir(os.path.join(root, name)) and not os.path.islink(
                    os.path.join(root, name)):
                jo.remove_tree(fd, name)
            else:
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# trap builders


def nested_dirs(w: World, depth: int) -> None:
    fd = os.open(w.jo, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)


def many_files(w: World, count: int) -> None:
    fd = os.open(w.jo, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"f{i:05d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def wide_tree(w: World, width: int) -> None:
    for i in range(width):
        d = w.path(f"logs{i}")
        os.mkdir(d)
        with open(os.path.join(d, "x"), "wb") as f:
            f.write(b"x")
        os.symlink(w.outside, os.path.join(d, "escape"))


def unix_socket(w: World, name: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(w.path(name))
    s.close()


def sparse(w: World, name: str, prefix: bytes, size: int) -> None:
    w.write(name, prefix)
    os.truncate(w.path(name), size)


def bytes_name(w: World, name: bytes, data: bytes = b"x") -> None:
    fd = os.open(os.fsencode(w.jo) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)


# --------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[World], None]
    message: Optional[ShutdownMessage] = None
    #: reasons (substrings) that must appear among the rejections
    reasons: FrozenSet[str] = frozenset()
    #: exact names left after enforce_limits (None: only the generic bounds are checked)
    remaining: Optional[FrozenSet[str]] = None
    limits: JobOutputsLimits = LIMITS
    heartbeat: Optional[str] = None  # "none" or "value": expected heartbeat_mtime("heartbeat")
    slow: bool = False
    extra: Dict[str, object] = field(default_factory=dict)


def msg(code: int, text: str) -> ShutdownMessage:
    return ShutdownMessage(code, text)


SM = "shutdown_message"
NONE: FrozenSet[str] = frozenset()

CASES = [
    Case("symlink to /etc/shadow", lambda w: os.symlink("/etc/shadow", w.path(SM)),
         None, frozenset({"symlink"}), NONE),
    Case("symlink to another VM's shutdown_message",
         lambda w: os.symlink(os.path.join(w.other_jo, SM), w.path(SM)),
         None, frozenset({"symlink"}), NONE),
    Case("relative symlink climbing out with ../",
         lambda w: os.symlink("../../../outside/secret", w.path(SM)),
         None, frozenset({"symlink"}), NONE),
    Case("dangling symlink", lambda w: os.symlink("/nonexistent/vfvmio", w.path(SM)),
         None, frozenset({"symlink"}), NONE),
    Case("hard link to a file outside (nlink 2)", lambda w: os.link(w.secret, w.path(SM)),
         None, frozenset({"hard link"}), NONE),
    Case("two hard links inside the directory",
         lambda w: (w.write("a", b"200 a"), os.link(w.path("a"), w.path("b"))),
         None, frozenset({"hard link"}), None),
    Case("FIFO as shutdown_message (must not block)", lambda w: os.mkfifo(w.path(SM)),
         None, frozenset({"fifo"}), NONE),
    Case("character device (/dev/zero's numbers)",
         lambda w: os.mknod(w.path(SM), stat.S_IFCHR | 0o600, os.makedev(1, 5)),
         None, frozenset({"device"}), NONE),
    Case("block device node",
         lambda w: os.mknod(w.path(SM), stat.S_IFBLK | 0o600, os.makedev(7, 0)),
         None, frozenset({"device"}), NONE),
    Case("unix socket", lambda w: unix_socket(w, "sock"), None, frozenset({"socket"}), NONE),
    Case("directory named shutdown_message",
         lambda w: (os.mkdir(w.path(SM)), open(os.path.join(w.path(SM), "x"), "wb").close()),
         None, frozenset({"directory"}), NONE),
    Case("10 GB sparse shutdown_message", lambda w: sparse(w, SM, b"200 ok\n", 10 * 1024 ** 3),
         None, frozenset({"file too big"}), NONE, slow=True),
    Case("5 MiB sparse file under the cap, valid first line",
         lambda w: sparse(w, SM, b"200 sparse but fine\n", 5 * MiB),
         msg(200, "sparse but fine"), NONE, frozenset({SM})),
    Case("11 MiB log next to a valid message",
         lambda w: (w.write(SM, b"200 ok"), w.write("big.log", b"x" * (11 * MiB))),
         msg(200, "ok"), frozenset({"file too big"}), frozenset({SM})),
    Case("binary garbage", lambda w: w.write(SM, bytes(range(255, -1, -1)) * 16),
         None, NONE, frozenset({SM})),
    Case("NUL bytes inside the text", lambda w: w.write(SM, b"200 ok\x00\x00evil"),
         msg(200, "ok??evil"), NONE, frozenset({SM})),
    Case("only NUL bytes", lambda w: w.write(SM, b"\x00" * 4096), None, NONE, frozenset({SM})),
    Case("invalid UTF-8", lambda w: w.write(SM, b"300 bad \xff\xfe end"),
         msg(300, "bad ?? end"), NONE, frozenset({SM})),
    Case("10 MB single line", lambda w: w.write(SM, b"200 " + b"a" * (10 * 1000 * 1000)),
         msg(200, "a" * 200), NONE, frozenset({SM})),
    Case("CRLF line ending", lambda w: w.write(SM, b"200 Success\r\nsecond line\r\n"),
         msg(200, "Success"), NONE, frozenset({SM})),
    Case("code 099 (below range)", lambda w: w.write(SM, b"099 too low"), None, NONE,
         frozenset({SM})),
    Case("code 800 (read, as Vac reads 100-999)", lambda w: w.write(SM, b"800 too high"),
         msg(800, "too high"), NONE, frozenset({SM})),
    Case("code 1000 (four digits)", lambda w: w.write(SM, b"1000 four digits"), None, NONE,
         frozenset({SM})),
    Case("leading spaces", lambda w: w.write(SM, b"   500 Problem with environment"),
         msg(500, "Problem with environment"), NONE, frozenset({SM})),
    Case("no code at all", lambda w: w.write(SM, b"Success"), None, NONE, frozenset({SM})),
    Case("empty file", lambda w: w.write(SM, b""), None, NONE, frozenset({SM})),
    Case("ANSI escape before the code", lambda w: w.write(SM, b"\x1b[31m200 red"), None, NONE,
         frozenset({SM})),
    Case("ANSI escape in the text", lambda w: w.write(SM, b"200 \x1b[2Jcleared\x07"),
         msg(200, "?[2Jcleared?"), NONE, frozenset({SM})),
    Case("Arabic-Indic digits", lambda w: w.write(SM, "٢٠٠ ok".encode()), None, NONE,
         frozenset({SM})),
    Case("full-width digits", lambda w: w.write(SM, "２００ ok".encode()), None, NONE,
         frozenset({SM})),
    Case("permission 000", lambda w: (w.write(SM, b"200 locked"), os.chmod(w.path(SM), 0)),
         msg(200, "locked") if os.geteuid() == 0 else None, NONE, frozenset({SM})),
    Case("names containing ..", lambda w: (w.write("..evil", b"x"), w.write("a..b", b"x")),
         None, frozenset({"bad name"}), NONE),
    Case("name with a newline", lambda w: w.write("bad\nname", b"x"), None,
         frozenset({"bad name"}), NONE),
    Case("names with control characters",
         lambda w: (w.write("bad\x1b[31m", b"x"), w.write("del\x7f", b"x"),
                    w.write("tab\tname", b"x")),
         None, frozenset({"bad name"}), NONE),
    Case("name that is not UTF-8", lambda w: bytes_name(w, b"\xff\xfe-evil"), None,
         frozenset({"bad name"}), NONE),
    Case("hidden and dash names, our temp prefix",
         lambda w: (w.write(".hidden", b"x"), w.write("-rf", b"x"), w.write(".vfput-1", b"x")),
         None, frozenset({"bad name"}), NONE),
    Case("name of 200 characters", lambda w: w.write("n" * 200, b"x"), None,
         frozenset({"bad name"}), NONE),
    Case("10,000 files", lambda w: (many_files(w, 10000), w.write(SM, b"200 kept")),
         msg(200, "kept"), frozenset({"too many files"}), None, slow=True),
    Case("directories nested 2,000 deep", lambda w: nested_dirs(w, 2000), None,
         frozenset({"directory"}), NONE, slow=True),
    Case("500 subdirectories each with an escaping symlink", lambda w: wide_tree(w, 500), None,
         frozenset({"directory"}), NONE, slow=True),
    Case("per-VM total exceeded",
         lambda w: [w.write(f"log{i}", b"x" * (400 * 1024)) for i in range(3)],
         None, frozenset({"over the per-VM total"}), None,
         limits=JobOutputsLimits(max_file_bytes=MiB, max_total_bytes=MiB, max_files=10)),
    Case("heartbeat as a symlink to a fresh file outside",
         lambda w: os.symlink(w.secret, w.path("heartbeat")), None, frozenset({"symlink"}),
         NONE, heartbeat="none"),
    Case("heartbeat dated a year ahead",
         lambda w: (w.write("heartbeat", b""),
                    os.utime(w.path("heartbeat"), (time.time() + 3e7,) * 2)),
         None, NONE, frozenset({"heartbeat"}), heartbeat="none"),
    Case("ordinary heartbeat and message (control)",
         lambda w: (w.write("heartbeat", b""), w.write(SM, b"200 Success")),
         msg(200, "Success"), NONE, frozenset({"heartbeat", SM}), heartbeat="value"),
]


def _ids(case: Case) -> str:
    return case.id


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_adversarial_joboutputs_stay_contained(world: World, case: Case) -> None:
    case.setup(world)
    watched = [world.outside, os.path.join(world.outside, "sub"), world.other_jo]
    if os.path.exists("/etc/shadow"):
        watched.append("/etc/shadow")
    before_outside = _snapshot(world.outside)
    before_other = _snapshot(world.other_jo)
    tripwire = Tripwire(watched)
    started = time.monotonic()
    peaks: List[int] = []
    message = _traced(peaks, jo.read_shutdown_message, world.jo, case.limits)
    heartbeat = _traced(peaks, jo.heartbeat_mtime, world.jo, "heartbeat")
    names_before = set(os.listdir(world.jo))
    scanned = _traced(peaks, jo.scan, world.jo, case.limits, protect=["heartbeat"])
    names_after_scan = set(os.listdir(world.jo))
    enforced = _traced(peaks, jo.enforce_limits, world.jo, case.limits, protect=["heartbeat"])
    peak = max(peaks)
    elapsed = time.monotonic() - started
    events = tripwire.events()
    tripwire.close()

    # the parse result is exactly what the case expects
    assert message == case.message
    # nothing outside the VM's directory was opened, read, written, created or deleted
    assert events == []
    assert _snapshot(world.outside) == before_outside
    assert _snapshot(world.other_jo) == before_other
    # bounded memory and time, even for the big cases
    assert peak < MEMORY_BOUND, f"peak {peak} bytes"
    assert elapsed < 120
    # scanning never changes the directory; both passes agree on what is wrong
    assert names_after_scan == names_before
    reasons = " | ".join(r for _, r in enforced.rejected)
    for wanted in case.reasons:
        assert wanted in reasons
    # (enforcing may reject less: removing one of two hard links makes the other a plain file)
    assert 0 < enforced.rejected_count <= scanned.rejected_count or not case.reasons
    assert len(enforced.rejected) <= jo.MAX_REPORTED
    # disk bounded: only valid regular files remain, within every cap
    remaining = _assert_within_caps(world.jo, case.limits)
    if case.remaining is not None:
        assert remaining == set(case.remaining)
    assert set(enforced.names) == remaining
    if case.heartbeat == "none":
        assert heartbeat is None
    elif case.heartbeat == "value":
        assert heartbeat == pytest.approx(os.stat(world.path("heartbeat")).st_mtime)


def _traced(peaks: List[int], fn: Callable, *args, **kwargs):
    """Call ``fn`` under tracemalloc and record its peak allocation."""
    tracemalloc.start()
    try:
        result = fn(*args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return result


def _assert_within_caps(directory: str, limits: JobOutputsLimits) -> set:
    names = set()
    total = 0
    for name in os.listdir(directory):
        st = os.lstat(os.path.join(directory, name))
        assert stat.S_ISREG(st.st_mode), f"{name!r} left behind"
        assert st.st_nlink == 1
        assert jo.valid_name(name), f"{name!r} left behind"
        size = max(st.st_size, st.st_blocks * 512)
        assert size <= limits.max_file_bytes
        total += size
        names.add(name)
    assert len(names) <= limits.max_files
    assert total <= limits.max_total_bytes
    return names


def test_table_has_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------
# behaviours beyond the table


def test_protected_names_win_the_file_count(world: World) -> None:
    many_files(world, 300)
    world.write("vm-heartbeat", b"")
    world.write(SM, b"200 done")
    report = jo.enforce_limits(world.jo, JobOutputsLimits(max_files=10), protect=["vm-heartbeat"])
    remaining = set(os.listdir(world.jo))
    assert {SM, "vm-heartbeat"} <= remaining
    assert len(remaining) == 10
    assert report.rejected_count == 292
    assert report.removed == 292


def test_symlinked_joboutputs_directory_is_left_alone(world: World) -> None:
    shutil.rmtree(world.jo)
    os.symlink(world.outside, world.jo)
    before = _snapshot(world.outside)
    assert jo.read_shutdown_message(world.jo, LIMITS) is None
    assert jo.heartbeat_mtime(world.jo, "secret") is None
    report = jo.enforce_limits(world.jo, LIMITS)
    assert report.files == ()
    assert report.rejected and report.rejected[0][0] == "."
    assert _snapshot(world.outside) == before
    assert os.path.islink(world.jo)


def test_missing_joboutputs_directory_is_empty(world: World) -> None:
    shutil.rmtree(world.jo)
    assert jo.read_shutdown_message(world.jo, LIMITS) is None
    assert jo.scan(world.jo, LIMITS) == jo.JobOutputsReport((), (), 0)


@pytest.mark.parametrize("name", ["../heartbeat", "/etc/passwd", "a/b", "..", "", "x\n"])
def test_heartbeat_name_from_config_is_validated(world: World, name: str) -> None:
    world.write("heartbeat", b"")
    assert jo.heartbeat_mtime(world.jo, name) is None


def test_heartbeat_slightly_in_the_future_is_accepted(world: World) -> None:
    world.write("heartbeat", b"")
    ahead = time.time() + 30
    os.utime(world.path("heartbeat"), (ahead, ahead))
    assert jo.heartbeat_mtime(world.jo, "heartbeat") == pytest.approx(ahead)


@pytest.mark.timeout(120)
def test_file_swapped_during_reads_never_leaks_outside(world: World) -> None:
    """A thread keeps replacing shutdown_message by a symlink to the secret, a FIFO, a hard
    link to another file of the VM and a regular file, while we read and enforce in a loop.

    (The racing thread plays the VM, so it gets the VM's powers: over NFS a VM cannot make a
    hard link to a file outside its export (cross-export LINK is EXDEV) and the HTTP server
    makes no links at all. A *static* hard link to an outside file is in the table above.)
    """
    stop = threading.Event()
    decoy = world.path("decoy-source")

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            tmp = world.path(f"t{i % 7}")
            i += 1
            try:
                kind = i % 4
                if kind == 0:
                    os.symlink(world.secret, tmp)
                elif kind == 1:
                    os.mkfifo(tmp)
                elif kind == 2:
                    if not os.path.exists(decoy):
                        with open(decoy, "wb") as f:
                            f.write(b"200 decoy")
                    os.link(decoy, tmp)
                else:  # O_EXCL|O_NOFOLLOW: never write through a leftover link
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
                    os.write(fd, b"200 regular")
                    os.close(fd)
                os.rename(tmp, world.path(SM))
            except OSError:
                pass

    before = _snapshot(world.outside)
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    seen = set()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            result = jo.read_shutdown_message(world.jo, LIMITS)
            seen.add(result)
            jo.enforce_limits(world.jo, LIMITS)
    finally:
        stop.set()
        thread.join()
    assert seen <= {None, msg(200, "regular"), msg(200, "decoy")}
    assert _snapshot(world.outside) == before


@pytest.mark.timeout(120)
def test_directory_swapped_for_symlink_during_removal_deletes_nothing_outside(world: World) -> None:
    """While enforce_limits removes a subdirectory tree, a thread keeps swapping that
    subdirectory for a symlink to a directory outside the VM."""
    for i in range(50):
        os.makedirs(world.path(f"tree/d{i}/e"))
        with open(world.path(f"tree/d{i}/e/f"), "wb") as f:
            f.write(b"x")
    stop = threading.Event()

    def swapper() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                os.rename(world.path("tree"), world.path(f"moved{n}"))
                os.symlink(world.outside, world.path("tree"))
                os.unlink(world.path("tree"))
                os.rename(world.path(f"moved{n}"), world.path("tree"))
            except OSError:
                pass

    before = _snapshot(world.outside)
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        for _ in range(20):
            jo.enforce_limits(world.jo, LIMITS)
    finally:
        stop.set()
        thread.join()
    jo.enforce_limits(world.jo, LIMITS)
    assert _snapshot(world.outside) == before
    _assert_within_caps(world.jo, LIMITS)
    assert os.listdir(world.jo) == []


def test_deep_tree_removal_holds_few_file_descriptors(world: World) -> None:
    nested_dirs(world, 1500)
    fds_before = len(os.listdir("/proc/self/fd"))
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        report = jo.enforce_limits(world.jo, LIMITS)
    finally:
        stop.set()
        thread.join()
    assert report.removed == 1501  # 1,500 directories and the leaf file
    assert os.listdir(world.jo) == []
    assert peak[0] - fds_before <= jo.MAX_DEPTH + 8


def test_rejections_are_logged_with_the_machine_directory(world: World, caplog) -> None:
    os.symlink("/etc/shadow", world.path(SM))
    with caplog.at_level("WARNING", logger="vacfactory.vmio.joboutputs"):
        jo.enforce_limits(world.jo, LIMITS)
    machine_dir = os.path.dirname(world.jo)
    assert any(r.getMessage().startswith(machine_dir) and "symlink" in r.getMessage()
               for r in caplog.records)


def test_rejection_logging_is_bounded(world: World, caplog) -> None:
    for i in range(200):
        world.write(f".h{i}", b"")
    with caplog.at_level("WARNING", logger="vacfactory.vmio.joboutputs"):
        report = jo.enforce_limits(world.jo, LIMITS)
    assert report.rejected_count == 200
    assert len(caplog.records) == jo.MAX_LOGGED + 1  # the detailed ones and one summary


@pytest.mark.parametrize("name,ok", [
    ("shutdown_message", True), ("heartbeat", True), ("job.log", True), ("a-b_c.d+e=f@g,h", True),
    ("9lives", True), ("_x", True), ("", False), (".", False), ("..", False), ("a/b", False),
    ("a..b", False), ("-x", False), (".x", False), ("é", False), ("a b", False),
    ("x" * 128, True), ("x" * 129, False), ("a\x00", False),
])
def test_valid_name_rules(name: str, ok: bool) -> None:
    assert jo.valid_name(name) is ok


def test_usage_counts_entries_and_bytes_with_a_bound(world: World) -> None:
    world.write("a", b"x" * 5000)
    world.write("b", b"y" * 10)
    os.symlink("/etc/shadow", world.path("c"))
    fd = jo.open_directory(world.jo)
    try:
        usage = jo.usage_fd(fd, "b", 100)
        bounded = jo.usage_fd(fd, "none", 1)
    finally:
        os.close(fd)
    assert usage.entries == 2
    assert usage.total_bytes >= 5000
    assert usage.complete
    assert not bounded.complete


def test_tripwire_sees_a_read_outside(world: World) -> None:
    """The containment proof is only as good as its detector: a plain read must trip it."""
    tripwire = Tripwire([world.outside])
    with open(world.secret, "rb") as f:
        f.read()
    events = tripwire.events()
    tripwire.close()
    assert any(mask & Tripwire.IN_OPEN for _, mask, _ in events)
    assert any(mask & Tripwire.IN_ACCESS for _, mask, _ in events)
