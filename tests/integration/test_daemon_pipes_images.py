"""The daemon's wiring of vacuum pipes, root images and shutdown, on libvirt's test driver.

A local HTTP server started by each test serves the pipes and the image. The first test runs a
real `vacfactory run` process: the pipes' machinetypes appear and their VMs start, the image is
downloaded once, changed pipes and images are picked up, and outages keep the cached copies.
The others run the daemon in this process (the test driver's domains live in the process that
opened it, so only in-process can the test end a VM behind the daemon's back, see what is
still running after the daemon exits, and look at the engine's machines): pruning keeps the
images that live VMs use, and SIGTERM accounts a VM that ended just before it and leaves the
running ones running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid as uuidlib
from typing import Dict, List

import pytest

from tests.unit.test_imagecache import Route, ScriptedServer
from tests.waiting import log_tail, scaled, wait_for
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.fetch.imagecache import url_key
from vacfactory.state.machines import Machine, MachineStore

pytestmark = pytest.mark.integration

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
# raw disk images qemu-img accepts as backing files (the test driver boots nothing)
IMAGE_V1 = b"vfpipes image one\n".ljust(512, b".") * 128
IMAGE_V2 = b"vfpipes image two\n".ljust(512, b"-") * 256


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_text(tmp_path, total: int, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = vfpipes{os.getpid()}x{uuidlib.uuid4().hex[:6]}.example.org
        factories = .
        gocdb_sitename = TEST-SITE
        state_dir = {tmp_path}/state
        libvirt_uri = test:///default
        domain_type = test
        total_processors = {total}
        hs06_per_processor = 10
        udp_port = {free_udp_port()}
        udp_timeout_seconds = 2
        nfs_exporter = none
        cycle_seconds = 1
        overload_per_processor = 100000
        internal_url_hosts = 127.0.0.1
        """) + textwrap.dedent(extra)


def pipe_document(url: str, *suffixes: str) -> bytes:
    return json.dumps({"cache_seconds": 60, "machinetypes": [
        {"suffix": s, "target_share": 1, "machine_model": "vm-raw", "root_image": url} for s in suffixes
    ]}).encode()


def machines(state_dir: str) -> List[Machine]:
    try:
        return list(MachineStore(state_dir, create=False).load_all().values())
    except Exception:  # noqa: BLE001 - the daemon may be renaming a directory right now
        return []


def image_versions(state_dir: str) -> List[str]:
    directory = os.path.join(state_dir, "imagecache")
    return sorted(n for n in os.listdir(directory) if n.endswith(".img")) if os.path.isdir(directory) else []


def started_of(state_dir: str, machinetype: str, after: float = 0.0,
               image_suffix: str = "") -> List[Machine]:
    return [m for m in machines(state_dir) if m.record.machinetype == machinetype and m.started is not None
            and m.record.created > after and (m.record.root_image_path or "").endswith(image_suffix)]


def log_has(log_path: str, pattern: str) -> bool:
    with open(log_path) as f:
        return re.search(pattern, f.read()) is not None


# --------------------------------------------------------------------------- a real `vacfactory run`


