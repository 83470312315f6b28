"""engine.vmbuild with real files: user_data (URLs with http_port, user_data_file_XXX, the X.509
proxy) and the config drive, built for libvirt's test driver and read back with pycdlib.

Everything is real: configuration files loaded by the loader, a machinetype directory, the
state directory, X.509 certificates made with ``cryptography``, an ISO read back with pycdlib,
and the real HTTP server for the comparison with what it serves.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import io
import json
import os
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import pycdlib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from tests.unit.engine_harness import HOST, kernel_file
from vacfactory.config.loader import ConfigSources, load_config
from vacfactory.engine.boundary import VMBoundary, vm_meta
from vacfactory.engine.hostfacts_mjf import host_machinefeatures
from vacfactory.engine.vmbuild import BuildError, VMBuilder
from vacfactory.hypervisor.domainxml import domain_xml
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.vmio.http import METADATA_ADDRESS, MJF_ADDRESS, MetadataServer, base_url

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
#: a whole second, so the proxy's notAfter (second precision) can equal it exactly
SHUTDOWN = int(NOW.timestamp()) + 30 * 3600


def ssh_public_key(comment: str = "root@factory.example.org") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode("ascii") + " " + comment


class Site:
    """A configuration file, a machinetype directory and a state directory under ``root``."""

    def __init__(self, root: str, name: str = "demo") -> None:
        self.root = root
        self.name = name
        self.state_dir = os.path.join(root, "state")
        self.mt_dir = os.path.join(self.state_dir, "machinetypes", name)
        os.makedirs(os.path.join(self.mt_dir, "files"))
        self.config_path = os.path.join(root, "vacfactory.conf")
        self.kernel = kernel_file(root)
        self.factory_name = f"vb{os.getpid()}.example.org"

    def write(self, name: str, data, directory: str = "") -> str:
        path = os.path.join(directory or os.path.join(self.mt_dir, "files"), name)
        with open(path, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return path

    def configure(self, settings: str = "", machinetype: str = "", model: str = "vm-raw", kernel: bool = True):
        """Load a configuration; ``kernel=False`` leaves out kernel_image (the VM boots its disks)."""
        kernel_line = f"kernel_image = {self.kernel}\n" if kernel else ""
        text = textwrap.dedent(f"""\
            [settings]
            vac_space = space.example.org
            factory_name = {self.factory_name}
            state_dir = {self.state_dir}
            libvirt_uri = test:///default
            domain_type = test
            total_processors = 2
            mb_per_processor = 100
            hs06_per_processor = 10
            """) + textwrap.dedent(settings) + textwrap.dedent(f"""
            [machinetype {self.name}]
            target_share = 1
            machine_model = {model}
            max_wallclock_seconds = 3600
            """) + kernel_line + textwrap.dedent(machinetype)
        with open(self.config_path, "w") as f:
            f.write(text)
        return load_config(ConfigSources.for_main_file(self.config_path), HOST)

    def record(self, config, builder: VMBuilder, uuid: str = "0b5c6f9e-1111-4222-8333-444455556666",
               processors: int = 1):
        return builder.new_record(config, config.machinetypes[self.name], uuid=uuid, slot=0,
                                  name=f"vb-00.{self.factory_name.split('.', 1)[1]}", processors=processors,
                                  created=float(SHUTDOWN - 3600), shutdown_time=float(SHUTDOWN))

    def user_data(self, config) -> str:
        builder = VMBuilder(self.state_dir)
        record = self.record(config, builder)
        data = builder.user_data(config, config.machinetypes[self.name], record)
        assert data is not None
        return data.decode("utf-8")


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(str(tmp_path))


def substituted(text: str) -> Dict[str, str]:
    """``NAME=VALUE`` lines of a rendered template."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# --------------------------------------------------------------------------------------------
# user_data


URL_TEMPLATE = """\
mf=##user_data_machinefeatures_url##
jf=##user_data_jobfeatures_url##
jo=##user_data_joboutputs_url##
"""


@pytest.mark.parametrize("port,base", [(80, "http://169.254.169.253"),
                                       (8080, "http://169.254.169.253:8080")])
