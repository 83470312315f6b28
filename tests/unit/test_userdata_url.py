"""user_data templates by http(s) URL (the usual Vac and vacuum-pipe case), end to end.

A real HTTP server on 127.0.0.1 serves the template (with an ETag, answering conditional GETs
with 304); a real engine on libvirt's test driver creates VMs through the daemon's kind of image
cache (background mode: the engine never waits for the network), and each VM's ``user_data``
file is read back. Only the clock is moved by hand (the engine's and the cache's).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import pytest

from tests.unit.engine_harness import HOST, Clock, Harness, kernel_file, machinetype_text, settings_text
from tests.waiting import scaled
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.engine.accountant import Accountant
from vacfactory.engine.boundary import VMBoundary
from vacfactory.engine.vmbuild import MAX_TEMPLATE_BYTES, VMBuilder
from vacfactory.engine.factory import EngineParts, Environment, Factory
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.fetch.imagecache import ImageCache
from vacfactory.state.machines import MachineStore
from vacfactory.state.status import StatusFiles

MT = "tmpl"
TEMPLATE = """\
#!/bin/sh
url=##user_data_url##
uuid=##user_data_uuid##
machinetype=##user_data_machinetype##
colour=##user_data_option_colour##
motd=##user_data_file_motd##
version={version}
gone=##user_data_option_nobody_sets_this##
"""


# --------------------------------------------------------------------------- the template server


@dataclass
class Seen:
    path: str
    if_none_match: Optional[str]
    status: int


@dataclass
class TemplateServer:
    """Serves ``routes`` (path -> (body, etag)) and records every request and its answer."""

    routes: Dict[str, Tuple[bytes, str]] = field(default_factory=dict)
    seen: List[Seen] = field(default_factory=list)

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                body, etag = owner.routes.get(self.path, (b"", ""))
                inm = self.headers.get("If-None-Match")
                status = 404 if not etag else 304 if inm == etag else 200
                owner.seen.append(Seen(self.path, inm, status))
                self.send_response(status)
                if etag:
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body) if status == 200 else 0))
                self.send_header("Connection", "close")
                self.end_headers()
                if status == 200:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="vf-userdata-http", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def serve(self, path: str, body: str, etag: str) -> str:
        self.routes[path] = (body.encode("utf-8"), etag)
        return self.url(path)

    def stop(self) -> None:
        """Down: the port refuses connections from now on."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def requests_to(self, path: str) -> List[Seen]:
        return [s for s in self.seen if s.path == path]


