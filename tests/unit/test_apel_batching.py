"""apel_batch: queued job records go out packed, never over AMS's 1 MB, all removed after the
one confirmation or none; sync messages are never packed; the archive is untouched."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import replace

import pytest

from tests.unit.test_apel_support import (
    NOW,
    StompStub,
    broker_settings,
    make_pki,
    make_settings,
    make_usage,
    read_queue,
)
from vacfactory.accounting import account_vm, send_queued, sync_month
from vacfactory.accounting.batching import AMS_MAX_MESSAGE_BYTES, MAX_BATCH_BYTES, Batch, pack_job_messages
from vacfactory.accounting.health import undrained_note
from vacfactory.accounting.send_state import record_run
from vacfactory.accounting.smime import load_signer
from vacfactory.core.apel import JOB, SYNC, job_message, parse_message, validate_message


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def long_record(settings, i: int) -> str:
    """A valid job record with every text field at or near its column's width."""
    usage = make_usage(i, machinetype="q" * 100, accounting_fqan="/" + "f" * 250)
    identity = replace(settings.identity, infrastructure_description="d" * 100)
    return job_message(usage, identity, NOW)


def test_a_full_batch_of_the_longest_records_signed_and_wrapped_stays_under_one_megabyte(tmp_path, pki):
    settings = make_settings(str(tmp_path))
    batch = Batch(limit_records=1000)
    i = 0
    while True:
        body = long_record(settings, i + 1)
        if not batch.fits(body, 1):
            break
        batch.add(f"name{i}", body, 1)
        i += 1
    assert 100 < batch.records < 1000 and batch.size <= MAX_BATCH_BYTES
    text = batch.text()
    message = parse_message(text)
    validate_message(message, NOW)
    assert message.kind == JOB and len(message.records) == batch.records
    signed = load_signer(pki.host_cert, pki.host_key, time.time()).sign(text.encode("ascii"))
    wire = json.dumps({"messages": [{"attributes": {"empaid": "0123abcd/0123456789abcd"},
                                     "data": base64.b64encode(signed).decode()}]})
    assert len(wire) < AMS_MAX_MESSAGE_BYTES


def test_the_record_limit_holds_and_packing_keeps_every_record_in_order(tmp_path):
    settings = make_settings(str(tmp_path))
    bodies = [job_message(make_usage(i), settings.identity, NOW) for i in range(1, 6)]
    batch = Batch(limit_records=3)
    for n, body in enumerate(bodies[:3]):
        assert batch.fits(body, 1)
        batch.add(str(n), body, 1)
    assert batch.full() and not batch.fits(bodies[3], 1)
    packed = parse_message(pack_job_messages(bodies))
    assert [r["LocalJobId"] for r in packed.records] == [parse_message(b).records[0]["LocalJobId"] for b in bodies]
    with pytest.raises(ValueError):
        pack_job_messages(["APEL-sync-message: v0.1\nSite: X\n%%\n"])


def test_over_stomp_jobs_go_packed_and_syncs_alone_and_the_queue_empties(tmp_path, pki):
    with StompStub() as broker:
        settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", broker.port, False,
                                                                       batch_records=2))
        for i in range(1, 6):
            account_vm(make_usage(i), settings, NOW)
        sync_month(settings, "202401", NOW)
        archived = sorted(os.listdir(os.path.join(settings.archive_dir, "202401")))
        result = send_queued(settings, 10, now=time.time())
        assert result.ok and result.sent == 6 and result.messages == 4
        kinds = []
        for body in broker.bodies():
            start = body.index("APEL-")
            text = body[start:body.rindex("%%") + 2].replace("\r\n", "\n") + "\n"
            message = parse_message(text)
            kinds.append((message.kind, len(message.records)))
        assert kinds == [(JOB, 2), (JOB, 2), (JOB, 1), (SYNC, 1)]
    assert read_queue(settings.outgoing_dir) == {}
    assert sorted(os.listdir(os.path.join(settings.archive_dir, "202401"))) == archived  # archive untouched


def test_a_refused_batch_leaves_every_one_of_its_records_queued(tmp_path, pki):
    settings = make_settings(str(tmp_path), broker=broker_settings(pki, "127.0.0.1", 1, False, batch_records=3))
    for i in range(1, 4):
        account_vm(make_usage(i), settings, NOW)
    before = read_queue(settings.outgoing_dir)
    result = send_queued(settings, 3, now=time.time())
    assert not result.ok and result.sent == 0 and result.unreachable
    assert read_queue(settings.outgoing_dir) == before  # read_queue locks each: none left locked


def test_check_names_the_last_success_and_error_of_the_built_in_sender(tmp_path):
    state = str(tmp_path)
    assert undrained_note(state, NOW) == ""  # ssmsend sends: nothing known here
    record_run(state, NOW - 86400, protocol="AMS", destination="gLite-APEL", sent=3, remaining=0, error=None)
    record_run(state, NOW, protocol="AMS", destination="gLite-APEL", sent=0, remaining=5,
               error="AMS msg.argo.grnet.gr: token exchange: AMS answered 401: no\nsuch host")
    note = undrained_note(state, NOW)
    assert note == ("; last successful AMS send 2024-01-16 13:49Z; last error: AMS msg.argo.grnet.gr: token "
                    "exchange: AMS answered 401: no such host")
