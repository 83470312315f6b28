"""shutdown_message parsing and the classification that drives backoff (core/outcomes.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vacfactory.core.outcomes import (
    MAX_TEXT,
    KillReason,
    Outcome,
    ShutdownMessage,
    classify,
    is_abort_code,
    parse_shutdown_message,
)


@pytest.mark.parametrize("raw, expected", [
    ("200 Success\n", ShutdownMessage(200, "Success")),
    ("300 Nothing to do", ShutdownMessage(300, "Nothing to do")),
    ("  700 Error: agent\r\nsecond line", ShutdownMessage(700, "Error: agent")),
    ("100", ShutdownMessage(100, "")),
    ("404-Not here", ShutdownMessage(404, "Not here")),
    ("500:\tsite problem", ShutdownMessage(500, "site problem")),
    (b"600 grid \xff\x00 bad", ShutdownMessage(600, "grid ?? bad")),
    ("200 \x1b[2Jclear screen", ShutdownMessage(200, "?[2Jclear screen")),
    ("first line\n200 second line", None),   # only the first line counts
    ("099 too low", None),
    ("800 site code", ShutdownMessage(800, "site code")),   # Vac: int(message[0:3])
    ("999", ShutdownMessage(999, "")),
    ("2000 four digits", None),
    ("abc", None),
    ("", None),
    (b"", None),
    ("-200 negative", None),
])
def test_parse_table(raw, expected):
    assert parse_shutdown_message(raw) == expected


def test_text_is_cut_and_a_huge_file_is_not_read_whole():
    message = parse_shutdown_message("200 " + "x" * 100_000)
    assert message == ShutdownMessage(200, "x" * MAX_TEXT)
    assert parse_shutdown_message(b"200 " + b"y" * 10_000_000).text == "y" * MAX_TEXT


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_parser_never_raises_and_yields_printable_text(raw):
    message = parse_shutdown_message(raw)
    if message is not None:
        assert 100 <= message.code <= 999
        assert len(message.text) <= MAX_TEXT
        assert all(0x20 <= ord(c) <= 0x7e for c in message.text)


@pytest.mark.parametrize("code, abort_on_700, aborts", [
    (100, True, False), (200, True, False), (299, True, False),
    (300, True, True), (400, True, True), (500, True, True), (699, True, True),
    (700, True, True), (799, True, True),
    (700, False, False), (600, False, True), (200, False, False),
    # Vac: every code >= 300 is an abort; abort_on_700 spares only 700-799
    (800, True, True), (999, True, True), (800, False, True), (999, False, True),
])
def test_abort_codes(code, abort_on_700, aborts):
    assert is_abort_code(code, abort_on_700) is aborts


@pytest.mark.parametrize("message, wall, kill, abort_on_700, outcome, code", [
    # the VM's own message
    (ShutdownMessage(200, "ok"), 5, None, True, Outcome.SUCCESS, 200),
    (ShutdownMessage(300, "no work"), 5000, None, True, Outcome.ABORT, 300),
    (ShutdownMessage(700, "agent"), 5000, None, True, Outcome.ABORT, 700),
    (ShutdownMessage(850, "site code"), 5000, None, False, Outcome.ABORT, 850),
    # 7xx with abort_on_700 off: judged as if no message (Vcycle): neutral after a full run...
    (ShutdownMessage(700, "agent"), 5000, None, False, Outcome.NEUTRAL, 700),
    # ...a fizzle when short
    (ShutdownMessage(700, "agent"), 10, None, False, Outcome.FIZZLE, 700),
    # no message: fizzle when shorter than fizzle_seconds, neutral after
    (None, 10, None, True, Outcome.FIZZLE, 300),
    (None, 5000, None, True, Outcome.NEUTRAL, None),
    # heartbeat kills override what the VM wrote
    (ShutdownMessage(200, "ok"), 5000, KillReason.HEARTBEAT_NOT_UPDATED, True, Outcome.ABORT, 700),
    (None, 10, KillReason.HEARTBEAT_NOT_CREATED, True, Outcome.ABORT, 700),
    # other kills: the VM's message still counts; without one, neutral even when short
    (ShutdownMessage(300, "no work"), 5000, KillReason.WALLCLOCK, True, Outcome.ABORT, 300),
    (None, 10, KillReason.WALLCLOCK, True, Outcome.NEUTRAL, None),
    (None, 10, KillReason.SHUTDOWN_TIME, True, Outcome.NEUTRAL, None),
    (None, 5000, KillReason.PAUSED, True, Outcome.NEUTRAL, None),
])
def test_classify_table(message, wall, kill, abort_on_700, outcome, code):
    result = classify(message, wall, 600, kill=kill, abort_on_700=abort_on_700)
    assert result.outcome is outcome
    assert (result.message.code if result.message else None) == code
    assert result.backs_off is (outcome in (Outcome.ABORT, Outcome.FIZZLE))


def test_heartbeat_kill_messages_are_the_vac_texts():
    assert str(classify(None, 900, 600, kill=KillReason.HEARTBEAT_NOT_UPDATED).message) == \
        "700 Heartbeat file not updated"
    assert str(classify(None, 900, 600, kill=KillReason.HEARTBEAT_NOT_CREATED).message) == \
        "700 Heartbeat file not created"
    assert str(classify(None, 42.7, 600).message) == "300 Fizzled after 42 seconds without a shutdown_message"