@pytest.fixture
def server():
    s = TemplateServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def silent_address():
    """An address that accepts TCP connections but never answers (a hung web server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/user_data.sh"
    sock.close()  # resets the queued connections: the cache's download thread ends


# --------------------------------------------------------------------------- the engine


@dataclass
class Engine:
    harness: Harness
    images: ImageCache

    @property
    def factory(self) -> Factory:
        return self.harness.factory

    def round(self):
        began = time.monotonic()
        report = self.factory.run_round()
        assert time.monotonic() - began < scaled(2.0), "a round waited for the network"
        return report

    def fetched(self) -> None:
        assert self.images.wait_idle(scaled(20)), "the template download never ended"

    def live(self):
        return self.harness.live()

    def user_data(self, machine) -> str:
        with open(machine.user_data_path, encoding="utf-8") as f:
            return f.read()

    def replace_vm(self, seconds: float = 600):
        """The live VM ends successfully ``seconds`` after it started; the round replaces it."""
        (machine,) = self.live()
        self.harness.clock.advance(seconds)
        self.harness.power_off(machine, "200 Success")
        report = self.round()
        assert machine.name in report.finished and len(report.created) == 1, report
        (new,) = self.live()
        return new

    def error(self) -> Optional[str]:
        return StatusFiles(self.harness.state_dir).error()

    def creation_failures(self) -> int:
        snapshot = self.factory.recorder.snapshot(self.harness.name, 1, {MT: (0, 0)}, {})
        return snapshot.machinetypes[0].creation_failures


@pytest.fixture
def engine(tmp_path):
    """engine(user_data, extra_mt='', image_timeout=30) -> a started Engine (1 processor)."""
    made: List[Engine] = []

    def build(user_data: str, extra_mt: str = "", image_timeout: float = 30) -> Engine:
        name = f"ud{os.getpid()}x{len(made)}.example.org"
        state_dir = str(tmp_path / "state")
        motd = tmp_path / "motd.txt"
        motd.write_text("hello from a file")
        config_path = str(tmp_path / "vacfactory.conf")
        with open(config_path, "w") as f:
            f.write(settings_text(name, state_dir, 1, "") + machinetype_text(MT, kernel_file(str(tmp_path)), 1, f"""\
                user_data = {user_data}
                user_data_option_colour = blue
                user_data_file_motd = {motd}
                """ + extra_mt))
        clock = Clock()
        watcher = ConfigWatcher(ConfigSources.for_main_file(config_path), host_facts=HOST)
        hypervisor = LibvirtHypervisor("test:///default")
        # as the daemon makes it: background mode, image_check_seconds (300 s) on the engine's clock
        images = ImageCache(os.path.join(state_dir, "imagecache"), timeout=image_timeout, check_seconds=300,
                            clock=clock, background=True)
        holder = {}
        factory = Factory(
            EngineParts(config_source=watcher, hypervisor=hypervisor, store=MachineStore(state_dir),
                        builder=VMBuilder(state_dir, images), boundary=VMBoundary(),
                        accountant=Accountant(lambda: AccountingSettings.from_config(holder["factory"].config))),
            Environment(host_processors=64, clock=clock, load_average=lambda: 0.0, rng=random.Random(7)),
        )
        holder["factory"] = factory
        images.on_ready = factory.wake.set
        factory.start()
        made.append(Engine(Harness(factory, hypervisor, clock, config_path, state_dir, name), images))
        return made[-1]

    yield build
    for e in made:
        e.images.wait_idle(scaled(30))
        e.harness.teardown()


def rendered(url: str, uuid: str, version: int) -> str:
    return (f"#!/bin/sh\nurl={url}\nuuid={uuid}\nmachinetype={MT}\ncolour=blue\n"
            f"motd=hello from a file\nversion={version}\ngone=\n")


# --------------------------------------------------------------------------- the tests


def test_a_url_template_is_fetched_in_the_background_and_rendered_into_the_vms_user_data(server, engine):
    url = server.serve("/user_data.sh", TEMPLATE.format(version=1), '"v1"')
    e = engine(url)
    report = e.round()
    assert report.waiting == [MT] and report.created == [] and report.failed == []
    e.fetched()
    assert e.factory.wake.is_set(), "the finished download did not wake the engine"
    report = e.round()
    assert len(report.created) == 1 and report.waiting == []
    (machine,) = e.live()
    # ##user_data_url## is the template's URL (as in Vac), not the cached copy's path
    assert e.user_data(machine) == rendered(url, machine.uuid, 1)
    assert [(s.if_none_match, s.status) for s in server.requests_to("/user_data.sh")] == [(None, 200)]
    assert e.error() is None and e.creation_failures() == 0


def test_a_changed_template_is_picked_up_through_a_conditional_get(server, engine):
    url = server.serve("/user_data.sh", TEMPLATE.format(version=1), '"v1"')
    e = engine(url)
    e.round()
    e.fetched()
    e.round()
    # within image_check_seconds: the cached copy, no request at all
    second = e.replace_vm(100)
    assert e.user_data(second) == rendered(url, second.uuid, 1)
    assert len(server.requests_to("/user_data.sh")) == 1
    # due: revalidated in the background with the ETag; unchanged, so 304
    third = e.replace_vm(600)
    e.fetched()
    assert e.user_data(third) == rendered(url, third.uuid, 1)
    assert server.requests_to("/user_data.sh")[-1] == Seen("/user_data.sh", '"v1"', 304)
    # changed on the server: the VM created when the check is due gets the copy at hand, the
    # conditional GET brings the new version, and the next VM gets it
    server.serve("/user_data.sh", TEMPLATE.format(version=2), '"v2"')
    fourth = e.replace_vm(600)
    e.fetched()
    assert e.user_data(fourth) == rendered(url, fourth.uuid, 1)
    assert server.requests_to("/user_data.sh")[-1] == Seen("/user_data.sh", '"v1"', 200)
    fifth = e.replace_vm(100)
    assert e.user_data(fifth) == rendered(url, fifth.uuid, 2)
    assert e.error() is None and e.creation_failures() == 0


def test_with_the_server_down_the_cached_copy_stays_in_use(server, engine):
    url = server.serve("/user_data.sh", TEMPLATE.format(version=1), '"v1"')
    e = engine(url)
    e.round()
    e.fetched()
    e.round()
    server.stop()
    for _ in range(2):  # the first revalidation fails; the next one waits for retry_seconds
        machine = e.replace_vm(600)
        e.fetched()
        assert e.user_data(machine) == rendered(url, machine.uuid, 1)
    assert e.error() is None and e.creation_failures() == 0


@pytest.mark.parametrize("down", ["refusing", "silent"])
def test_never_fetched_with_the_server_down_the_machinetype_waits_without_a_failure(
        server, engine, silent_address, down):
    if down == "refusing":
        url = server.url("/user_data.sh")
        server.stop()
    else:
        url = silent_address
    e = engine(url, image_timeout=20)
    for _ in range(3):  # Engine.round asserts that no round waits for the network
        report = e.round()
        assert report.waiting == [MT] and report.created == [] and report.failed == []
        e.harness.clock.advance(30)
        time.sleep(0.2)
    if down == "silent":
        assert e.images.fetching() == [url]  # the download still hangs, and no round waited for it
    assert e.live() == [] and e.harness.domains() == []
    assert e.error() is None and e.creation_failures() == 0
    assert StatusFiles(e.harness.state_dir).status()["waiting_for_images"] == [MT]


def test_an_oversized_url_template_is_a_creation_error_naming_the_machinetype_and_url(server, engine):
    url = server.serve("/big.sh", "#" * (MAX_TEMPLATE_BYTES + 1), '"big"')
    e = engine(url)
    assert e.round().waiting == [MT]
    e.fetched()
    report = e.round()
    assert report.failed == [MT] and report.created == [] and e.live() == []
    error = e.error()
    assert error is not None and f"machinetype {MT}: user_data {url}" in error
    assert f"larger than the {MAX_TEMPLATE_BYTES}-byte limit" in error
    assert e.creation_failures() == 1
    # nothing was cached, so nothing truncated can ever be used
    assert not [n for n in os.listdir(e.images.directory) if n.endswith(".img")]


@pytest.mark.parametrize("which", ["user_data", "user_data_file_motd"])
def test_an_oversized_template_or_file_is_a_creation_error_naming_the_machinetype_and_file(
        tmp_path, engine, which):
    big = tmp_path / "big.txt"
    big.write_text("#" * (MAX_TEMPLATE_BYTES + 1))
    template = tmp_path / "template.sh"
    template.write_text(TEMPLATE.format(version=1))
    if which == "user_data":
        e = engine(str(big))
    else:
        e = engine(str(template), extra_mt=f"user_data_file_motd = {big}\n")
    report = e.round()
    assert report.failed == [MT] and e.live() == []
    error = e.error()
    assert error is not None and f"machinetype {MT}: {which} {big}: larger than the" in error


def test_a_template_of_exactly_the_limit_is_used_whole(tmp_path, engine):
    body = "#" * (MAX_TEMPLATE_BYTES - 1) + "\n"
    template = tmp_path / "template.sh"
    template.write_text(body)
    e = engine(str(template))
    assert len(e.round().created) == 1
    (machine,) = e.live()
    assert e.user_data(machine) == body
