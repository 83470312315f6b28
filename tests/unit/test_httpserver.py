"""The MJF/metadata HTTP server over real loopback sockets.

VM A lives at 127.0.0.2, VM B at 127.0.0.3 (all of 127/8 is local, so a client socket bound
to those addresses plays each VM); 127.0.0.9 is an address nobody registered. Fairness under
attack (many VMs, many connections) is in test_http_fairness.py.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_vmbuild import Site
from tests.waiting import scaled
from vacfactory.engine.boundary import VMBoundary, nfs_meta, vm_meta
from vacfactory.engine.vmbuild import VMBuilder, meta_data
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.state.records import VMRecord
from vacfactory.vmio import http as hs
from vacfactory.vmio.exports import CommandResult, ExportfsExporter, GaneshaExporter, NullExporter
from vacfactory.vmio.http import MetadataServer, Timeouts, parse_head
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.registry import VMEndpoint, VMRegistry, new_token

A_ADDR, B_ADDR, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.9"
KiB, MiB = 1024, 1024 * 1024


@dataclass
class VMDirs:
    endpoint: VMEndpoint
    root: str

    @property
    def jo(self) -> str:
        return self.endpoint.joboutputs_dir


def make_vm(base: str, uuid: str, address: str, cpus: str, key: Optional[str] = None) -> VMDirs:
    root = os.path.join(base, "machines", uuid)
    for d in ("machinefeatures", "jobfeatures", "joboutputs"):
        os.makedirs(os.path.join(root, d))
    files = {
        "machinefeatures/total_cpu": cpus, "machinefeatures/shutdowntime": "1900000000",
        "machinefeatures/hs06": "40.0", "jobfeatures/job_id": uuid,
        "jobfeatures/allocated_cpu": cpus + "\n", "user_data": f"#cloud-config\n# {uuid}\n",
    }
    for rel, text in files.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    meta = {"public_key": key} if key else {}
    meta["site_note"] = "hello"
    endpoint = VMEndpoint(
        uuid=uuid, name=f"{uuid}.example.org", address=address, token=new_token(),
        machinefeatures_dir=os.path.join(root, "machinefeatures"),
        jobfeatures_dir=os.path.join(root, "jobfeatures"),
        joboutputs_dir=os.path.join(root, "joboutputs"),
        user_data_path=os.path.join(root, "user_data"), machinetype="demo", meta=meta)
    return VMDirs(endpoint, root)


@dataclass
class Env:
    base: str
    registry: VMRegistry
    server: MetadataServer
    a: VMDirs
    b: VMDirs

    @property
    def port(self) -> int:
        return self.server.bound_addresses[0][1]


def start_env(limits: JobOutputsLimits = JobOutputsLimits(), timeouts: Timeouts = Timeouts(),
              **kwargs) -> Env:
    base = tempfile.mkdtemp(prefix="vfvmio-http-")
    a = make_vm(base, "vm-a", A_ADDR, "4", key="ssh-ed25519 AAAAkeyA a@example")
    b = make_vm(base, "vm-b", B_ADDR, "8")
    registry = VMRegistry()
    registry.add(a.endpoint)
    registry.add(b.endpoint)
    # the token-only pool is open here so that the token forms can be tried from STRANGER;
    # a server's default (closed at accept) has its own test
    kwargs.setdefault("max_unidentified_connections", 8)
    server = MetadataServer(registry, [("127.0.0.1", 0)], limits, timeouts=timeouts, **kwargs)
    server.start()
    return Env(base, registry, server, a, b)


def stop_env(env: Env) -> None:
    env.server.stop()
    shutil.rmtree(env.base, ignore_errors=True)


@pytest.fixture
def env() -> Iterator[Env]:
    e = start_env()
    yield e
    stop_env(e)


def request(env: Env, method: str, path: str, src: str = A_ADDR, body: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes, Dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10, source_address=(src, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def raw(env: Env, data: bytes, src: str = A_ADDR, timeout: float = 5.0,
        shutdown: bool = True) -> bytes:
    """Send raw bytes; return everything the server sends until it closes (or timeout)."""
    s = socket.create_connection(("127.0.0.1", env.port), timeout=timeout,
                                 source_address=(src, 0))
    try:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def statuses(data: bytes) -> List[int]:
    """Status codes of every response in ``data`` (responses may follow a body directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


# --------------------------------------------------------------------------------------------
# MJF


@pytest.mark.parametrize("path", ["/machinefeatures", "/machinefeatures/"])
def test_machinefeatures_listing_is_vacs_html(env: Env, path: str) -> None:
    status, body, headers = request(env, "GET", path)
    assert status == 200
    assert headers["content-type"] == "text/html"
    assert body == (b'<html><body><ul><li><a href="hs06">hs06</a></li>'
                    b'<li><a href="shutdowntime">shutdowntime</a></li>'
                    b'<li><a href="total_cpu">total_cpu</a></li></ul></body></html>\n')


def test_jobfeatures_listing_skips_symlinks_and_hidden_files(env: Env) -> None:
    os.symlink("/etc/passwd", os.path.join(env.a.endpoint.jobfeatures_dir, "passwd"))
    open(os.path.join(env.a.endpoint.jobfeatures_dir, ".hidden"), "w").close()
    status, body, _ = request(env, "GET", "/jobfeatures/")
    assert status == 200
    assert b"allocated_cpu" in body and b"job_id" in body
    assert b"passwd" not in body and b"hidden" not in body


def test_key_value_is_plain_text_and_reread_on_every_request(env: Env) -> None:
    status, body, headers = request(env, "GET", "/machinefeatures/shutdowntime")
    assert (status, body, headers["content-type"]) == (200, b"1900000000", "text/plain")
    with open(os.path.join(env.a.endpoint.machinefeatures_dir, "shutdowntime"), "w") as f:
        f.write("1800000000")  # a drain lowered it
    assert request(env, "GET", "/machinefeatures/shutdowntime")[1] == b"1800000000"
    assert request(env, "GET", "/jobfeatures/allocated_cpu")[1] == b"4\n"


@pytest.mark.parametrize("path", [
    "/machinefeatures/total_cpu/extra", "/machinefeatures/../jobfeatures/job_id",
    "/machinefeatures/..", "/machinefeatures/%2e%2e%2fjobfeatures%2fjob_id",
    "/machinefeatures/%2Fetc%2Fpasswd", "/machinefeatures/.hidden", "/machinefeatures//total_cpu",
    "/machinefeatures/total_cpu/", "/jobfeatures/nonexistent", "/machinefeatures/a%00b",
    "/machinefeatures/" + "k" * 200, "/nothing", "/jobfeatures/job_id%2F..%2F..%2Fvm-b",
])
def test_deeper_paths_traversal_and_bad_keys_are_404(env: Env, path: str) -> None:
    status, body, _ = request(env, "GET", path)
    assert status == 404
    assert b"vm-b" not in body


def test_symlinked_fifo_and_device_keys_are_404_without_blocking(env: Env) -> None:
    mf = env.a.endpoint.machinefeatures_dir
    os.symlink(os.path.join(env.b.endpoint.machinefeatures_dir, "total_cpu"),
               os.path.join(mf, "linked"))
    os.mkfifo(os.path.join(mf, "fifo"))
    os.mknod(os.path.join(mf, "zero"), 0o20600, os.makedev(1, 5))
    started = time.monotonic()
    for key in ("linked", "fifo", "zero"):
        assert request(env, "GET", "/machinefeatures/" + key)[0] == 404
    assert time.monotonic() - started < scaled(5)


def test_head_gives_headers_without_body(env: Env) -> None:
    status, body, headers = request(env, "HEAD", "/machinefeatures/total_cpu")
    assert (status, body, headers["content-length"]) == (200, b"", "1")


# --------------------------------------------------------------------------------------------
# joboutputs


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_put_and_post_write_joboutputs_and_answer_201(env: Env, method: str) -> None:
    status, _, _ = request(env, method, "/joboutputs/shutdown_message", body=b"200 Success\n")
    assert status == 201
    with open(os.path.join(env.a.jo, "shutdown_message"), "rb") as f:
        assert f.read() == b"200 Success\n"
    assert os.listdir(env.b.jo) == []
    # replacing is atomic and allowed
    assert request(env, method, "/joboutputs/shutdown_message", body=b"300 None")[0] == 201
    with open(os.path.join(env.a.jo, "shutdown_message"), "rb") as f:
        assert f.read() == b"300 None"
    assert sorted(os.listdir(env.a.jo)) == ["shutdown_message"]  # no temp files left


def test_empty_put_creates_an_empty_heartbeat(env: Env) -> None:
    assert request(env, "PUT", "/joboutputs/heartbeat", body=b"")[0] == 201
    assert os.path.getsize(os.path.join(env.a.jo, "heartbeat")) == 0


@pytest.mark.parametrize("path", ["/joboutputs/shutdown_message", "/joboutputs", "/joboutputs/"])
def test_joboutputs_cannot_be_read_back(env: Env, path: str) -> None:
    request(env, "PUT", "/joboutputs/shutdown_message", body=b"200 ok")
    status, body, headers = request(env, "GET", path)
    assert status == 405
    assert b"200 ok" not in body
    assert "PUT" in headers["allow"]


@pytest.mark.parametrize("path", [
    "/joboutputs/", "/joboutputs/a/b", "/joboutputs/..", "/joboutputs/.hidden",
    "/joboutputs/%2e%2e", "/joboutputs/bad%0aname", "/joboutputs/..%2f..%2fetc", "/joboutputs/-rf",
    "/joboutputs/a..b", "/joboutputs/" + "n" * 200,
])
def test_put_with_a_bad_name_is_403_and_writes_nothing(env: Env, path: str) -> None:
    status, _, _ = request(env, "PUT", path, body=b"x")
    assert status == 403
    assert os.listdir(env.a.jo) == []


def test_put_without_content_length_is_411(env: Env) -> None:
    data = raw(env, b"PUT /joboutputs/x HTTP/1.1\r\nHost: h\r\n\r\nbody")
    assert statuses(data) == [411]
    assert os.listdir(env.a.jo) == []


def test_chunked_put_is_refused(env: Env) -> None:
    data = raw(env, b"PUT /joboutputs/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"4\r\nbody\r\n0\r\n\r\n")
    assert statuses(data) == [501]
    assert os.listdir(env.a.jo) == []


def test_expect_100_continue_is_honoured(env: Env) -> None:
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5, source_address=(A_ADDR, 0))
    try:
        s.sendall(b"PUT /joboutputs/log HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello")
        assert b"201 Created" in s.recv(1000)
    finally:
        s.close()
    with open(os.path.join(env.a.jo, "log"), "rb") as f:
        assert f.read() == b"hello"


@pytest.mark.parametrize("target", ["dir", "fifo", "symlink"])
def test_put_refuses_to_replace_a_non_regular_file(env: Env, target: str) -> None:
    victim = os.path.join(env.base, "outside-victim")
    with open(victim, "wb") as f:
        f.write(b"untouched")
    path = os.path.join(env.a.jo, "x")
    if target == "dir":
        os.mkdir(path)
    elif target == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(victim, path)
    status, _, _ = request(env, "PUT", "/joboutputs/x", body=b"overwrite")
    assert status == 403
    with open(victim, "rb") as f:
        assert f.read() == b"untouched"
    assert sorted(os.listdir(env.a.jo)) == ["x"]


def test_put_over_the_per_file_cap_is_413_before_the_body_is_read() -> None:
    env = start_env(JobOutputsLimits(max_file_bytes=100 * KiB, max_total_bytes=MiB, max_files=5))
    try:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5,
                                     source_address=(A_ADDR, 0))
        s.sendall(b"PUT /joboutputs/big HTTP/1.1\r\nContent-Length: 10737418240\r\n\r\n")
        reply = s.recv(1000)
        assert statuses(reply) == [413]
        assert b"Connection: close" in reply
        s.close()
        assert os.listdir(env.a.jo) == []
    finally:
        stop_env(env)


