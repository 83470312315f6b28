"""Describe a ``machine_model = docker`` machine as a container (Vac's docker model).

Pure: it reads the configuration and the machine directory's paths and returns a
:class:`~vacfactory.hypervisor.base.ContainerSpec`; the container hypervisor makes it. What
a container sees of the host is exactly Vac's binds, nothing else:

- ``joboutputs``      -> ``/var/spool/joboutputs`` read-write (heartbeat, shutdown_message)
- ``machinefeatures`` -> ``/etc/machinefeatures`` read-only
- ``jobfeatures``     -> ``/etc/jobfeatures`` read-only
- ``user_data``       -> ``/user_data`` read-only (executable: the default command runs it)
- ``/cvmfs``          -> ``/cvmfs`` read-only, when ``cvmfs_repositories`` is set
- each ``tmp_binds`` path -> a private empty directory under the machine directory

CPU shares are processors x 1024 and the memory limit processors x ``mb_per_processor`` (the
VM record's memory). ``container_command`` is split into words as a shell would, but no shell
runs it (the words reach the runtime as a list).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from vacfactory.core import values
from vacfactory.errors import VacFactoryError
from vacfactory.hypervisor.base import BindSpec, ContainerSpec
from vacfactory.state.machines import Machine

#: the container path of each file or directory of the machine directory (Vac's)
JOBOUTPUTS_TARGET = "/var/spool/joboutputs"
MACHINEFEATURES_TARGET = "/etc/machinefeatures"
JOBFEATURES_TARGET = "/etc/jobfeatures"
USER_DATA_TARGET = "/user_data"
CVMFS = "/cvmfs"
#: the machine directory's folder holding one private directory per tmp_binds path
TMP_BINDS_DIR = "tmp_binds"


class ContainerBuildError(VacFactoryError):
    """A docker machinetype's container cannot be described (bad command, image, binds)."""


def image_reference(mt) -> str:
    """The image of ``root_image = docker://IMAGE[:TAG]`` (already checked by the config)."""
    try:
        return values.docker_image(mt.root_image or "", f"machinetype {mt.name} root_image")
    except ValueError as error:
        raise ContainerBuildError(str(error)) from None


def tmp_bind_source(machine: Machine, index: int) -> str:
    return os.path.join(machine.path, TMP_BINDS_DIR, str(index))


def binds(mt, machine: Machine, cvmfs: str = CVMFS) -> List[BindSpec]:
    found = [
        BindSpec(machine.joboutputs_dir, JOBOUTPUTS_TARGET, readonly=False),
        BindSpec(machine.machinefeatures_dir, MACHINEFEATURES_TARGET),
        BindSpec(machine.jobfeatures_dir, JOBFEATURES_TARGET),
    ]
    if os.path.exists(machine.user_data_path):
        found.append(BindSpec(machine.user_data_path, USER_DATA_TARGET))
    if mt.cvmfs_repositories:
        found.append(BindSpec(cvmfs, CVMFS))
    for index, path in enumerate(mt.tmp_binds or ()):
        found.append(BindSpec(tmp_bind_source(machine, index), path, readonly=False, scratch=True))
    return found


def command(mt) -> Tuple[str, ...]:
    """``container_command`` as words (core.values.command_words, the config's rule too)."""
    try:
        return values.command_words(mt.container_command or "", f"machinetype {mt.name} container_command")
    except ValueError as error:
        raise ContainerBuildError(str(error)) from None


def container_spec(config, mt, machine: Machine, cvmfs: Optional[str] = None) -> ContainerSpec:
    """The container of ``machine`` (a docker machinetype's); ContainerBuildError if the
    values do not make one (the spec checks itself too)."""
    record = machine.record
    try:
        return ContainerSpec(
            name=record.name,
            uuid=record.uuid,
            image=image_reference(mt),
            command=command(mt),
            processors=record.processors,
            memory_mib=record.memory_mb,
            binds=tuple(binds(mt, machine, cvmfs or CVMFS)),
            stop_grace_seconds=config.settings.container_stop_seconds,
        )
    except ValueError as error:
        raise ContainerBuildError(f"machinetype {mt.name}: {error}") from None
