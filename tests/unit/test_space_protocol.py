"""space.protocol: VacQuery 01.03 messages, decoded and encoded without any I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vacfactory.errors import ProtocolError
from vacfactory.space.protocol import (
    MAX_QUERY_BYTES,
    MAX_REPLY_BYTES,
    VACQUERY_VERSION_STRING,
    Query,
    QueryType,
    Reply,
    ReplyType,
    check_reply,
    cookie_for,
    decode,
    encode_query,
    make_salt,
    replies_for,
)
from vacfactory.space.snapshot import (
    FactorySnapshot,
    FactoryStatus,
    MachineStatus,
    MachinetypeStatus,
)

NOW = 1_700_000_000.0
SPACE = "vac01.example.ac.uk"
COOKIE = "c" * 64


def snapshot(**kw) -> FactorySnapshot:
    base = dict(
        space=SPACE,
        factory="f1.example.ac.uk",
        machines=(
            MachineStatus(machine="f1-00.example.ac.uk", state="Running", uuid="u-0",
                          machinetype="atlas", machine_model="vm", created_time=NOW - 100,
                          started_time=NOW - 90, heartbeat_time=NOW - 5, num_processors=2,
                          cpu_seconds=150, cpu_percentage=97.5, hs06=20.0,
                          fqan="/atlas/Role=production"),
            MachineStatus(machine="f1-01.example.ac.uk"),
        ),
        machinetypes=(
            MachinetypeStatus(machinetype="atlas", running_hs06=20.0, running_machines=1,
                              running_processors=2, num_before_fizzle=1,
                              shutdown_message="300 No more work", shutdown_time=NOW - 50,
                              shutdown_machine="f1-01.example.ac.uk", fqan="/atlas",
                              max_wallclock_seconds=172800, max_processors=8,
                              bytes_per_processor=2 * 1024 ** 3),
            MachinetypeStatus(machinetype="lhcb"),
        ),
        factory_status=FactoryStatus(running_processors=2, running_machines=1, running_hs06=20.0,
                                     max_processors=32, max_machines=32, max_hs06=320.0,
                                     load_average=1.5, kernel_version="6.1.0",
                                     os_issue="Debian GNU/Linux 12", mem_total_kb=1 << 24),
    )
    base.update(kw)
    return FactorySnapshot(**base)


def vac_query(**fields) -> bytes:
    """A query as Vac 03.01's client writes it (Python 2 json.dumps, default separators)."""
    message = {
        "vac_version": "Vac 03.01 vacd-factory",
        "vacquery_version": "VacQuery 01.03",
        "space": SPACE,
        "cookie": COOKIE,
        "message_type": "machinetypes_query",
    }
    message.update(fields)
    message = {k: v for k, v in message.items() if v is not None}
    return json.dumps(message).encode()


# -- queries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("query_type", list(QueryType))
def test_our_queries_decode_to_what_was_encoded(query_type):
    data = encode_query(query_type, SPACE, COOKIE, now=NOW + 0.25)
    query = decode(data, peer="10.0.0.1")
    assert query == Query(query_type, SPACE, COOKIE, VACQUERY_VERSION_STRING,
                          query.client_version, NOW + 0.25)
    assert query.client_version.startswith("vacfactory ")


def test_a_vac_client_query_is_understood():
    query = decode(vac_query(), peer="p")
    assert query.query_type is QueryType.MACHINETYPES
    assert query.space == SPACE and query.cookie == COOKIE and query.time_sent is None


@pytest.mark.parametrize("method,expected", [
    ("machines", QueryType.MACHINES),
    ("machinetypes", QueryType.MACHINETYPES),
    ("factories", QueryType.FACTORY),
])
def test_legacy_method_names_are_mapped(method, expected):
    assert decode(vac_query(message_type=None, method=method), peer="p").query_type is expected


def test_message_type_wins_over_legacy_method():
    data = vac_query(message_type="factory_query", method="machines")
    assert decode(data, peer="p").query_type is QueryType.FACTORY


def test_our_queries_carry_the_legacy_method_for_old_responders():
    for query_type, method in ((QueryType.MACHINES, "machines"),
                               (QueryType.MACHINETYPES, "machinetypes"),
                               (QueryType.FACTORY, "factories")):
        assert json.loads(encode_query(query_type, SPACE, COOKIE))["method"] == method