def test_per_vm_total_and_file_count_are_enforced() -> None:
    env = start_env(JobOutputsLimits(max_file_bytes=400 * KiB, max_total_bytes=MiB, max_files=3))
    try:
        for i in range(2):
            assert request(env, "PUT", f"/joboutputs/log{i}", body=b"x" * (400 * KiB))[0] == 201
        assert request(env, "PUT", "/joboutputs/log2", body=b"x" * (400 * KiB))[0] == 413
        assert request(env, "PUT", "/joboutputs/small", body=b"x")[0] == 201
        assert request(env, "PUT", "/joboutputs/fourth", body=b"x")[0] == 413
        # replacing an existing file is measured without its old size
        assert request(env, "PUT", "/joboutputs/log0", body=b"y" * (400 * KiB))[0] == 201
        # VM B has its own budget
        assert request(env, "PUT", "/joboutputs/log0", src=B_ADDR, body=b"z" * (400 * KiB))[0] == 201
        assert sorted(os.listdir(env.a.jo)) == ["log0", "log1", "small"]
    finally:
        stop_env(env)


def test_concurrent_uploads_share_the_per_vm_budget() -> None:
    env = start_env(JobOutputsLimits(max_file_bytes=MiB, max_total_bytes=MiB, max_files=10))
    try:
        first = socket.create_connection(("127.0.0.1", env.port), timeout=5,
                                         source_address=(A_ADDR, 0))
        first.sendall(b"PUT /joboutputs/one HTTP/1.1\r\nContent-Length: 700000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.2)
        status, _, _ = request(env, "PUT", "/joboutputs/two", body=b"y" * 700000)
        assert status == 413
        first.sendall(b"x" * 699000)
        assert statuses(first.recv(1000)) == [201]
        first.close()
    finally:
        stop_env(env)


def test_abandoned_upload_leaves_nothing_and_frees_the_budget() -> None:
    env = start_env(JobOutputsLimits(max_file_bytes=MiB, max_total_bytes=MiB, max_files=10))
    try:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5, source_address=(A_ADDR, 0))
        s.sendall(b"PUT /joboutputs/part HTTP/1.1\r\nContent-Length: 900000\r\n\r\n" + b"x" * 5000)
        time.sleep(0.2)
        s.close()
        time.sleep(0.3)
        assert os.listdir(env.a.jo) == []
        assert request(env, "PUT", "/joboutputs/whole", body=b"y" * 900000)[0] == 201
    finally:
        stop_env(env)


