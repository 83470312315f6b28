"""Container figures for `make bench`, printed with their goals; exits 1 if one is missed.

refill: a real daemon with a ``machine_model = docker`` machinetype on a private Podman API
service (tests/podman_lab.py), two slots, containers that exit after 2 s: time from a
container's exit (the runtime's die event) to the next container's start event, median and
max. Goal: median < 1 s, as for VMs (bench_factory.py's refill, printed beside it by
`make bench`); a bare create+start of the same container through the API is printed as the
floor.

Usage: python tests/bench/bench_containers.py [--refills N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.refills import Refills  # noqa: E402
from tests.podman_lab import BUSYBOX, PodmanService, missing_tools  # noqa: E402
from vacfactory.engine import naming  # noqa: E402
from vacfactory.hypervisor.base import ContainerSpec  # noqa: E402
from vacfactory.hypervisor.containers import ContainerHypervisor  # noqa: E402


def write_config(tmp: str, name: str, socket: str) -> str:
    path = os.path.join(tmp, "vacfactory.conf")
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            [settings]
            vac_space = bench.example.org
            factory_name = {name}
            state_dir = {tmp}/state
            libvirt_uri = test:///default
            domain_type = test
            total_processors = 2
            mb_per_processor = 64
            cycle_seconds = 60
            overload_per_processor = 100
            nfs_exporter = none
            udp_port = {21000 + os.getpid() % 10000}
            container_socket = {socket}

            [machinetype bench]
            target_share = 1
            machine_model = docker
            root_image = docker://{BUSYBOX}
            container_command = sleep 2
            fizzle_seconds = 1
            backoff_seconds = 1
            """))
    return path


def bare_create(runtime: ContainerHypervisor, name: str, samples: int = 5) -> float:
    """Median time of the API's own create+start of the same container (the floor)."""
    times = []
    for i in range(samples):
        spec = ContainerSpec(name=naming.domain_name(name, 90 + i), uuid=str(uuidlib.uuid4()), image=BUSYBOX,
                             command=("sleep", "30"), processors=1, memory_mib=64, stop_grace_seconds=0)
        start = time.perf_counter()
        runtime.create(spec)
        times.append(time.perf_counter() - start)
        runtime.destroy(spec.uuid)
    deadline = time.monotonic() + 60
    while runtime.stopping() and time.monotonic() < deadline:  # let the stops finish first
        time.sleep(0.05)
    return statistics.median(times)


def bench_refill(refills: int) -> bool:
    missing = missing_tools()
    if missing:
        print(f"container refill: missing {', '.join(missing)} (run make setup)")
        return False
    podman = PodmanService()
    podman.start()
    try:
        podman.import_busybox()
        name = f"vfbdc{os.getpid()}.example.org"
        refills_seen = Refills()
        runtime = ContainerHypervisor(podman.socket_path, owner=name, remove_exited=False)
        runtime.set_event_callback(refills_seen.on_event)
        with tempfile.TemporaryDirectory(prefix="vfbench-") as tmp:
            config = write_config(tmp, name, podman.socket_path)
            try:
                refills_seen.run_daemon(config, os.path.join(tmp, "daemon.log"), refills, 10)
            finally:
                for container in runtime.list_domains():
                    runtime.destroy(container.uuid)
            bare = bare_create(runtime, name)
        runtime.close()
    finally:
        podman.stop()
    gaps = refills_seen.gaps()
    if not gaps:
        print("container refill: no refills observed")
        return False
    print(f"container refill: container exited -> next container started: median {statistics.median(gaps):.2f} s, "
          f"max {max(gaps):.2f} s over {len(gaps)} refills (goal: median < 1 s, as for VMs; a bare API "
          f"create+start here: {bare:.2f} s; Vac: up to its 60 s cycle)")
    return statistics.median(gaps) < 1.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refills", type=int, default=10)
    args = parser.parse_args()
    return 0 if bench_refill(args.refills) else 1


if __name__ == "__main__":
    sys.exit(main())