def test_unknown_fields_are_ignored():
    query = decode(vac_query(surprise={"nested": [1, 2]}, hmac="00" * 32), peer="p")
    assert query.space == SPACE


@pytest.mark.parametrize("data,why", [
    (b"", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"message_type": "machinetypes_query"}', "vacquery_version"),
    (b"[" * 6000 + b"]" * 6000, "too long"),
    (b"[" * 3000 + b"]" * 3000, "not JSON"),
    (b"x" * (10241), "too long"),
])
def test_malformed_datagrams_raise_protocol_error(data, why):
    with pytest.raises(ProtocolError) as caught:
        decode(data, peer="10.1.2.3")
    assert why in str(caught.value)
    assert caught.value.peer == "10.1.2.3"


@pytest.mark.parametrize("fields", [
    {"space": None},
    {"cookie": None},
    {"space": 7},
    {"space": ""},
    {"space": "two words"},
    {"cookie": ["c"]},
    {"cookie": True},
    {"message_type": None},
    {"message_type": "dance_query"},
    {"message_type": 3},
    {"vacquery_version": "VacQuery 02.00"},
    {"vacquery_version": "01.03"},
    {"vacquery_version": 1.03},
    {"time_sent": "now"},
    {"time_sent": True},
    {"vac_version": 12},
])
def test_queries_with_missing_or_wrong_fields_are_rejected(fields):
    with pytest.raises(ProtocolError):
        decode(vac_query(**fields), peer="p")


def test_nan_and_infinity_are_not_json():
    for constant in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        data = vac_query()[:-1] + b', "time_sent": ' + constant + b"}"
        with pytest.raises(ProtocolError):
            decode(data, peer="p")


def test_older_vacquery_versions_are_accepted():
    for version in ("VacQuery 01.00", "VacQuery 01.02", "VacQuery 0.3"):
        assert decode(vac_query(vacquery_version=version), peer="p").vacquery_version == version


def test_padding_makes_a_query_about_the_asked_size_but_never_above_vac_limit():
    small = encode_query(QueryType.MACHINES, SPACE, COOKIE, now=NOW)
    padded = encode_query(QueryType.MACHINES, SPACE, COOKIE, now=NOW, pad_to=900)
    huge = encode_query(QueryType.MACHINES, SPACE, COOKIE, now=NOW, pad_to=5000)
    assert len(small) < 300
    assert 880 <= len(padded) <= 900
    assert len(huge) <= MAX_QUERY_BYTES
    assert decode(padded, peer="p").cookie == COOKIE


# -- replies ---------------------------------------------------------------------------------

# The keys Vac 03.01 (shared.py, makeMachineResponse & co.) sends, deprecated ones included.
VAC_COMMON = {"message_type", "vac_version", "daemon_version", "vacquery_version", "cookie",
              "space", "factory", "time_sent", "site"}
VAC_MACHINE = VAC_COMMON | {
    "num_machines", "machine", "state", "uuid", "created_time", "started_time",
    "heartbeat_time", "num_cpus", "num_processors", "cpu_seconds", "cpu_percentage", "hs06",
    "machinetype", "shutdown_message", "shutdown_time", "machine_model"}
VAC_MACHINETYPE = VAC_COMMON | {
    "num_machinetypes", "machinetype", "running_hs06", "running_machines", "running_cpus",
    "running_processors", "num_before_fizzle", "shutdown_message", "shutdown_time",
    "shutdown_machine"}
VAC_FACTORY = VAC_COMMON | {
    "running_cpus", "running_processors", "running_machines", "running_hs06", "max_cpus",
    "max_processors", "max_machines", "max_hs06", "total_cpus", "total_machines", "total_hs06",
    "root_disk_avail_kb", "root_disk_avail_inodes", "vac_disk_avail_kb", "daemon_disk_avail_kb",
    "vac_disk_avail_inodes", "daemon_disk_avail_inodes", "load_average", "kernel_version",
    "os_issue", "boot_time", "factory_heartbeat_time", "responder_heartbeat_time",
    "mjf_heartbeat_time", "metadata_heartbeat_time", "swap_used_kb", "swap_free_kb",
    "mem_used_kb", "mem_total_kb"}