def test_one_mib_put_is_fast(env: Env) -> None:
    body = os.urandom(MiB)
    started = time.perf_counter()
    status, _, _ = request(env, "PUT", "/joboutputs/payload", body=body)
    elapsed = time.perf_counter() - started
    assert status == 201
    with open(os.path.join(env.a.jo, "payload"), "rb") as f:
        assert f.read() == body
    assert elapsed < scaled(0.5)  # the bench measures the real figure (goal < 50 ms)


# --------------------------------------------------------------------------------------------
# metadata


@pytest.mark.parametrize("path", [
    "/latest/user-data", "/0000-00-00/user-data", "/2009-04-04/user-data",
    "/openstack/latest/user_data", "/openstack/latest/user-data",
    "/openstack/2012-08-10/user_data",
])
def test_user_data_is_served_on_every_vac_and_openstack_path(env: Env, path: str) -> None:
    status, body, _ = request(env, "GET", path)
    assert (status, body) == (200, b"#cloud-config\n# vm-a\n")


@pytest.mark.parametrize("path", ["/latest/meta-data", "/latest/meta-data/", "/0000-00-00/meta-data/"])
def test_ec2_meta_data_listing(env: Env, path: str) -> None:
    status, body, _ = request(env, "GET", path)
    assert status == 200
    lines = body.decode().split()
    assert lines[0] == "public-keys/0/openssh-key"
    assert {"ami-id", "instance-id", "hostname", "local-ipv4"} <= set(lines)


