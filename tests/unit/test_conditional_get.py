"""The one conditional GET both caches revalidate with (vacfactory.fetch.conditional), against
a real HTTP server on loopback."""

from __future__ import annotations

import pytest

from tests.unit.test_imagecache import Route, ScriptedServer
from vacfactory.fetch.conditional import Validators, conditional_get
from vacfactory.fetch.safefetch import FetchError
from vacfactory.fetch.urlpolicy import UrlPolicy

ETAG = '"v1"'
STAMP = "Mon, 01 Jan 2024 00:00:00 GMT"


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.stop()


def get(server: ScriptedServer, path: str, held=None):
    with conditional_get(server.url(path), held, UrlPolicy(), timeout=5, checked=False) as response:
        return None if response is None else (b"".join(response.iter_body(4096)), Validators.of(response))


def test_a_200_yields_the_body_and_the_validators_to_keep(server):
    server.routes["/x"] = Route(b"image", etag=ETAG, last_modified=STAMP)
    body, validators = get(server, "/x")
    assert body == b"image" and validators == Validators(ETAG, STAMP)
    sent = server.requests_to("/x")[0].headers
    assert "If-None-Match" not in sent and "If-Modified-Since" not in sent


def test_the_held_validators_are_sent_and_a_304_means_unchanged(server):
    server.routes["/x"] = Route(b"image", etag=ETAG, last_modified=STAMP)
    assert get(server, "/x", Validators(ETAG, STAMP)) is None
    sent = server.requests_to("/x")[0].headers
    assert sent["If-None-Match"] == ETAG and sent["If-Modified-Since"] == STAMP


def test_a_changed_version_is_a_200_despite_the_held_validators(server):
    server.routes["/x"] = Route(b"image v2", etag='"v2"')
    body, validators = get(server, "/x", Validators(ETAG))
    assert body == b"image v2" and validators == Validators('"v2"', None)


def test_a_304_without_a_held_copy_is_an_error_not_an_empty_success(server):
    server.routes["/x"] = Route(status=304)
    with pytest.raises(FetchError, match="HTTP 304"):
        get(server, "/x")


def test_any_other_status_is_one_short_error_line(server):
    with pytest.raises(FetchError, match=r"^HTTP 404 Not Found$"):
        get(server, "/missing", Validators(ETAG))