def reply_dicts(query_type: QueryType, snap: FactorySnapshot = None):
    query = Query(query_type, SPACE, COOKIE)
    return [json.loads(d) for d in replies_for(query, snap or snapshot(), NOW)]


def test_machine_status_has_every_vac_field_and_optional_fqan():
    running, free = reply_dicts(QueryType.MACHINES)
    assert set(running) == VAC_MACHINE | {"fqan"}
    assert set(free) == VAC_MACHINE
    assert running["num_machines"] == 2 and running["num_cpus"] == running["num_processors"] == 2
    assert running["created_time"] == int(NOW - 100) and isinstance(running["created_time"], int)
    assert free["uuid"] is None and free["machinetype"] is None and free["state"] == "Shut down"
    # Vac's empty slot: 0 processors, 0.0 HS06 (it was 1 and 1.0 here: issue 12 item 9)
    assert free["num_processors"] == free["num_cpus"] == 0 and free["hs06"] == 0.0


def test_machine_status_sends_the_model_and_adds_lifetime_efficiency_in_a_new_field():
    snap = snapshot()
    running = replace(snap.machines[0], machine_model="cernvm3", cpu_percentage=795.5,
                      cpu_efficiency=0.93)
    (reply,) = reply_dicts(QueryType.MACHINES, replace(snap, machines=(running,)))
    assert reply["machine_model"] == "cernvm3"
    assert reply["cpu_percentage"] == 795.5  # Vac's meaning: recent, summed over processors
    assert reply["cpu_efficiency"] == 0.93  # ours, in a field Vac does not have
    decoded = decode(json.dumps(reply).encode(), peer="p").status
    assert (decoded.machine_model, decoded.cpu_efficiency) == ("cernvm3", 0.93)


LONG = "x" * 3000


@pytest.mark.parametrize("query_type,snap_change", [
    (QueryType.FACTORY, lambda s: replace(s, factory_status=replace(
        s.factory_status, os_issue="AlmaLinux release 9.3 " + LONG, kernel_version="5." + LONG))),
    (QueryType.MACHINES, lambda s: replace(s, machines=tuple(
        replace(m, shutdown_message="300 " + LONG + "\u00e9\"") for m in s.machines))),
    (QueryType.MACHINETYPES, lambda s: replace(s, machinetypes=tuple(
        replace(m, shutdown_message="300 " + "\"" * 2000, fqan="/" + LONG)
        for m in s.machinetypes))),
])
def test_every_reply_fits_the_1024_bytes_a_vac_client_reads(query_type, snap_change):
    """Vac's client reads a reply with a 1024-byte buffer: a longer one arrives cut, is not
    JSON and is lost. Long text is shortened (a message keeps its code); Vac's required
    fields stay."""
    snap = snap_change(snapshot())
    query = Query(query_type, SPACE, "c" * 64)
    datagrams = replies_for(query, snap, NOW)
    assert datagrams
    for datagram in datagrams:
        assert len(datagram) <= MAX_REPLY_BYTES
        reply = decode(datagram[:1024], peer="p")  # what a 1024-byte read gets: all of it
        fields = json.loads(datagram)
        vac_factories_reads = {"running_cpus", "total_cpus", "running_machines", "total_machines",
                               "load_average", "root_disk_avail_kb", "vac_disk_avail_kb",
                               "mem_used_kb", "mem_total_kb", "vac_version"}
        required = {"factory_status": VAC_COMMON | vac_factories_reads,
                    "machine_status": VAC_MACHINE, "machinetype_status": VAC_MACHINETYPE}
        assert required[fields["message_type"]] <= set(fields)
        if "shutdown_message" in fields and fields["shutdown_message"]:
            assert fields["shutdown_message"].startswith("300")  # the code survives
        assert reply.cookie == "c" * 64


def test_a_reply_that_fits_is_sent_unchanged_with_every_deprecated_duplicate():
    for query_type in QueryType:
        for datagram in replies_for(Query(query_type, SPACE, COOKIE), snapshot(), NOW):
            fields = json.loads(datagram)
            if query_type is QueryType.FACTORY:
                assert set(fields) == VAC_FACTORY


