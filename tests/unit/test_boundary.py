"""What every VM is offered (engine.boundary.vm_meta) through the real HTTP server: the
``root_public_key`` in meta_data.json and the EC2 paths, ``http_port`` in every URL; bad key
files are configuration errors naming the option and where it was set; the daemon's wiring.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
from typing import Iterator, Tuple

import pytest

from tests.unit.test_vmbuild import Site, ssh_public_key
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon
from vacfactory.engine.boundary import VMBoundary, read_public_key, vm_meta
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.errors import ConfigError
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.vmio.httpserver import METADATA_ADDRESS, MJF_ADDRESS, MetadataServer, base_url
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
        assert vm_meta(config)["public_key"] == read_public_key(config.settings.root_public_key)
        return
    vm = serve(site, config)
    doc = json.loads(vm.get("/openstack/latest/meta_data.json")[1])
    assert doc["public_keys"] == {}
    assert b"public-keys" not in vm.get("/latest/meta-data/")[1]
    assert vm.get("/latest/meta-data/public-keys/0/openssh-key")[0] == 404
    assert read_public_key(os.path.join(site.root, "absent.pub"), "default") is None


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


BAD_KEYS = {
    "a private key": ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n"
                      "-----END OPENSSH PRIVATE KEY-----\n", "3 non-empty lines"),
    "two keys": (ssh_public_key("a") + "\n" + ssh_public_key("b") + "\n", "2 non-empty lines"),
    "an empty file": ("", "0 non-empty lines"),
    "no key type": ("AAAAC3NzaC1lZDI1NTE5AAAAI root\n", "must start with a key type"),
    "bad base64": ("ssh-ed25519 not*base64 root\n", "not base64"),
    "the wrong type": (f"ssh-rsa {_rsa_blob_with_type(b'ssh-ed25519')} root\n", "not a ssh-rsa key"),
    "a control character": (ssh_public_key("a\x1b[2Jb") + "\n", "control characters"),
}


@pytest.mark.parametrize("what", sorted(BAD_KEYS))
def test_a_file_that_is_not_one_public_key_line_is_an_error_naming_the_option(site, what) -> None:
    content, why = BAD_KEYS[what]
    path = site.write("key.pub", content, site.root)
    config = site.configure(f"root_public_key = {path}\n")
    with pytest.raises(ConfigError) as error:
        vm_meta(config)
    line = open(site.config_path).read().splitlines().index(f"root_public_key = {path}") + 1
    assert str(error.value).startswith(f"{site.config_path}:{line}: [settings] root_public_key: {path}: "
                                       "not an OpenSSH public key line (")
    assert why in str(error.value)


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_an_unreadable_configured_key_is_an_error_and_the_vm_is_not_published(site, make) -> None:
    path = os.path.join(site.root, "keydir" if make == "directory" else "absent.pub")
    if make == "directory":
        os.mkdir(path)
    config = site.configure(f"root_public_key = {path}\n")
    builder = VMBuilder(site.state_dir)
    record = site.record(config, builder)
    machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record))
    boundary = VMBoundary(meta_source=lambda: vm_meta(config))
    with pytest.raises(ConfigError) as error:
        boundary.publish(Machine(record=dataclasses.replace(record, address=VM_ADDR), path=machine.path))
    assert f"{site.config_path}:" in str(error.value)
    assert f"[settings] root_public_key: {path}: " in str(error.value)
    assert ("no such file" if make == "missing" else "cannot read: Is a directory") in str(error.value)
    assert len(boundary.registry) == 0


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
    assert any("root_public_key" in r.getMessage() and "re-registered without it" in r.getMessage()
               for r in caplog.records)
