"""`make demo`: run a real factory on conf/demo.conf with a live table, then a summary.

The factory runs in this process (the same Daemon `vacfactory run` uses), with its state in
demo-state/ and its log in demo-state/vacfactory.log. After --seconds the demo drains the
factory the way an admin would (shutdown_time = now in the runtime override file), waits
until every VM has ended and been accounted, and prints what happened.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vacfactory.cli.machines import format_row, machine_rows  # noqa: E402
from vacfactory.config.loader import ConfigSources  # noqa: E402
from vacfactory.daemon import Daemon, configure_logging  # noqa: E402

GUEST_DIR = os.path.join(REPO, "images", "build", "tiny-guest")
PILOT = os.path.join(REPO, "contextualization", "demo-pilot.sh")


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


def table(daemon: Daemon, started: float, events: "collections.Counter[str]") -> str:
    factory = daemon.factory
    now = time.time()
    rows = machine_rows(dict(factory.machines), factory.config.settings.total_processors)
    lines = [f"vacfactory demo: {int(now - started)} s, factory {factory.config.settings.factory_name}"]
    report = factory.last_report
    if report is not None and report.decision is not None:
        lines.append(f"last decision: {report.decision.reason}")
    lines.append("")
    lines.extend(format_row(row, now) for row in rows)
    lines.append("")
    lines.append("so far: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())) if events else "so far: -")
    return "\n".join(lines)


def summarize(daemon: Daemon, since: float) -> str:
    machines = [m for m in daemon.factory.machines.values() if m.record.created >= since]
    outcomes = collections.Counter(m.finished.outcome for m in machines if m.finished)
    messages = collections.Counter(m.finished.message or m.finished.reason for m in machines if m.finished)
    accounted = sum(1 for m in machines if m.accounted and m.accounted.archive)
    lines = [
        "",
        "demo summary",
        f"  VMs created: {len(machines)}",
        f"  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        f"  APEL records archived: {accounted}",
        "  shutdown messages:",
    ]
    lines.extend(f"    {count:3d} x {message}" for message, count in messages.most_common())
    lines.append(f"  state: {daemon.config.settings.state_dir}  log: {daemon.config.settings.state_dir}/vacfactory.log")
    return "\n".join(lines)


def drain(daemon: Daemon) -> None:
    """What `vacfactory drain` does: shutdown_time = now in the runtime override file."""
    path = os.path.join(daemon.config.settings.state_dir, "runtime.conf")
    with open(path, "w") as f:
        f.write(f"[settings]\nshutdown_time = {int(time.time())}\n")
    daemon.factory.wake.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "conf", "demo.conf"))
    parser.add_argument("--seconds", type=float, default=180)
    args = parser.parse_args()
    for needed in ("vmlinux", "initrd.img"):
        if not os.path.exists(os.path.join(GUEST_DIR, needed)):
            print(f"missing {GUEST_DIR}/{needed}: run images/build-tiny-guest.sh (make setup)", file=sys.stderr)
            return 1
    daemon = Daemon(ConfigSources.for_main_file(args.config))
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
    started = time.time()
    events: "collections.Counter[str]" = collections.Counter()
    worker = threading.Thread(target=daemon.run, name="engine", daemon=True)
    worker.start()
    interactive = sys.stdout.isatty()
    draining = False
    try:
        while worker.is_alive():
            time.sleep(2)
            events.clear()
            for m in list(daemon.factory.machines.values()):
                if m.record.created >= started:
                    events["created"] += 1
                    if m.finished:
                        events[m.finished.outcome] += 1
            text = table(daemon, started, events)
            print(("\033[H\033[2J" + text) if interactive else text + "\n", flush=True)
            if not draining and time.time() - started >= args.seconds:
                print("time is up: draining the factory (shutdown_time = now)", flush=True)
                drain(daemon)
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
    print(summarize(daemon, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
