"""The container runtime of docker machinetypes (``container_socket``).

Offline: the socket exists. Online: the Docker Engine API answers there (a round in which it
does not is blind, for VMs too), and it has each docker machinetype's image (else the
factory's first round starts a pull and the machinetype waits for it: a note, not a problem).
"""

from __future__ import annotations

import os
import stat
from typing import List

from vacfactory.config import options as table
from vacfactory.config.model import Config
from vacfactory.core import values

from .findings import ERROR, NOTE, Finding, Locator

#: how long the runtime may take to answer `config check --online`
RUNTIME_TIMEOUT = 5.0


def docker_machinetypes(config: Config) -> list:
    return [mt for mt in config.machinetypes.values()
            if mt.machine_model in table.STARTED_CONTAINER_MODELS and mt.startable and mt.target_share > 0]


def container_socket(config: Config, locator: Locator) -> List[Finding]:
    """A docker machinetype needs the runtime's socket; without it every round is blind."""
    if not docker_machinetypes(config):
        return []
    path = config.settings.container_socket
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError as error:
        why = error.strerror or str(error)
    else:
        why = None if is_socket else "not a socket"
    if why is None:
        return []
    return [locator.finding(ERROR, f"{path}: {why}: no Docker Engine API (Docker, or `podman system service`) "
                                   "answers there, so the daemon's rounds are blind and no VM or container "
                                   "is created", table.SETTINGS, "container_socket")]


def container_runtime(config: Config, locator: Locator, timeout: float = RUNTIME_TIMEOUT) -> List[Finding]:
    """Online: the runtime answers, and which docker images it does not have yet."""
    wanted = docker_machinetypes(config)
    if not wanted or container_socket(config, locator):
        return []  # nothing to ask, or the offline check already said why it cannot answer
    from vacfactory.errors import HypervisorError
    from vacfactory.hypervisor.containers import ContainerHypervisor
    from vacfactory.view.monitoring import answer_within

    runtime = ContainerHypervisor(config.settings.container_socket, owner=config.settings.factory_name,
                                  timeout=timeout)
    findings: List[Finding] = []
    try:
        def probe() -> None:
            if not runtime.ping():
                raise HypervisorError("no answer to a ping", uri=runtime.url)

        why = answer_within(probe, timeout)
        if why is not None:
            return [locator.finding(ERROR, f"{config.settings.container_socket}: the container runtime does not "
                                           f"answer: {why}", table.SETTINGS, "container_socket")]
        for mt in wanted:
            reference = values.docker_image(mt.root_image)
            try:
                present = runtime.has_image(reference)
            except HypervisorError as error:
                findings.append(locator.finding(ERROR, f"image {reference}: {error}", f"{table.MACHINETYPE} {mt.name}",
                                                "root_image"))
                continue
            if not present:
                findings.append(locator.finding(
                    NOTE, f"the container runtime does not have {reference} yet: the factory starts a pull at its "
                          "first round and starts no container of this machinetype until it has arrived",
                    f"{table.MACHINETYPE} {mt.name}", "root_image"))
    finally:
        runtime.close()
    return findings
