"""vmio.syslogd: the VMs' syslog receiver, over real UDP sockets and real machine directories.

VM A sends from 127.0.0.2, VM B from 127.0.0.3 (all of 127/8 is local, so a client socket bound
to one of those addresses plays that VM); 127.0.0.9 is an address no VM has.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Dict, List

import pytest
from hypothesis import given, settings, strategies as st

from tests.waiting import poll
from vacfactory.state.machines import MachineStore
from vacfactory.state.records import VMRecord
from vacfactory.vmio.registry import VMEndpoint, VMRegistry
from vacfactory.vmio.syslogd import (
    SyslogLimits,
    SyslogReceiver,
    expire,
    format_forward,
    format_line,
    parse_hostport,
    parse_message,
    receiver_address,
    registry_resolver,
    syslog_files,
)

A_ADDR, B_ADDR, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.9"
NOW = 1705499379.25  # 2024-01-17T13:49:39.250Z


# --------------------------------------------------------------------------------------------
# fixtures


def make_machine(tmp_path, uuid: str, name: str, address: str) -> str:
    store = MachineStore(str(tmp_path / "state"))
    record = VMRecord(uuid=uuid, name=name, slot=0, factory="f.example.org", space="vac.example.org",
                      machinetype="alpha", machine_model="vm-raw", processors=1, memory_mb=2048,
                      created=NOW, shutdown_time=NOW + 86400, address=address)
    return store.prepare(record, {}, {}).path


@pytest.fixture
def vms(tmp_path) -> Dict[str, str]:
    """address -> machine directory of two VMs (the resolver's table; tests may change it)."""
    return {
        A_ADDR: make_machine(tmp_path, "aaaaaaaa-0000-4000-8000-000000000001", "f-00.example.org", A_ADDR),
        B_ADDR: make_machine(tmp_path, "bbbbbbbb-0000-4000-8000-000000000002", "f-01.example.org", B_ADDR),
    }


def messages_of(machine_dir: str) -> List[str]:
    path = os.path.join(machine_dir, "syslog", "messages")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


class VM:
    """A client socket bound to one loopback address: the source the receiver sees."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))

    def send(self, data: bytes, to) -> None:
        self.sock.sendto(data, to)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def direct(vms):
    """direct(limits) -> an unstarted receiver whose handle() tests call with their own clock."""
    made: List[SyslogReceiver] = []

    def build(limits: SyslogLimits = SyslogLimits()) -> SyslogReceiver:
        r = SyslogReceiver([("127.0.0.1", 0)], vms.get, limits)
        made.append(r)
        return r

    yield build
    for r in made:
        r.stop()  # closes the files handle() opened


@pytest.fixture
def receiver(vms):
    made: List[SyslogReceiver] = []

    def build(limits: SyslogLimits = SyslogLimits(), forward=None) -> SyslogReceiver:
        r = SyslogReceiver([("127.0.0.1", 0)], vms.get, limits, forward=forward)
        r.start()
        made.append(r)
        return r

    yield build
    for r in made:
        r.stop()


# --------------------------------------------------------------------------------------------
# parsing


def test_rfc3164_with_host_and_tag():
    m = parse_message(b"<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed on /dev/pts/8", NOW)
    assert (m.format, m.priority, m.hostname, m.app, m.procid) == ("rfc3164", "auth.crit", "mymachine", "su", "230")
    assert m.timestamp == "2023-10-11T22:14:15"  # October is after January: last year
    assert m.text == "'su root' failed on /dev/pts/8"


def test_rfc3164_without_host_and_with_an_rfc3339_time():
    m = parse_message(b"<13>Jan  5 01:02:03 sshd[7]: Accepted publickey", NOW)
    assert (m.hostname, m.app, m.procid, m.timestamp) == (None, "sshd", "7", "2024-01-05T01:02:03")
    m = parse_message(b"<30>2024-01-17T13:49:38.123+00:00 vm01 systemd[1]: Started.", NOW)
    assert (m.timestamp, m.hostname, m.app, m.text) == ("2024-01-17T13:49:38.123+00:00", "vm01", "systemd", "Started.")


def test_rfc5424_with_structured_data_and_bom():
    data = (b'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 '
            b'[exampleSDID@32473 iut="3" eventSource="App\\]lication"][x@1 a="b"] \xef\xbb\xbfAn event')
    m = parse_message(data, NOW)
    assert (m.format, m.priority, m.app, m.procid, m.msgid) == ("rfc5424", "local4.notice", "evntslog", None, "ID47")
    assert m.structured_data == '[exampleSDID@32473 iut="3" eventSource="App\\]lication"][x@1 a="b"]'
    assert m.text == "An event" and m.timestamp == "2003-10-11T22:14:15.003Z"


def test_rfc5424_nil_fields_and_no_message():
    m = parse_message(b"<14>1 - - - - - -", NOW)
    assert (m.format, m.timestamp, m.hostname, m.app, m.text) == ("rfc5424", None, None, None, "")


def test_no_or_bad_pri_keeps_everything_as_a_user_notice():
    for data in (b"hello world", b"<999>hello", b"<>x", b"<12"):
        m = parse_message(data, NOW)
        assert m.priority == "user.notice" and m.format == "raw" and m.text == data.decode()


def test_line_format_escapes_control_characters_and_terminal_sequences():
    m = parse_message(b"<11>Jan 17 13:49:38 host app: a\x1b[2Jb\nc\td\xff e\xe2\x80\xae", NOW)
    line = format_line(m, NOW)
    assert line == "2024-01-17T13:49:39.250Z user.err 2024-01-17T13:49:38 host app: a#033[2Jb#012c#011d\\xff e#u202e\n"


def test_oversize_datagram_is_cut_and_marked():
    m = parse_message(b"<13>" + b"x" * 20000, NOW, max_bytes=8192)
    assert m.truncated and len(m.text) == 8192 - 4
    assert format_line(m, NOW).endswith(" #truncated\n")


def test_forward_is_rfc5424_naming_the_vm_by_its_real_name():
    m = parse_message(b"<38>Jan 17 13:49:38 liar-claims-to-be-b sshd[9]: Failed password", NOW)
    out = format_forward(m, NOW, "f-00.example.org", A_ADDR).decode()
    assert out.startswith("<38>1 2024-01-17T13:49:39.250Z f-00.example.org sshd 9 - [origin ip=\"127.0.0.2\" ")
    assert out.endswith("] Failed password")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_to_one_safe_line(data):
    m = parse_message(data, NOW, max_bytes=512)
    line = format_line(m, NOW)
    assert line.endswith("\n") and line.count("\n") == 1
    body = line[:-1]
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f or 0x80 <= ord(c) < 0xa0 or c in "\u2028\u2029\u202e"
                   for c in body)
    fields = body.split(" ", 5)
    assert len(fields) == 6 and fields[4].endswith(":")
    format_forward(m, NOW, "h.example.org", A_ADDR)


# --------------------------------------------------------------------------------------------
# settings helpers


def test_hostport_and_where_the_receiver_binds():
    assert parse_hostport("169.254.169.254:514") == ("169.254.169.254", 514)
    assert parse_hostport("[::1]:514") == ("::1", 514)
    for bad in ("nohost", ":514", "h:0", "h:70000", "h:x"):
        with pytest.raises(ValueError):
            parse_hostport(bad)
    assert receiver_address("169.254.169.254:514") == ("169.254.169.254", 514)
    assert receiver_address("169.254.169.253:5140") == ("169.254.169.253", 5140)
    assert receiver_address("syslog.example.org:514") is None  # VMs log there directly
    assert receiver_address("") is None and receiver_address(None) is None


def _settings(extra: str):
    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import load_config_string

    text = ("[settings]\nvac_space = vac01.example.org\nfactory_name = f.example.org\ndomain_type = test\n"
            "state_dir = /tmp/unused-vacfactory-state\n" + extra)
    return load_config_string(text, HostFacts("f.example.org", 8, 16384)).settings


def test_options_defaults_and_port_rule():
    from vacfactory.errors import ConfigError

    s = _settings("")
    assert (s.syslog_server, s.syslog_forward, s.syslog_days) == ("169.254.169.254:514", None, 7.0)
    assert (s.syslog_max_bytes_per_vm, s.syslog_rate_per_vm, s.syslog_burst_per_vm) == (20971520, 50.0, 500)
    assert (s.keep_on_abnormal_end, s.keep_days, s.keep_max_overlays) == (False, 7.0, 8)
    assert _settings("syslog_server =\nsyslog_forward = 10.1.2.3:5514\n").syslog_server == ""
    assert receiver_address(_settings("syslog_server =\n").syslog_server) is None
    for bad in ("syslog_server = 169.254.169.254:70000", "syslog_forward = central", "syslog_server = a b:514"):
        with pytest.raises(ConfigError):
            _settings(bad + "\n")


def test_registry_resolver_maps_addresses_to_machine_directories(vms):
    registry = VMRegistry()
    path = vms[A_ADDR]
    registry.add(VMEndpoint(uuid=os.path.basename(path), name="f-00.example.org", address=A_ADDR, token="ab" * 16,
                            machinefeatures_dir=os.path.join(path, "machinefeatures"),
                            jobfeatures_dir=os.path.join(path, "jobfeatures"),
                            joboutputs_dir=os.path.join(path, "joboutputs"),
                            user_data_path=os.path.join(path, "user_data"), machinetype="alpha"))
    resolve = registry_resolver(registry)
    assert resolve(A_ADDR) == path and resolve(B_ADDR) is None
    registry.remove(os.path.basename(path))
    assert resolve(A_ADDR) is None


# --------------------------------------------------------------------------------------------
# the receiver over real sockets


def test_each_vm_files_under_its_own_directory_and_strangers_are_dropped(receiver, vms):
    r = receiver()
    to = r.addresses[0]
    a, b, stranger = VM(A_ADDR), VM(B_ADDR), VM(STRANGER)
    try:
        a.send(b"<30>Jan 17 13:49:38 f-01.example.org pilot[1]: I am B, honest", to)
        b.send(b"<30>1 2024-01-17T13:49:38Z f-01 pilot 2 - - from B", to)
        stranger.send(b"<30>Jan 17 13:49:38 x y: who am I", to)
        assert poll(lambda: r.stats.received == 3)
    finally:
        for vm in (a, b, stranger):
            vm.close()
    lines_a, lines_b = messages_of(vms[A_ADDR]), messages_of(vms[B_ADDR])
    year = time.gmtime().tm_year
    assert len(lines_a) == 1 and lines_a[0].endswith(f"daemon.info {year}-01-17T13:49:38 f-01.example.org "
                                                     "pilot[1]: I am B, honest")
    assert len(lines_b) == 1 and lines_b[0].endswith("pilot[2]: from B")
    stats = r.stats
    assert (stats.filed, stats.dropped_unknown) == (2, 1)
    assert not any("who am I" in line for line in lines_a + lines_b)
    st_dir = os.stat(os.path.join(vms[A_ADDR], "syslog"))
    assert oct(st_dir.st_mode & 0o777) == "0o750"
    assert oct(os.stat(os.path.join(vms[A_ADDR], "syslog", "messages")).st_mode & 0o777) == "0o640"


def test_a_flooding_vm_cannot_starve_another(receiver, vms):
    limits = SyslogLimits(rate_per_second=50, burst=100)
    r = receiver(limits)
    to = r.addresses[0]
    a, b = VM(A_ADDR), VM(B_ADDR)
    sent_a = sent_b = 0
    began = time.monotonic()
    try:
        for round_ in range(20):
            # A floods at full speed; B stays within its own allowance (4 a round, 80 < burst):
            # with one budget shared by all VMs, A would have used it all up
            for i in range(500):
                a.send(b"<13>flood %d" % sent_a, to)
                sent_a += 1
                if i % 125 == 0:
                    b.send(b"<13>b-message %d" % sent_b, to)
                    sent_b += 1
            # pace the test, not the VM: no datagram may be lost in the kernel, so that every
            # drop is the receiver's decision
            total = sent_a + sent_b
            assert poll(lambda: r.stats.received == total), (r.stats, total)
    finally:
        a.close()
        b.close()
    elapsed = time.monotonic() - began
    lines_b = messages_of(vms[B_ADDR])
    assert [line.rsplit(" ", 1)[1] for line in lines_b] == [str(i) for i in range(sent_b)]
    filed_a = [line for line in messages_of(vms[A_ADDR]) if ": flood " in line]
    assert limits.burst <= len(filed_a) <= limits.burst + limits.rate_per_second * elapsed + 1
    stats = r.stats
    assert stats.dropped_rate == sent_a - len(filed_a)
    assert stats.filed == len(filed_a) + sent_b and stats.dropped_unknown == 0


def test_dropped_datagrams_cost_little(vms, direct):
    r = direct(SyslogLimits(rate_per_second=1, burst=1))
    began = time.process_time()
    outcomes = [r.handle(b"<13>" + b"x" * 1000, A_ADDR, NOW) for _ in range(20000)]
    spent = time.process_time() - began
    assert outcomes.count("dropped_rate") == 19999
    assert spent < 1.0  # ~5 us each here; a receiver must shed a flood far faster than it files


def test_rate_drops_are_summarised_when_the_vm_is_back_under(vms, direct):
    r = direct(SyslogLimits(rate_per_second=1, burst=2))
    assert [r.handle(b"<13>m%d" % i, A_ADDR, NOW) for i in range(5)] == ["filed"] * 2 + ["dropped_rate"] * 3
    assert r.handle(b"<13>later", A_ADDR, NOW + 1.5) == "filed"
    lines = messages_of(vms[A_ADDR])
    assert lines[-2].endswith("vacfactory: 3 messages from this VM were dropped over the rate limit (1/s, burst 2)")
    assert " syslog.warning " in lines[-2] and lines[-1].endswith(": later")
    # a steady flood is summarised at most once a minute, with everything dropped meanwhile
    for second in range(2, 63):
        for _ in range(5):
            r.handle(b"<13>flood", A_ADDR, NOW + second)
    notes = [line for line in messages_of(vms[A_ADDR]) if "dropped over the rate limit" in line]
    assert len(notes) == 2 and " 240 messages " in notes[1]  # 60 s x 4 dropped a second


def test_per_vm_byte_cap_stops_filing_with_a_last_line(vms, direct):
    limits = SyslogLimits(max_bytes_per_vm=4096, rate_per_second=1e6, burst=10 ** 6)
    r = direct(limits)
    outcomes = [r.handle(b"<13>app: " + b"y" * 200, A_ADDR, NOW) for _ in range(40)]
    assert outcomes.count("dropped_size") > 0 and outcomes[0] == "filed"
    assert r.stats.dropped_size == outcomes.count("dropped_size")
    path = os.path.join(vms[A_ADDR], "syslog", "messages")
    assert os.path.getsize(path) <= 4096
    assert messages_of(vms[A_ADDR])[-1].endswith("reached 4096 bytes; further messages are not filed")
    assert r.handle(b"<13>still B", B_ADDR, NOW) == "filed"  # B has its own cap
    # a restarted receiver counts what is already on disk
    again = direct(limits)
    assert again.handle(b"<13>app: more", A_ADDR, NOW) == "dropped_size"


def test_never_writes_through_a_symlink_or_into_a_fifo(vms, tmp_path, direct):
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    syslog_a = os.path.join(vms[A_ADDR], "syslog")
    os.mkdir(syslog_a)
    os.symlink(str(outside), os.path.join(syslog_a, "messages"))
    os.mkdir(os.path.join(vms[B_ADDR], "syslog"))
    os.mkfifo(os.path.join(vms[B_ADDR], "syslog", "messages"))
    r = direct()
    assert r.handle(b"<13>a", A_ADDR, NOW) == "filed"
    assert r.handle(b"<13>b", B_ADDR, NOW) == "filed"
    assert outside.read_text() == "precious\n"
    for address in (A_ADDR, B_ADDR):
        path = os.path.join(vms[address], "syslog", "messages")
        assert not os.path.islink(path) and os.path.isfile(path) and len(messages_of(vms[address])) == 1


def test_a_symlinked_syslog_directory_is_refused(vms, tmp_path, direct):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(str(elsewhere), os.path.join(vms[A_ADDR], "syslog"))
    r = direct()
    assert r.handle(b"<13>a", A_ADDR, NOW) == "dropped_error"
    assert os.listdir(str(elsewhere)) == [] and r.stats.dropped_error == 1


def test_a_reused_address_files_under_the_new_vm(vms, tmp_path, direct):
    r = direct(SyslogLimits(rate_per_second=1, burst=1))
    assert r.handle(b"<13>old vm", A_ADDR, NOW) == "filed"
    assert r.handle(b"<13>old vm again", A_ADDR, NOW) == "dropped_rate"
    new_dir = make_machine(tmp_path, "cccccccc-0000-4000-8000-000000000003", "f-00.example.org", A_ADDR)
    old_dir = vms[A_ADDR]
    vms[A_ADDR] = new_dir  # the slot's address now belongs to a new VM: a fresh bucket, a fresh file
    assert r.handle(b"<13>new vm", A_ADDR, NOW) == "filed"
    assert [line.split(": ", 1)[1] for line in messages_of(old_dir)] == ["old vm"]
    assert [line.split(": ", 1)[1] for line in messages_of(new_dir)] == ["new vm"]
    del vms[A_ADDR]  # cleaned: no longer registered
    assert r.handle(b"<13>late", A_ADDR, NOW) == "dropped_unknown"


def test_messages_rotate_at_a_new_utc_day(vms, direct):
    r = direct()
    today = time.time()
    assert r.handle(b"<13>day one", A_ADDR, today) == "filed"
    assert r.handle(b"<13>day two", A_ADDR, today + 86400) == "filed"
    files = syslog_files(vms[A_ADDR])
    day = time.strftime("%Y%m%d", time.gmtime(today))
    assert [f.name for f in files] == [f"messages-{day}", "messages"]
    with open(files[0].path) as f:
        assert f.read().endswith(": day one\n")
    assert [line.split(": ", 1)[1] for line in messages_of(vms[A_ADDR])] == ["day two"]


def test_forwarding_sends_rfc5424_within_the_rate_limit(vms):
    central = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    central.bind(("127.0.0.1", 0))
    central.settimeout(5)
    r = SyslogReceiver([("127.0.0.1", 0)], vms.get, SyslogLimits(rate_per_second=1, burst=1),
                       forward=central.getsockname())
    r.start()
    try:
        vm = VM(A_ADDR)
        vm.send(b"<38>Jan 17 13:49:38 pretend sshd[9]: Failed password for root", r.addresses[0])
        vm.send(b"<38>over the rate", r.addresses[0])
        data, _ = central.recvfrom(65535)
        assert poll(lambda: r.stats.received == 2)
        vm.close()
    finally:
        r.stop()
        central.settimeout(0.2)
    text = data.decode()
    assert text.startswith("<38>1 ") and " f-00.example.org sshd 9 - [origin ip=\"127.0.0.2\"" in text
    assert text.endswith("] Failed password for root")
    with pytest.raises(socket.timeout):
        central.recvfrom(65535)  # the message over the rate was not forwarded either
    central.close()
    assert (r.stats.forwarded, r.stats.dropped_rate) == (1, 1)


def test_stop_closes_the_socket(vms, direct):
    r = direct()
    r.start()
    address = r.addresses[0]
    r.stop()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(address)  # free again
    probe.close()


def test_start_fails_cleanly_on_an_address_the_host_does_not_have(vms):
    r = SyslogReceiver([("127.0.0.1", 0), ("192.0.2.1", 514)], vms.get)
    with pytest.raises(OSError):
        r.start()
    assert r.addresses == []


# --------------------------------------------------------------------------------------------
# retention


def test_expire_removes_only_files_older_than_the_retention(vms, direct):
    r = direct()
    now = time.time()
    r.handle(b"<13>one", A_ADDR, now - 9 * 86400)
    os.utime(os.path.join(vms[A_ADDR], "syslog", "messages"), (now - 9 * 86400,) * 2)
    r.handle(b"<13>two", A_ADDR, now)  # a new day: the old file rotates
    r.handle(b"<13>b", B_ADDR, now)
    r.stop()
    files = syslog_files(vms[A_ADDR])
    assert len(files) == 2
    old = files[0].path
    assert files[0].name == "messages-" + time.strftime("%Y%m%d", time.gmtime(now - 9 * 86400))
    assert expire(list(vms.values()), 0, now).files_removed == 0  # <= 0 keeps everything
    result = expire(list(vms.values()), 7, now)
    assert result.files_removed == 1 and result.bytes_removed > 0
    assert not os.path.exists(old) and len(messages_of(vms[A_ADDR])) == 1 and len(messages_of(vms[B_ADDR])) == 1
    os.utime(os.path.join(vms[B_ADDR], "syslog", "messages"), (now - 8 * 86400,) * 2)
    assert expire(list(vms.values()), 7, now).files_removed == 1 and messages_of(vms[B_ADDR]) == []


def test_expire_does_not_follow_a_symlinked_syslog_directory(vms, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "messages"
    victim.write_text("not ours\n")
    os.utime(str(victim), (1, 1))
    os.symlink(str(elsewhere), os.path.join(vms[A_ADDR], "syslog"))
    assert expire([vms[A_ADDR], "/nonexistent/dir"], 1, time.time()).files_removed == 0
    assert victim.exists()


# --------------------------------------------------------------------------------------------
# one address normalisation for the whole VM boundary (syslog and HTTP)


def test_a_dual_stack_source_is_filed_under_the_ipv4_address_the_registry_knows(direct, vms):
    from vacfactory.vmio.registry import normalise_address

    assert normalise_address("::ffff:127.0.0.2") == "127.0.0.2"
    assert normalise_address("fe80::1%eth0") == "fe80::1" and normalise_address("not an address") == "not an address"
    r = direct()
    assert r.handle(b"<13>hello from a dual-stack socket", "::ffff:" + A_ADDR, NOW) == "filed"
    assert messages_of(vms[A_ADDR])[-1].endswith("hello from a dual-stack socket")
