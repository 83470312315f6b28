"""The tiny guest and the demo pilot, on real TCG VMs (qemu:///system).

Every libvirt object is named vfguest-*; the network is 10.254.78.0/24 with the host on .254.
Without libvirtd these tests fail (they do not skip).
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator

import pytest

from tests.integration import guest_helpers as g

pytestmark = pytest.mark.integration

# one address (and MAC) per VM that uses the network
IP_HTTP = g.SUBNET + ".1"
IP_TOKEN = g.SUBNET + ".2"
IP_NFS = g.SUBNET + ".3"
IP_STOP = g.SUBNET + ".4"
ALL_IPS = (IP_HTTP, IP_TOKEN, IP_NFS, IP_STOP)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def image() -> g.GuestImage:
    g.build_guest()
    return g.GuestImage(g.DEFAULT_GUEST_DIR)


@pytest.fixture(scope="module")
def conn():
    c = g.connect()
    yield c
    c.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = g.make_workdir("test")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vms(conn, image, workdir):
    """Factory for VMs; every one is destroyed at the end of the test."""
    made = []

    def make(tag: str, cmdline: str = "", **xml_args) -> g.VM:
        vm = g.VM(conn, image, workdir, tag, cmdline, **xml_args)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.destroy()


@pytest.fixture(scope="module")
def network(conn):
    net = g.GuestNetwork(conn, {g.mac_for(ip): ip for ip in ALL_IPS})
    yield net
    net.destroy()


@pytest.fixture
def stub(network):
    s = g.MetadataStub(g.HOST_IP)
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------
# helpers


def mjf_values(now: int, job_id: str) -> tuple:
    """Machine/job features as the factory writes them (Vac's keys, plus a site option)."""
    machinefeatures = {
        "hs06": "20.0", "total_cpu": "1", "phys_cores": "1", "log_cores": "1", "jobslots": "1",
        "shutdowntime": str(now + 3600), "site_name": "UKI-Example Site",
    }
    jobfeatures = {
        "shutdowntime_job": str(now + 3600), "cpufactor_lrms": "1.0",
        "cpu_limit_secs": "3600", "cpu_limit_secs_lrms": "3600", "wall_limit_secs": "3600",
        "wall_limit_secs_lrms": "3600", "jobstart_secs": str(now), "hs06_job": "20.0",
        "max_rss_bytes": "268435456", "mem_limit_MB": "268", "allocated_cpu": "1\n",
        "allocated_CPU": "1\n", "job_id": job_id,
    }
    return machinefeatures, jobfeatures


def expected_report(machinefeatures: Dict[str, str], jobfeatures: Dict[str, str]) -> Dict:
    out = {"machinefeatures/" + k: v.rstrip("\n") for k, v in machinefeatures.items()}
    out.update({"jobfeatures/" + k: v.rstrip("\n") for k, v in jobfeatures.items()})
    return out


def parse_report(path: Path) -> Dict[str, str]:
    report = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        assert sep, "bad mjf_report line %r" % line
        report[key] = value
    return report


def pilot(values: Dict[str, str]) -> str:
    return g.render_user_data(g.PILOT_TEMPLATE.read_text(), values)


def mjf_dirs(base: Path, machinefeatures, jobfeatures) -> tuple:
    mf, jf, jo = base / "machinefeatures", base / "jobfeatures", base / "joboutputs"
    for d, values in ((mf, machinefeatures), (jf, jobfeatures), (jo, {})):
        d.mkdir(parents=True)
        for k, v in values.items():
            (d / k).write_text(v)
    return mf, jf, jo


# ---------------------------------------------------------------------------------------------
# the build


def test_build_produces_kernel_initrd_and_second_run_is_a_fast_noop(workdir):
    out = workdir / "guest"
    started = time.monotonic()
    first = g.build_guest(out, force=True)
    build_seconds = time.monotonic() - started
    assert "built" in first.stdout, first.stdout + first.stderr
    files = {name: out / name for name in ("vmlinux", "vmlinuz", "initrd.img")}
    for name, path in files.items():
        assert path.stat().st_size > 1_000_000, name
    assert files["vmlinux"].read_bytes()[:4] == b"\x7fELF"
    assert files["initrd.img"].read_bytes()[:2] == b"\x1f\x8b"   # gzip
    assert not list(out.glob(".work.*")), "the unpacked kernel tree was left behind"
    manifest = (out / "manifest.txt").read_text()
    for module in ("virtio_net", "9pnet_virtio", "nfsv4", "sunrpc", "isofs", "sr_mod",
                   "ata_piix"):
        assert re.search(r"\b%s\b" % module, manifest), module
    mtimes = {name: path.stat().st_mtime_ns for name, path in files.items()}

    started = time.monotonic()
    second = g.build_guest(out)
    noop_seconds = time.monotonic() - started
    assert "up to date" in second.stdout
    assert noop_seconds < 2, noop_seconds
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == mtimes
    print("build %.1f s, no-op %.2f s" % (build_seconds, noop_seconds))


# ---------------------------------------------------------------------------------------------
# plain mode and config drive


def test_plain_mode_sleeps_vf_lifetime_and_powers_off(vms):
    vm = vms("plain", "vf_lifetime=2").start()
    lifecycle = vm.wait_gone(60)
    lines = g.guest_lines(vm.console())
    assert lines[0].startswith("GUEST: init started")
    assert "GUEST: modules loaded" in lines
    assert "GUEST: no network interface" in lines
    assert "GUEST: plain mode: sleeping 2 s" in lines
    assert lines[-1].startswith("GUEST: powering off")
    assert lifecycle < 20, (lifecycle, vm.console())
    print("plain lifecycle %.1f s" % lifecycle)


def test_config_drive_user_data_runs_on_ide_cdrom_and_virtio_disk(vms, workdir):
    marker = "VF-MARKER-" + uuid.uuid4().hex
    user_data = ("#!/bin/sh\necho \"$1:%s:$(cat /tmp/meta_data.json):$VF_CONFIG_DRIVE\"\n"
                 "exit 3\n" % marker)
    iso = g.make_config_drive(workdir / "config.iso", user_data, {"uuid": "u-1234"})
    # vf_lifetime=600: plain mode would outlast wait_gone; only the user_data ends it this early
    ide = vms("cdrom", "vf_lifetime=600", ide_cdrom=iso).start()
    virtio = vms("vdisk", "vf_lifetime=600", virtio_iso=iso).start()
    for vm, device in ((ide, "/dev/sr0"), (virtio, "/dev/vda")):
        lifecycle = vm.wait_gone(120)
        console = vm.console()
        assert ':%s:{"uuid": "u-1234"}:/mnt/config' % marker in console
        lines = g.guest_lines(console)
        assert "GUEST: config drive %s mounted on /mnt/config" % device in lines
        assert "GUEST: user_data from config drive" in lines
        assert "GUEST: user_data exited with status 3" in lines
        assert not [line for line in lines if "plain mode" in line]
        assert lines[-1].startswith("GUEST: powering off")
        print("config drive on %s: %.1f s" % (device, lifecycle))


# ---------------------------------------------------------------------------------------------
# the demo pilot over HTTP, NFS, and with a stalled heartbeat


def test_demo_pilot_over_http_metadata(vms, stub, network, workdir):
    now = int(time.time())
    # VM 1: the substituted URLs, mjf left empty (default http), outcome 300
    job1 = str(uuid.uuid4())
    mf1, jf1 = mjf_values(now, job1)
    m1 = stub.add(g.Machine(IP_HTTP, workdir / "jo1", machinefeatures=mf1, jobfeatures=jf1))
    m1.joboutputs.mkdir()
    m1.user_data = pilot({
        "uuid": job1, "machinetype": "demo",
        "machinefeatures_url": stub.url + "/machinefeatures",
        "jobfeatures_url": stub.url + "/jobfeatures",
        "joboutputs_url": stub.url + "/joboutputs",
        "option_outcome": "300 Nothing to do", "option_lifetime": "4",
        "option_heartbeat_interval": "1"}).encode()
    # VM 2: token URLs from meta_data.json win over the substituted ones; default outcome and
    # heartbeat; lifetime 300, but shutdowntime_job has passed, so it drains at once
    job2 = str(uuid.uuid4())
    mf2, jf2 = mjf_values(now, job2)
    jf2["shutdowntime_job"] = str(now - 10)
    token = "t" + uuid.uuid4().hex
    m2 = stub.add(g.Machine(IP_TOKEN, workdir / "jo2", machinefeatures=mf2, jobfeatures=jf2,
                            token=token))
    m2.joboutputs.mkdir()
    # the factory's meta_data.json: plain URLs and *_token_url ones; the token ones win
    m2.meta_data = {"uuid": job2, "hostname": "vm02", "meta": {"machinetype": "demo"}}
    for what in ("machinefeatures", "jobfeatures", "joboutputs"):
        m2.meta_data["meta"][what] = "%s/wrong-meta/%s" % (stub.url, what)
        m2.meta_data["meta"][what + "_token_url"] = "%s/%s/%s" % (stub.url, token, what)
    m2.user_data = pilot({
        "uuid": job2, "machinefeatures_url": stub.url + "/wrong/machinefeatures",
        "jobfeatures_url": stub.url + "/wrong/jobfeatures",
        "joboutputs_url": stub.url + "/wrong/joboutputs", "option_lifetime": "300"}).encode()

    cmdline = "vf_metadata_url=" + stub.url
    vm1 = vms("http", cmdline, network=network.name, mac=g.mac_for(IP_HTTP)).start()
    vm2 = vms("token", cmdline, network=network.name, mac=g.mac_for(IP_TOKEN)).start()
    lifecycle1 = vm1.wait_gone(120)
    lifecycle2 = vm2.wait_gone(120)     # lifetime 300: only the drain ends it this early

    for vm, m, mf, jf in ((vm1, m1, mf1, jf1), (vm2, m2, mf2, jf2)):
        console = vm.console()
        assert "GUEST: network eth0 %s/24 (dhcp)" % m.ip in console
        assert "GUEST: user_data from %s/latest/user-data" % stub.url in console
        assert parse_report(m.joboutputs / "mjf_report") == expected_report(mf, jf), console
        beat = int((m.joboutputs / "heartbeat").read_text())
        assert now <= beat <= time.time() + 1
    assert (m1.joboutputs / "shutdown_message").read_text() == "300 Nothing to do\n"
    assert (m2.joboutputs / "shutdown_message").read_text() == "200 Success\n"

    paths1, paths2 = stub.paths_from(IP_HTTP), stub.paths_from(IP_TOKEN)
    # lifetime 4 s, a heartbeat every second: at t=0..4 (at least 3 even on a busy host)
    assert paths1.count("/joboutputs/heartbeat") >= 3, paths1
    assert "PILOT: shutdowntime_job has passed: stopping early" in vm2.console()
    assert "PILOT: MJF URLs from /tmp/meta_data.json (token URLs)" in vm2.console()
    assert not [p for p in paths2 if p.startswith("/wrong")], paths2
    assert "/%s/machinefeatures/" % token in paths2
    print("http pilots: %.1f s, %.1f s" % (lifecycle1, lifecycle2))


def test_demo_pilot_over_nfs(vms, stub, network, workdir):
    now = int(time.time())
    job = str(uuid.uuid4())
    mf_values, jf_values = mjf_values(now, job)
    mf, jf, jo = mjf_dirs(workdir / "nfs", mf_values, jf_values)
    g.Ganesha.chown_for_rw(jo)    # every client identity is squashed, as the factory does
    ganesha = g.Ganesha(workdir, g.HOST_IP, [
        g.Export(mf, "/%s/machinefeatures" % job, IP_NFS, read_only=True),
        g.Export(jf, "/%s/jobfeatures" % job, IP_NFS, read_only=True),
        g.Export(jo, "/%s/joboutputs" % job, IP_NFS)])
    # user_data still comes from the HTTP metadata stub; MJF and joboutputs go over NFS
    stub.add(g.Machine(IP_NFS, workdir / "unused", user_data=pilot({
        "uuid": job, "machinetype": "demo", "option_mjf": "nfs",
        "option_nfs_server": g.HOST_IP, "option_lifetime": "4",
        "option_heartbeat_interval": "2", "option_outcome": "200 Success"}).encode()))
    try:
        ganesha.start()
        vm = vms("nfs", "vf_metadata_url=" + stub.url, network=network.name,
                 mac=g.mac_for(IP_NFS)).start()
        lifecycle = vm.wait_gone(120)
    finally:
        ganesha.stop()
    console = vm.console()
    assert "PILOT: mounted %s:/%s/" % (g.HOST_IP, job) in console, console
    assert parse_report(jo / "mjf_report") == expected_report(mf_values, jf_values), console
    assert (jo / "shutdown_message").read_text() == "200 Success\n"
    assert now <= int((jo / "heartbeat").read_text()) <= time.time() + 1
    assert (jo / "shutdown_message").stat().st_uid == g.Ganesha.ANON_UID
    print("nfs pilot: %.1f s" % lifecycle)


def test_demo_pilot_stops_heartbeat_but_keeps_running(vms, stub, network, workdir):
    job = str(uuid.uuid4())
    mf, jf = mjf_values(int(time.time()), job)
    m = stub.add(g.Machine(IP_STOP, workdir / "jo", machinefeatures=mf, jobfeatures=jf))
    m.joboutputs.mkdir()
    m.user_data = pilot({
        "uuid": job, "machinefeatures_url": stub.url + "/machinefeatures",
        "jobfeatures_url": stub.url + "/jobfeatures", "joboutputs_url": stub.url + "/joboutputs",
        "option_heartbeat_file": "vm-heartbeat", "option_heartbeat_interval": "1",
        "option_heartbeat_stop_after": "4", "option_lifetime": "300"}).encode()
    vm = vms("hbstop", "vf_metadata_url=" + stub.url, network=network.name,
             mac=g.mac_for(IP_STOP)).start()
    vm.wait_console("PILOT: heartbeat stopped after 4 s", 120)
    beats = stub.paths_from(IP_STOP).count("/joboutputs/vm-heartbeat")
    assert beats >= 3, stub.paths_from(IP_STOP)
    heartbeat = m.joboutputs / "vm-heartbeat"
    mtime = heartbeat.stat().st_mtime
    time.sleep(4)
    assert vm.exists(), "the VM must keep running without heartbeats"
    assert heartbeat.stat().st_mtime == mtime
    assert stub.paths_from(IP_STOP).count("/joboutputs/vm-heartbeat") == beats
    assert not (m.joboutputs / "shutdown_message").exists()
