"""The kernel exporter as the daemon makes it: what paths a VM is exported, and which kernel
exports a restart withdraws.

This host has no kernel nfsd, so ``exportfs`` itself is played by a recorder that answers
``exportfs -v`` with a listing (the exporter's ``runner`` is injectable for this); everything
else (the daemon's make_exporter, the engine's export specs, the machine directories) is real.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Sequence

import pytest

from tests.unit.engine_harness import HOST
from tests.unit.test_vmbuild import Site
from vacfactory.config.loader import ConfigSources
from vacfactory.daemon import Daemon, make_exporter
from vacfactory.engine.boundary import export_specs
from vacfactory.engine.vmbuild import VMBuilder
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.vmio.exports import CommandResult, ExportfsExporter, GaneshaExporter, NullExporter


class Exportfs:
    """Records argument lists; ``exportfs -v`` lists ``listing``."""

    def __init__(self, listing: str = "") -> None:
        self.listing = listing
        self.calls: List[List[str]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(0, self.listing if list(argv[1:]) == ["-v"] else "", "")


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(str(tmp_path))


def nfs_machine(site: Site, config, uuid: str, slot: int) -> Machine:
    builder = VMBuilder(site.state_dir)
    record = dataclasses.replace(site.record(config, builder, uuid=uuid), slot=slot,
                                 address=f"169.254.169.{slot + 1}", mjf_transport="nfs")
    return MachineStore(site.state_dir).prepare(record, *builder.features(config, record))


@pytest.mark.parametrize("kind,cls", [("exportfs", ExportfsExporter), ("ganesha", GaneshaExporter),
                                      ("none", NullExporter)])
def test_make_exporter_follows_nfs_exporter(site: Site, kind: str, cls: type) -> None:
    assert isinstance(make_exporter(site.configure(f"nfs_exporter = {kind}\n")), cls)


def test_the_daemons_kernel_exporter_withdraws_only_stale_exports_of_its_machines_dir(site: Site) -> None:
    config = site.configure("nfs_exporter = exportfs\n")
    daemon = Daemon(ConfigSources.for_main_file(site.config_path), host_facts=HOST)
    daemon.hypervisor.close()
    exporter = daemon.boundary.exporter
    assert isinstance(exporter, ExportfsExporter)
    machines = os.path.join(site.state_dir, "machines")
    live = nfs_machine(site, config, "11111111-aaaa-4bbb-8ccc-000000000001", 0)
    # after a restart: a live VM's export, a VM that ended while the daemon was down, a
    # neighbouring directory whose name merely starts like ours, and the site's own export
    listed = "\n".join([
        f"{live.machinefeatures_dir}\n\t\t169.254.169.1(sync,wdelay,ro,all_squash)",
        f"{machines}/22222222-dead-4bbb-8ccc-000000000002/joboutputs 169.254.169.2(rw,all_squash)",
        f"{machines}-old/x 169.254.169.3(ro)",
        "/srv/data 10.0.0.0/8(rw,root_squash)",
    ]) + "\n"
    exporter.runner = recorder = Exportfs(listed)
    exporter.prepare_rw = False  # chown to 65534 needs root; not what this test is about
    exporter.reconcile({live.uuid: export_specs(live)})
    withdrawn = [c for c in recorder.calls if c[1] == "-u"]
    assert withdrawn == [["exportfs", "-u",
                          f"169.254.169.2:{machines}/22222222-dead-4bbb-8ccc-000000000002/joboutputs"]]


def test_the_kernel_server_exports_the_real_machine_directory_paths(site: Site) -> None:
    """What a VM mounts with nfs_exporter = exportfs (docs/admin-guide.md): the kernel has no
    pseudo paths, so the export is the directory itself, not /<uuid>/... as with ganesha."""
    config = site.configure("nfs_exporter = exportfs\n")
    machine = nfs_machine(site, config, "33333333-aaaa-4bbb-8ccc-000000000003", 4)
    recorder = Exportfs()
    exporter = ExportfsExporter(runner=recorder, prepare_rw=False)
    exporter.set_exports(machine.uuid, export_specs(machine))
    base = os.path.join(site.state_dir, "machines", machine.uuid)
    assert [(c[2].split(",")[0], c[3]) for c in recorder.calls] == [
        ("ro", f"169.254.169.5:{base}/machinefeatures"),
        ("ro", f"169.254.169.5:{base}/jobfeatures"),
        ("rw", f"169.254.169.5:{base}/joboutputs"),
    ]
    assert [s.pseudo for s in export_specs(machine)] == [
        f"/{machine.uuid}/machinefeatures", f"/{machine.uuid}/jobfeatures", f"/{machine.uuid}/joboutputs"]
