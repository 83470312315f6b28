"""Factory-core figures for `make bench`, printed with their goals; exits 1 if one is missed.

1. fill: an empty 64-processor factory on libvirt's test driver, 1-processor VMs: time until
   all 64 are created (one decision round). Goal < 2 s (Vac: over an hour).
2. refill: a real daemon on qemu:///system with TCG guests that power off after a few
   seconds: time from a domain's stop event to the next domain's start event. Goal: median
   < 1 s; a bare `virsh create` of the same guest takes ~0.5 s here.
3. steady round: the whole engine round (reconcile with libvirt, enforce heartbeats and
   wallclock, settle, decide) with 128 running VMs of 10 machinetypes on the test driver and
   nothing to create: CPU per round. Goal < 20 ms (the issue's decision-round goal; the pure
   scheduler alone is measured by bench_decision.py).
4. idle: a daemon with its slots full on the test driver: CPU share of one core and RSS.
   Goals < 1 % and < 100 MB.
5. parallel fill: an empty 8-processor engine on qemu:///system with the tiny TCG guest (the
   host-processor limit lifted for the bench only: this machine has 2 cores): the round that
   starts all 8, against a bare parallel createXML of the same 8 domains (8 threads, a
   connection each) in the same run. Goal: within 1.3x of the bare figure (the issue measured
   8.7 s one createXML after another, 1.8 s in parallel on separate connections).

Usage: python tests/bench/bench_factory.py [--skip-refill] [--refills N] [--skip-parallel-fill]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.refills import Refills  # noqa: E402
from tests.unit.engine_harness import kernel_file, machinetype_text, make_harness, settings_text  # noqa: E402
from vacfactory.engine import naming  # noqa: E402

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")
GUEST = os.path.join(REPO, "images", "build", "tiny-guest")


def bench_fill() -> bool:
    with tempfile.TemporaryDirectory(prefix="vfbench-") as tmp:
        name = f"vfbfill{os.getpid()}.example.org"
        text = settings_text(name, os.path.join(tmp, "state"), 64, "") + machinetype_text("bench", kernel_file(tmp))
        harness = make_harness(tmp, text, name=name)
        try:
            start = time.perf_counter()
            cpu = time.process_time()
            report = harness.factory.run_round()
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu
            created = len(report.created)
        finally:
            harness.teardown()
    print(f"fill: {created} VMs created on 64 free processors in {elapsed:.2f} s ({cpu:.2f} s CPU) "
          f"(goal < 2 s; Vac's one VM per 60 s cycle needs over an hour)")
    return created == 64 and elapsed < 2.0


def bench_steady_round(rounds: int = 30) -> bool:
    with tempfile.TemporaryDirectory(prefix="vfbench-") as tmp:
        name = f"vfbround{os.getpid()}.example.org"
        kernel = kernel_file(tmp)
        text = settings_text(name, os.path.join(tmp, "state"), 128, "")
        for i in range(10):
            text += machinetype_text(f"vo{i}", kernel, 1 + i % 4, "heartbeat_file = heartbeat\nheartbeat_seconds = 3600\n")
        harness = make_harness(tmp, text, name=name)
        try:
            while len(harness.live()) < 128:  # fill (max_starting_processors may bound a round)
                harness.clock.advance(10)
                harness.factory.run_round()
            live = harness.live()
            samples = []
            for _ in range(rounds):
                harness.clock.advance(10)
                for machine in live:  # every VM heartbeats, so enforcement reads 128 files
                    path = os.path.join(machine.joboutputs_dir, "heartbeat")
                    with open(path, "w") as f:
                        f.write("ok\n")
                    os.utime(path, (harness.clock(), harness.clock()))
                cpu = time.process_time()
                report = harness.factory.run_round()
                samples.append(time.process_time() - cpu)
                if report.created or report.finished or len(harness.live()) != 128:
                    raise RuntimeError(f"the steady round was not steady: {report}")
        finally:
            harness.teardown()
    median = statistics.median(samples) * 1000
    print(f"steady round: 128 running VMs, 10 machinetypes: median {median:.1f} ms CPU, "
          f"max {max(samples) * 1000:.1f} ms over {rounds} rounds (goal < 20 ms)")
    return median < 20.0


def write_daemon_config(tmp: str, name: str, uri: str, domain_type: str, total: int, cmdline: str,
                        kernel: str, initrd: str, cycle: float) -> str:
    path = os.path.join(tmp, "vacfactory.conf")
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            [settings]
            vac_space = bench.example.org
            factory_name = {name}
            state_dir = {tmp}/state
            libvirt_uri = {uri}
            domain_type = {domain_type}
            total_processors = {total}
            mb_per_processor = 256
            cycle_seconds = {cycle}
            overload_per_processor = 100
            nfs_exporter = none
            udp_port = {20000 + os.getpid() % 10000}

            [machinetype bench]
            target_share = 1
            machine_model = vm-raw
            kernel_image = {kernel}
            initrd_image = {initrd}
            kernel_cmdline = {cmdline}
            fizzle_seconds = 1
            backoff_seconds = 1
            """))
    return path


