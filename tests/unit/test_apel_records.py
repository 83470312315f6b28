"""core.apel: record text exactly as APEL parses it, and the APEL server's rules."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from tests.unit.test_apel_support import NOW, UUID, make_usage
from vacfactory.core import apel
from vacfactory.core.apel import (
    CLOUD,
    JOB,
    SYNC,
    FieldInvalid,
    RecordIdentity,
    VMUsage,
    cloud_message,
    dn_from_space,
    format_service_level,
    job_fields,
    job_message,
    parse_message,
    placeholder_site,
    sync_message,
    validate_fields,
    validate_message,
)
from vacfactory.errors import RecordInvalid

IDENTITY = RecordIdentity(
    site="UKI-NORTHGRID-MAN-HEP",
    space="vac01.tier2.hep.manchester.ac.uk",
    factory="factory07.tier2.hep.manchester.ac.uk",
)

EXPECTED = """APEL-individual-job-message: v0.3
Site: UKI-NORTHGRID-MAN-HEP
SubmitHost: vac01.tier2.hep.manchester.ac.uk/vacfactory-factory07.tier2.hep.manchester.ac.uk
LocalJobId: 5d0c1a3e-7f7b-4c55-9a0e-1f1b6ad7c2e4
LocalUserId: factory07.tier2.hep.manchester.ac.uk
Queue: lhcb-prod
GlobalUserName: /DC=uk/DC=ac/DC=manchester/DC=hep/DC=tier2/DC=vac01
FQAN: /lhcb/Role=NULL/Capability=NULL
WallDuration: 85600
CpuDuration: 81234
Processors: 8
NodeCount: 1
InfrastructureDescription: APEL-VACFACTORY
InfrastructureType: grid
StartTime: 1705413779
EndTime: 1705499379
MemoryReal: 16777216
MemoryVirtual: 16777216
ServiceLevelType: HEPSPEC
ServiceLevel: 10.5
%%
"""


def job_dict(**changes: str) -> dict:
    fields = dict(job_fields(make_usage(), IDENTITY))
    fields.update(changes)
    return fields


def test_job_record_is_vacs_template_field_for_field():
    assert job_message(make_usage(), IDENTITY, NOW) == EXPECTED


def test_job_record_omits_fqan_line_when_unset_and_still_validates():
    text = job_message(make_usage(accounting_fqan=None), IDENTITY, NOW)
    assert "FQAN" not in text
    assert text.count("\n%%\n") == 1 and text.endswith("%%\n")


def test_global_user_name_is_the_space_reversed_into_dcs():
    assert dn_from_space("vac01.example.com") == "/DC=com/DC=example/DC=vac01"
    assert placeholder_site("vac01.example.com") == "example.com"
    assert placeholder_site("localspace") == "localspace"


@pytest.mark.parametrize("value,text", [(10.5, "10.5"), (1.0, "1.0"), (12.1256, "12.126"), (7.125, "7.125"),
                                        (11.3333333, "11.333"), (20, "20.0")])
def test_service_level_has_at_most_three_decimals(value, text):
    assert format_service_level(value) == text


def test_service_level_is_per_processor_and_one_when_not_benchmarked():
    assert dict(job_fields(make_usage(hs06_per_processor=None), IDENTITY))["ServiceLevel"] == "1.0"
    assert dict(job_fields(make_usage(hs06_per_processor=13.25, processors=4), IDENTITY))["ServiceLevel"] == "13.25"


def test_memory_is_written_in_kilobytes():
    fields = dict(job_fields(make_usage(memory_mb=2048), IDENTITY))
    assert fields["MemoryReal"] == fields["MemoryVirtual"] == str(2048 * 1024)


def test_hepscore23_is_configurable_and_accepted():
    identity = replace(IDENTITY, benchmark_type="HEPscore23")
    text = job_message(make_usage(), identity, NOW)
    assert "ServiceLevelType: HEPscore23\n" in text


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"Site": ""}, "Site"),
        ({"LocalJobId": "null"}, "LocalJobId"),
        ({"WallDuration": "85600.5"}, "WallDuration"),
        ({"CpuDuration": "lots"}, "CpuDuration"),
        ({"Processors": "8.0"}, "Processors"),
        ({"EndTime": "1705413778"}, "EndTime"),              # before StartTime
        ({"EndTime": str(int(NOW) + 3 * 86400)}, "EndTime"),  # APEL's 2-day limit
        ({"EndTime": str(int(NOW) + 7200)}, "EndTime"),       # our clock-skew limit
        ({"StartTime": "yesterday"}, "StartTime"),
        ({"ServiceLevelType": "HS06"}, "ServiceLevelType"),
        ({"ServiceLevelType": "none"}, "ServiceLevelType"),
        ({"ServiceLevel": "0"}, "ServiceLevel"),
        ({"ServiceLevel": "nan"}, "ServiceLevel"),
        ({"ServiceLevel": "12345678.5"}, "ServiceLevel"),
        ({"Queue": "q" * 101}, "Queue"),
        ({"LocalJobId": "x" * 256}, "LocalJobId"),
        ({"InfrastructureType": "g" * 21}, "InfrastructureType"),
        ({"InfrastructureDescription": "d" * 101}, "InfrastructureDescription"),
        ({"Queue": "lhcb-pr\u00f6d"}, "Queue"),
        ({"Queue": "a%%b"}, "Queue"),
        ({"Queue": "two\nlines"}, "Queue"),
        ({"Queue": " padded"}, "Queue"),
        ({"FQAN": "lhcb"}, "FQAN"),
        ({"MemoryReal": "-1"}, "MemoryReal"),
        ({"Bogus": "1"}, "Bogus"),
    ],
)
def test_each_apel_rule_rejects_with_the_field_named(changes, field):
    with pytest.raises(FieldInvalid) as caught:
        validate_fields(JOB, job_dict(**changes), NOW, record=UUID)
    assert caught.value.field == field
    assert UUID in str(caught.value) and field in str(caught.value)


def test_mandatory_job_fields_are_the_apel_ones():
    for field in ("Site", "LocalJobId", "WallDuration", "CpuDuration", "StartTime", "EndTime"):
        fields = job_dict()
        del fields[field]
        with pytest.raises(FieldInvalid) as caught:
            validate_fields(JOB, fields, NOW)
        assert caught.value.field == field
    optional = job_dict()
    for field in ("SubmitHost", "Queue", "FQAN", "Processors", "MemoryReal"):
        del optional[field]
    validate_fields(JOB, optional, NOW)


def test_benchmark_type_is_case_insensitive_and_iso_datetimes_are_accepted():
    validate_fields(JOB, job_dict(ServiceLevelType="hepscore23", StartTime="2024-01-16T14:02:59Z"), NOW)
    validate_fields(JOB, job_dict(ServiceLevelType="si2k"), NOW)


def test_end_time_just_within_the_clock_tolerance_is_accepted():
    validate_fields(JOB, job_dict(EndTime=str(int(NOW) + 3000)), NOW)


def test_rendering_refuses_non_ascii_machinetype_before_anything_is_written():
    with pytest.raises(RecordInvalid):
        job_message(make_usage(machinetype="atlas-\u00e9"), IDENTITY, NOW)


def test_rendering_refuses_a_vm_that_ends_before_it_starts():
    with pytest.raises(FieldInvalid) as caught:
        job_message(make_usage(end_time=1705413000), IDENTITY, NOW)
    assert caught.value.field == "EndTime"


def test_sync_record_for_an_empty_month_is_valid():
    text = sync_message(IDENTITY.site, IDENTITY.submit_host, 0, 2024, 2, NOW)
    assert text == (
        "APEL-sync-message: v0.1\nSite: UKI-NORTHGRID-MAN-HEP\n"
        "SubmitHost: vac01.tier2.hep.manchester.ac.uk/vacfactory-factory07.tier2.hep.manchester.ac.uk\n"
        "NumberOfJobs: 0\nMonth: 2\nYear: 2024\n%%\n"
    )
    with pytest.raises(FieldInvalid):
        sync_message(IDENTITY.site, IDENTITY.submit_host, 1, 2024, 13, NOW)
    with pytest.raises(FieldInvalid):
        sync_message("", IDENTITY.submit_host, 1, 2024, 1, NOW)


def test_cloud_record_has_the_mandatory_fields_and_mb_memory():
    message = parse_message(cloud_message(make_usage(), IDENTITY, NOW))
    assert message.kind == CLOUD
    record = message.records[0]
    assert record["VMUUID"] == UUID and record["SiteName"] == IDENTITY.site
    assert record["Memory"] == "16384" and record["CpuCount"] == "8" and record["Status"] == "completed"
    assert "RecordCreateTime" not in record  # deterministic across retries
    with pytest.raises(FieldInvalid) as caught:
        validate_fields(CLOUD, {k: v for k, v in record.items() if k != "SiteName"}, NOW)
    assert caught.value.field == "SiteName"


def test_parse_round_trip_and_strictness():
    message = parse_message(EXPECTED)
    assert message.kind == JOB and message.header == apel.JOB_HEADER
    assert dict(message.records[0]) == dict(job_fields(make_usage(), IDENTITY))
    validate_message(message, NOW)
    for bad in (
        "APEL-summary-message: v0.2\nSite: x\n%%\n",   # unknown type
        EXPECTED.replace("%%\n", ""),                    # no separator
        EXPECTED.replace("NodeCount: 1", "NodeCount 1"),  # not Key: value
        EXPECTED.replace("NodeCount: 1", "NodeCount: 1\nNodeCount: 2"),
        EXPECTED.replace("lhcb-prod", "lhcb-pr\u00f6d"),
    ):
        with pytest.raises(RecordInvalid):
            parse_message(bad)
    assert parse_message(sync_message("S", "H", 3, 2024, 1, NOW)).kind == SYNC


def test_crlf_bodies_as_openssl_returns_them_still_parse():
    message = parse_message(EXPECTED.replace("\n", "\r\n"))
    assert message.records[0]["ServiceLevel"] == "10.5"


def test_months():
    assert apel.month_of(NOW) == "202401"
    assert apel.month_of(1704067199) == "202312"  # 2023-12-31T23:59:59Z
    assert apel.months_between("202311", "202402") == ["202311", "202312", "202401", "202402"]
    assert apel.months_between("202402", "202401") == []
    assert apel.month_start("202401") == 1704067200
    with pytest.raises(ValueError):
        apel.parse_month("202413")


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40).filter(
    lambda s: s.strip("-") == s)


@settings(max_examples=200, deadline=None)
@given(
    machinetype=_names,
    processors=st.integers(1, 512),
    start=st.integers(0, int(NOW) - 1),
    wall=st.integers(0, 10 ** 7),
    cpu=st.integers(0, 10 ** 9),
    memory=st.integers(1, 10 ** 7),
    hs06=st.one_of(st.none(), st.floats(0.001, 1000.0)),
    fqan=st.one_of(st.none(), _names.map(lambda n: f"/{n}/Role=NULL/Capability=NULL")),
)
def test_every_plausible_vm_renders_a_record_that_parses_back_identically(
    machinetype, processors, start, wall, cpu, memory, hs06, fqan
):
    usage = VMUsage(uuid=UUID, machinetype=machinetype, hostname="h", processors=processors, start_time=start,
                    end_time=min(start + wall, int(NOW)), cpu_seconds=cpu, memory_mb=memory,
                    hs06_per_processor=hs06, accounting_fqan=fqan)
    text = job_message(usage, IDENTITY, NOW)
    assert text.isascii()
    message = parse_message(text)
    assert dict(message.records[0]) == dict(job_fields(usage, IDENTITY))
    validate_message(message, NOW)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_crashes_on_garbage(text):
    try:
        message = parse_message(text)
    except RecordInvalid:
        return
    try:
        validate_message(message, NOW)
    except RecordInvalid:
        pass
