"""The built-in sender reads the site's ssmsend sender.cfg (option apel_sender_cfg): every
value it takes, and every mistake named with file:line before anything is sent."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from tests.unit.test_apel_cli import run
from tests.unit.test_apel_support import make_settings
from vacfactory.accounting.sender_cfg import effective_broker
from vacfactory.accounting.settings import AMS, DEFAULT_AMS_CLOUD_DESTINATION, STOMP
from vacfactory.cli.common import EXIT_OK
from vacfactory.errors import AccountingError

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "apel", "sender.cfg")

AMS_CFG = """\
[sender]
protocol: AMS
[broker]
host: msg.argo.grnet.gr
[certificates]
certificate: /etc/grid-security/hostcert.pem
key: /etc/grid-security/hostkey.pem
capath: /etc/grid-security/certificates
[messaging]
destination: gLite-APEL
ams_project: accounting
path: {path}
path_type: dirq
"""


def with_cfg(tmp_path, text: str):
    settings = make_settings(str(tmp_path / "state"))
    cfg = tmp_path / "sender.cfg"
    cfg.write_text(text.format(path=settings.outgoing_dir))
    return replace(settings, broker=replace(settings.broker, sender_cfg=str(cfg))), str(cfg)


def test_an_ams_sender_cfg_sets_protocol_host_topic_project_and_certificates(tmp_path):
    settings, _ = with_cfg(tmp_path, AMS_CFG)
    broker = effective_broker(settings)
    assert (broker.protocol, broker.host, broker.destination, broker.ams_project) == (
        AMS, "msg.argo.grnet.gr", "gLite-APEL", "accounting")
    assert broker.host_cert == "/etc/grid-security/hostcert.pem" and broker.ams_token is None
    assert broker.cloud_destination == DEFAULT_AMS_CLOUD_DESTINATION and broker.use_ssl


def test_the_shipped_sender_cfg_is_read_as_ams_to_egi(tmp_path):
    settings = make_settings("/var/lib/vacfactory")
    broker = effective_broker(replace(settings, broker=replace(settings.broker, sender_cfg=SHIPPED)))
    assert (broker.protocol, broker.host, broker.destination) == (AMS, "msg.argo.grnet.gr", "gLite-APEL")


def test_a_stomp_sender_cfg_takes_port_and_use_ssl(tmp_path):
    text = AMS_CFG.replace("protocol: AMS", "protocol: STOMP").replace(
        "host: msg.argo.grnet.gr", "host: broker.example.org\nport: 6162\nuse_ssl: false")
    settings, _ = with_cfg(tmp_path, text)
    broker = effective_broker(settings)
    assert (broker.protocol, broker.host, broker.port, broker.use_ssl) == (STOMP, "broker.example.org", 6162, False)


@pytest.mark.parametrize("change,line,words", [
    (("protocol: AMS", "protocol: KAFKA"), 2, "neither STOMP nor AMS"),
    (("destination: gLite-APEL", "destination: gLite-APEL   # grid jobs"), 10, "inline comment"),
    (("ams_project: accounting", "ams_project: acc/ounting"), 11, "not an AMS name"),
    (("path_type: dirq", "path_type: directory"), 13, "path_type: dirq only"),
    (("host: msg.argo.grnet.gr", "host: msg.argo.grnet.gr:443"), 4, "not a host name"),
])
def test_mistakes_are_named_with_file_and_line(tmp_path, change, line, words):
    settings, cfg = with_cfg(tmp_path, AMS_CFG.replace(*change))
    with pytest.raises(AccountingError) as error:
        effective_broker(settings)
    assert f"{cfg}:{line}:" in str(error.value) and words in str(error.value)


def test_missing_values_and_another_queue_are_refused(tmp_path):
    settings, cfg = with_cfg(tmp_path, AMS_CFG.replace("destination: gLite-APEL\n", ""))
    with pytest.raises(AccountingError, match=r"\[messaging\] destination is missing"):
        effective_broker(settings)
    settings, cfg = with_cfg(tmp_path, AMS_CFG.replace("path: {path}", "path: /var/spool/apel/outgoing"))
    with pytest.raises(AccountingError, match="would never be sent"):
        effective_broker(settings)
    settings = replace(settings, broker=replace(settings.broker, sender_cfg=str(tmp_path / "absent.cfg")))
    with pytest.raises(AccountingError, match="cannot read"):
        effective_broker(settings)


def test_apel_status_shows_protocol_destination_last_send_and_depth(tmp_path, capsys):
    settings, _ = with_cfg(tmp_path, AMS_CFG)
    assert run(settings, "status", "--json") == EXIT_OK
    sender = json.loads(capsys.readouterr().out)["sender"]
    assert sender["protocol"] == AMS and sender["destination"] == "gLite-APEL"
    assert sender["ams_project"] == "accounting" and sender["last_success"] is None and sender["queue_depth"] == 0
    assert run(settings, "status") == EXIT_OK
    text = capsys.readouterr().out
    assert "sender: AMS to msg.argo.grnet.gr gLite-APEL (AMS project accounting)" in text
    assert "last successful send: never; queue depth 0" in text


def test_a_broken_sender_cfg_shows_in_status_and_fails_the_send_without_touching_the_queue(tmp_path, capsys):
    from tests.unit.test_apel_support import NOW, make_usage, read_queue
    from vacfactory.accounting import account_vm, send_queued

    settings, cfg = with_cfg(tmp_path, AMS_CFG.replace("protocol: AMS", "protocol: KAFKA"))
    account_vm(make_usage(1), settings, NOW)  # accounting never reads sender.cfg
    before = read_queue(settings.outgoing_dir)
    result = send_queued(settings, 5, now=NOW)
    assert not result.ok and result.remaining == 1 and "KAFKA" in (result.error or "")
    assert read_queue(settings.outgoing_dir) == before
    assert run(settings, "status") == EXIT_OK
    assert f"sender configuration error: {cfg}:2:" in capsys.readouterr().out


def test_config_check_reads_sender_cfg_as_the_sender_will(tmp_path):
    from tests.unit.test_config_predict import conf, findings
    from vacfactory.config import predict

    state = tmp_path / "state"
    cfg = tmp_path / "sender.cfg"
    cfg.write_text(AMS_CFG.format(path=state / "apel-outgoing").replace("protocol: AMS", "protocol: KAFKA"))
    path = conf(tmp_path, settings=f"apel_send = yes\napel_sender_cfg = {cfg}\n")
    errors = [f for f in findings(path) if f.severity == predict.ERROR]
    assert [(f.option, f.line) for f in errors] == [("apel_sender_cfg", 7)]
    assert f"{cfg}:2: [sender] protocol: 'KAFKA' is neither STOMP nor AMS" in errors[0].message
    cert = tmp_path / "hostcert.pem"
    cert.write_text("a certificate")
    cfg.write_text(AMS_CFG.format(path=state / "apel-outgoing").replace(
        "/etc/grid-security/hostkey.pem", str(tmp_path / "nokey.pem")).replace(
        "/etc/grid-security/hostcert.pem", str(cert)))
    errors = [f for f in findings(path) if f.severity == predict.ERROR]
    assert [f.option for f in errors] == ["apel_sender_cfg"]
    assert f"{tmp_path / 'nokey.pem'}: no such file (from {cfg})" in errors[0].message