@pytest.mark.parametrize("key,value", [
    ("instance-id", b"vm-a"), ("ami-id", b"vm-a"), ("hostname", b"vm-a.example.org"),
    ("local-ipv4", b"127.0.0.2"), ("public-keys/0/openssh-key", b"ssh-ed25519 AAAAkeyA a@example"),
    ("public-keys/", b"0=vacfactory\n"), ("public-keys/0/", b"openssh-key\n"),
])
def test_ec2_meta_data_values(env: Env, key: str, value: bytes) -> None:
    assert request(env, "GET", "/latest/meta-data/" + key)[:2] == (200, value)


def test_vm_without_a_key_has_no_public_keys(env: Env) -> None:
    status, body, _ = request(env, "GET", "/latest/meta-data/", src=B_ADDR)
    assert status == 200 and b"public-keys" not in body
    assert request(env, "GET", "/latest/meta-data/public-keys/0/openssh-key", src=B_ADDR)[0] == 404


@pytest.mark.parametrize("path", [
    "/openstack/latest/meta_data.json", "/openstack/latest/meta-data.json",
    "/latest/meta-data.json", "/openstack/2012-08-10/meta_data.json",
])
def test_meta_data_json_carries_mjf_urls_and_token_forms(env: Env, path: str) -> None:
    status, body, headers = request(env, "GET", path)
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    token = env.a.endpoint.token
    assert doc["uuid"] == "vm-a" and doc["hostname"] == doc["name"] == "vm-a.example.org"
    assert doc["public_keys"] == {"vacfactory": "ssh-ed25519 AAAAkeyA a@example"}
    meta = doc["meta"]
    assert meta["machinefeatures"] == "http://169.254.169.253/machinefeatures"
    assert meta["jobfeatures"] == "http://169.254.169.253/jobfeatures"
    assert meta["joboutputs"] == "http://169.254.169.253/joboutputs"
    assert meta["machinefeatures_token_url"] == f"http://169.254.169.253/vm/{token}/machinefeatures"
    assert meta["joboutputs_token_url"] == f"http://169.254.169.253/vm/{token}/joboutputs"
    assert meta["machinetype"] == "demo" and meta["site_note"] == "hello"
    assert env.b.endpoint.token not in body.decode()


def test_token_urls_from_meta_data_work_from_behind_nat(env: Env) -> None:
    doc = json.loads(request(env, "GET", "/openstack/latest/meta_data.json")[1])
    url = doc["meta"]["machinefeatures_token_url"] + "/total_cpu"
    path = url.split("169.254.169.253", 1)[1]
    assert request(env, "GET", path, src=STRANGER)[:2] == (200, b"4")
    put = doc["meta"]["joboutputs_token_url"].split("169.254.169.253", 1)[1] + "/heartbeat"
    assert request(env, "PUT", put, src=STRANGER, body=b"")[0] == 201
    assert os.listdir(env.a.jo) == ["heartbeat"]


@pytest.mark.parametrize("path", ["/latest/other", "/openstack/latest/secret", "/1999/user-data",
                                  "/latest/meta-data/public-keys/1/openssh-key", "/openstack/x/"])
def test_unknown_metadata_paths_are_404(env: Env, path: str) -> None:
    assert request(env, "GET", path)[0] == 404


# --------------------------------------------------------------------------------------------
# identification: a VM can never reach another VM's files


def test_each_vm_sees_its_own_values(env: Env) -> None:
    assert request(env, "GET", "/machinefeatures/total_cpu", src=A_ADDR)[1] == b"4"
    assert request(env, "GET", "/machinefeatures/total_cpu", src=B_ADDR)[1] == b"8"
    assert request(env, "GET", "/latest/user-data", src=B_ADDR)[1] == b"#cloud-config\n# vm-b\n"


def test_unknown_address_without_token_is_403(env: Env) -> None:
    for path in ("/machinefeatures/total_cpu", "/latest/user-data", "/openstack/latest/meta_data.json"):
        status, body, _ = request(env, "GET", path, src=STRANGER)
        assert (status, body) == (403, b"403 Forbidden: unknown VM\n")
    assert request(env, "PUT", "/joboutputs/x", src=STRANGER, body=b"x")[0] == 403
    assert os.listdir(env.a.jo) == [] and os.listdir(env.b.jo) == []


def test_token_in_header_identifies_the_vm(env: Env) -> None:
    headers = {"X-Vacfactory-Token": env.b.endpoint.token}
    assert request(env, "GET", "/machinefeatures/total_cpu", src=STRANGER, headers=headers)[1] == b"8"


