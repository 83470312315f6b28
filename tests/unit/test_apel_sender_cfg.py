"""apel/sender.cfg, the shipped configuration of the real APEL sender (ssmsend).

ssmsend reads it with ``configparser.ConfigParser({'use_ssl': 'true'})`` and then asks for
each value with ``get``/``getboolean``/``getint`` (apel/ssm ``bin/sender.py`` and
``ssm/agents.py``): a missing option, an unknown protocol or path_type, an empty destination
or a comment left inside a value (configparser keeps inline comments) only shows up on the
first hourly cron run of a production site. This reads the file the same way and checks what
ssmsend would, and that its paths are the ones vacfactory writes.
"""

from __future__ import annotations

import configparser
import os
import re

import pytest

from vacfactory.accounting.settings import DEFAULT_CAPATH, DEFAULT_DESTINATION, AccountingSettings
from vacfactory.config import options as table
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config

SENDER_CFG = os.path.join(os.path.dirname(__file__), "..", "..", "apel", "sender.cfg")
PROTOCOLS = ("STOMP", "AMS")  # Ssm2.STOMP_MESSAGING, Ssm2.AMS_MESSAGING
PATH_TYPES = ("dirq", "directory")  # Ssm2: QueueSimple or MessageDirectory
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL")


def default(name: str):
    return table.accepted_options(table.SETTINGS)[name].default


@pytest.fixture
def default_accounting(tmp_path) -> AccountingSettings:
    """Accounting of a factory whose configuration leaves state_dir at its default."""
    conf = tmp_path / "vacfactory.conf"
    conf.write_text("[settings]\nvac_space = vac01.example.com\nfactory_name = factory07.example.com\n")
    config = load_config(ConfigSources.for_main_file(str(conf)),
                         host_facts=HostFacts(fqdn="factory07.example.com", cpu_count=8, mem_total_mb=65536))
    assert config.settings.state_dir == default("state_dir")
    return AccountingSettings.from_config(config)


@pytest.fixture(scope="module")
def cp() -> configparser.ConfigParser:
    parser = configparser.ConfigParser({"use_ssl": "true"})  # exactly as ssmsend builds it
    assert parser.read(SENDER_CFG) == [SENDER_CFG]
    return parser


def test_the_sender_sends_vacfactorys_outgoing_queue_in_dirq_layout(cp, default_accounting):
    assert cp.get("messaging", "path") == default("state_dir") + "/apel-outgoing"
    assert cp.get("messaging", "path") == default_accounting.outgoing_dir
    assert cp.get("messaging", "path_type") == "dirq"


def test_everything_ssmsend_asks_for_is_there_and_valid(cp):
    protocol = cp.get("sender", "protocol")
    assert protocol in PROTOCOLS
    assert cp.get("broker", "host")
    if protocol == "STOMP":
        assert 0 < cp.getint("broker", "port") < 65536
    else:
        assert cp.get("messaging", "ams_project")  # AMS exits without it
    cp.getboolean("broker", "use_ssl")  # asked for whatever the protocol (default: true)
    assert cp.get("messaging", "destination") != ""  # Ssm2Exception: no destination queue
    assert cp.get("messaging", "path_type") in PATH_TYPES
    for option in ("certificate", "key", "capath"):
        assert os.path.isabs(cp.get("certificates", option))
    if cp.has_option("certificates", "server_cert"):
        cp.getboolean("certificates", "verify_server_cert", fallback=True)
    # logging_helper: any of these missing makes ssmsend exit 1 before sending anything
    assert os.path.isabs(cp.get("logging", "logfile"))
    assert cp.get("logging", "level") in LOG_LEVELS
    cp.getboolean("logging", "console")


def test_ams_sends_grid_job_records_to_the_apel_topic(cp):
    if cp.get("sender", "protocol") == "AMS":
        assert cp.get("messaging", "destination") == DEFAULT_DESTINATION
        assert cp.get("messaging", "ams_project") == "accounting"


def test_the_certificates_are_the_ones_the_built_in_sender_defaults_to(cp):
    assert cp.get("certificates", "certificate") == default("apel_host_cert")
    assert cp.get("certificates", "key") == default("apel_host_key")
    assert cp.get("certificates", "capath") == default("apel_capath") == DEFAULT_CAPATH


def test_no_value_carries_an_inline_comment(cp):
    """configparser keeps ``host: x  # note`` as the value 'x  # note' (no inline comments)."""
    for section in cp.sections():
        for option, value in cp.items(section, raw=True):
            assert not re.search(r"\s[#;]", value), f"[{section}] {option} = {value!r}"
            assert value == value.strip()


def test_the_cloud_queue_named_in_the_comments_is_the_one_vacfactory_fills(default_accounting):
    """The comment tells sites how to send cloud records with a second ssmsend; the path it
    names must be where apel_cloud_records queues them (AccountingSettings.cloud_queue_dir)."""
    with open(SENDER_CFG) as f:
        comments = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    paths = [line.split(":", 1)[1].strip() for line in comments if line.startswith("path:")]
    assert paths == [default("state_dir") + "/apel-cloud-outgoing"] == [default_accounting.cloud_queue_dir]
    assert any(default("state_dir") + "/apel-cloud-outgoing" in line for line in comments
               if not line.startswith("path:"))
