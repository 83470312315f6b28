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

from tests.waiting import scaled, wait_for
from vacfactory.errors import ImageError
from vacfactory.fetch.imagecache import ImageCache, ImageNotReady, url_key
from vacfactory.fetch.urlpolicy import UrlPolicy


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
    with caplog.at_level(logging.WARNING, logger="vacfactory.fetch.imagecache"):
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


def test_redirects_to_an_allowed_host_are_followed(http_server, cache_dir):
    http_server.routes["/old.img"] = Route(location=http_server.url("/new.img"), status=302)
    http_server.routes["/new.img"] = Route(IMAGE_V2, etag='"n"')
    loopback_mirror = UrlPolicy.from_words(["127.0.0.1"])  # every redirect is checked, even the site's
    path = ImageCache(cache_dir, timeout=10, policy=loopback_mirror).get(http_server.url("/old.img"))
    with open(path, "rb") as f:
        assert f.read() == IMAGE_V2
    assert [s.path for s in http_server.seen] == ["/old.img", "/new.img"]


def test_huge_slow_download_is_bounded_by_the_timeout(http_server, cache_dir):
    http_server.routes["/slow.img"] = Route(endless=True, chunk_delay=0.05)
    cache = ImageCache(cache_dir, timeout=1.5)
    started = time.monotonic()
    with pytest.raises(ImageError, match="took more than"):
        cache.get(http_server.url("/slow.img"))
    assert time.monotonic() - started < scaled(10)
    assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")] == []


def test_an_image_larger_than_the_free_space_is_refused_before_downloading(http_server, cache_dir):
    http_server.routes["/huge.img"] = Route(b"x" * 1024, declared_length=10**15)
    with pytest.raises(ImageError, match="does not fit"):
        ImageCache(cache_dir, timeout=10, max_bytes=10**16).get(http_server.url("/huge.img"))
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


# --------------------------------------------------------------------------- background mode


def test_background_get_never_waits_for_a_slow_download(http_server, cache_dir):
    url = http_server.url("/slow.img")
    body = IMAGE_V1[:8192]
    http_server.routes["/slow.img"] = Route(body, etag='"s"', chunk_delay=0.5)  # 8 pieces: about 4 s
    ready = threading.Event()
    cache = ImageCache(cache_dir, timeout=30, check_seconds=300, background=True, on_ready=ready.set)
    started = time.monotonic()
    with pytest.raises(ImageNotReady, match="downloading it in the background"):
        cache.get(url)
    with pytest.raises(ImageNotReady):
        cache.get(url)  # the second caller neither waits nor starts a second download
    assert time.monotonic() - started < min(scaled(1.0), 3.0)  # the download takes about 4 s
    assert cache.fetching() == [url]
    assert ready.wait(scaled(30))
    path = cache.get(url)
    with open(path, "rb") as f:
        assert f.read() == body
    assert len(http_server.requests_to("/slow.img")) == 1
    assert cache.fetching() == []