def test_vm_a_cannot_use_vm_b_token_from_its_own_address(env: Env) -> None:
    tb = env.b.endpoint.token
    assert request(env, "GET", f"/vm/{tb}/machinefeatures/total_cpu", src=A_ADDR)[0] == 403
    assert request(env, "GET", "/machinefeatures/total_cpu", src=A_ADDR,
                   headers={"X-Vacfactory-Token": tb})[0] == 403
    assert request(env, "PUT", f"/vm/{tb}/joboutputs/shutdown_message", src=A_ADDR,
                   body=b"200 forged")[0] == 403
    assert os.listdir(env.b.jo) == []


def test_header_and_path_tokens_must_agree(env: Env) -> None:
    ta, tb = env.a.endpoint.token, env.b.endpoint.token
    assert request(env, "GET", f"/vm/{ta}/machinefeatures/total_cpu", src=STRANGER,
                   headers={"X-Vacfactory-Token": tb})[0] == 403
    assert request(env, "GET", f"/vm/{ta}/machinefeatures/total_cpu", src=STRANGER,
                   headers={"X-Vacfactory-Token": ta})[:2] == (200, b"4")


@pytest.mark.parametrize("token", ["", "0" * 32, "XYZ", "a" * 31, "../vm-b", "%2e%2e"])
def test_bad_or_unknown_tokens_are_403(env: Env, token: str) -> None:
    assert request(env, "GET", f"/vm/{token}/machinefeatures/total_cpu", src=A_ADDR)[0] in (403, 404)
    assert request(env, "GET", f"/vm/{token}/machinefeatures/total_cpu", src=STRANGER)[0] in (403, 404)


@pytest.mark.parametrize("path", [
    "/machinefeatures/../../vm-b/machinefeatures/total_cpu",
    "/vm/../machinefeatures/total_cpu", "/jobfeatures/%2e%2e/%2e%2e/vm-b/jobfeatures/job_id",
    "/openstack/latest/../../../vm-b/user_data",
])
def test_path_tricks_never_reach_another_vm(env: Env, path: str) -> None:
    status, body, _ = request(env, "GET", path, src=A_ADDR)
    assert status in (403, 404)
    assert b"8" not in body and b"vm-b" not in body


def test_path_tricks_never_write_into_another_vm(env: Env) -> None:
    for path in ("/joboutputs/../../vm-b/joboutputs/x", "/joboutputs/..%2f..%2fvm-b%2fjoboutputs%2fx"):
        assert request(env, "PUT", path, src=A_ADDR, body=b"x")[0] == 403
    assert os.listdir(env.b.jo) == [] and os.listdir(env.a.jo) == []


def test_removed_vm_is_forgotten_at_once(env: Env) -> None:
    token = env.a.endpoint.token
    env.registry.remove("vm-a")
    assert request(env, "GET", "/machinefeatures/total_cpu", src=A_ADDR)[0] == 403
    assert request(env, "GET", f"/vm/{token}/machinefeatures/total_cpu", src=STRANGER)[0] == 403


def test_symlinked_joboutputs_directory_refuses_uploads(env: Env) -> None:
    shutil.rmtree(env.a.jo)
    os.symlink(env.b.jo, env.a.jo)
    assert request(env, "PUT", "/joboutputs/x", body=b"x")[0] == 403
    assert os.listdir(env.b.jo) == []


# --------------------------------------------------------------------------------------------
# HTTP robustness


def test_keep_alive_serves_many_requests_on_one_connection(env: Env) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=5, source_address=(A_ADDR, 0))
    try:
        local = None
        for _ in range(50):
            conn.request("GET", "/machinefeatures/total_cpu")
            resp = conn.getresponse()
            assert resp.read() == b"4"
            local = local or conn.sock.getsockname()
            assert conn.sock.getsockname() == local
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    data = raw(env, b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n"
                    b"GET /nothing HTTP/1.1\r\n\r\n"
                    b"PUT /joboutputs/p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                    b"GET /jobfeatures/job_id HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert statuses(data) == [200, 404, 201, 200]
    assert data.endswith(b"vm-a")


def test_http_1_0_closes_after_the_response(env: Env) -> None:
    data = raw(env, b"GET /machinefeatures/total_cpu HTTP/1.0\r\n\r\n", shutdown=False, timeout=3)
    assert statuses(data) == [200] and data.endswith(b"\r\n\r\n4")


@pytest.mark.parametrize("data,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n", 431),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / FOO/1.1\r\n\r\n", 400),
    (b"get / HTTP/1.1\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
    (b"GET relative HTTP/1.1\r\n\r\n", 400),
    (b"BREW /machinefeatures HTTP/1.1\r\n\r\n", 405),
])
def test_malformed_requests_get_an_error_and_the_server_lives_on(env: Env, data: bytes,
                                                                  status: int) -> None:
    assert statuses(raw(env, data))[:1] == [status]
    assert request(env, "GET", "/machinefeatures/total_cpu")[:2] == (200, b"4")


def test_absolute_form_target_is_accepted(env: Env) -> None:
    data = raw(env, b"GET http://169.254.169.253/machinefeatures/total_cpu HTTP/1.1\r\n\r\n")
    assert statuses(data) == [200] and data.endswith(b"4")