def test_user_data_urls_carry_http_port_unless_it_is_80(site: Site, port: int, base: str) -> None:
    site.write("user_data.sh", URL_TEMPLATE)
    config = site.configure(f"http_port = {port}\n", "user_data = user_data.sh\n")
    values = substituted(site.user_data(config))
    assert values == {"mf": f"{base}/machinefeatures", "jf": f"{base}/jobfeatures",
                      "jo": f"{base}/joboutputs"}


def test_user_data_files_replace_their_file_and_option_patterns(site: Site) -> None:
    site.write("user_data.sh", "relf=##user_data_file_motd##\nrelo=##user_data_option_motd##\n"
                               "absf=##user_data_file_setup##\nplain=##user_data_option_plain##\n")
    site.write("motd.txt", "hello from files/")
    absolute = site.write("setup.cfg", "absolute ##user_data_uuid## stays verbatim", site.root)
    config = site.configure(machinetype=f"""\
        user_data = user_data.sh
        user_data_file_motd = motd.txt
        user_data_file_setup = {absolute}
        user_data_option_plain = an option
        """)
    assert substituted(site.user_data(config)) == {
        "relf": "hello from files/", "relo": "hello from files/",
        "absf": "absolute ##user_data_uuid## stays verbatim", "plain": "an option",
    }


def test_a_missing_user_data_file_is_a_build_error_naming_it(site: Site) -> None:
    site.write("user_data.sh", "x=##user_data_file_motd##\n")
    config = site.configure(machinetype="user_data = user_data.sh\nuser_data_file_motd = gone.txt\n")
    with pytest.raises(BuildError) as error:
        site.user_data(config)
    message = str(error.value)
    assert f"machinetype {site.name}" in message
    assert os.path.join(site.mt_dir, "files", "gone.txt") in message


# --------------------------------------------------------------------------------------------
# the limited X.509 proxy


def _name(*cns: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmbuild test")]
                     + [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])