def test_run_takes_machinetypes_from_pipes_and_images_by_url_and_keeps_cached_copies(tmp_path, server):
    image_url = server.url("/vfpipes.img")
    server.routes["/vfpipes.img"] = Route(IMAGE_V1, etag='"i1"')
    server.routes["/vo.json"] = Route(pipe_document(image_url, "prod"), etag='"vo1"')
    server.routes["/vb.json"] = Route(pipe_document(image_url, "prod"), etag='"vb1"')
    config = tmp_path / "vacfactory.conf"
    # VMs live 4 s, so new ones are created (and the image revalidated) all the time
    config.write_text(settings_text(tmp_path, 6, "image_check_seconds = 1\n") + textwrap.dedent(f"""
        [machinetype local]
        target_share = 1
        machine_model = vm-raw
        root_image = {image_url}
        max_wallclock_seconds = 4
        fizzle_seconds = 1

        [vacuum_pipe vo]
        vacuum_pipe_url = {server.url('/vo.json')}
        target_share = 1
        max_wallclock_seconds = 4
        fizzle_seconds = 1

        [vacuum_pipe vb]
        vacuum_pipe_url = {server.url('/vb.json')}
        target_share = 1
        max_wallclock_seconds = 4
        fizzle_seconds = 1
        """))
    state_dir = str(tmp_path / "state")
    log_path = str(tmp_path / "daemon.log")
    tail = log_tail(log_path)
    with open(log_path, "w") as log:
        process = subprocess.Popen([VACFACTORY, "--config", str(config), "run"], stdout=log,
                                   stderr=subprocess.STDOUT)
    began = time.monotonic()
    try:
        # the pipes' machinetypes appear and their VMs start: one download of the image for the
        # site's machinetype, and one (under the URL policy: 127.0.0.1 is an internal_url_hosts
        # mirror) that both pipes share; a pipe is never served the site's trusted copy
        for machinetype in ("local", "vo-prod", "vb-prod"):
            wait_for(lambda: started_of(state_dir, machinetype), f"a running {machinetype} VM", 60, details=tail)
        full_downloads = [s for s in server.requests_to("/vfpipes.img") if "If-None-Match" not in s.headers]
        assert len(full_downloads) == 2
        site_v1, pipes_v1 = f"{url_key(image_url)}-1.img", f"{url_key(image_url, checked=True)}-1.img"
        assert image_versions(state_dir) == sorted([site_v1, pipes_v1])
        for name in (site_v1, pipes_v1):
            with open(os.path.join(state_dir, "imagecache", name), "rb") as f:
                assert f.read() == IMAGE_V1
        paths = {m.record.machinetype: m.record.root_image_path for m in machines(state_dir)}
        assert paths["local"] == os.path.join(state_dir, "imagecache", site_v1)
        assert paths["vo-prod"] == paths["vb-prod"] == os.path.join(state_dir, "imagecache", pipes_v1)
        wait_for(lambda: any(s.headers.get("If-None-Match") == '"i1"' for s in server.requests_to("/vfpipes.img")),
                 "a conditional revalidation of the image", 30, details=tail)
        assert len([s for s in server.requests_to("/vfpipes.img") if "If-None-Match" not in s.headers]) == 2

        # a new image: a new version, used by the VMs created from then on
        server.routes["/vfpipes.img"] = Route(IMAGE_V2, etag='"i2"')
        changed = time.time()
        wait_for(lambda: started_of(state_dir, "local", changed, "-2.img"), "a VM on the new image", 30, details=tail)
        assert f"{url_key(image_url)}-2.img" in image_versions(state_dir)
        with open(os.path.join(state_dir, "imagecache", f"{url_key(image_url)}-2.img"), "rb") as f:
            assert f.read() == IMAGE_V2

        # a changed pipe is picked up (cache_seconds is at least 60); a failing one keeps its cache
        server.routes["/vo.json"] = Route(pipe_document(image_url, "prod", "new"), etag='"vo2"')
        server.routes["/vb.json"] = Route(status=503)
        wait_for(lambda: started_of(state_dir, "vo-new"), "a VM of the new pipe machinetype vo-new", 120, details=tail)
        wait_for(lambda: log_has(log_path, r"pipe vb \(.*\): cannot fetch: HTTP 503.*keeping the cached copy"),
                 "the failed fetch of pipe vb", 30, details=tail)
        failed = time.time()
        wait_for(lambda: started_of(state_dir, "vb-prod", failed), "a vb-prod VM after the failed fetch", 30,
                 details=tail)
        assert "vb-prod" in {m.record.machinetype for m in started_of(state_dir, "vb-prod", failed)}

        # the image server goes away: the cached image keeps serving
        server.stop()
        wait_for(lambda: log_has(log_path, r"vfpipes\.img: cannot refresh the image .*using the cached copy"),
                 "the failed revalidation", 30, details=tail)
        outage = time.time()
        wait_for(lambda: started_of(state_dir, "local", outage, "-2.img"), "a VM created during the outage", 30,
                 details=tail)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=scaled(60))
    assert code == 0
    with open(log_path) as f:
        text = f.read()
    assert "Traceback" not in text and "creation of a" not in text  # no creation ever failed
    assert time.monotonic() - began < scaled(200)


