"""`make demo`: run a real factory on conf/demo.conf with a live table, then a summary.

The factory runs in this process (the same Daemon `vacfactory run` uses), with its state in
demo-state/ (or --state-dir) and its log in vacfactory.log there. After --seconds the demo
drains the factory the way an admin would (`vacfactory drain --at +10s`: shutdown_time in the
runtime override file), so running pilots see the earlier shutdowntime_job in their MJF and
stop with their own outcome, waits until every VM has ended and been accounted, stops the
nfs-ganesha the factory started for its NFS machinetype (it would go on holding
169.254.169.254:2049), and prints what happened. While it runs, the factory's status page is
at the address it prints first (metrics_port in conf/demo.conf).

When a container runtime is present (Podman, installed by `make setup`), the demo starts
Podman's Docker-compatible API service on a private socket with a busybox image (the tests'
lab, tests/podman_lab.py), and the configuration gains a third machinetype, demo-container:
the same pilot in a container (machine_model = docker), its MJF and joboutputs bind-mounted.
The service and its containers are removed at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import subprocess
import sys
import threading
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.podman_lab import BUSYBOX, PodmanService, missing_tools  # noqa: E402
from vacfactory.atomic import atomic_write_text  # noqa: E402
from vacfactory.cli.machines import format_row, machine_rows  # noqa: E402
from vacfactory.config.loader import ConfigSources  # noqa: E402
from vacfactory.daemon import Daemon, configure_logging  # noqa: E402
from vacfactory.vmio.exports import GaneshaExporter  # noqa: E402

GUEST_DIR = os.path.join(REPO, "images", "build", "tiny-guest")
PILOT = os.path.join(REPO, "contextualization", "demo-pilot.sh")
#: the drain's shutdown_time is this far ahead: pilots (heartbeat every 5 s) stop by themselves
#: before it plus grace_seconds (conf/demo.conf), when the factory would kill them
DRAIN_SECONDS = 10
#: with --state-dir: read after the configuration, it sets state_dir (kept in the state directory)
STATE_DIR_CONF = "demo-state-dir.conf"
#: with a container runtime: the demo-container machinetype, read after the configuration
#: (in demo-state/, conf/demo.conf's state_dir: git-ignored)
CONTAINERS_CONF = os.path.join(REPO, "demo-state", "demo-containers.conf")


def config_sources(config: str, state_dir: Optional[str], containers: Optional[str] = None) -> ConfigSources:
    """The sources `vacfactory --config CONFIG run` reads; with ``state_dir``, plus a file read
    after CONFIG that moves the state directory there (the runtime override follows it); with
    ``containers`` (a runtime's socket), plus the demo-container machinetype on it."""
    sources = ConfigSources.for_main_file(config)
    late = []
    if state_dir:
        state_dir = os.path.abspath(state_dir)
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
        late.append(os.path.join(state_dir, STATE_DIR_CONF))
        atomic_write_text(late[-1], f"# written by tools/demo.py --state-dir\n[settings]\nstate_dir = {state_dir}\n")
    if containers:
        late.append(os.path.join(state_dir, "demo-containers.conf") if state_dir else CONTAINERS_CONF)
        os.makedirs(os.path.dirname(late[-1]), mode=0o755, exist_ok=True)
        atomic_write_text(late[-1], container_machinetype(containers))
    return dataclasses.replace(sources, late_files=sources.late_files + tuple(late))


def container_machinetype(socket: str) -> str:
    """demo-container: the demo pilot in a busybox container, as demo-ok does in a VM."""
    return f"""# written by tools/demo.py: a container runtime is present
[settings]
container_socket = {socket}
container_stop_seconds = 5

[machinetype demo-container]
target_share = 1
machine_model = docker
root_image = docker://{BUSYBOX}
user_data = demo-pilot.sh
user_data_option_outcome = 200 Success
user_data_option_lifetime = 30
user_data_option_heartbeat_interval = 5
heartbeat_file = heartbeat
heartbeat_seconds = 60
fizzle_seconds = 15
backoff_seconds = 60
max_wallclock_seconds = 600
accounting_fqan = /demo/Role=NULL/Capability=NULL
"""


def start_container_runtime() -> Optional[PodmanService]:
    """Podman's API service with the busybox image, or None without Podman (a VM-only demo)."""
    if missing_tools():
        return None
    service = PodmanService()
    try:
        service.start()
        service.import_busybox()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        print(f"no containers in this demo: the Podman service did not start: {error}", file=sys.stderr)
        service.stop()
        return None
    return service


def stop_nfs_server(daemon: Daemon) -> str:
    """Stop the nfs-ganesha the factory started for NFS VMs, now that none is left to serve
    (the factory never stops it: it keeps serving running VMs across factory restarts)."""
    exporter = daemon.boundary.exporter
    if not isinstance(exporter, GaneshaExporter) or exporter.running_pid() is None:
        return ""
    exporter.stop_server()
    return "nfs-ganesha stopped"


def link_machinetype_files(daemon: Daemon) -> None:
    """Put the guest kernel, initrd and pilot where Vac's rules look: machinetypes/NAME/files/."""
    for name in daemon.config.machinetypes:
        files = os.path.join(daemon.config.settings.state_dir, "machinetypes", name, "files")
        os.makedirs(files, exist_ok=True)
        for source in (os.path.join(GUEST_DIR, "vmlinux"), os.path.join(GUEST_DIR, "initrd.img"), PILOT):
            target = os.path.join(files, os.path.basename(source))
            if os.path.lexists(target):
                os.unlink(target)
            os.symlink(source, target)


def backing_off(daemon: Daemon) -> dict:
    """machinetype -> seconds of backoff left, from the engine's last metrics snapshot (built in
    the engine thread after each round, so reading it here is safe)."""
    snapshot = daemon.metrics_snapshot
    if snapshot is None:
        return {}
    return {m.machinetype: m.backoff_remaining_seconds for m in snapshot.machinetypes if m.in_backoff}


def table(daemon: Daemon, started: float, events: "collections.Counter[str]") -> str:
    factory = daemon.factory
    now = time.time()
    rows = machine_rows(dict(factory.machines), factory.config.settings.total_processors)
    lines = [f"vacfactory demo: {int(now - started)} s, factory {factory.config.settings.factory_name}"]
    report = factory.last_report
    if report is not None and report.decision is not None:
        lines.append(f"last decision: {report.decision.reason}")
    backoff = backing_off(daemon)
    lines.append("backing off: " + (", ".join(f"{name} ({left:.0f} s left)" for name, left in sorted(backoff.items()))
                                    if backoff else "-"))
    lines.append("")
    lines.extend(format_row(row, now) for row in rows)
    lines.append("")
    lines.append("so far: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())) if events else "so far: -")
    return "\n".join(lines)


def summarize(daemon: Daemon, since: float, backoffs: "dict[str, float]", drained_at: int) -> str:
    machines = [m for m in daemon.factory.machines.values() if m.record.created >= since]
    outcomes = collections.Counter(m.finished.outcome for m in machines if m.finished)
    messages = collections.Counter(m.finished.message or m.finished.reason for m in machines if m.finished)
    accounted = sum(1 for m in machines if m.accounted and m.accounted.archive)
    transports = collections.Counter((m.record.machinetype, m.record.mjf_transport) for m in machines)
    containers = sum(1 for m in machines if m.record.machine_model == "docker")
    lines = [
        "",
        "demo summary",
        f"  VMs created: {len(machines) - containers}",
        f"  containers created: {containers}",
        "  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        f"  APEL records archived: {accounted}",
        "  MJF: " + ", ".join(f"{name} over {transport} ({count} VMs)"
                              for (name, transport), count in sorted(transports.items())),
        "  shutdown messages:",
    ]
    lines.extend(f"    {count:3d} x {message}" for message, count in messages.most_common())
    backed_off = ", ".join(f"{name} (up to {left:.0f} s)" for name, left in sorted(backoffs.items()))
    lines.append("  backed off: " + (backed_off or "nothing"))
    if drained_at:
        early = sum(1 for m in machines if m.finished and m.finished.reason == "shutdown_message"
                    and "shutdowntime_job has passed: stopping early" in _console(m))
        killed = sum(1 for m in machines if m.finished and m.finished.reason == "shutdown_time")
        lines.append(f"  drain: shutdown_time {time.strftime('%H:%M:%S', time.localtime(drained_at))}; "
                     f"{early} VMs saw it in their MJF and stopped early, {killed} were stopped by the factory")
    logged = sum(1 for m in machines if _has_syslog(m))
    lines.append(f"  syslog: {logged} VMs sent syslog lines to the factory (`vacfactory machine UUID` shows them)")
    lines.append(f"  state: {daemon.config.settings.state_dir}  log: {daemon.config.settings.state_dir}/vacfactory.log")
    return "\n".join(lines)


def _has_syslog(machine) -> bool:
    try:
        return os.path.getsize(os.path.join(machine.path, "syslog", "messages")) > 0
    except OSError:
        return False


def _console(machine) -> str:
    try:
        with open(machine.console_log, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def drain(daemon: Daemon) -> int:
    """What `vacfactory drain --at +10s` does: shutdown_time in the runtime override file."""
    path = os.path.join(daemon.config.settings.state_dir, "runtime.conf")
    when = int(time.time()) + DRAIN_SECONDS
    atomic_write_text(path, f"[settings]\nshutdown_time = {when}\n")
    daemon.factory.wake.set()
    return when


def status_page_url(daemon: Daemon) -> Optional[str]:
    """The status page's address, once the daemon's admin listener is up (metrics_port)."""
    if daemon.metrics is None:
        return None
    host, port = daemon.metrics.address
    return f"http://{host}:{port}/"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "conf", "demo.conf"))
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--state-dir", help="the factory's state directory instead of the configuration's "
                        "state_dir (tests run the demo in a temporary directory)")
    args = parser.parse_args()
    for needed in ("vmlinux", "initrd.img"):
        if not os.path.exists(os.path.join(GUEST_DIR, needed)):
            print(f"missing {GUEST_DIR}/{needed}: run images/build-tiny-guest.sh (make setup)", file=sys.stderr)
            return 1
    runtime = start_container_runtime()
    try:
        return run_demo(args, runtime)
    finally:
        if runtime is not None:
            runtime.stop()  # the service, and any container of the demo still there


