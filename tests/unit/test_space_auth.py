"""space.auth: HMAC-SHA256 signatures on datagrams, replay window, key loading."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vacfactory.errors import ConfigError, ProtocolError
from vacfactory.space import auth
from vacfactory.space.protocol import QueryType, decode, encode_query

KEY = b"space secret"
NOW = 1_700_000_000.0


def query(now: float = NOW) -> bytes:
    return encode_query(QueryType.MACHINETYPES, "vac01.example.ac.uk", "c" * 64, now=now)


def test_signature_is_an_hmac_field_appended_over_the_exact_unsigned_bytes():
    data = query()
    signed = auth.sign(data, KEY)
    expected = hmac.new(KEY, data, hashlib.sha256).hexdigest()
    assert signed == data[:-1] + b',"hmac":"' + expected.encode() + b'"}'
    assert len(signed) == len(data) + auth.SIGNATURE_BYTES


def test_a_signed_query_is_still_a_plain_vacquery_for_vac_and_unkeyed_factories():
    signed = auth.sign(query(), KEY)
    assert json.loads(signed)["space"] == "vac01.example.ac.uk"  # what Vac's json.loads sees
    assert decode(signed, peer="p").query_type is QueryType.MACHINETYPES


def test_verify_returns_the_unsigned_datagram_and_signature():
    data = query()
    body, signature = auth.verify(auth.sign(data, KEY), KEY, peer="p")
    assert body == data and len(signature) == 64


def test_wrong_key_unsigned_and_tampered_datagrams_are_refused():
    signed = auth.sign(query(), KEY)
    with pytest.raises(ProtocolError, match="wrong signature"):
        auth.verify(signed, b"another key", peer="p")
    with pytest.raises(ProtocolError, match="unsigned"):
        auth.verify(query(), KEY, peer="p")
    tampered = signed.replace(b"vac01", b"vac02")
    with pytest.raises(ProtocolError, match="wrong signature"):
        auth.verify(tampered, KEY, peer="p")


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_flipping_any_bit_pattern_of_any_byte_breaks_the_signature(position, flip):
    signed = bytearray(auth.sign(query(), KEY))
    position %= len(signed)
    signed[position] ^= flip
    with pytest.raises(ProtocolError):
        auth.verify(bytes(signed), KEY, peer="p")


def test_only_non_empty_objects_can_be_signed():
    for data in (b"{}", b"[1]", b"garbage"):
        with pytest.raises(ValueError):
            auth.sign(data, KEY)


def test_replay_guard_accepts_each_signature_once_inside_the_window():
    guard = auth.ReplayGuard(window=30.0)
    guard.check("a" * 64, NOW - 10, NOW, peer="p")
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check("a" * 64, NOW - 10, NOW + 1, peer="p")
    guard.check("b" * 64, NOW + 5, NOW, peer="p")  # a peer's clock slightly ahead is fine


@pytest.mark.parametrize("time_sent", [NOW - 31, NOW + 31, None])
def test_replay_guard_refuses_stale_future_and_untimed_queries(time_sent):
    with pytest.raises(ProtocolError):
        auth.ReplayGuard(window=30.0).check("a" * 64, time_sent, NOW, peer="p")


def test_replay_guard_forgets_old_signatures_and_stays_bounded():
    guard = auth.ReplayGuard(window=30.0, capacity=10)
    guard.check("a" * 64, NOW, NOW, peer="p")
    for i in range(50):
        guard.check(f"{i:064d}", NOW + 100, NOW + 100, peer="p")
    assert len(guard._seen) <= 10
    # "a" is long gone, but its time_sent is now stale: it still cannot be replayed
    with pytest.raises(ProtocolError, match="time_sent"):
        guard.check("a" * 64, NOW, NOW + 100, peer="p")


def test_load_space_key(tmp_path):
    assert auth.load_space_key(None, None) is None
    assert auth.load_space_key("s3cret", None) == b"s3cret"
    key_file = tmp_path / "space.key"
    key_file.write_bytes(b"from-file  \nsecond line ignored\n")
    assert auth.load_space_key(None, str(key_file)) == b"from-file"
    key_file.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="empty"):
        auth.load_space_key(None, str(key_file))
    with pytest.raises(ConfigError, match="space_key_file"):
        auth.load_space_key(None, str(tmp_path / "missing"))
