"""The image cache against a real HTTP server on loopback: validators, outages, bad bodies.

The server (``ScriptedServer``) is started by a fixture and serves whatever each test puts in
its routes; vacuum pipe tests use it too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

import pytest

from vacfactory.errors import ImageError
from vacfactory.imagecache import ImageCache, url_key


# --------------------------------------------------------------------------- the test server


@dataclass
class Route:
    """What one path answers. Conditional requests get 304 when the validators match."""

    body: bytes = b""
    status: int = 200
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    location: Optional[str] = None
    #: Content-Length to declare (default: the real length); larger than the body = truncated
    declared_length: Optional[int] = None
    #: send the body in 1 KiB pieces with this pause between them
    chunk_delay: float = 0.0
    #: keep sending 1 KiB pieces for ever (a huge, slow server)
    endless: bool = False
    content_type: str = "application/octet-stream"


@dataclass
class Seen:
    path: str
    headers: Dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        server: "ScriptedServer" = self.server.scripted  # type: ignore[attr-defined]
        server.seen.append(Seen(self.path, {k: v for k, v in self.headers.items()}))
        route = server.routes.get(self.path)
        if route is None:
            self._plain(404, b"no such route\n")
            return
        if route.location is not None:
            self.send_response(route.status if route.status in (301, 302, 303, 307, 308) else 302)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.status != 200:
            self._plain(route.status, b"scripted failure\n")
            return
        inm = self.headers.get("If-None-Match")
        ims = self.headers.get("If-Modified-Since")
        if (route.etag and inm == route.etag) or (not route.etag and route.last_modified and ims == route.last_modified):
            self.send_response(304)
            if route.etag:
                self.send_header("ETag", route.etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", route.content_type)
        if route.etag:
            self.send_header("ETag", route.etag)
        if route.last_modified:
            self.send_header("Last-Modified", route.last_modified)
        if not route.endless:  # an endless body has no length: it ends when the connection closes
            length = route.declared_length if route.declared_length is not None else len(route.body)
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if route.endless:
                while not server.stopping.is_set():
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(route.chunk_delay or 0.05)
            elif route.chunk_delay:
                for start in range(0, len(route.body), 1024):
                    self.wfile.write(route.body[start:start + 1024])
                    self.wfile.flush()
                    time.sleep(route.chunk_delay)
            else:
                self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 serving ``routes``; ``stop()`` makes it unreachable."""

    def __init__(self, ssl_context=None) -> None:
        self.routes: Dict[str, Route] = {}
        self.seen: List[Seen] = []
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.scripted = self  # type: ignore[attr-defined]
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="vfops-http", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> List[Seen]:
        return [s for s in self.seen if s.path == path]

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def http_server():
    server = ScriptedServer()
    yield server
    server.stop()


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "vfops-state" / "imagecache")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_files(directory: str) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".img"))


IMAGE_V1 = b"vfops image version 1\n" * 4096
IMAGE_V2 = b"vfops image version 2 (longer)\n" * 4096
LM1 = "Mon, 01 Jan 2024 00:00:00 GMT"
LM2 = "Tue, 02 Jan 2024 00:00:00 GMT"


# --------------------------------------------------------------------------- tests


def test_first_fetch_caches_a_read_only_copy_with_its_validators(http_server, cache_dir):
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"', last_modified=LM1)
    cache = ImageCache(cache_dir, timeout=10)
    path = cache.get(http_server.url("/root.img"))
    assert os.path.dirname(path) == cache_dir
    assert os.path.basename(path) == f"{url_key(http_server.url('/root.img'))}-1.img"
    with open(path, "rb") as f:
        assert f.read() == IMAGE_V1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")] == []
    assert cache.current(http_server.url("/root.img")) == path
    first = http_server.requests_to("/root.img")[0]
    assert "If-None-Match" not in first.headers and "If-Modified-Since" not in first.headers


def test_unchanged_image_is_revalidated_with_a_304_and_reused(http_server, cache_dir):
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"', last_modified=LM1)
    cache = ImageCache(cache_dir, timeout=10, check_seconds=0)
    first = cache.get(http_server.url("/root.img"))
    inode = os.stat(first).st_ino
    second = cache.get(http_server.url("/root.img"))
    assert second == first and os.stat(second).st_ino == inode
    again = http_server.requests_to("/root.img")[1]
    assert again.headers["If-None-Match"] == '"v1"'
    assert again.headers["If-Modified-Since"] == LM1
    assert image_files(cache_dir) == [os.path.basename(first)]


