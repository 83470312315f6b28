"""What every VM is offered (engine.boundary.vm_meta) through the real HTTP server: the keys
of the ``root_public_key`` file in meta_data.json and the EC2 paths, ``http_port`` in every URL;
as in Vac, a key file that cannot be read or holds no key never stops a VM ("no ssh access",
logged once per file and change), an ``authorized_keys``-style file offers every valid key and
skips the rest with a warning naming file:line; the daemon's wiring.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import os
from typing import Iterator, Tuple

import pytest
from hypothesis import given, settings, strategies as st

from tests.unit.test_vmbuild import Site, ssh_public_key
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon
from vacfactory.engine.boundary import VMBoundary, vm_meta
from vacfactory.engine.rootkeys import MAX_KEY_FILE, key_file_problems, public_key_line_problem, read_public_keys
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.vmio.http import METADATA_ADDRESS, MJF_ADDRESS, MetadataServer, base_url
from tests.unit.engine_harness import HOST

VM_ADDR = "127.0.0.2"


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(str(tmp_path))


class Served:
    """One VM published through VMBoundary and served by a real MetadataServer."""

    def __init__(self, site: Site, config, port: int) -> None:
        builder = VMBuilder(site.state_dir)
        record = site.record(config, builder)
        machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record))
        # libvirt's test driver gives VMs no address; this one plays the VM from 127.0.0.2
        self.machine = Machine(record=dataclasses.replace(record, address=VM_ADDR), path=machine.path)
        self.boundary = VMBoundary(meta_source=lambda: vm_meta(config))
        self.boundary.publish(self.machine)
        # what the daemon passes (Daemon.ensure_http)
        self.server = MetadataServer(self.boundary.registry, [("127.0.0.1", 0)],
                                     mjf_base_url=base_url(MJF_ADDRESS, port),
                                     metadata_base_url=base_url(METADATA_ADDRESS, port))
        self.server.start()

    def get(self, path: str) -> Tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.bound_addresses[0][1],
                                          timeout=10, source_address=(VM_ADDR, 0))
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture
def serve() -> Iterator:
    started = []

    def start(site: Site, config, port: int = 80) -> Served:
        served = Served(site, config, port)
        started.append(served)
        return served

    yield start
    for served in started:
        served.server.stop()


def test_root_public_key_is_offered_in_meta_data_json_and_on_the_ec2_paths(site, serve) -> None:
    key = ssh_public_key()
    path = site.write("id_ed25519.pub", key + "\n", site.root)
    vm = serve(site, site.configure(f"root_public_key = {path}\n"))
    status, body = vm.get("/openstack/latest/meta_data.json")
    doc = json.loads(body)
    assert status == 200 and doc["public_keys"] == {"vacfactory": key}
    assert doc["availability_zone"] == site.factory_name
    assert json.loads(vm.get("/latest/meta-data.json")[1])["public_keys"] == {"vacfactory": key}
    assert vm.get("/latest/meta-data/")[1].split(b"\n")[0] == b"public-keys/0/openssh-key"
    assert vm.get("/latest/meta-data/public-keys/") == (200, b"0=vacfactory\n")
    assert vm.get("/latest/meta-data/public-keys/0/") == (200, b"openssh-key\n")
    assert vm.get("/latest/meta-data/public-keys/0/openssh-key") == (200, key.encode())


def test_without_a_key_file_at_the_default_path_no_key_is_offered(site, serve) -> None:
    config = site.configure()
    assert config.settings.root_public_key == "/root/.ssh/id_rsa.pub"
    if os.path.exists(config.settings.root_public_key):  # a host with a root key offers it
        assert vm_meta(config)["public_key"] == "\n".join(read_public_keys(config.settings.root_public_key).keys)
        return
    vm = serve(site, config)
    doc = json.loads(vm.get("/openstack/latest/meta_data.json")[1])
    assert doc["public_keys"] == {}
    assert b"public-keys" not in vm.get("/latest/meta-data/")[1]
    assert vm.get("/latest/meta-data/public-keys/0/openssh-key")[0] == 404
    assert read_public_keys(os.path.join(site.root, "absent.pub")).unreadable == "no such file"


@pytest.mark.parametrize("port,base", [(80, "http://169.254.169.253"),
                                       (8080, "http://169.254.169.253:8080")])
def test_meta_data_urls_carry_http_port_unless_it_is_80(site, serve, port: int, base: str) -> None:
    vm = serve(site, site.configure(f"http_port = {port}\n"), port)
    token = vm.machine.record.token
    meta = json.loads(vm.get("/openstack/latest/meta_data.json")[1])["meta"]
    assert meta["machinefeatures"] == f"{base}/machinefeatures"
    assert meta["joboutputs"] == f"{base}/joboutputs"
    assert meta["jobfeatures_token_url"] == f"{base}/vm/{token}/jobfeatures"
    assert meta["metadata_token_url"] == base.replace(".253", ".254") + f"/vm/{token}"
    # the token URL works on the server as given (path after the authority)
    path = meta["machinefeatures_token_url"].split(base, 1)[1] + "/total_cpu"
    assert vm.get(path) == (200, b"1")


def _rsa_blob_with_type(name: bytes) -> str:
    return base64.b64encode(len(name).to_bytes(4, "big") + name + b"\x00" * 8).decode()


def _warnings(caplog, needle: str):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


BAD_LINES = {
    "a private key": ("-----BEGIN OPENSSH PRIVATE KEY-----", "must start with a key type"),
    "no key type": ("AAAAC3NzaC1lZDI1NTE5AAAAI root", "must start with a key type"),
    "bad base64": ("ssh-ed25519 not*base64 root", "not base64"),
    "no key data": ("ssh-ed25519", "no key data"),
    "the wrong type": (f"ssh-rsa {_rsa_blob_with_type(b'ssh-ed25519')} root", "not a ssh-rsa key"),
    "a control character": (ssh_public_key("a\x1b[2Jb"), "control characters"),
    "options without a key": ('from="10.0.0.1" root', "must start with a key type"),
    "unbalanced option quotes": ('from="10.0.0.1 ssh-ed25519 AAAA x', "must start with a key type"),
}


@pytest.mark.parametrize("what", sorted(BAD_LINES))
def test_a_line_that_is_not_a_key_is_skipped_with_a_warning_naming_file_and_line(site, caplog, what) -> None:
    bad, why = BAD_LINES[what]
    good = ssh_public_key("good")
    path = site.write("keys", f"# root keys\n\n{bad}\n{good}\n", site.root)
    config = site.configure(f"root_public_key = {path}\n")
    assert vm_meta(config)["public_key"] == good
    line = open(site.config_path).read().splitlines().index(f"root_public_key = {path}") + 1
    (warning,) = _warnings(caplog, "skipped")
    assert warning.startswith(f"{path}:3: skipped, not an OpenSSH public key line (")
    assert why in warning and warning.endswith(f"(root_public_key from {site.config_path}:{line})")


def test_an_authorized_keys_file_offers_every_valid_key_with_its_options(site, serve) -> None:
    keys = [ssh_public_key("alice"), 'from="10.0.0.0/8",no-pty ' + ssh_public_key("bob"),
            'command="echo \\"hi there\\"" ' + ssh_public_key("carol")]
    text = f"# admins\n{keys[0]}\n\n   {keys[1]}  \r\n# old key, revoked\n#{ssh_public_key('eve')}\n{keys[2]}"
    path = site.write("authorized_keys", text, site.root)
    assert read_public_keys(path).keys == tuple(keys)
    vm = serve(site, site.configure(f"root_public_key = {path}\n"))
    served = "\n".join(keys)
    assert json.loads(vm.get("/openstack/latest/meta_data.json")[1])["public_keys"] == {"vacfactory": served}
    assert vm.get("/latest/meta-data/public-keys/0/openssh-key") == (200, served.encode())


@pytest.mark.parametrize("make", ["missing", "directory", "fifo", "empty", "only comments", "too big"])
def test_a_key_file_that_offers_nothing_still_publishes_the_vm_without_a_key(site, caplog, make) -> None:
    path = os.path.join(site.root, "key.pub")
    if make == "directory":
        os.mkdir(path)
    elif make == "fifo":
        os.mkfifo(path)  # must not hang the engine
    elif make != "missing":
        content = {"empty": "", "only comments": "# no key yet\n\n",
                   "too big": (ssh_public_key() + "\n") * (MAX_KEY_FILE // 80 + 10)}[make]
        site.write("key.pub", content, site.root)
    config = site.configure(f"root_public_key = {path}\n")
    builder = VMBuilder(site.state_dir)
    record = site.record(config, builder)
    machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record))
    boundary = VMBoundary(meta_source=lambda: vm_meta(config))
    boundary.publish(Machine(record=dataclasses.replace(record, address=VM_ADDR), path=machine.path))
    registered = boundary.registry.by_address(VM_ADDR)
    assert registered is not None and "public_key" not in registered.meta
    line = open(site.config_path).read().splitlines().index(f"root_public_key = {path}") + 1
    expected = {"missing": f"cannot read {path}: no such file", "directory": f"cannot read {path}: not a regular file",
                "fifo": f"cannot read {path}: not a regular file", "empty": f"no public key in {path}",
                "only comments": f"no public key in {path}",
                "too big": f"cannot read {path}: over {MAX_KEY_FILE} bytes: not a public key file"}[make]
    assert _warnings(caplog, "no ssh access") == \
        [f"no ssh access: {expected} (root_public_key from {site.config_path}:{line})"]


def test_no_ssh_access_is_logged_once_per_file_and_change_not_per_vm(site, caplog) -> None:
    path = os.path.join(site.root, "id_rsa.pub")
    config = site.configure(f"root_public_key = {path}\n")
    for _ in range(3):
        assert "public_key" not in vm_meta(config)
    assert len(_warnings(caplog, "no ssh access")) == 1
    key = ssh_public_key()
    site.write("id_rsa.pub", key + "\n", site.root)       # the admin adds the key
    for _ in range(3):
        assert vm_meta(config)["public_key"] == key
    assert len(_warnings(caplog, "no ssh access")) == 1
    os.remove(path)                                       # ... and removes it again
    vm_meta(config)
    vm_meta(config)
    assert len(_warnings(caplog, "no ssh access")) == 2


def test_the_daemon_offers_the_configured_key_to_the_vms_it_publishes(site) -> None:
    key = ssh_public_key()
    path = site.write("id.pub", key + "\n", site.root)
    site.configure(f"root_public_key = {path}\n")
    daemon = Daemon(ConfigSources.for_main_file(site.config_path), host_facts=HOST)
    try:
        assert daemon.boundary.meta_source() == {"public_key": key,
                                                 "availability_zone": site.factory_name}
    finally:
        daemon.hypervisor.close()


def test_after_a_restart_live_vms_are_served_even_if_the_key_file_went_bad(site, caplog) -> None:
    path = site.write("key.pub", "garbage\n", site.root)
    config = site.configure(f"root_public_key = {path}\n")
    builder = VMBuilder(site.state_dir)
    record = dataclasses.replace(site.record(config, builder), address=VM_ADDR)
    machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record))
    boundary = VMBoundary(meta_source=lambda: vm_meta(config))
    boundary.start(config, [machine])
    registered = boundary.registry.by_address(VM_ADDR)
    assert registered is not None and registered.uuid == record.uuid
    assert "public_key" not in registered.meta
    assert _warnings(caplog, f"{path}:1: skipped")
    assert _warnings(caplog, f"no ssh access: no public key in {path}")


def test_the_default_key_path_is_named_as_the_default(tmp_path) -> None:
    keys = read_public_keys(str(tmp_path / "id_rsa.pub"))
    assert key_file_problems(keys) == [f"no ssh access: cannot read {tmp_path}/id_rsa.pub: no such file "
                                       "(root_public_key default)"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=80), st.sampled_from([
    ssh_public_key("x").encode(), b"# comment", b"", b'no-pty ' + ssh_public_key("y").encode(),
    b"ssh-ed25519 !!!", b"\xff\xfe"])), max_size=8))
def test_any_file_content_yields_only_valid_single_line_keys_and_never_raises(tmp_path_factory, lines) -> None:
    path = tmp_path_factory.mktemp("keys") / "k"
    path.write_bytes(b"\n".join(lines))
    keys = read_public_keys(str(path))
    assert keys.unreadable is None
    for key in keys.keys:
        assert "\n" not in key and "\r" not in key
        assert public_key_line_problem(key.encode()) == ""
    assert len(keys.keys) + len(keys.skipped) <= len(b"\n".join(lines).split(b"\n"))