def test_background_revalidation_serves_the_cached_copy_meanwhile(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    ready = threading.Event()
    cache = ImageCache(cache_dir, timeout=30, check_seconds=0, background=True, on_ready=ready.set)
    with pytest.raises(ImageNotReady):
        cache.get(url)
    assert ready.wait(scaled(10))
    ready.clear()
    old = cache.get(url)  # due for a check (check_seconds 0): revalidated in the background
    assert cache.wait_idle(scaled(10))
    assert not ready.is_set()  # a 304 changes nothing: nobody is woken
    assert http_server.requests_to("/root.img")[-1].headers["If-None-Match"] == '"v1"'
    http_server.routes["/root.img"] = Route(IMAGE_V2, etag='"v2"', chunk_delay=0.01)
    started = time.monotonic()
    assert cache.get(url) == old  # the new version is on its way; this VM uses the old one
    assert time.monotonic() - started < scaled(1.0)
    assert ready.wait(scaled(30))
    new = cache.get(url)
    assert new != old and new.endswith("-2.img")
    with open(old, "rb") as f:
        assert f.read() == IMAGE_V1  # never replaced under a VM that uses it


def test_background_failure_is_retried_only_after_retry_seconds(http_server, cache_dir, caplog):
    url = http_server.url("/missing.img")
    cache = ImageCache(cache_dir, timeout=10, background=True, retry_seconds=3600)
    with caplog.at_level(logging.ERROR, logger="vacfactory.fetch.imagecache"):
        with pytest.raises(ImageNotReady):
            cache.get(url)
        assert cache.wait_idle(scaled(10))
    assert any("HTTP 404" in r.getMessage() and "no usable cached copy" in r.getMessage() for r in caplog.records)
    with pytest.raises(ImageNotReady, match="HTTP 404.*retried in the background"):
        cache.get(url)
    assert cache.fetching() == [] and len(http_server.requests_to("/missing.img")) == 1
    cache.retry_seconds = 0
    http_server.routes["/missing.img"] = Route(IMAGE_V1)
    with pytest.raises(ImageNotReady):
        cache.get(url)
    assert cache.wait_idle(scaled(10))
    assert cache.get(url) == cache.current(url)


def test_background_outage_keeps_the_cached_copy_and_spaces_the_retries(http_server, cache_dir):
    url = http_server.url("/root.img")
    http_server.routes["/root.img"] = Route(IMAGE_V1, etag='"v1"')
    cache = ImageCache(cache_dir, timeout=5, check_seconds=0, background=True, retry_seconds=3600)
    with pytest.raises(ImageNotReady):
        cache.get(url)
    assert cache.wait_idle(scaled(10))
    path = cache.get(url)
    assert cache.wait_idle(scaled(10))
    http_server.routes["/root.img"] = Route(status=503)
    for _ in range(3):
        assert cache.get(url) == path
        assert cache.wait_idle(scaled(10))
    # download, 304, one failed revalidation, then no more until retry_seconds have passed
    assert len(http_server.requests_to("/root.img")) == 3


def test_prune_leaves_a_running_download_alone(http_server, cache_dir):
    url = http_server.url("/slow.img")
    body = IMAGE_V2[:6144]
    http_server.routes["/slow.img"] = Route(body, chunk_delay=0.3)
    cache = ImageCache(cache_dir, timeout=30, background=True)
    with pytest.raises(ImageNotReady):
        cache.get(url)
    wait_for(lambda: os.path.isdir(cache_dir) and [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")],
             "the download to start writing", 10, interval=0.05)
    assert cache.prune(set()) == []
    assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")]  # still being written
    assert cache.wait_idle(scaled(30))
    with open(cache.get(url), "rb") as f:
        assert f.read() == body


# --------------------------------------------------------------------------- the engine


def test_engine_round_does_not_wait_for_a_10_second_download(http_server, tmp_path, caplog):
    """The engine asks the cache in its own thread: a slow image server must not hold a round
    (no watchdog ping, no limits enforced) for the length of the download."""
    from tests.unit.engine_harness import HOST, Clock, kernel_file, machinetype_text, settings_text
    from vacfactory.accounting.settings import AccountingSettings
    from vacfactory.config.loader import ConfigSources, ConfigWatcher
    from vacfactory.engine.accountant import Accountant
    from vacfactory.engine.boundary import VMBoundary
    from vacfactory.engine.vmbuild import VMBuilder
    from vacfactory.engine.factory import EngineParts, Environment, Factory
    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
    from vacfactory.state.machines import MachineStore
    from vacfactory.state.status import StatusFiles

    url = http_server.url("/vfops-root.img")
    body = IMAGE_V1[:10240]
    http_server.routes["/vfops-root.img"] = Route(body, etag='"r1"', chunk_delay=1.0)  # 10 pieces: 10 s
    name = f"vfimg{os.getpid()}.example.org"
    state_dir = str(tmp_path / "state")
    config_path = tmp_path / "vacfactory.conf"
    config_path.write_text(settings_text(name, state_dir, 1, "image_fetch_timeout_seconds = 60\n")
                           + machinetype_text("imaged", kernel_file(str(tmp_path)), 1, f"root_image = {url}\n"))
    watcher = ConfigWatcher(ConfigSources.for_main_file(str(config_path)), host_facts=HOST)
    hypervisor = LibvirtHypervisor("test:///default")
    images = ImageCache(os.path.join(state_dir, "imagecache"), timeout=60, check_seconds=300, background=True)
    holder = {}
    factory = Factory(
        EngineParts(config_source=watcher, hypervisor=hypervisor, store=MachineStore(state_dir),
                    builder=VMBuilder(state_dir, images), boundary=VMBoundary(),
                    accountant=Accountant(lambda: AccountingSettings.from_config(holder["factory"].config))),
        Environment(host_processors=64, clock=Clock(), load_average=lambda: 0.0),
    )
    holder["factory"] = factory
    images.on_ready = factory.wake.set
    factory.start()
    try:
        with caplog.at_level(logging.INFO, logger="vacfactory.engine"):
            for _ in range(3):
                began = time.monotonic()
                report = factory.run_round()
                assert time.monotonic() - began < scaled(2.0), "a round waited for the image download"
                assert report.created == [] and report.failed == [] and report.waiting == ["imaged"]
                time.sleep(0.5)
        waits = [r for r in caplog.records if "not startable yet" in r.getMessage()]
        assert len(waits) == 1 and "imaged" in waits[0].getMessage()
        assert StatusFiles(state_dir).error() is None  # not a creation failure
        assert StatusFiles(state_dir).status()["waiting_for_images"] == ["imaged"]
        assert factory.recorder.snapshot(name, 1, {"imaged": (0, 0)}, {}).machinetypes[0].creation_failures == 0
        assert factory.wake.wait(scaled(30)), "the finished download never woke the engine"
        report = factory.run_round()
        assert len(report.created) == 1 and report.waiting == []
        (machine,) = [m for m in factory.machines.values() if m.live]
        assert machine.record.root_image_path == images.current(url)
        with open(machine.record.root_image_path, "rb") as f:
            assert f.read() == body
        assert len(http_server.requests_to("/vfops-root.img")) == 1
    finally:
        for machine in factory.machines.values():
            hypervisor.destroy(machine.uuid)
        hypervisor.close()