def test_check_seconds_spares_the_server_between_checks(http_server, cache_dir):
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    now = [1000.0]
    cache = ImageCache(cache_dir, timeout=10, check_seconds=300, clock=lambda: now[0])
    path = cache.get(http_server.url("/root.img"))
    now[0] += 299
    assert cache.get(http_server.url("/root.img")) == path
    assert len(http_server.requests_to("/root.img")) == 1
    now[0] += 2
    assert cache.get(http_server.url("/root.img")) == path
    assert len(http_server.requests_to("/root.img")) == 2


def test_changed_image_gets_a_new_version_and_the_old_one_stays_until_pruned(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    cache = ImageCache(cache_dir, timeout=10)
    old = cache.get(url)
    old_inode = os.stat(old).st_ino
    http_server.routes["/root.img"] = Route(IMAGE_V2, etag='"v2"')
    new = cache.get(url)
    assert new != old and new.endswith("-2.img")
    with open(new, "rb") as f:
        assert f.read() == IMAGE_V2
    # a running VM's backing file is neither replaced nor rewritten
    with open(old, "rb") as f:
        assert f.read() == IMAGE_V1
    assert os.stat(old).st_ino == old_inode
    assert cache.prune({old}) == []
    assert os.path.exists(old)
    assert cache.prune(set()) == [old]
    assert not os.path.exists(old) and os.path.exists(new)
    assert cache.prune(set()) == []  # the current version is never pruned


def test_server_with_etag_only_is_asked_with_if_none_match(http_server, cache_dir):
    http_server.routes["/etag.img"] = Route(IMAGE_V1, etag='"only-etag"')
    cache = ImageCache(cache_dir, timeout=10)
    path = cache.get(http_server.url("/etag.img"))
    assert cache.get(http_server.url("/etag.img")) == path
    second = http_server.requests_to("/etag.img")[1]
    assert second.headers["If-None-Match"] == '"only-etag"'
    assert "If-Modified-Since" not in second.headers


def test_server_with_last_modified_only_is_asked_with_if_modified_since(http_server, cache_dir):
    http_server.routes["/lm.img"] = Route(IMAGE_V1, last_modified=LM1)
    cache = ImageCache(cache_dir, timeout=10)
    path = cache.get(http_server.url("/lm.img"))
    assert cache.get(http_server.url("/lm.img")) == path
    second = http_server.requests_to("/lm.img")[1]
    assert second.headers["If-Modified-Since"] == LM1
    assert "If-None-Match" not in second.headers
    http_server.routes["/lm.img"] = Route(IMAGE_V2, last_modified=LM2)
    assert cache.get(http_server.url("/lm.img")) != path


def test_server_without_validators_is_refetched_and_identical_content_is_not_duplicated(http_server, cache_dir):
    http_server.routes["/plain.img"] = Route(IMAGE_V1)
    cache = ImageCache(cache_dir, timeout=10)
    path = cache.get(http_server.url("/plain.img"))
    assert cache.get(http_server.url("/plain.img")) == path
    assert len(http_server.requests_to("/plain.img")) == 2
    assert image_files(cache_dir) == [os.path.basename(path)]


def test_outage_with_a_cached_copy_uses_it_and_warns(http_server, cache_dir, caplog):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    cache = ImageCache(cache_dir, timeout=5)
    path = cache.get(url)
    http_server.stop()
    with caplog.at_level(logging.WARNING, logger="vacfactory.imagecache"):
        assert cache.get(url) == path
    assert any("using the cached copy" in r.getMessage() for r in caplog.records)


def test_outage_without_a_cached_copy_is_an_image_error(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.stop()
    with pytest.raises(ImageError, match="no usable cached copy"):
        ImageCache(cache_dir, timeout=5).get(url)


def test_http_error_keeps_the_cached_copy(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    cache = ImageCache(cache_dir, timeout=5)
    path = cache.get(url)
    http_server.routes["/root.img"] = Route(status=503)
    assert cache.get(url) == path
    with pytest.raises(ImageError, match="HTTP 404"):
        cache.get(http_server.url("/missing.img"))


def test_wrong_sha256_is_refused_and_leaves_nothing_behind(http_server, cache_dir):
    http_server.routes["/root.img"] = Route(IMAGE_V1)
    cache = ImageCache(cache_dir, timeout=10)
    with pytest.raises(ImageError, match="sha256 of the download is"):
        cache.get(http_server.url("/root.img"), sha256=sha(b"something else"))
    assert os.listdir(cache_dir) == []
    path = cache.get(http_server.url("/root.img"), sha256=sha(IMAGE_V1).upper())
    with open(path, "rb") as f:
        assert f.read() == IMAGE_V1


def test_a_new_sha256_forces_a_download_and_a_bad_one_keeps_nothing_unverified(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    cache = ImageCache(cache_dir, timeout=10)
    cache.get(url, sha256=sha(IMAGE_V1))
    http_server.routes["/root.img"] = Route(IMAGE_V2, etag='"v2"')
    # the configuration now pins v2: the cached v1 must not be used, even on a 304 path
    path = cache.get(url, sha256=sha(IMAGE_V2))
    with open(path, "rb") as f:
        assert f.read() == IMAGE_V2
    http_server.stop()
    with pytest.raises(ImageError):
        cache.get(url, sha256=sha(IMAGE_V1 + b"x"))


def test_truncated_body_is_refused(http_server, cache_dir):
    http_server.routes["/short.img"] = Route(IMAGE_V1, declared_length=len(IMAGE_V1) + 5000)
    cache = ImageCache(cache_dir, timeout=10)
    with pytest.raises(ImageError):
        cache.get(http_server.url("/short.img"))
    assert os.listdir(cache_dir) == []


def test_truncated_refresh_keeps_the_good_copy(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    cache = ImageCache(cache_dir, timeout=10)
    good = cache.get(url)
    http_server.routes["/root.img"] = Route(IMAGE_V2, etag='"v2"', declared_length=len(IMAGE_V2) * 2)
    assert cache.get(url) == good
    assert image_files(cache_dir) == [os.path.basename(good)]


def test_redirects_are_followed(http_server, cache_dir):
    http_server.routes["/old.img"] = Route(location=http_server.url("/new.img"), status=302)
    http_server.routes["/new.img"] = Route(IMAGE_V2, etag='"n"')
    path = ImageCache(cache_dir, timeout=10).get(http_server.url("/old.img"))
    with open(path, "rb") as f:
        assert f.read() == IMAGE_V2
    assert [s.path for s in http_server.seen] == ["/old.img", "/new.img"]


def test_huge_slow_download_is_bounded_by_the_timeout(http_server, cache_dir):
    http_server.routes["/slow.img"] = Route(endless=True, chunk_delay=0.05)
    cache = ImageCache(cache_dir, timeout=1.5)
    started = time.monotonic()
    with pytest.raises(ImageError, match="took more than"):
        cache.get(http_server.url("/slow.img"))
    assert time.monotonic() - started < 10
    assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")] == []


def test_an_image_larger_than_the_free_space_is_refused_before_downloading(http_server, cache_dir):
    http_server.routes["/huge.img"] = Route(b"x" * 1024, declared_length=10**15)
    with pytest.raises(ImageError, match="does not fit"):
        ImageCache(cache_dir, timeout=10).get(http_server.url("/huge.img"))
    assert os.listdir(cache_dir) == []


def test_local_paths_are_verified_not_copied(tmp_path, cache_dir):
    image = tmp_path / "vfops-local.img"
    image.write_bytes(IMAGE_V1)
    cache = ImageCache(cache_dir)
    assert cache.get(str(image)) == str(image)
    assert cache.get(str(image), sha256=sha(IMAGE_V1)) == str(image)
    with pytest.raises(ImageError, match="not the configured"):
        cache.get(str(image), sha256=sha(IMAGE_V2))
    with pytest.raises(ImageError, match="No such file"):
        cache.get(str(tmp_path / "vfops-missing.img"))
    with pytest.raises(ImageError, match="not a sha256"):
        cache.get(str(image), sha256="abc")
    assert not os.path.exists(cache_dir)


def test_concurrent_gets_download_once(http_server, cache_dir):
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"', chunk_delay=0.001)
    cache = ImageCache(cache_dir, timeout=20, check_seconds=60)
    results: List[str] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(http_server.url("/root.img"))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(http_server.requests_to("/root.img")) == 1
