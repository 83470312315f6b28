"""`make demo`, shortened: tools/demo.py on conf/demo.conf with real TCG guests, as the Makefile
runs it (`tools/demo.py --config conf/demo.conf --seconds N`), in a temporary state directory
(--state-dir) instead of the checkout's demo-state/.

The demo must exit 0 and print its summary; VMs of both machinetypes are created, run and end
with their own shutdown_message (demo-ok over HTTP with 200, demo-nowork over NFS from
nfs-ganesha with 300); a slot is refilled; and afterwards nothing of the demo is left: no domain
in libvirt, no disk, no NFS export, no nfs-ganesha on 169.254.169.254:2049.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import pytest

from vacfactory.engine import naming
from vacfactory.hypervisor.libvirt_hv import LibvirtHypervisor
from vacfactory.state.machines import Machine, MachineStore
from vacfactory.vmio.exports import GaneshaExporter
from tests.integration.realfactory import REPO, domains_named, ganesha_exports, nfs_port_holder, read

pytestmark = pytest.mark.integration

DEMO_CONF = str(REPO / "conf" / "demo.conf")
DEMO_FACTORY = "factory1.demo.vacfactory.invalid"  # conf/demo.conf's factory_name
#: short, but long enough for demo-ok's first VMs (lifetime 40 s) to be drained while they work
DEMO_SECONDS = 40


@pytest.fixture(scope="module")
def demo(tiny_guest):
    """Run the demo once; (its output, its machines, how long it took, the state directory)."""
    if os.path.realpath(tiny_guest.directory) != os.path.realpath(REPO / "images" / "build" / "tiny-guest"):
        pytest.fail("tools/demo.py runs the tiny guest of images/build/tiny-guest only")
    holder = nfs_port_holder()
    if holder:
        pytest.fail(f"another NFS server holds 169.254.169.254:2049, where the demo's nfs-ganesha must bind: {holder}")
    leftover = domains_named(DEMO_FACTORY)
    if leftover:
        pytest.fail(f"domains of another demo run exist: {leftover}")
    workdir = tempfile.mkdtemp(prefix="vfdemo-")
    os.chmod(workdir, 0o755)  # qemu (libvirt-qemu) must reach the disks and console logs
    state_dir = os.path.join(workdir, "state")
    began = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "tools" / "demo.py"), "--config", DEMO_CONF, "--seconds", str(DEMO_SECONDS),
             "--state-dir", state_dir],
            cwd=str(REPO), capture_output=True, text=True, timeout=DEMO_SECONDS + 300,
        )
        elapsed = time.monotonic() - began
        machines = sorted(MachineStore(state_dir, create=False).load_all().values(), key=lambda m: m.record.created)
        yield done, machines, elapsed, state_dir
    finally:
        # a failed run must not leave VMs or ganesha behind for the next test
        hypervisor = LibvirtHypervisor("qemu:///system")
        try:
            pattern = naming.domain_pattern(DEMO_FACTORY)
            for domain in hypervisor.list_domains():
                if pattern.match(domain.name):
                    hypervisor.destroy(domain.uuid)
        finally:
            hypervisor.close()
        ganesha = os.path.join(state_dir, "ganesha")
        GaneshaExporter(os.path.join(ganesha, "ganesha.conf"), os.path.join(ganesha, "ganesha.pid"),
                        os.path.join(ganesha, "ganesha.log")).stop_server()
        shutil.rmtree(workdir, ignore_errors=True)


def output(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout (tail)\n{done.stdout[-4000:]}\n--- stderr (tail)\n{done.stderr[-4000:]}"


def by_type(machines: List[Machine]) -> Dict[str, List[Machine]]:
    found: Dict[str, List[Machine]] = collections.defaultdict(list)
    for m in machines:
        found[m.record.machinetype].append(m)
    return found


def test_demo_exits_0_and_prints_its_summary(demo):
    done, machines, elapsed, state_dir = demo
    assert done.returncode == 0, output(done)
    print(f"the demo took {elapsed:.0f} s")
    assert "vacfactory demo:" in done.stdout, output(done)  # the live table
    assert "status page: http://127.0.0.1:9105/" in done.stdout, output(done)
    summary = done.stdout[done.stdout.rfind("demo summary"):]
    print(summary)
    assert done.stdout.count("demo summary") == 1, output(done)
    created = re.search(r"VMs created: (\d+)", summary)
    containers = re.search(r"containers created: (\d+)", summary)
    assert created and containers and int(created.group(1)) + int(containers.group(1)) == len(machines), summary
    assert int(created.group(1)) >= 2, summary
    # Podman is on every machine `make setup` prepared: the demo runs its pilot in a container too
    assert int(containers.group(1)) >= 1 and "demo-container over bind" in summary, summary
    assert re.search(r"APEL records archived: \d+", summary), summary
    assert "shutdown messages:" in summary and "drain: shutdown_time" in summary, summary
    assert "demo-ok over http" in summary and "demo-nowork over nfs" in summary, summary
    assert f"state: {state_dir}" in summary, summary
    assert "Traceback" not in done.stdout + done.stderr + read(os.path.join(state_dir, "vacfactory.log"))


def test_demo_vms_run_and_end_with_their_own_shutdown_message_over_http_and_nfs(demo):
    done, machines, _, _ = demo
    assert machines, output(done)
    types = by_type(machines)
    for m in machines:
        assert m.started is not None and m.finished is not None, f"{m.name} did not run to its end"
        assert m.accounted is not None and m.cleaned is not None, f"{m.name} was not accounted and cleaned"
    # demo-nowork: MJF over NFS, nothing to do: 300, its slot goes to demo-ok (backoff)
    nfs = types["demo-nowork"]
    assert nfs, f"no demo-nowork VM: {[m.record.machinetype for m in machines]}"
    first = nfs[0]
    assert first.record.mjf_transport == "nfs"
    console = read(first.console_log)
    assert f"PILOT: mounted 169.254.169.254:/{first.uuid}/machinefeatures" in console, console
    assert (first.finished.reason, first.finished.code, first.finished.text) == \
        ("shutdown_message", 300, "Nothing to do"), first.finished
    assert first.finished.outcome == "abort"
    # demo-ok: MJF over HTTP, works until the drain's shutdowntime_job and ends with 200
    ok = [m for m in types["demo-ok"] if m.finished.reason == "shutdown_message"]
    assert ok, [(m.name, m.finished) for m in types["demo-ok"]]
    assert all(m.record.mjf_transport == "http" for m in types["demo-ok"])
    assert all((m.finished.code, m.finished.outcome) == (200, "success") for m in ok), [m.finished for m in ok]
    assert any(m.finished.cpu_seconds > 0 for m in machines)
    # demo-container: the same pilot in a container, MJF and joboutputs bind-mounted
    containers = types["demo-container"]
    assert containers and all(m.record.machine_model == "docker" for m in containers), containers
    assert all(m.finished.code == 200 and m.finished.outcome == "success" for m in containers), \
        [m.finished for m in containers]


def test_demo_refills_a_slot_when_its_vm_ends(demo):
    _, machines, _, _ = demo
    slots: Dict[int, List[Machine]] = collections.defaultdict(list)
    for m in machines:
        slots[m.record.slot].append(m)
    refills = [(previous.name, following.name) for ms in slots.values() for previous, following in zip(ms, ms[1:])
               if previous.finished and following.record.created >= previous.finished.end_time]
    assert refills, [(m.record.slot, m.name, m.record.created, m.finished) for m in machines]


def test_demo_leaves_nothing_behind(demo):
    _, machines, _, state_dir = demo
    assert domains_named(DEMO_FACTORY) == [], "the demo's domains are gone from libvirt"
    for m in machines:
        assert not os.path.exists(m.disks_dir) or os.listdir(m.disks_dir) == [], f"{m.name} left disks behind"
    assert ganesha_exports(state_dir) == [], "every NFS export was withdrawn"
    assert nfs_port_holder() is None, "the demo stopped its nfs-ganesha"
    assert not os.path.exists(os.path.join(state_dir, "runtime.conf")), "the demo removed its drain"