def test_slow_loris_head_is_cut_off_while_others_are_served() -> None:
    env = start_env(timeouts=Timeouts(head=1.0, idle=5.0))
    try:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5, source_address=(A_ADDR, 0))
        started = time.monotonic()
        closed = False
        for byte in b"GET /machinefeatures/total_cpu HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.send(bytes([byte]))
            except OSError:
                closed = True
                break
            assert request(env, "GET", "/machinefeatures/total_cpu", src=B_ADDR)[1] == b"8"
            time.sleep(0.1)
            if time.monotonic() - started > 4:
                break
        if not closed:
            s.settimeout(3)
            closed = s.recv(100) == b""
        s.close()
        assert closed
        assert time.monotonic() - started < 4
    finally:
        stop_env(env)


def test_idle_keep_alive_connections_are_closed() -> None:
    env = start_env(timeouts=Timeouts(idle=0.5))
    try:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5, source_address=(A_ADDR, 0))
        s.sendall(b"GET /machinefeatures/total_cpu HTTP/1.1\r\n\r\n")
        first = s.recv(1000)
        assert statuses(first) == [200]
        started = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - started < 3
        s.close()
    finally:
        stop_env(env)


def test_connections_per_vm_are_capped() -> None:
    env = start_env(max_connections_per_vm=4)
    socks = []
    try:
        for _ in range(4):
            socks.append(socket.create_connection(("127.0.0.1", env.port), timeout=5,
                                                  source_address=(A_ADDR, 0)))
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", env.port), timeout=5,
                                         source_address=(A_ADDR, 0))
        assert statuses(extra.recv(1000)) == [503]
        extra.close()
        # another VM is not affected
        assert request(env, "GET", "/machinefeatures/total_cpu", src=B_ADDR)[1] == b"8"
    finally:
        for s in socks:
            s.close()
        stop_env(env)


def test_stop_closes_the_listening_socket() -> None:
    env = start_env()
    port = env.port
    stop_env(env)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_binding_a_busy_port_raises_export_error(env: Env) -> None:
    from vacfactory.errors import ExportError
    other = MetadataServer(env.registry, [("127.0.0.1", env.port)])
    with pytest.raises(ExportError):
        other.start()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda a, b: a + b"\r\n\r\n" + b, st.binary(max_size=500), st.binary(max_size=500)),
    st.builds(lambda m, p, h: b"%s /%s HTTP/1.1\r\n%s\r\n\r\n" % (m, p, h),
              st.sampled_from([b"GET", b"PUT", b"POST", b"HEAD", b"X"]),
              st.binary(max_size=100), st.binary(max_size=300)),
))
def test_fuzzed_bytes_never_break_the_server(env: Env, junk: bytes) -> None:
    reply = raw(env, junk, timeout=3)
    for line in reply.split(b"\r\n"):
        if line.startswith(b"HTTP/"):
            assert line.startswith(b"HTTP/1.1 ")
    assert request(env, "GET", "/machinefeatures/total_cpu")[:2] == (200, b"4")
    leftovers = [n for n in os.listdir(env.a.jo) if n.startswith(".")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------
# the parser alone


def test_parse_head_reads_what_the_router_needs() -> None:
    req = parse_head(b"PUT /joboutputs/x?q=1 HTTP/1.1\r\nContent-Length: 12\r\n"
                     b"X-Vacfactory-Token: abc\r\nConnection: keep-alive, Upgrade\r\n"
                     b"Expect: 100-Continue")
    assert (req.method, req.path, req.content_length, req.keep_alive, req.expect_continue) == \
        ("PUT", "/joboutputs/x", 12, True, True)
    assert req.headers["x-vacfactory-token"] == "abc"
    assert parse_head(b"GET / HTTP/1.0").keep_alive is False
    assert parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive is False


@given(st.binary(max_size=2000))
def test_parse_head_raises_only_http_errors(data: bytes) -> None:
    try:
        parse_head(data)
    except hs.HTTPError as e:
        assert 400 <= e.status < 600


# --------------------------------------------------------------------------------------------
# the registry behind identification


def _endpoint(uuid: str, address: str, token: Optional[str] = None) -> VMEndpoint:
    return VMEndpoint(uuid, uuid + ".example", address, token or new_token(), "/m", "/j", "/o",
                      "/u", "demo", {"k": "v"})


def test_tokens_are_128_random_bits_in_hex() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in tokens)


def test_registry_indexes_by_uuid_address_and_token() -> None:
    reg = VMRegistry()
    a = _endpoint("vm-a", A_ADDR)
    reg.add(a)
    assert reg.by_uuid("vm-a") is a and reg.by_address(A_ADDR) is a and reg.by_token(a.token) is a
    assert reg.by_address(B_ADDR) is None and reg.by_token(new_token()) is None
    assert reg.by_token("not a token") is None
    moved = _endpoint("vm-a", B_ADDR)
    reg.add(moved)  # re-adding a uuid replaces it and frees the old address and token
    assert reg.by_address(A_ADDR) is None and reg.by_token(a.token) is None
    assert reg.all() == (moved,) and len(reg) == 1
    assert reg.remove("vm-a") is moved and reg.remove("vm-a") is None
    assert reg.all() == ()