# --------------------------------------------------------------------------- in this process


@pytest.fixture
def test_driver():
    """Our own connection to the test driver: it keeps the driver's domains alive after the
    daemon closes its connection, and ends VMs behind the daemon's back."""
    hypervisor = LibvirtHypervisor("test:///default")
    yield hypervisor
    hypervisor.close()


def make_daemon(config_path: str) -> Daemon:
    return Daemon(ConfigSources.for_main_file(config_path),
                  host_facts=HostFacts(fqdn="host.example.org", cpu_count=4, mem_total_mb=1 << 20))


def live_by_image(daemon: Daemon) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for m in daemon.factory.machines.values():
        if m.live:
            found.setdefault(os.path.basename(m.record.root_image_path or ""), []).append(m.uuid)
    return found


def test_prune_images_keeps_the_versions_live_vms_use(tmp_path, server, test_driver):
    url = server.url("/vfprune.img")
    server.routes["/vfprune.img"] = Route(IMAGE_V1, etag='"p1"')
    config = tmp_path / "vacfactory.conf"
    config.write_text(settings_text(tmp_path, 2, "image_check_seconds = 0\n") + textwrap.dedent(f"""
        [machinetype imaged]
        target_share = 1
        machine_model = vm-raw
        root_image = {url}
        fizzle_seconds = 0
        """))  # fizzle_seconds 0: a VM ended after a second is no fizzle, so no backoff
    daemon = make_daemon(str(config))
    daemon.start()
    images = daemon.images
    state_dir = str(tmp_path / "state")
    cache = os.path.join(state_dir, "imagecache")

    def round_() -> None:  # what Factory.run does, driven by hand
        daemon.factory.wake.clear()
        daemon.factory.run_round()
        daemon._after_round()

    def end(uuid: str) -> None:
        test_driver.destroy(uuid)
        round_()  # finishes it and starts a replacement
        assert images.wait_idle(scaled(30))  # its revalidation (image_check_seconds = 0) is done

    try:
        round_()
        assert daemon.factory.last_report.waiting == ["imaged"]  # downloading in the background
        assert images.wait_idle(scaled(30))
        assert daemon.factory.wake.is_set()  # the finished download woke the engine
        round_()
        v1 = os.path.basename(images.current(url))
        assert list(live_by_image(daemon)) == [v1] and len(live_by_image(daemon)[v1]) == 2
        server.routes["/vfprune.img"] = Route(IMAGE_V2, etag='"p2"')
        a, b = live_by_image(daemon)[v1]
        end(b)  # its replacement starts on v1 while v2 downloads in the background
        v2 = os.path.basename(images.current(url))
        assert v2 != v1 and image_versions(state_dir) == sorted([v1, v2])
        (b2,) = [u for u in live_by_image(daemon)[v1] if u != a]
        end(b2)
        assert sorted(live_by_image(daemon)) == sorted([v1, v2]) and live_by_image(daemon)[v1] == [a]

        daemon.prune_images()
        assert os.path.exists(os.path.join(cache, v1)), "pruned the image under a live VM"
        assert os.path.exists(os.path.join(cache, v2))

        end(a)
        assert list(live_by_image(daemon)) == [v2]
        daemon.prune_images()
        assert not os.path.exists(os.path.join(cache, v1))
        assert os.path.exists(os.path.join(cache, v2))
    finally:
        daemon.close()
        for machine in daemon.factory.machines.values():
            if machine.live:
                test_driver.destroy(machine.uuid)


