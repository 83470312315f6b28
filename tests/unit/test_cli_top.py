"""`vacfactory top` in a real terminal (tmux, 80x24) against a real daemon on libvirt's test
driver: it shows the numbers of /status.json, follows a VM ending, keeps hostile text from
driving the terminal, and quits on `q`; without a terminal it prints one frame."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.unit.view_harness import ViewDaemon, write_config
from vacfactory.cli.top import frame

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ESCAPES = "\x1b]2;pwned\x07\x1b[2J\x9b31m"


class Tmux:
    """A private tmux server (its own socket) with one 80x24 session."""

    def __init__(self, command: list) -> None:
        self.socket = f"vfview{os.getpid()}"
        self.tmux(["new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
                   " ".join(subprocess.list2cmdline([w]) for w in command)])

    def tmux(self, args: list) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=10, cwd=ROOT)

    def screen(self) -> list:
        return self.tmux(["capture-pane", "-p", "-t", "top"]).stdout.splitlines()

    def wait_screen(self, check, what: str, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        lines: list = []
        while time.monotonic() < deadline:
            lines = self.screen()
            if check(lines):
                return lines
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n" + "\n".join(lines))

    def alive(self) -> bool:
        return self.tmux(["has-session", "-t", "top"]).returncode == 0

    def close(self) -> None:
        self.tmux(["kill-server"])


@pytest.fixture
def view(tmp_path):
    made = []

    def make(processors: int = 4) -> ViewDaemon:
        made.append(ViewDaemon(write_config(str(tmp_path), processors=processors)))
        return made[-1]

    yield make
    for v in made:
        v.close()


def top_command(v: ViewDaemon, *extra: str) -> list:
    return [sys.executable, "-m", "vacfactory.cli.main", "-c", v.daemon.watcher.sources.main_file, "top", *extra]


def test_top_in_tmux_shows_the_status_numbers_follows_a_vm_ending_and_quits_on_q(view):
    v = view(processors=4)
    v.round()
    doc = v.status()
    term = Tmux(top_command(v, "-n", "0.3"))
    try:
        lines = term.wait_screen(lambda ls: any("4/4 processors busy" in line for line in ls), "the summary")
        text = "\n".join(lines)
        assert all(len(line) <= 80 for line in lines) and len(lines) <= 24
        for mt in doc["machinetypes"]:
            (row,) = [line for line in lines if line.startswith(mt["name"] + " ")]
            assert row.split()[1:6] == [f"{100 * mt['target_share']:.0f}%", f"{100 * mt['share']:.0f}%",
                                         f"{100 * mt['space_share']:.0f}%", str(mt["running_vms"]),
                                         str(mt["running_processors"])]
        for slot in doc["slots"]:
            assert f"{slot['slot']:<5}{slot['name'].split('.')[0]:<16}{slot['machinetype']:<15}Running" in text

        # a VM ends with escape sequences in its message: top shows the code, the terminal is unmoved
        ended = v.live()[0]
        v.power_off(ended, "300 " + ESCAPES)
        v.clock.advance(60)
        v.round()
        lines = term.wait_screen(lambda ls: any(" 300:1" in line for line in ls), "the ended VM's code")
        title = term.tmux(["display-message", "-p", "-t", "top", "#{pane_title}"]).stdout
        assert "pwned" not in title and lines[0].startswith("vacfactory top - ")

        term.tmux(["send-keys", "-t", "top", "q"])
        deadline = time.monotonic() + 10
        while term.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not term.alive(), "q did not quit"
    finally:
        term.close()


def test_top_on_80x24_with_more_slots_than_rows_says_how_many_are_hidden(view):
    v = view(processors=20)
    v.round()
    result = subprocess.run(top_command(v), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
    shown = sum(1 for line in lines if " Running " in line or " Starting " in line)
    assert lines[-1] == f"... {20 - shown} more slots (a taller terminal shows them)"


def test_a_frame_replaces_every_control_character_from_the_factory():
    doc = {"factory": "f" + ESCAPES, "processors": {"busy": 1, "total": 1, "free": 0},
           "engine": {"decision": ESCAPES, "backoffs": {ESCAPES: {}}},
           "machinetypes": [{"name": ESCAPES, "outcomes_since_start": {ESCAPES: 1}}],
           "space": [{"name": ESCAPES, "state": "unknown", "processors": {ESCAPES: 1}}],
           "slots": [{"slot": 0, "name": ESCAPES, "machinetype": ESCAPES, "state": "Shut down",
                      "shutdown_message": "300 " + ESCAPES}]}
    lines = frame(doc, 200, 24, 0.0)
    assert len(lines) == 8
    assert not [line for line in lines if any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in line)]


def test_top_without_the_listener_says_why(tmp_path):
    config = write_config(str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "vacfactory.cli.main", "-c", config, "top"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 69 and "is the daemon running?" in result.stderr
    assert result.stderr.count("\n") == 1
