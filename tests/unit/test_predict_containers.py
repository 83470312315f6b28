"""`config check` on docker machinetypes, offline: the container runtime's socket must be
there (a real socket, a regular file, nothing), and VM-only sites are never asked about it."""

from __future__ import annotations

import os
import socket

from tests.unit.test_config_loading import HOST, write
from vacfactory.config.loader import ConfigSources, load_config
from vacfactory.config.predict import ERROR, Locator, container_socket

HEAD = """[settings]
vac_space = space.example.org
factory_name = f1.example.org
state_dir = {root}/state
domain_type = test
container_socket = {socket}
"""
DOCKER = "[machinetype dc]\ntarget_share = 1\nmachine_model = docker\nroot_image = docker://busybox\n"


def findings(tmp_path, socket_path: str, machinetype: str = DOCKER):
    main = write(tmp_path / "vacfactory.conf", HEAD.format(root=tmp_path, socket=socket_path) + machinetype)
    config = load_config(ConfigSources.for_main_file(main), HOST)
    return main, container_socket(config, Locator(config, [main]))


def test_a_missing_socket_is_an_error_at_its_line(tmp_path):
    main, found = findings(tmp_path, str(tmp_path / "nosuch.sock"))
    assert [(f.severity, f.source, f.line, f.option) for f in found] == [(ERROR, main, 6, "container_socket")]
    assert "No such file or directory" in found[0].message and "blind" in found[0].message


def test_a_file_that_is_no_socket_is_an_error(tmp_path):
    path = tmp_path / "plain"
    path.write_text("")
    _, found = findings(tmp_path, str(path))
    assert len(found) == 1 and "not a socket" in found[0].message


def test_a_listening_socket_is_fine_and_vm_sites_are_not_asked(tmp_path):
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        assert findings(tmp_path, path)[1] == []
    os.unlink(path)
    vm = "[machinetype vm]\ntarget_share = 1\nroot_image = /images/vm.img\n"
    assert findings(tmp_path, str(tmp_path / "nosuch.sock"), vm)[1] == []