def run_demo(args: argparse.Namespace, runtime: Optional[PodmanService]) -> int:
    daemon = Daemon(config_sources(args.config, args.state_dir, runtime.socket_path if runtime else None))
    state_dir = daemon.config.settings.state_dir
    os.makedirs(state_dir, exist_ok=True)
    try:
        os.unlink(os.path.join(state_dir, "runtime.conf"))  # undrain a previous demo
    except FileNotFoundError:
        pass
    configure_logging("INFO", os.path.join(state_dir, "vacfactory.log"))
    link_machinetype_files(daemon)
    daemon.install_signal_handlers()
    daemon.start()
    page = status_page_url(daemon)
    print(f"status page: {page} (or `vacfactory -c {args.config} top`)" if page
          else "status page: none (metrics_port is 0 or its port is taken: see the log)", flush=True)
    started = time.time()
    events: "collections.Counter[str]" = collections.Counter()
    worker = threading.Thread(target=daemon.run, name="engine", daemon=True)
    worker.start()
    interactive = sys.stdout.isatty()
    draining = False
    drained_at = 0
    backoffs: "dict[str, float]" = {}
    try:
        while worker.is_alive():
            time.sleep(2)
            for name, left in backing_off(daemon).items():
                backoffs[name] = max(backoffs.get(name, 0.0), left)
            events.clear()
            for m in list(daemon.factory.machines.values()):
                if m.record.created >= started:
                    events["created"] += 1
                    if m.finished:
                        events[m.finished.outcome] += 1
            text = table(daemon, started, events) + (f"\nstatus page: {page}" if page else "")
            print(("\033[H\033[2J" + text) if interactive else text + "\n", flush=True)
            if not draining and time.time() - started >= args.seconds:
                drained_at = drain(daemon)
                print(f"time is up: draining the factory (shutdown_time = now + {DRAIN_SECONDS} s, "
                      "published in the running VMs' machine/job features)", flush=True)
                draining = True
            if draining and not any(m.live or m.cleaned is None for m in daemon.factory.machines.values()):
                break
    except KeyboardInterrupt:
        pass
    daemon.stop()
    worker.join(timeout=30)
    daemon.close()
    try:
        os.unlink(os.path.join(state_dir, "runtime.conf"))
    except FileNotFoundError:
        pass
    # VMs left running (the demo was interrupted) keep their NFS mounts and so their server
    stopped = "" if any(m.live for m in daemon.factory.machines.values()) else stop_nfs_server(daemon)
    print(summarize(daemon, started, backoffs, drained_at))
    if runtime is None:
        print("  containers: none (no Podman here: `make setup` installs it)")
    if stopped:
        print(f"  {stopped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