def test_machinetype_status_has_every_vac_field_and_the_optional_ones_when_set():
    atlas, lhcb = reply_dicts(QueryType.MACHINETYPES)
    optional = {"fqan", "max_wallclock_seconds", "max_processors", "bytes_per_processor"}
    assert set(atlas) == VAC_MACHINETYPE | optional
    assert set(lhcb) == VAC_MACHINETYPE
    assert atlas["num_machinetypes"] == 2
    assert atlas["running_cpus"] == atlas["running_processors"] == 2
    assert isinstance(atlas["running_hs06"], float)
    assert atlas["shutdown_message"] == "300 No more work"
    assert lhcb["shutdown_message"] is None and lhcb["shutdown_time"] is None


def test_factory_status_has_every_vac_field_with_deprecated_duplicates():
    (factory,) = reply_dicts(QueryType.FACTORY)
    assert set(factory) == VAC_FACTORY
    assert factory["total_cpus"] == factory["max_cpus"] == factory["max_processors"] == 32
    assert factory["vac_disk_avail_kb"] == factory["daemon_disk_avail_kb"]
    assert factory["vac_version"] == factory["daemon_version"]


def test_every_reply_echoes_the_cookie_and_names_space_factory_and_site():
    for query_type in QueryType:
        for reply in reply_dicts(query_type):
            assert reply["cookie"] == COOKIE
            assert reply["space"] == SPACE and reply["factory"] == "f1.example.ac.uk"
            assert reply["site"] == "example.ac.uk"  # Vac: the space without its first label
            assert reply["time_sent"] == int(NOW)
            assert reply["vacquery_version"] == "VacQuery 01.03"


def test_site_is_gocdb_sitename_when_configured():
    (reply,) = reply_dicts(QueryType.FACTORY, snapshot(site="UKI-NORTHGRID-MAN-HEP"))
    assert reply["site"] == "UKI-NORTHGRID-MAN-HEP"


def test_a_query_for_another_space_gets_no_reply():
    assert replies_for(Query(QueryType.FACTORY, "other.space", COOKIE), snapshot(), NOW) == []


def test_cookie_with_quotes_is_echoed_as_valid_json():
    cookie = 'a"b\\c'
    (data,) = replies_for(Query(QueryType.FACTORY, SPACE, cookie), snapshot(), NOW)
    assert decode(data, peer="p").cookie == cookie


@pytest.mark.parametrize("query_type", list(QueryType))
def test_our_replies_decode_back_to_the_snapshot_records(query_type):
    snap = snapshot()
    decoded = [decode(d, peer="p") for d in replies_for(Query(query_type, SPACE, COOKIE), snap,
                                                         NOW)]
    assert all(isinstance(r, Reply) and r.cookie == COOKIE for r in decoded)
    if query_type is QueryType.MACHINETYPES:
        assert [r.status for r in decoded] == list(snap.machinetypes)
        assert [r.count for r in decoded] == [2, 2]
    elif query_type is QueryType.MACHINES:
        assert decoded[0].status.machine == "f1-00.example.ac.uk"
        assert decoded[0].status.cpu_percentage == 97.5
        assert decoded[1].status == MachineStatus(machine="f1-01.example.ac.uk", hs06=0.0)  # Vac: empty = 0, 0.0
    else:
        assert decoded[0].status == snap.factory_status
        assert decoded[0].key == "f1.example.ac.uk"


def test_legacy_reply_fields_of_older_vac_versions_are_mapped():
    old = {
        "method": "machinetype", "vac_version": "Vac 0.20", "vacquery_version": "VacQuery 0.3",
        "cookie": COOKIE, "space": SPACE, "factory": "old.example.ac.uk",
        "num_machinetypes": 1, "machinetype": "atlas", "total_hs06": 42.0,
        "total_machines": 3, "num_before_fizzle": 0, "shutdown_message": None,
        "shutdown_time": None, "shutdown_machine": None,
    }
    reply = decode(json.dumps(old).encode(), peer="p")
    assert reply.reply_type is ReplyType.MACHINETYPE
    assert reply.status.running_hs06 == 42.0 and reply.status.running_machines == 3
    assert reply.daemon_version == "Vac 0.20"