def make_user_cert(days: float) -> Tuple[x509.Certificate, rsa.RSAPrivateKey, x509.Certificate]:
    """A CA and a user certificate it signed, valid ``days`` from now: (user, user key, CA)."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (x509.CertificateBuilder().subject_name(_name("Test CA")).issuer_name(_name("Test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(NOW - datetime.timedelta(days=1))
          .not_valid_after(NOW + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    user = (x509.CertificateBuilder().subject_name(_name("pilot robot")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return user, key, ca


def write_credentials(site: Site, user: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
    site.write("x509cert.pem", user.public_bytes(serialization.Encoding.PEM), site.mt_dir)
    site.write("x509key.pem", key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), site.mt_dir)


def pem_certificates(text: str) -> List[x509.Certificate]:
    marker = "-----END CERTIFICATE-----"
    blocks = [b + marker for b in text.split(marker)[:-1]]
    return [x509.load_pem_x509_certificate(b[b.index("-----BEGIN CERTIFICATE-----"):].encode())
            for b in blocks]


PROXY_TEMPLATE = "#!/bin/sh\ncat > /tmp/x509up <<'EOF'\n##user_data_option_x509_proxy##\nEOF\n"


@pytest.mark.parametrize("legacy,cn", [(False, "demo"), (True, "limited proxy")])
def test_proxy_from_the_machinetype_credentials_expires_at_the_vms_shutdown_time(
        site: Site, legacy: bool, cn: str) -> None:
    user, key, _ = make_user_cert(days=10)
    write_credentials(site, user, key)
    site.write("user_data.sh", PROXY_TEMPLATE)
    config = site.configure(machinetype=f"user_data = user_data.sh\nuser_data_proxy = true\n"
                                        f"legacy_proxy = {'true' if legacy else 'false'}\n")
    text = site.user_data(config)
    assert "##user_data" not in text
    proxy, *chain = pem_certificates(text)
    assert chain == [user]
    assert "PRIVATE KEY-----" in text and "BEGIN PRIVATE KEY" not in text  # the proxy's own key only
    proxy.verify_directly_issued_by(user)
    assert proxy.subject == x509.Name(list(user.subject.rdns) + [
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn)])])
    assert proxy.not_valid_after_utc == datetime.datetime.fromtimestamp(SHUTDOWN, UTC)


def test_proxy_without_credentials_is_a_build_error_naming_the_directory(site: Site) -> None:
    site.write("user_data.sh", PROXY_TEMPLATE)
    config = site.configure(machinetype="user_data = user_data.sh\nuser_data_proxy = true\n")
    with pytest.raises(BuildError) as error:
        site.user_data(config)
    assert "x509cert.pem and x509key.pem" in str(error.value) and site.mt_dir in str(error.value)


def test_a_certificate_that_expires_before_the_vm_is_a_build_error(site: Site) -> None:
    user, key, _ = make_user_cert(days=1)  # SHUTDOWN is 30 h away
    write_credentials(site, user, key)
    site.write("user_data.sh", PROXY_TEMPLATE)
    config = site.configure(machinetype="user_data = user_data.sh\nuser_data_proxy = true\n")
    with pytest.raises(BuildError) as error:
        site.user_data(config)
    message = str(error.value)
    assert f"machinetype {site.name}: user_data_proxy ({site.mt_dir})" in message
    assert "before the VM's shutdown time" in message


# --------------------------------------------------------------------------------------------
# the config drive


def read_iso(path: str, name: str) -> bytes:
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/openstack/latest/{name}")
        return out.getvalue()
    finally:
        iso.close()


def test_config_drive_holds_user_data_and_the_meta_data_json_the_server_serves(site: Site) -> None:
    key = ssh_public_key()
    key_path = site.write("id_ed25519.pub", key + "\n", site.root)
    site.write("user_data.sh", "#!/bin/sh\necho ##user_data_uuid## ##user_data_joboutputs_url##\n")
    config = site.configure(f"http_port = 8080\nroot_public_key = {key_path}\n",
                            "user_data = user_data.sh\nconfig_drive = true\n")
    mt = config.machinetypes[site.name]
    builder = VMBuilder(site.state_dir)
    record = site.record(config, builder)
    features = builder.features(config, record)
    machine = MachineStore(site.state_dir).prepare(record, *features,
                                                   builder.user_data(config, mt, record))
    spec = builder.domain_spec(config, mt, machine)

    (cdrom,) = [d for d in spec.disks if d.device == "cdrom"]
    assert cdrom.path == os.path.join(machine.disks_dir, "config.iso") and cdrom.readonly
    hypervisor = LibvirtHypervisor("test:///default")
    try:
        hypervisor.create(spec)  # libvirt accepts the domain with its config drive
        assert any(d.uuid == record.uuid for d in hypervisor.list_domains())
    finally:
        hypervisor.destroy(record.uuid)
        hypervisor.close()

    assert read_iso(cdrom.path, "user_data") == \
        f"#!/bin/sh\necho {record.uuid} http://169.254.169.253:8080/joboutputs\n".encode()
    on_drive = json.loads(read_iso(cdrom.path, "meta_data.json"))
    mjf, token = "http://169.254.169.253:8080", record.token
    assert on_drive == {
        "uuid": record.uuid, "hostname": record.name, "name": record.name, "launch_index": 0,
        "availability_zone": site.factory_name,
        "public_keys": {"vacfactory": key},
        "meta": {
            "machinefeatures": f"{mjf}/machinefeatures", "jobfeatures": f"{mjf}/jobfeatures",
            "joboutputs": f"{mjf}/joboutputs",
            "machinefeatures_token_url": f"{mjf}/vm/{token}/machinefeatures",
            "jobfeatures_token_url": f"{mjf}/vm/{token}/jobfeatures",
            "joboutputs_token_url": f"{mjf}/vm/{token}/joboutputs",
            "metadata_token_url": f"http://169.254.169.254:8080/vm/{token}",
            "vacfactory_token": token, "machinetype": site.name,
        },
    }

    # the same document over HTTP, for the same VM given an address (the test driver has none)
    addressed = Machine(record=dataclasses.replace(record, address="127.0.0.2"), path=machine.path)
    boundary = VMBoundary(meta_source=lambda: vm_meta(config))
    boundary.publish(addressed)
    server = MetadataServer(boundary.registry, [("127.0.0.1", 0)],
                            mjf_base_url=base_url(MJF_ADDRESS, 8080),
                            metadata_base_url=base_url(METADATA_ADDRESS, 8080))
    with server:
        conn = http.client.HTTPConnection("127.0.0.1", server.bound_addresses[0][1], timeout=10,
                                          source_address=("127.0.0.2", 0))
        try:
            conn.request("GET", "/openstack/latest/meta_data.json")
            served = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    assert served == on_drive


def test_no_config_drive_unless_asked(site: Site) -> None:
    site.write("user_data.sh", "#!/bin/sh\n")
    config = site.configure(machinetype="user_data = user_data.sh\n")
    builder = VMBuilder(site.state_dir)
    record = site.record(config, builder)
    machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record), b"x")
    spec = builder.domain_spec(config, config.machinetypes[site.name], machine)
    assert not [d for d in spec.disks if d.device == "cdrom"]
    assert not os.path.exists(os.path.join(machine.disks_dir, "config.iso"))


# --------------------------------------------------------------------------------------------
# disks, memory and host facts


def virtual_size(path: str) -> int:
    """The guest-visible size of a disk image, as qemu-img reports it."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["virtual-size"]