def test_sigterm_accounts_a_vm_that_just_ended_and_leaves_the_others_running(tmp_path, test_driver):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not a kernel: the test driver boots nothing")
    config = tmp_path / "vacfactory.conf"
    config.write_text(settings_text(tmp_path, 3) + textwrap.dedent(f"""
        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {kernel}
        fizzle_seconds = 1
        """))
    state_dir = str(tmp_path / "state")
    daemon = make_daemon(str(config))
    ended: List[str] = []
    problems: List[str] = []

    def three_running() -> List[Machine]:  # each past fizzle_seconds, so its end is accounted
        running = [m for m in machines(state_dir) if m.state == "running"]
        return running if len(running) == 3 and all(time.time() - m.started.time > 1.5 for m in running) else []

    def end_one_then_sigterm() -> None:
        try:
            victim = wait_for(three_running, "3 running VMs", 30)[0]
            ended.append(victim.uuid)
            assert test_driver.destroy(victim.uuid)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            problems.append(repr(error))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # at once: before the engine's next round, usually

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        daemon.install_signal_handlers()
        daemon.start()
        helper = threading.Thread(target=end_one_then_sigterm, daemon=True)
        helper.start()
        give_up = time.monotonic() + scaled(90)  # only if SIGTERM never arrived
        try:
            daemon.run(until=lambda: time.monotonic() > give_up)
        finally:
            daemon.close()
        helper.join(scaled(10))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert problems == [] and len(ended) == 1
    by_uuid = {m.uuid: m for m in machines(state_dir)}
    gone = by_uuid[ended[0]]
    assert gone.finished is not None and gone.accounted is not None, "the VM that ended was not accounted"
    assert gone.accounted.archive and os.path.isfile(gone.accounted.archive)
    assert gone.cleaned is not None
    still = {d.uuid for d in test_driver.list_domains()}
    others = [m for m in by_uuid.values() if m.uuid != gone.uuid]
    assert len(others) in (2, 3)  # 3 if a round replaced the VM before the signal arrived
    try:
        for machine in others:
            assert machine.live and machine.finished is None
            assert machine.uuid in still, f"{machine.name}: the daemon stopped a running VM"
    finally:
        for machine in others:
            test_driver.destroy(machine.uuid)



def test_reloaded_metrics_port_vacmon_and_image_settings_apply_without_a_restart(tmp_path):
    import urllib.error
    import urllib.request

    def tcp_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def receiver() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(scaled(5))
        return sock

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not a kernel: the test driver boots nothing")
    first, second = receiver(), receiver()
    old_port, new_port = tcp_port(), tcp_port()
    config = tmp_path / "vacfactory.conf"
    machinetype = f"\n[machinetype alpha]\ntarget_share = 1\nmachine_model = vm-raw\nkernel_image = {kernel}\n"
    text = settings_text(tmp_path, 1)
    config.write_text(text + f"metrics_port = {old_port}\nvacmon_hostport = 127.0.0.1:{first.getsockname()[1]}\n"
                      + machinetype)
    daemon = make_daemon(str(config))
    try:
        daemon.start()
        daemon.factory.run_round()
        daemon._after_round()
        with urllib.request.urlopen(f"http://127.0.0.1:{old_port}/metrics", timeout=scaled(5)) as response:
            assert b"vacfactory_total_processors 1" in response.read()
        assert json.loads(first.recvfrom(65536)[0])["message_type"] in ("factory_status", "machinetype_status")

        config.write_text(text + f"metrics_port = {new_port}\nvacmon_hostport = 127.0.0.1:{second.getsockname()[1]}\n"
                          "image_check_seconds = 77\nimage_fetch_timeout_seconds = 33\n" + machinetype)
        st = os.stat(config)
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        daemon.factory.run_round()  # reads the new configuration
        daemon._after_round()
        daemon.run_periodic(force=True)  # as the periodic jobs do within a minute
        with urllib.request.urlopen(f"http://127.0.0.1:{new_port}/metrics", timeout=scaled(5)) as response:
            assert b"vacfactory_total_processors 1" in response.read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{old_port}/metrics", timeout=scaled(5))
        assert json.loads(second.recvfrom(65536)[0])["message_type"] in ("factory_status", "machinetype_status")
        assert (daemon.images.check_seconds, daemon.images.timeout) == (77, 33)
    finally:
        daemon.close()
        for machine in daemon.factory.machines.values():
            if machine.live:
                daemon.hypervisor.destroy(machine.uuid)
        first.close()
        second.close()