def test_vac_float_processor_counts_are_accepted_when_whole():
    data = reply_dicts(QueryType.MACHINETYPES)[0]
    data["running_processors"] = 3.0  # Vac adds float(allocated_cpu)
    assert decode(json.dumps(data).encode(), peer="p").status.running_processors == 3
    data["running_processors"] = 2.5
    with pytest.raises(ProtocolError):
        decode(json.dumps(data).encode(), peer="p")


@pytest.mark.parametrize("field,value", [
    ("num_machinetypes", None), ("num_machinetypes", 0), ("num_machinetypes", -1),
    ("machinetype", None), ("machinetype", ""), ("running_hs06", "12"),
    ("running_hs06", None), ("num_before_fizzle", True), ("shutdown_time", "yesterday"),
    ("factory", None), ("factory", 12), ("space", None), ("cookie", None),
])
def test_replies_with_wrong_required_fields_are_rejected(field, value):
    data = reply_dicts(QueryType.MACHINETYPES)[0]
    data[field] = value
    with pytest.raises(ProtocolError):
        decode(json.dumps(data).encode(), peer="p")


@pytest.mark.parametrize("field", ["num_machinetypes", "machinetype", "running_hs06",
                                   "num_before_fizzle", "shutdown_message", "shutdown_time",
                                   "shutdown_machine"])
def test_a_machinetype_status_lacking_what_vac_requires_is_rejected(field):
    data = reply_dicts(QueryType.MACHINETYPES)[0]
    del data[field]
    with pytest.raises(ProtocolError):
        decode(json.dumps(data).encode(), peer="p")


def test_factory_status_nulls_keep_defaults():
    data = reply_dicts(QueryType.FACTORY)[0]
    data["load_average"] = None
    del data["mem_total_kb"]
    status = decode(json.dumps(data).encode(), peer="p").status
    assert status.load_average == 0.0 and status.mem_total_kb == 0 and status.max_processors == 32


# -- cookies ---------------------------------------------------------------------------------


def test_cookie_is_vacs_sha256_of_salt_and_factory_name():
    salt = make_salt(b"\x01" * 32)
    assert salt == b"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    assert cookie_for(salt, "f1.example.ac.uk") == hashlib.sha256(
        salt + b"f1.example.ac.uk").hexdigest()


def test_check_reply_accepts_only_our_kind_space_factory_and_cookie():
    (data,) = replies_for(Query(QueryType.FACTORY, SPACE, COOKIE), snapshot(), NOW)
    reply = decode(data, peer="p")
    good = {"f1.example.ac.uk": COOKIE}
    check_reply(reply, reply_type=ReplyType.FACTORY, space=SPACE, cookies=good, peer="p")
    for kwargs in (
        dict(reply_type=ReplyType.MACHINETYPE, space=SPACE, cookies=good),
        dict(reply_type=ReplyType.FACTORY, space="other", cookies=good),
        dict(reply_type=ReplyType.FACTORY, space=SPACE, cookies={"f2.example.ac.uk": COOKIE}),
        dict(reply_type=ReplyType.FACTORY, space=SPACE, cookies={"f1.example.ac.uk": "d" * 64}),
    ):
        with pytest.raises(ProtocolError):
            check_reply(reply, peer="p", **kwargs)


# -- properties ------------------------------------------------------------------------------

_names = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z")
_times = st.one_of(st.none(), st.integers(0, 2 ** 40).map(float))


@settings(max_examples=200, deadline=None)
@given(
    name=_names,
    hs06=st.floats(0, 1e6, allow_nan=False),
    counts=st.tuples(*(st.integers(0, 10_000) for _ in range(3))),
    message=st.one_of(st.none(), st.text(max_size=100)),
    when=_times,
    cookie=st.from_regex(r"\A[\x21-\x7e]{1,80}\Z"),
)
def test_any_machinetype_status_round_trips(name, hs06, counts, message, when, cookie):
    status = MachinetypeStatus(machinetype=name, running_hs06=hs06, running_machines=counts[0],
                               running_processors=counts[1], num_before_fizzle=counts[2],
                               shutdown_message=message, shutdown_time=when)
    snap = snapshot(machinetypes=(status,))
    (data,) = replies_for(Query(QueryType.MACHINETYPES, SPACE, cookie), snap, NOW)
    reply = decode(data, peer="p")
    assert reply.status == status and reply.cookie == cookie and reply.count == 1