def bench_refill(refills: int) -> bool:
    import libvirt

    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor

    kernel, initrd = os.path.join(GUEST, "vmlinux"), os.path.join(GUEST, "initrd.img")
    if not os.path.exists(kernel):
        print(f"refill: no guest in {GUEST} (run make setup)")
        return False
    name = f"vfbrefill{os.getpid()}.example.org"
    pattern = naming.domain_pattern(name)
    refills_seen = Refills(lambda domain: bool(pattern.match(domain)))

    libvirt.registerErrorHandler(lambda *_: None, None)
    hypervisor = LibvirtHypervisor("qemu:///system")  # starts libvirt's event loop for us
    hypervisor.set_event_callback(refills_seen.on_event)
    hypervisor.list_domains()  # connect, so events flow
    with tempfile.TemporaryDirectory(prefix="vfbench-") as tmp:
        os.chmod(tmp, 0o755)
        config = write_daemon_config(tmp, name, "qemu:///system", "qemu", 2,
                                     "console=ttyS0 quiet panic=-1 vf_lifetime=2", kernel, initrd, 60)
        try:
            refills_seen.run_daemon(config, os.path.join(tmp, "daemon.log"), refills, 20)
        finally:
            for domain in hypervisor.list_domains():
                if pattern.match(domain.name):
                    hypervisor.destroy(domain.uuid)
    gaps = refills_seen.gaps()
    bare = bare_create(kernel, initrd)
    hypervisor.close()
    if not gaps:
        print("refill: no refills observed (see the daemon log)")
        return False
    print(f"refill: guest powered off -> next domain started: median {statistics.median(gaps):.2f} s, "
          f"max {max(gaps):.2f} s over {len(gaps)} refills (goal: median < 1 s; "
          f"a bare createXML here: {bare:.2f} s; Vac: up to 60 s plus its cycle)")
    return statistics.median(gaps) < 1.0


def bare_create(kernel: str, initrd: str) -> float:
    """How long libvirt itself takes to start this guest (the floor for any refill)."""
    import uuid

    from vacfactory.hypervisor.base import VMSpec
    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor

    hypervisor = LibvirtHypervisor("qemu:///system")
    spec = VMSpec(name=f"vfbench-bare-{os.getpid()}", uuid=str(uuid.uuid4()), vcpus=1, memory_mib=256,
                  domain_type="qemu", kernel=kernel, initrd=initrd, cmdline="console=ttyS0 quiet panic=-1")
    start = time.perf_counter()
    hypervisor.create(spec)
    elapsed = time.perf_counter() - start
    hypervisor.destroy(spec.uuid)
    hypervisor.close()
    return elapsed


def bench_parallel_fill(vms: int = 8) -> bool:
    """The engine's fill of ``vms`` real domains vs a bare parallel createXML of the same ones."""
    kernel, initrd = os.path.join(GUEST, "vmlinux"), os.path.join(GUEST, "initrd.img")
    if not os.path.exists(kernel):
        print(f"parallel fill: no guest in {GUEST} (run make setup)")
        return False
    with tempfile.TemporaryDirectory(prefix="vfbench-") as tmp:
        os.chmod(tmp, 0o755)  # qemu writes the console logs in the machine directories
        engine_fill(tmp, "warm", vms, kernel, initrd)  # slot ports bound, XML shape validated
        specs, _ = engine_fill(tmp, "a", vms, kernel, initrd)
        bare_first = bare_parallel_create(specs)
        _, engine = engine_fill(tmp, "b", vms, kernel, initrd)
        bare = min(bare_first, bare_parallel_create(specs))
    ratio = engine / bare
    print(f"parallel fill: {vms} TCG domains started by one engine round in {engine:.2f} s; a bare parallel "
          f"createXML of the same domains {bare:.2f} s: {ratio:.2f}x (goal <= 1.3x; one createXML after "
          f"another: ~{vms * 1.1:.0f} s here)")
    return ratio <= 1.3


