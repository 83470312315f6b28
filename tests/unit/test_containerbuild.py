"""A docker machinetype's machine: its record, its files and the ContainerSpec, from a real
configuration file through the loader and a real machine directory (engine.containerbuild,
engine.vmbuild). The container itself is started in tests/integration (real Podman)."""

from __future__ import annotations

import os
import stat

import pytest

from tests.unit.test_vmbuild import Site, substituted
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.errors import ConfigError
from vacfactory.fetch.imagecache import ImageNotReady
from vacfactory.hypervisor.base import BindSpec, ContainerSpec
from vacfactory.state.machines import MachineStore

DOCKER = """\
root_image = docker://registry.example.org:5000/lhcb/pilot:1.2
user_data = user_data
container_command = /bin/sh -c 'exec /user_data --queue "lhcb q"'
tmp_binds = /scratch /tmp/pilot
cvmfs_repositories = lhcb.cern.ch
max_processors = 2
"""


def ready(reference: str):
    return None


@pytest.fixture
def site(tmp_path) -> Site:
    s = Site(str(tmp_path))
    s.write("user_data", "#!/bin/sh\nmf=##user_data_machinefeatures_url##\njf=##user_data_jobfeatures_url##\n"
                         "jo=##user_data_joboutputs_url##\n")
    return s


def prepared(site: Site, config, builder: VMBuilder, processors: int = 2):
    mt = config.machinetypes[site.name]
    record = site.record(config, builder, processors=processors)
    mf, jf = builder.features(config, record)
    return MachineStore(site.state_dir).prepare(record, mf, jf, builder.user_data(config, mt, record))


def test_a_docker_machine_is_a_container_with_exactly_vacs_binds(site: Site) -> None:
    config = site.configure(settings="container_stop_seconds = 7\n", machinetype=DOCKER, model="docker",
                            kernel=False)
    builder = VMBuilder(site.state_dir, container_images=ready)
    machine = prepared(site, config, builder)
    spec = builder.machine_spec(config, config.machinetypes[site.name], machine)
    assert isinstance(spec, ContainerSpec)
    assert (spec.name, spec.uuid, spec.image) == (machine.name, machine.uuid, "registry.example.org:5000/lhcb/pilot:1.2")
    assert spec.command == ("/bin/sh", "-c", 'exec /user_data --queue "lhcb q"')
    assert (spec.processors, spec.memory_mib, spec.stop_grace_seconds) == (2, 200, 7)
    assert spec.binds == (
        BindSpec(machine.joboutputs_dir, "/var/spool/joboutputs", readonly=False),
        BindSpec(machine.machinefeatures_dir, "/etc/machinefeatures"),
        BindSpec(machine.jobfeatures_dir, "/etc/jobfeatures"),
        BindSpec(machine.user_data_path, "/user_data"),
        BindSpec("/cvmfs", "/cvmfs"),
        BindSpec(os.path.join(machine.path, "tmp_binds", "0"), "/scratch", readonly=False, scratch=True),
        BindSpec(os.path.join(machine.path, "tmp_binds", "1"), "/tmp/pilot", readonly=False, scratch=True),
    )


def test_a_docker_record_has_no_address_no_image_file_and_gets_mjf_by_binds(site: Site) -> None:
    config = site.configure(machinetype=DOCKER, model="docker", kernel=False)
    builder = VMBuilder(site.state_dir, container_images=ready)
    machine = prepared(site, config, builder)
    record = machine.record
    assert (record.address, record.mac, record.root_image_path, record.mjf_transport) == (None, None, None, "bind")
    assert record.machine_model == "docker"
    # the default command runs user_data: executable, and only root's
    assert stat.S_IMODE(os.stat(machine.user_data_path).st_mode) == 0o700
    # its user_data is told where the container finds MJF: paths, not the VMs' HTTP server
    with open(machine.user_data_path) as f:
        assert substituted(f.read()) == {"mf": "/etc/machinefeatures", "jf": "/etc/jobfeatures",
                                         "jo": "/var/spool/joboutputs"}
    with open(os.path.join(machine.jobfeatures_dir, "job_id")) as f:
        assert f.read() == machine.uuid


def test_a_vm_keeps_its_private_user_data_and_http_urls(site: Site) -> None:
    config = site.configure(machinetype="user_data = user_data\n")
    builder = VMBuilder(site.state_dir)
    machine = prepared(site, config, builder, processors=1)
    assert stat.S_IMODE(os.stat(machine.user_data_path).st_mode) == 0o600
    with open(machine.user_data_path) as f:
        assert substituted(f.read())["mf"].startswith("http://169.254.169.253")


@pytest.mark.parametrize("images,why", [
    (None, "no container runtime is connected"),
    (lambda reference: f"being pulled ({reference})", "being pulled (registry.example.org:5000/lhcb/pilot:1.2)"),
])
def test_a_docker_machinetype_waits_while_the_runtime_has_no_image(site: Site, images, why) -> None:
    config = site.configure(machinetype=DOCKER, model="docker", kernel=False)
    builder = VMBuilder(site.state_dir, container_images=images)
    with pytest.raises(ImageNotReady) as caught:
        site.record(config, builder)
    assert why in str(caught.value)
    assert os.listdir(os.path.join(site.state_dir)) == ["machinetypes"]  # nothing prepared


@pytest.mark.parametrize("command,why", [("/bin/sh -c 'unbalanced", "does not split into words"),
                                         ("''", "has no command")])
def test_a_command_that_does_not_split_is_refused_by_the_configuration(site: Site, command: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        site.configure(machinetype=DOCKER.replace("container_command = /bin/sh -c 'exec /user_data --queue \"lhcb q\"'",
                                                  f"container_command = {command}"), model="docker", kernel=False)
    assert "[machinetype demo] container_command" in str(caught.value) and why in str(caught.value)


def test_a_machine_without_user_data_gets_no_user_data_bind(site: Site) -> None:
    config = site.configure(machinetype="root_image = docker://busybox\ncontainer_command = sleep 1\n",
                            model="docker", kernel=False)
    builder = VMBuilder(site.state_dir, container_images=ready)
    machine = prepared(site, config, builder, processors=1)
    spec = builder.machine_spec(config, config.machinetypes[site.name], machine)
    assert [b.target for b in spec.binds] == ["/var/spool/joboutputs", "/etc/machinefeatures", "/etc/jobfeatures"]
    assert spec.command == ("sleep", "1")
