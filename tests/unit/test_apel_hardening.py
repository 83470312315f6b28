"""APEL input hardening (issue 13, item 6).

- ``gocdb_sitename`` is checked at load with APEL's rules for Site, so a value APEL would
  refuse (``%%``, non-ASCII, over 255 characters, a null word) is a located config error and
  not a refusal of every record at record time.
- Patterns that validate whole values match the whole value: ``re.match`` with ``^...$``
  also accepts a trailing newline (``$`` matches before it), so ``"x\\n"`` passed.
"""

from __future__ import annotations

import os

import pytest

from tests.unit.test_apel_support import NOW, UUID, make_usage
from vacfactory.accounting import archive, outgoing
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config
from vacfactory.core import apel
from vacfactory.errors import ConfigErrors, RecordInvalid

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)

# gocdb_sitename is on line 5
HEAD = """\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
state_dir = {state}
gocdb_sitename = {site}
[machinetype lhcb]
root_image = cernvm3.iso
target_share = 1
"""


def _load(tmp_path, site: str):
    main = tmp_path / "vacfactory.conf"
    main.write_text(HEAD.format(state=tmp_path / "state", site=site), encoding="utf-8")
    return str(main), load_config(ConfigSources.for_main_file(str(main)), host_facts=HOST)


@pytest.mark.parametrize("site,reason", [
    ("UKI%%SITE", "contains the record separator '%%'"),
    ("UKI-S\u00eeTE", "is not printable ASCII"),
    ("S" * 256, "longer than 255 characters"),
    ("none", "mandatory field missing or null"),
])
def test_a_gocdb_sitename_apel_would_refuse_is_a_located_load_error(tmp_path, site, reason):
    with pytest.raises(ConfigErrors) as caught:
        _load(tmp_path, site)
    main = str(tmp_path / "vacfactory.conf")
    messages = [str(e) for e in caught.value.errors]
    assert any(m.startswith(f"{main}:5: [settings] gocdb_sitename: ") and reason in m
               and "APEL refuses such a record" in m for m in messages), messages


def test_the_longest_gocdb_sitename_that_loads_makes_a_valid_record(tmp_path):
    site = "S" * 255
    _, config = _load(tmp_path, site)
    assert config.settings.gocdb_sitename == site
    identity = apel.RecordIdentity(site=site, space="vac01.example.com", factory="wn01.example.com")
    text = apel.job_message(make_usage(), identity, now=NOW)
    assert f"Site: {site}\n" in text
    apel.validate_message(apel.parse_message(text), now=NOW)


@pytest.mark.parametrize("value", ["x\n", "UKI\n", "\n"])
def test_a_trailing_newline_is_not_printable_ascii(value):
    with pytest.raises(apel.FieldInvalid, match="is not printable ASCII"):
        apel.validate_fields(apel.SYNC, {"Site": value, "NumberOfJobs": "0", "Month": "1",
                                         "Year": "2026"}, now=NOW)


def test_epoch_seconds_with_a_trailing_newline_are_not_a_datetime():
    assert apel.parse_datetime("StartTime", "1705499379") == 1705499379
    with pytest.raises(apel.FieldInvalid, match="neither epoch seconds"):
        apel.parse_datetime("StartTime", "1705499379\n")


def test_a_month_with_a_trailing_newline_is_not_a_month():
    assert apel.is_month("202401") and apel.parse_month("202401") == (2024, 1)
    assert not apel.is_month("202401\n")
    with pytest.raises(ValueError):
        apel.parse_month("202401\n")


def test_a_uuid_with_a_trailing_newline_is_not_an_archive_file_name():
    archive.check_uuid(UUID)
    with pytest.raises(RecordInvalid, match="not usable as a file name"):
        archive.check_uuid(UUID + "\n")


def test_queue_names_with_a_trailing_newline_are_not_elements(tmp_path):
    assert outgoing.is_element_name("65a7d7f3/0123456789abcd")
    assert not outgoing.is_element_name("65a7d7f3/0123456789abcd\n")
    # a directory and a file named like dirq's but with a newline are not counted
    queue = tmp_path / "queue"
    (queue / "65a7d7f3").mkdir(parents=True)
    (queue / "65a7d7f3" / "0123456789abcd").write_text("x")
    (queue / "65a7d7f3" / "0123456789abce\n").write_text("x")
    os.makedirs(queue / "65a7d7f4\n")
    (queue / "65a7d7f4\n" / "0123456789abcd").write_text("x")
    assert outgoing.backlog_of(str(queue)).count == 1