def test_registry_refuses_a_second_vm_on_an_address_or_token() -> None:
    from vacfactory.errors import ExportError
    reg = VMRegistry()
    a = _endpoint("vm-a", A_ADDR)
    reg.add(a)
    with pytest.raises(ExportError, match="address"):
        reg.add(_endpoint("vm-b", A_ADDR))
    with pytest.raises(ExportError, match="token"):
        reg.add(_endpoint("vm-b", B_ADDR, token=a.token))
    assert reg.all() == (a,)


@pytest.mark.parametrize("kwargs", [{"address": "169.254.169.5/24"}, {"address": "::1"},
                                    {"token": "short"}, {"token": "G" * 32}, {"uuid": "../x"},
                                    {"uuid": ""}])
def test_endpoint_validates_its_fields(kwargs) -> None:
    values = dict(uuid="vm-a", name="n", address=A_ADDR, token=new_token(),
                  machinefeatures_dir="/m", jobfeatures_dir="/j", joboutputs_dir="/o",
                  user_data_path="/u", machinetype="demo")
    values.update(kwargs)
    with pytest.raises(ValueError):
        VMEndpoint(**values)


def test_endpoint_meta_cannot_be_changed_after_registration() -> None:
    meta = {"public_key": "k"}
    e = VMEndpoint("vm-a", "n", A_ADDR, new_token(), "/m", "/j", "/o", "/u", "demo", meta)
    meta["public_key"] = "changed"
    assert e.meta["public_key"] == "k"
    with pytest.raises(TypeError):
        e.meta["x"] = "y"  # type: ignore[index]


def test_registry_is_safe_under_concurrent_use() -> None:
    reg = VMRegistry()
    errors: List[BaseException] = []
    stop = threading.Event()

    def churn(n: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                e = _endpoint(f"vm-{n}-{i % 5}", f"127.1.{n}.{i % 5 + 1}")
                reg.add(e)
                found = reg.by_address(e.address)
                assert found is None or found.address == e.address
                assert reg.by_token(e.token) in (e, None)
                reg.remove(e.uuid)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert reg.all() == ()


def test_a_stream_of_blank_lines_does_not_keep_a_connection_alive() -> None:
    env = start_env(timeouts=Timeouts(head=1.0, idle=30.0))
    try:
        s = socket.create_connection(("127.0.0.1", env.port), timeout=5, source_address=(A_ADDR, 0))
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 4:
            try:
                s.send(b"\r\n")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        s.close()
        assert closed
    finally:
        stop_env(env)


# --------------------------------------------------------------------------------------------
# NFS VMs are told where their exports are (engine.boundary.nfs_meta)


class _Exportfs:
    """Stands in for the exportfs binary (this host has no kernel nfsd): records the calls."""

    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def __call__(self, argv) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(0, "", "")


def _nfs_exporter(kind: str, directory: str):
    """The real exporter class of ``kind`` (ganesha's configuration without its process)."""

    class QuietGanesha(GaneshaExporter):
        def _start(self) -> None:
            return None

        def _reload(self, pid: int) -> None:
            return None

    if kind == "exportfs":
        return ExportfsExporter(runner=_Exportfs(), prepare_rw=False)
    if kind == "ganesha":
        return QuietGanesha(os.path.join(directory, "ganesha.conf"), os.path.join(directory, "ganesha.pid"),
                            os.path.join(directory, "ganesha.log"), prepare_rw=False)
    return NullExporter()


@dataclass
class _NfsVM:
    machine: Machine
    boundary: VMBoundary
    config: object


def _published_vm(tmp_path, kind: str, transport: str = "nfs") -> _NfsVM:
    """A VM of a machinetype with ``mjf_transport``, published through VMBoundary with the
    ``kind`` exporter, as the engine does; it plays the VM from A_ADDR."""
    site = Site(str(tmp_path))
    config = site.configure(f"nfs_exporter = {kind}\n", f"mjf_transport = {transport}\n")
    builder = VMBuilder(site.state_dir)
    record = replace(site.record(config, builder), address=A_ADDR)
    machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record))
    boundary = VMBoundary(exporter=_nfs_exporter(kind, str(tmp_path / "ganesha")),
                          meta_source=lambda: vm_meta(config))
    boundary.publish(machine)
    return _NfsVM(machine, boundary, config)


def _served_meta_data(registry: VMRegistry) -> Dict[str, object]:
    server = MetadataServer(registry, [("127.0.0.1", 0)])
    with server:
        conn = http.client.HTTPConnection("127.0.0.1", server.bound_addresses[0][1], timeout=10,
                                          source_address=(A_ADDR, 0))
        try:
            conn.request("GET", "/openstack/latest/meta_data.json")
            response = conn.getresponse()
            assert response.status == 200
            return json.loads(response.read())
        finally:
            conn.close()


NFS_KEYS = ("nfs_server", "machinefeatures_nfs_path", "jobfeatures_nfs_path", "joboutputs_nfs_path")


