"""`make demo`: run a real factory on conf/demo.conf with a live table, then a summary.

The factory runs in this process (the same Daemon `vacfactory run` uses), with its state in
demo-state/ (or --state-dir) and its log in vacfactory.log there. After --seconds the demo
drains the factory the way an admin would (`vacfactory drain --at +10s`: shutdown_time in the
runtime override file), so running pilots see the earlier shutdowntime_job in their MJF and
stop with their own outcome, waits until every VM has ended and been accounted, stops the
nfs-ganesha the factory started for its NFS machinetype (it would go on holding
169.254.169.254:2049), and prints what happened. While it runs, the factory's status page is
at the address it prints first (metrics_port in conf/demo.conf).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import threading
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

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


def config_sources(config: str, state_dir: Optional[str]) -> ConfigSources:
    """The sources `vacfactory --config CONFIG run` reads; with ``state_dir``, plus a file read
    after CONFIG that moves the state directory there (the runtime override follows it)."""
    sources = ConfigSources.for_main_file(config)
    if not state_dir:
        return sources
    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    late = os.path.join(state_dir, STATE_DIR_CONF)
    atomic_write_text(late, f"# written by tools/demo.py --state-dir\n[settings]\nstate_dir = {state_dir}\n")
    return dataclasses.replace(sources, late_files=sources.late_files + (late,))


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
    lines = [
        "",
        "demo summary",
        f"  VMs created: {len(machines)}",
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
    daemon = Daemon(config_sources(args.config, args.state_dir))
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
    if stopped:
        print(f"  {stopped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
