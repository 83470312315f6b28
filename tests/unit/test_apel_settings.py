"""AccountingSettings.from_config over the real configuration loader, and the CLI end to end."""

from __future__ import annotations

import json
import os

import pytest

from vacfactory.accounting import AccountingSettings, account_vm
from vacfactory.cli.main import main
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config

from tests.unit.test_apel_support import NOW, make_usage, read_queue

HOST = HostFacts(fqdn="factory07.example.com", cpu_count=8, mem_total_mb=65536)


def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "vacfactory.conf"
    path.write_text(
        "[settings]\n"
        "vac_space = vac01.example.com\n"
        f"state_dir = {tmp_path / 'state'}\n"
        "factory_name = factory07.example.com\n"
        f"{extra}"
    )
    return str(path)


def settings_of(tmp_path, extra: str = "") -> AccountingSettings:
    return AccountingSettings.from_config(load_config(ConfigSources.for_main_file(write_config(tmp_path, extra)),
                                                      host_facts=HOST))


def test_a_fully_configured_site(tmp_path):
    settings = settings_of(tmp_path, "gocdb_sitename = UKI-TEST\nhs06_per_processor = 12.5\n"
                                     "accounting_benchmark = HEPscore23\napel_cloud_records = yes\n"
                                     "apel_send = yes\napel_broker_host = broker.example.org\n"
                                     "apel_broker_port = 6162\napel_send_interval_seconds = 600\n")
    state = str(tmp_path / "state")
    assert settings.site == "UKI-TEST" and settings.space == "vac01.example.com"
    assert settings.submit_host == "vac01.example.com/vacfactory-factory07.example.com"
    assert settings.benchmark_type == "HEPscore23" and settings.cloud_records
    assert settings.queue_enabled and settings.queue_disabled_reason is None
    assert settings.archive_dir == os.path.join(state, "apel-archive")
    assert settings.outgoing_dir == os.path.join(state, "apel-outgoing")
    assert settings.cloud_queue_dir == os.path.join(state, "apel-cloud-outgoing")
    broker = settings.broker
    assert (broker.host, broker.port, broker.send_enabled, broker.send_interval_seconds) == (
        "broker.example.org", 6162, True, 600)
    assert settings.infrastructure_description == "APEL-VACFACTORY" and settings.infrastructure_type == "grid"


def test_without_gocdb_sitename_and_hs06_vacs_placeholder_site_and_no_queueing(tmp_path):
    settings = settings_of(tmp_path)
    assert settings.site == "example.com"  # the space minus its first label
    assert not settings.queue_enabled
    assert settings.queue_disabled_reason == "gocdb_sitename is not set and hs06_per_processor is not set"
    only_site = settings_of(tmp_path, "gocdb_sitename = UKI-TEST\n")
    assert not only_site.queue_enabled and only_site.queue_disabled_reason == "hs06_per_processor is not set"


def test_cli_end_to_end_with_config(tmp_path, capsys):
    config = write_config(tmp_path, "gocdb_sitename = UKI-TEST\nhs06_per_processor = 10\n")
    settings = settings_of(tmp_path, "gocdb_sitename = UKI-TEST\nhs06_per_processor = 10\n")
    account_vm(make_usage(1), settings, NOW)
    assert main(["--config", config, "apel", "sync", "202401", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"][0]["number_of_jobs"] == 1 and out["records"][0]["site"] == "UKI-TEST"
    assert len(read_queue(settings.outgoing_dir)) == 2
    assert main(["--config", config, "apel", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backlog"]["job"]["queued"] == 2


def test_cli_with_an_invalid_config_exits_78(tmp_path, capsys):
    config = write_config(tmp_path, "accounting_benchmark = HS06\n")
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "apel", "status"])
    assert caught.value.code == 78