def test_meta_data_json_gives_an_nfs_vm_the_real_paths_the_kernel_server_exports(tmp_path) -> None:
    vm = _published_vm(tmp_path, "exportfs")
    meta = _served_meta_data(vm.boundary.registry)["meta"]
    machine = vm.machine
    assert {k: meta[k] for k in NFS_KEYS} == {
        "nfs_server": hs.METADATA_ADDRESS,
        "machinefeatures_nfs_path": machine.machinefeatures_dir,
        "jobfeatures_nfs_path": machine.jobfeatures_dir,
        "joboutputs_nfs_path": machine.joboutputs_dir,
    }
    # exactly what exportfs was told to export to this VM
    exported = sorted(call[-1] for call in vm.boundary.exporter.runner.calls if call[1] == "-o")
    assert exported == sorted(f"{A_ADDR}:{meta[k]}" for k in NFS_KEYS[1:])


def test_meta_data_json_gives_an_nfs_vm_the_pseudo_paths_ganesha_exports(tmp_path) -> None:
    vm = _published_vm(tmp_path, "ganesha")
    meta = _served_meta_data(vm.boundary.registry)["meta"]
    uuid = vm.machine.uuid
    assert {k: meta[k] for k in NFS_KEYS} == {
        "nfs_server": hs.METADATA_ADDRESS,
        "machinefeatures_nfs_path": f"/{uuid}/machinefeatures",
        "jobfeatures_nfs_path": f"/{uuid}/jobfeatures",
        "joboutputs_nfs_path": f"/{uuid}/joboutputs",
    }
    # exactly the pseudo paths in ganesha's configuration, for this VM's address
    exports = vm.boundary.exporter.exports[uuid]
    assert sorted(s.pseudo for s, _ in exports) == sorted(meta[k] for k in NFS_KEYS[1:])
    assert {s.client for s, _ in exports} == {A_ADDR}
    assert vm.boundary.exporter.bind_address == meta["nfs_server"]


@pytest.mark.parametrize("kind,transport", [("ganesha", "http"), ("exportfs", "http")])
def test_an_http_vm_is_given_no_nfs_keys(tmp_path, kind: str, transport: str) -> None:
    vm = _published_vm(tmp_path, kind, transport)
    meta = _served_meta_data(vm.boundary.registry)["meta"]
    assert not set(NFS_KEYS) & set(meta)
    assert meta["machinefeatures"] == "http://169.254.169.253/machinefeatures"


def test_no_nfs_keys_when_nothing_is_exported() -> None:
    record = VMRecord(uuid="11111111-aaaa-4bbb-8ccc-000000000001", name="vm.example.org", slot=0,
                      factory="f.example.org", space="s.example.org", machinetype="demo",
                      machine_model="vm-raw", processors=1, memory_mb=100, created=0.0,
                      shutdown_time=3600.0, mjf_transport="nfs", address=A_ADDR, token=new_token())
    machine = Machine(record=record, path="/var/lib/vacfactory/machines/" + record.uuid)
    assert nfs_meta(machine, "none") == {}
    assert set(nfs_meta(machine, "exportfs")) == set(NFS_KEYS)


def test_the_config_drive_and_a_restarted_engine_give_the_same_nfs_keys(tmp_path) -> None:
    vm = _published_vm(tmp_path, "exportfs")
    served = _served_meta_data(vm.boundary.registry)
    # the config drive's meta_data.json (engine.vmbuild, from nfs_exporter in the configuration)
    assert meta_data(vm.config, vm.machine.record, vm.machine) == served
    # after a restart the engine re-registers live VMs (VMBoundary.start) with the same keys
    again = VMBoundary(exporter=_nfs_exporter("exportfs", ""), meta_source=lambda: vm_meta(vm.config))
    again.start(vm.config, [vm.machine])
    assert _served_meta_data(again.registry) == served


# --------------------------------------------------------------------------------------------
# no token in the log: whoever reads it must not learn how to be a VM


def test_refused_and_logged_requests_never_show_a_token(env: Env, caplog) -> None:
    ta, tb = env.a.endpoint.token, env.b.endpoint.token
    caplog.set_level("DEBUG", logger="vacfactory.vmio.http")
    env.server.warnings.clear()
    attempts = [
        ("GET", f"/vm/{tb}/machinefeatures/total_cpu", A_ADDR, None),    # B's token from A
        ("PUT", f"/vm/{tb}/joboutputs/shutdown_message", A_ADDR, b"x"),
        ("GET", f"/vm/{ta}/machinefeatures/nokey", STRANGER, None),      # a 404 GET is logged
        ("PUT", f"/vm/{ta}/joboutputs/bad%20name", STRANGER, b"x"),       # refused name
        ("GET", f"/nothing/{tb}/{tb[:20]}", B_ADDR, None),                # tokens elsewhere
        ("PUT", f"/joboutputs/{tb}", A_ADDR, b"x" * 10),                  # as a file name
    ]
    for method, path, src, body in attempts:
        env.server.warnings.clear()
        request(env, method, path, src=src, body=body)
    text = caplog.text
    assert "refused" in text and hs.REDACTED in text  # the refusals were logged...
    for token in (ta, tb):
        assert token not in text and token[:16] not in text  # ...without any token
    assert hs.shown(f"/vm/{tb}/x") == "/vm/<redacted>/x"