def build(site: Site, config, processors: int, builder: VMBuilder = None):
    """Record, features, machine directory and domain spec of one VM, as the engine makes them."""
    builder = builder or VMBuilder(site.state_dir)
    record = site.record(config, builder, processors=processors)
    machine = MachineStore(site.state_dir).prepare(record, *builder.features(config, record), None)
    return machine, builder.domain_spec(config, config.machinetypes[site.name], machine)


def accepted_by_libvirt(spec) -> bool:
    hypervisor = LibvirtHypervisor("test:///default")
    try:
        hypervisor.create(spec)
        return any(d.uuid == spec.uuid for d in hypervisor.list_domains())
    finally:
        hypervisor.destroy(spec.uuid)
        hypervisor.close()


def test_vm_raw_gets_an_overlay_root_and_a_scratch_disk_of_disk_gb_per_processor_on_scratch_device(
        site: Site) -> None:
    base = os.path.join(site.mt_dir, "files", "base.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "16M"], check=True)
    config = site.configure("disk_gb_per_processor = 3\n",
                            "root_image = base.img\nroot_device = vda\nscratch_device = hdb\n", kernel=False)
    machine, spec = build(site, config, processors=2)

    root, scratch = spec.disks
    assert os.listdir(machine.disks_dir) == []  # the spec describes; the hypervisor makes them
    assert (root.path, root.target_dev, root.bus, root.device) == \
        (os.path.join(machine.disks_dir, "root.qcow2"), "vda", "virtio", "disk")
    assert (scratch.path, scratch.target_dev, scratch.bus, scratch.fmt) == \
        (os.path.join(machine.disks_dir, "scratch.qcow2"), "hdb", "ide", "qcow2")
    assert spec.boot == "hd" and spec.kernel is None
    assert accepted_by_libvirt(spec)
    assert virtual_size(root.path) == 16 << 20  # an overlay on the root image
    assert virtual_size(scratch.path) == 3 * 2 * 10**9


def test_vm_raw_without_disk_gb_per_processor_gets_no_scratch_disk(site: Site) -> None:
    base = os.path.join(site.mt_dir, "files", "base.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "16M"], check=True)
    config = site.configure(machinetype="root_image = base.img\n", kernel=False)
    machine, spec = build(site, config, processors=2)
    assert [d.target_dev for d in spec.disks] == ["vda"]
    assert accepted_by_libvirt(spec)
    assert sorted(os.listdir(machine.disks_dir)) == ["root.qcow2"]


@pytest.mark.parametrize("model,disk_settings,gb_per_processor", [
    ("cernvm3", "", 40),  # unset: Vac's 40 GB per processor
    ("cernvm4", "disk_gb_per_processor = 5\n", 5),
])
def test_cernvm_boots_the_root_image_iso_from_cdrom_with_an_empty_root_disk_on_root_device(
        site: Site, model: str, disk_settings: str, gb_per_processor: int) -> None:
    iso = site.write("cernvm.iso", b"\0" * 4096)
    config = site.configure(disk_settings, "root_image = cernvm.iso\nroot_device = hda\n", model=model,
                            kernel=False)
    machine, spec = build(site, config, processors=2)

    cdrom, root = spec.disks
    assert (cdrom.path, cdrom.device, cdrom.fmt, cdrom.readonly, cdrom.target_dev, cdrom.bus) == \
        (iso, "cdrom", "raw", True, "hdc", "ide")
    assert (root.path, root.device, root.fmt, root.target_dev, root.bus) == \
        (os.path.join(machine.disks_dir, "root.qcow2"), "disk", "qcow2", "hda", "ide")
    assert spec.boot == "cdrom" and spec.kernel is None
    os_el = ET.fromstring(domain_xml(spec)).find("os")
    assert os_el.find("boot").get("dev") == "cdrom"
    assert accepted_by_libvirt(spec)
    assert virtual_size(root.path) == gb_per_processor * 2 * 10**9
    # what the VM is told it has: its root disk is its scratch space
    with open(os.path.join(machine.jobfeatures_dir, "scratch_limit_bytes")) as f:
        assert f.read() == str(gb_per_processor * 2 * 10**9)


@pytest.mark.parametrize("processors", [1, 2])
def test_memory_is_mb_per_processor_times_processors(site: Site, processors: int) -> None:
    config = site.configure()  # mb_per_processor = 100 (the default is 2048)
    machine, spec = build(site, config, processors=processors)
    assert machine.record.memory_mb == spec.memory_mib == 100 * processors
    assert spec.vcpus == processors
    memory = ET.fromstring(domain_xml(spec)).find("memory")
    assert (memory.get("unit"), memory.text) == ("MiB", str(100 * processors))
    with open(os.path.join(machine.jobfeatures_dir, "max_rss_bytes")) as f:
        assert f.read() == str(100 * processors * 1048576)
    # the files on disk hold Vac's bytes: a newline after allocated_cpu/_CPU only
    for key in ("allocated_cpu", "allocated_CPU"):
        with open(os.path.join(machine.jobfeatures_dir, key), "rb") as f:
            assert f.read() == f"{processors}\n".encode()
    with open(os.path.join(machine.machinefeatures_dir, "total_cpu"), "rb") as f:
        assert f.read() == str(processors).encode()


HOST_CPUINFO = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                "model name\t: AMD EPYC 7763 64-Core Processor\nstepping\t: 1\n\n")


def made_up_host_features(root: str) -> Dict[str, str]:
    proc = os.path.join(root, "proc")
    os.makedirs(os.path.join(proc, "sys", "kernel"))
    with open(os.path.join(proc, "cpuinfo"), "w") as f:
        f.write(HOST_CPUINFO)
    with open(os.path.join(proc, "sys", "kernel", "osrelease"), "w") as f:
        f.write("6.1.0-99-amd64\n")
    return host_machinefeatures(proc, "QEMU 7.2.0 libvirt 9.0.0 test", os_release=os.path.join(root, "none"),
                                arch="x86_64")


def test_host_facts_given_to_the_builder_are_in_every_vms_machinefeatures(site: Site) -> None:
    facts = made_up_host_features(site.root)
    assert facts["cpu_model"] == "AMD EPYC 7763 64-Core Processor"  # the made-up host, not this one
    config = site.configure()
    machine, _ = build(site, config, processors=1, builder=VMBuilder(site.state_dir, host_features=facts))
    published = {}
    for key in os.listdir(machine.machinefeatures_dir):
        with open(os.path.join(machine.machinefeatures_dir, key)) as f:
            published[key] = f.read()
    assert published["cpu_model"] == "AMD EPYC 7763 64-Core Processor"
    assert published["kernel_version"] == "6.1.0-99-amd64"
    assert published["hypervisor"] == "QEMU 7.2.0 libvirt 9.0.0 test"
    assert published["cpu_vendor"] == "AuthenticAMD" and published["cpu_arch"] == "x86_64"
    assert {key: published[key] for key in facts} == facts  # every fact, unchanged
    assert published["total_cpu"] == "1"  # beside the standard keys, not instead of them


def test_a_site_option_replaces_or_hides_a_host_fact(site: Site) -> None:
    facts = made_up_host_features(site.root)
    config = site.configure("machinefeatures_option_kernel_version =\n"
                            "machinefeatures_option_cpu_model = hidden by the site\n")
    builder = VMBuilder(site.state_dir, host_features=facts)
    machinefeatures, _ = builder.features(config, site.record(config, builder))
    assert machinefeatures["kernel_version"] == ""
    assert machinefeatures["cpu_model"] == "hidden by the site"
    assert machinefeatures["hypervisor"] == facts["hypervisor"]