def engine_fill(tmp: str, tag: str, vms: int, kernel: str, initrd: str, uri: str = "qemu:///system",
                domain_type: str = "qemu"):
    """An in-process engine on qemu:///system fills ``vms`` processors in one round; returns the
    specs it started and the round's wall time. Its domains are destroyed afterwards."""
    import random

    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import ConfigSources, ConfigWatcher
    from vacfactory.daemon import network_spec
    from vacfactory.engine.accountant import Accountant
    from vacfactory.engine.boundary import VMBoundary
    from vacfactory.engine.factory import EngineParts, Environment, Factory
    from vacfactory.engine.vmbuild import VMBuilder
    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
    from vacfactory.state.machines import MachineStore

    directory = os.path.join(tmp, tag)
    os.makedirs(directory)
    os.chmod(directory, 0o755)
    name = f"vfbpar{tag}{os.getpid()}.example.org"
    config = write_daemon_config(directory, name, uri, domain_type, vms,
                                 "console=ttyS0 quiet panic=-1", kernel, initrd, 60)
    # the host-processor limit lifted for the bench only: 8 TCG guests on this 2-core machine
    host = HostFacts(fqdn="bench.example.org", cpu_count=64, mem_total_mb=1 << 20)
    watcher = ConfigWatcher(ConfigSources.for_main_file(config), host_facts=host)
    hypervisor = LibvirtHypervisor(uri)
    if domain_type != "test":
        hypervisor.ensure_network(network_spec(watcher.current))
    specs = []
    create = hypervisor.create

    def recording_create(spec):
        specs.append(spec)
        create(spec)

    hypervisor.create = recording_create
    state_dir = watcher.current.settings.state_dir
    factory = Factory(EngineParts(config_source=watcher, hypervisor=hypervisor, store=MachineStore(state_dir),
                                  builder=VMBuilder(state_dir), boundary=VMBoundary(),
                                  accountant=Accountant.for_config(watcher)),
                      Environment(host_processors=64, load_average=lambda: 0.0, rng=random.Random(1)))
    factory.start()
    try:
        began = time.perf_counter()
        report = factory.run_round()
        elapsed = time.perf_counter() - began
        if len(report.created) != vms:
            raise RuntimeError(f"the engine created {len(report.created)} of {vms}: {report}")
    finally:
        destroy_all(hypervisor, [spec.uuid for spec in specs])
        hypervisor.close()
    return specs, elapsed


def bare_parallel_create(specs) -> float:
    """Wall time of a createXML of every spec at once, each from its own thread and connection."""
    import libvirt

    from vacfactory.hypervisor.domainxml import domain_xml
    from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor

    connections = [libvirt.open("qemu:///system") for _ in specs]
    errors = []

    def start(conn, spec) -> None:
        try:
            conn.createXML(domain_xml(spec), 0)
        except libvirt.libvirtError as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=pair) for pair in zip(connections, specs)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    hypervisor = LibvirtHypervisor("qemu:///system")
    destroy_all(hypervisor, [spec.uuid for spec in specs])
    hypervisor.close()
    for conn in connections:
        conn.close()
    if errors:
        raise RuntimeError(f"bare createXML failed: {errors[0]}")
    return elapsed


def destroy_all(hypervisor, uuids) -> None:
    threads = [threading.Thread(target=hypervisor.destroy, args=(uuid,)) for uuid in uuids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def bench_idle(seconds: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="vfbench-") as tmp:
        name = f"vfbidle{os.getpid()}.example.org"
        config = write_daemon_config(tmp, name, "test:///default", "test", 8, "quiet", kernel_file(tmp), "", 10)
        config_text = open(config).read().replace("initrd_image = \n", "")
        with open(config, "w") as f:
            f.write(config_text)
        log = open(os.path.join(tmp, "daemon.log"), "w")
        daemon = subprocess.Popen([VACFACTORY, "--config", config, "run"], stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(5)  # start-up and the first fill
            before = cpu_seconds(daemon.pid)
            time.sleep(seconds)
            used = cpu_seconds(daemon.pid) - before
            rss = rss_mb(daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    print(f"idle daemon (8 running VMs, test driver): {100 * used / seconds:.2f} % of one core, "
          f"RSS {rss:.0f} MB over {seconds:.0f} s (goals < 1 %, < 100 MB)")
    return 100 * used / seconds < 1.0 and rss < 100


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-refill", action="store_true")
    parser.add_argument("--refills", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--skip-parallel-fill", action="store_true")
    parser.add_argument("--only-parallel-fill", action="store_true")
    args = parser.parse_args()
    if args.only_parallel_fill:
        return 0 if bench_parallel_fill() else 1
    met = [bench_fill(), bench_steady_round()]
    if not args.skip_refill:
        met.append(bench_refill(args.refills))
    if not args.skip_parallel_fill:
        met.append(bench_parallel_fill())
    met.append(bench_idle(args.idle_seconds))
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
